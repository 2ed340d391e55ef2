"""Distill an AdaSDE predictor (per-step solver coefficients) for a pretrained diffusion model."""

# ruff: noqa: E402 -- torch_utils.cli comes first: the thread policy must be set before torch loads OpenMP.
from torch_utils import cli

cli.apply_thread_policy()
cli.apply_memory_policy()

import glob
import json
import os
import re
import sys
import zipfile

import click

import solvers
from dnnlib.util import EasyDict, Logger
from solvers.distill import TEACHERS
from solvers.learned import make_predictor
from torch_utils import distributed as dist

#----------------------------------------------------------------------------
# Run directory name of the official AdaSDE train.py, with the NFE counted for
# any number of points: <id>-<dataset>-<N>-<nfe>-adasde-dpm-<M>-<sched>[-afs]<desc>


def schedule_tag(schedule_type, schedule_rho):
    return dict(polynomial=f'poly{float(schedule_rho)}', logsnr='logsnr', time_uniform=f'uni{float(schedule_rho)}',
                discrete='discrete', flow='flow')[schedule_type]


def next_run_dir(outdir, desc):
    ids = [int(m.group()) for d in (os.listdir(outdir) if os.path.isdir(outdir) else [])
           if os.path.isdir(os.path.join(outdir, d)) and (m := re.match(r'^\d+', d))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def _runs(outdir):
    """(run_dir, its options, whether it has a training state) of the runs in outdir, newest first."""
    if not os.path.isdir(outdir):
        return
    for d in sorted(os.listdir(outdir), reverse=True):
        run_dir = os.path.join(outdir, d)
        try:
            with open(os.path.join(run_dir, 'training_options.json')) as f:
                old = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(old, dict):
            has_state = os.path.isfile(os.path.join(run_dir, 'training-state.pt'))
            yield run_dir, {k: v for k, v in old.items() if k != 'run_dir'}, has_state


def find_resumable(outdir, c):
    """The newest run in outdir with exactly these options and a training state to continue from."""
    new = {k: v for k, v in c.items() if k != 'run_dir'}
    for run_dir, old, has_state in _runs(outdir):
        if has_state and not cli.differing(old, new):
            return run_dir
    return None


def find_stateless_twin(outdir, desc, c):
    """The newest run named <id>-<desc> with exactly these options but no training state: a shipped run (exp/
    keeps a run's options, log and predictor, not its state), retrained in place by --resume."""
    new = {k: v for k, v in c.items() if k != 'run_dir'}
    for run_dir, old, has_state in _runs(outdir):
        if not has_state and re.fullmatch(r'\d+-' + re.escape(desc), os.path.basename(run_dir)) \
                and not cli.differing(old, new):
            return run_dir
    return None


def check_no_conflicting_run(outdir, desc, c):
    """--resume found no run with these options: refuse if the newest run of the same name (<id>-<desc>), the
    one meant to be continued, was made with other options, naming the first that differs."""
    new = {k: v for k, v in c.items() if k != 'run_dir'}
    for run_dir, old, has_state in _runs(outdir):
        if has_state and re.fullmatch(r'\d+-' + re.escape(desc), os.path.basename(run_dir)):
            raise click.UsageError(f'--resume: {cli.mismatch_message(run_dir, old, new)}; give the same options to '
                                   'continue it, or leave out --resume to start a new run')


def check_training_state(path):
    """The iteration a training state reached; one line, never torch's advice to unpickle, when training-state.pt is
    not a state that train.py wrote."""
    import torch
    problem = None
    if not zipfile.is_zipfile(path):
        problem = 'not a file written by train.py (damaged or truncated)'
    else:
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
            if not isinstance(state, dict) or not {'predictor', 'optimizer', 'cur_iter'} <= set(state):
                problem = 'not a training state of train.py'
        except Exception:  # any failure means the same to the user; torch's own text advises unpickling
            problem = 'not a file written by train.py (damaged or truncated)'
    if problem:
        raise click.ClickException(f'cannot resume from {path}: {problem}; delete it to restart that run, or leave '
                                   'out --resume to start a new one')
    return int(state['cur_iter'])

#----------------------------------------------------------------------------


# The learned solvers train.py distills. --sampler_stu names a solver as the reference codes do: AdaSDE's
# `adasde`, AMED's `amed` and its plug-ins `euler`, `dpm`, `ipndm`, `dpmpp`, EPD's `epd` and its plug-in `ipndm`.
# The two `ipndm`s are told apart by the flags that only EPD's train.py has (so both codes' launch lines run
# here unchanged); `amed_ipndm` and `epd_ipndm` say it outright.
STUDENTS = dict(adasde=('adasde', None), amed=('amed', 'amed'), epd=('epd', 'epd'), euler=('amed', 'euler'),
                dpm=('amed', 'dpm'), dpmpp=('amed', 'dpmpp'), ipndm=(None, 'ipndm'), amed_ipndm=('amed', 'ipndm'),
                epd_ipndm=('epd', 'ipndm'))
EPD_ONLY_FLAGS = ('num_points', 'coslr', 'alpha', 'fcn')

# Defaults of the flags whose default depends on the solver: each reference's own (its train.py; for AdaSDE the
# settings of its published recipes, as before).
SOLVER_DEFAULTS = dict(
    adasde=dict(sampler_tea='dpm', tea_substeps=2, M=3, schedule_type='time_uniform', schedule_rho=1.0, num_points=1,
                scale_dir=0.05, scale_time=0.2, max_order=4, alpha=20.0, lr=0.2),
    amed=dict(sampler_tea='heun', tea_substeps=1, M=1, schedule_type='polynomial', schedule_rho=7.0, num_points=None,
              scale_dir=0.01, scale_time=0.0, max_order=3, alpha=0.0, lr=5e-3),
    epd=dict(sampler_tea='heun', tea_substeps=2, M=1, schedule_type='polynomial', schedule_rho=7.0, num_points=2,
             scale_dir=0.01, scale_time=0.0, max_order=3, alpha=10.0, lr=5e-3),
)
# The predictor's hyperparameters of each solver, from the options of the same names.
HYPERPARAMS = dict(
    adasde=('num_steps', 'num_points', 'scale_dir', 'scale_time', 'gamma', 'fcn', 'base', 'max_order'),
    amed=('num_steps', 'base', 'scale_dir', 'scale_time', 'max_order', 'predict_x0', 'lower_order_final'),
    epd=('num_steps', 'num_points', 'base', 'scale_dir', 'scale_time', 'max_order', 'fcn'),
)
SOLVER_ONLY_FLAGS = dict(gamma='adasde', base='adasde', num_points='adasde or epd', fcn='adasde or epd')
# Flags the AdaSDE and EPD codes take (and record) but do not use: accepted, so that their launch lines run here.
UNUSED_FLAGS = ('predict_x0', 'lower_order_final')


def plugins_of(kind):
    """The --sampler_stu names of a learned solver's forms."""
    return [name for name, (k, _) in STUDENTS.items() if k == kind]


def resolve_student(opts, given):
    """(learned solver, its base) of --sampler_stu, and the solver-dependent defaults filled into opts."""
    kind, base = STUDENTS[opts.sampler_stu]
    if kind is None:  # plain 'ipndm': EPD's plug-in if an EPD-only flag is given, else AMED's
        kind = 'epd' if any(flag in given for flag in EPD_ONLY_FLAGS) else 'amed'
    for flag, owners in SOLVER_ONLY_FLAGS.items():
        if flag in given and flag not in HYPERPARAMS[kind]:
            raise click.UsageError(f'--{flag} is an option of {owners}, not of --sampler_stu={opts.sampler_stu} '
                                   f'({kind})')
    unused = [flag for flag in UNUSED_FLAGS if flag in given and flag not in HYPERPARAMS[kind]]
    if unused:
        dist.print0(f'Note: {", ".join("--" + f for f in unused)} has no effect on --sampler_stu={opts.sampler_stu} '
                    f'({kind}), as in its reference code.')
    for key, value in SOLVER_DEFAULTS[kind].items():
        if opts[key] is None:
            opts[key] = value
    if kind == 'adasde':
        base = opts.base
    elif 'base' in given and opts.base != base:  # an AMED or EPD student names its base itself
        raise click.UsageError(f'--base is an option of adasde; the base of {kind} is chosen by --sampler_stu (one '
                               f'of {", ".join(plugins_of(kind))}), here {opts.sampler_stu}: {base}')
    if opts.sampler_tea not in ('dpm', 'heun') and 'tea_substeps' in given:
        raise click.UsageError(f'--tea_substeps is for a dpm or heun teacher, not --sampler_tea={opts.sampler_tea}')
    return kind, base

#----------------------------------------------------------------------------


@click.command(context_settings=dict(show_default=True, max_content_width=120))
# Main options.
@cli.model_options(dataset_default='digits')
@click.option('--outdir', help='Where to put the run directories', type=str, default='./exps')
@click.option('--desc', help='String appended to the run directory name', type=str, default='')
@click.option('--num_steps', help='Time points of the student (num_steps - 1 steps)', type=click.IntRange(min=2),
              default=4)
@click.option('--sampler_stu', help='Learned solver: adasde (AdaSDE; --base picks its form), amed (AMED-Solver), epd '
              '(EPD-Solver), or a plug-in: euler, dpm, dpmpp (AMED-Plugin), ipndm (AMED-Plugin, or EPD-Plugin when '
              'an EPD-only flag is given: --num_points, --coslr, --alpha, --fcn), amed_ipndm, epd_ipndm',
              type=click.Choice(list(STUDENTS)), default='adasde')
@click.option('--sampler_tea', help='Teacher solver on the teacher grid: dpm (DPM-Solver-2), heun, ipndm, dpmpp, '
              'euler  [default: adasde dpm, amed and epd heun]', type=click.Choice(list(TEACHERS)), default=None,
              show_default=False)
@click.option('--tea_substeps', help='Sub-steps per teacher interval of a dpm or heun teacher (2: the AdaSDE and EPD '
              'teachers)  [default: adasde and epd 2, amed 1]', type=click.IntRange(min=1), default=None,
              show_default=False)
@click.option('--M', 'M', help='Teacher intervals inserted per student interval  [default: adasde 3, amed and epd 1]',
              type=click.IntRange(min=0), default=None, show_default=False)
@click.option('--afs', help='Analytical first step (saves one NFE)', type=bool, default=True)
@click.option('--schedule_type', help='Time discretization  [default: adasde time_uniform, amed and epd polynomial]',
              type=click.Choice(list(solvers.SCHEDULES)), default=None, show_default=False)
@click.option('--schedule_rho', help='Exponent of the schedule  [default: adasde 1, amed and epd 7]', type=cli.Finite(),
              default=None, show_default=False)
# Hyperparameters of the learned solvers.
@click.option('--num_points', help='Parallel intermediate points per step, K (adasde, epd)  [default: adasde 1, '
              'epd 2]', type=click.IntRange(min=1), default=None, show_default=False)
@click.option('--scale_dir', help='Half-width of the c range [1-s, 1+s] (0: off)  [default: adasde 0.05, amed and '
              'epd 0.01]', type=cli.Finite(min=0), default=None, show_default=False)
@click.option('--scale_time', help='Half-width of the a range [1-s, 1+s] (0: off)  [default: adasde 0.2, amed and '
              'epd 0]', type=cli.Finite(min=0), default=None, show_default=False)
@click.option('--gamma', help='Upper end of the learned churn range, adasde (0: an ODE solver)',
              type=cli.Finite(min=0), default=0.02)
@click.option('--fcn', help='Fix c = 1 on the last step (adasde, epd)', is_flag=True)
@click.option('--base', help='Step structure of adasde: dpm (the paper: 1 + K calls per step), or the plug-in form on '
              'a multistep base, ipndm or deis (1 call per step, past derivatives reused)',
              type=click.Choice(['dpm', 'ipndm', 'deis']), default='dpm')
@click.option('--max_order', help='Order of a multistep base and teacher  [default: adasde 4, amed and epd 3]',
              type=click.IntRange(1, 4), default=None, show_default=False)
@click.option('--predict_x0', help='Data prediction of the dpmpp plug-in and teacher', type=bool, default=True)
@click.option('--lower_order_final', help='Lower order at the end, dpmpp plug-in and teacher', type=bool,
              default=True)
@click.option('--loss_steps', help='all: a loss and an Adam step per student step (the official code); last: only '
              'the final state is fitted', type=click.Choice(['all', 'last']), default='all')
@click.option('--alpha', help='Weight of the feature loss on the last step (0: L2 there too)  [default: adasde 20, '
              'amed 0, epd 10]', type=cli.Finite(min=0), default=None, show_default=False)
@click.option('--feature_net', help='Loss network of that loss: inception (official code), lpips (the paper), '
              'digits_loss, digits (the digits FID detector: ablations only), none  [default: the zoo entry\'s, '
              'digits_loss for digits, else inception]', type=click.Choice(['inception', 'lpips', 'digits_loss',
              'digits', 'none']), default=None)
# Text-to-image models.
@click.option('--prompts', help='Captions CSV (column "text") of text-to-image models  [default: the 30k MS-COCO '
              'captions of the zoo entry "prompts"]', type=str, default=None)
# Optimisation.
@click.option('--lr', help='Adam learning rate  [default: adasde 0.2, amed and epd 5e-3]',
              type=cli.Finite(min=0, min_open=True), default=None, show_default=False)
@click.option('--coslr', help='Cosine learning-rate decay (to the official code\'s absolute floor 0.01)', is_flag=True)
@click.option('--batch', help='Total batch size', type=click.IntRange(min=1), default=32)
@click.option('--batch-gpu', 'batch_gpu', help='Per-process batch per round (gradient accumulation)',
              type=click.IntRange(min=1), default=None)
@click.option('--total_kimg', help='Training length in thousands of trajectories', type=cli.Finite(min=0,
              min_open=True), default=10)
@click.option('--seed', help='Random seed', type=click.IntRange(min=0, max=2**32 - 1), default=0)
@click.option('--device', help='torch device [default: cuda if available, else cpu]', type=str, default=None)
@click.option('-n', '--dry-run', 'dry_run', help='Print the options and exit', is_flag=True)
@click.option('--resume', help='Continue the newest run with identical options from its last state', is_flag=True)
def main(**kwargs):
    """Distill a learned solver (AdaSDE, AMED, EPD or a plug-in form) against a many-step teacher.

    \b
    Examples:
    # Embedded digits model, 5 NFE (num_steps=4 with AFS), on the CPU:
    python train.py --dataset_name=digits --num_steps=4 --batch=32 --total_kimg=1
    # CIFAR-10 as in the paper, 2 GPUs:
    torchrun --standalone --nproc_per_node=2 train.py --dataset_name=cifar10 --num_steps=4 --M=3 \\
        --schedule_type=time_uniform --schedule_rho=1 --gamma=0.02 --lr=0.2 --coslr --batch=64 --total_kimg=10
    # AMED-Solver on the digits model, 5 NFE, the AMED code's recipe (Heun teacher, M=1):
    python train.py --sampler_stu=amed --num_steps=4 --M=1 --schedule_type=time_uniform --schedule_rho=1
    # EPD-Solver with K=2 parallel points (5 real network calls, "3 NFE" as EPD counts them):
    python train.py --sampler_stu=epd --num_steps=3 --num_points=2 --M=3 --lr=0.2 --coslr
    """
    given = {k for k in kwargs if click.get_current_context().get_parameter_source(k)
             != click.core.ParameterSource.DEFAULT}
    opts = EasyDict(kwargs)
    dist.init()
    dist.stop_on_signals()  # SIGTERM / Ctrl-C: save the state at the end of the iteration, then stop
    from models.zoo import ZOO, detector_for
    models = sorted(name for name, entry in ZOO.items() if entry.kind != 'file')
    if opts.model_path is None and opts.dataset_name not in models:
        raise click.BadParameter(f'unknown dataset {opts.dataset_name!r}; choose from {", ".join(models)} '
                                 'or give --model_path', param_hint='--dataset_name')
    cli.check_model_kind(opts.model_kind, opts.model_path)
    if opts.model_kind is not None and click.get_current_context().get_parameter_source('dataset_name') \
            == click.core.ParameterSource.DEFAULT:
        # A user's cm/adm/ldm checkpoint is not the digits model: name the run after its file (and so use the
        # default Inception feature loss rather than the digits detector).
        opts.dataset_name = os.path.splitext(os.path.basename(opts.model_path or opts.model_kind))[0]
    model = opts.model_path or opts.dataset_name
    kind, base = resolve_student(opts, given)
    feature_net = opts.feature_net or getattr(ZOO.get(opts.dataset_name), 'feature_net', None) or 'inception'
    if opts.alpha == 0 and feature_net != 'none' and 'feature_net' in given:
        raise click.UsageError(f'--feature_net={feature_net} is the network of the feature loss, which --alpha=0 '
                               + ('turns off' if 'alpha' in given else f'(the default of {kind}) leaves out')
                               + '; give --alpha > 0 to use it, or leave out --feature_net')
    if feature_net == 'none' or opts.alpha == 0:
        feature_net = None
    try:
        solvers.check_schedule(opts.schedule_type, opts.schedule_rho)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--schedule_rho') from None
    judge = detector_for(opts.dataset_name) if opts.dataset_name in ZOO else None
    if feature_net is not None and feature_net == judge:
        dist.print0(f'Warning: --feature_net={feature_net} is the FID detector of {opts.dataset_name}: FID then scores '
                    'the predictor with the network it was trained against, so it is not an independent judge.')
    prompts = opts.prompts
    if prompts is None and getattr(ZOO.get(opts.dataset_name), 'label_kind', None) == 'text':
        from models.zoo import fetch
        try:
            prompts = fetch('prompts')
        except ValueError as e:
            raise click.ClickException(f'{e} (or give --prompts)') from None
    model_kwargs = {k: opts[k] for k in ('guidance_type', 'guidance_rate', 'classifier_path', 'classifier_arch',
                                         'resolution') if opts[k] is not None}
    model_kwargs.update({k: v for k, v in (('kind', opts.model_kind), ('arch', opts.model_arch)) if v is not None})
    for name in ('model_arch', 'classifier_arch'):
        if opts[name] is not None:
            from models.adapters import parse_arch
            try:
                parse_arch(opts[name], name)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint=f'--{name}') from None
    hyper = {key: base if key == 'base' else opts[key] for key in HYPERPARAMS[kind]}
    try:
        nfe = solvers.nfe(kind, opts.num_steps, afs=opts.afs, predictor=make_predictor(kind, **hyper))
    except ValueError as e:
        raise click.UsageError(str(e)) from None

    # Configuration: click -> EasyDict -> training_options.json -> training_loop.
    c = EasyDict(
        dataset_name=opts.dataset_name, model=model, model_kwargs=model_kwargs, sampler_stu=kind,
        predictor_kwargs=hyper, sampler_tea=opts.sampler_tea, M=opts.M, substeps=opts.tea_substeps, afs=opts.afs,
        schedule_type=opts.schedule_type, schedule_rho=opts.schedule_rho,
        alpha=opts.alpha if feature_net else 0.0, feature_net=feature_net, loss_steps=opts.loss_steps,
        prompts=prompts, lr=opts.lr,
        coslr=opts.coslr,
        batch=opts.batch, batch_gpu=opts.batch_gpu, total_kimg=opts.total_kimg, seed=opts.seed, device=opts.device)
    student = kind if base in (None, kind) or (kind, base) == ('adasde', 'dpm') else f'{kind}_{base}'
    desc = (f'{opts.dataset_name}-{opts.num_steps}-{nfe}-{student}-{opts.sampler_tea}-{opts.M}-'
            f'{schedule_tag(opts.schedule_type, opts.schedule_rho)}{"-afs" if opts.afs else ""}{opts.desc}')

    if os.sep in opts.desc or (os.altsep and os.altsep in opts.desc):
        raise click.BadParameter(f'{opts.desc!r}: part of the run folder\'s name, it cannot hold a path separator',
                                 param_hint='--desc')
    from training.training_loop import rounds_batch
    try:  # before the run folder is made (training_loop checks again)
        rounds_batch(opts.batch, opts.batch_gpu, dist.get_world_size())
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if opts.prompts is not None:
        from models.sd import check_prompt_file
        try:
            check_prompt_file(opts.prompts)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint='--prompts') from None
    device = cli.resolve_device(opts.device) if opts.device is not None else dist.device()
    entry = ZOO.get(model)
    if entry is not None and entry.resolution and entry.channels:  # a --model_path model: in training_loop, loaded
        from training.training_loop import check_batch_fits
        try:
            check_batch_fits(opts.batch, dist.get_world_size(), (entry.channels, entry.resolution, entry.resolution),
                             opts.num_steps, device)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    cli.check_output_dir(opts.outdir, need_bytes=2**20)
    resume_dir = find_resumable(opts.outdir, c) if opts.resume else None
    rerun_dir = None
    if opts.resume and resume_dir is None:
        check_no_conflicting_run(opts.outdir, desc, c)
        rerun_dir = find_stateless_twin(opts.outdir, desc, c)
        if rerun_dir is not None:
            dist.print0(f'--resume: {rerun_dir} has these options but no training state (a shipped run keeps only '
                        'its predictor): training it again in place, from the start; its log and predictor are '
                        'replaced.')
        else:
            dist.print0('No run with these options to resume; starting a new one.')
    if resume_dir is not None:
        from training.training_loop import snapshot_path, total_iterations
        done = check_training_state(os.path.join(resume_dir, 'training-state.pt'))
        total = total_iterations(opts.total_kimg, opts.batch)
        final = snapshot_path(resume_dir, total, opts.batch)
        if done >= total and os.path.isfile(final):  # finished: nothing to redo, no file to rewrite
            dist.print0(f'--resume: {resume_dir} is finished ({total}/{total} iterations); its predictor: {final}. '
                        'Nothing to do (delete that run to train it again).')
            return
    c.run_dir = resume_dir or rerun_dir or next_run_dir(opts.outdir, desc)

    dist.print0(json.dumps(c, indent=2))
    parallel = make_predictor(kind, **hyper).parallel_nfe(opts.num_steps) - int(opts.afs)
    dist.print0(f'Student: {student}, {opts.num_steps} time points, {nfe} NFE (real network calls'
                + (f'; {parallel} as the EPD code counts them' if parallel != nfe else '') + f'); teacher: '
                f'{opts.sampler_tea} on {(opts.M + 1) * (opts.num_steps - 1) + 1} points.')
    dist.print0(f'Output directory: {c.run_dir}')
    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return

    # Create the run directory and go.
    if dist.get_rank() == 0:
        if rerun_dir is not None:  # a fresh log; the old predictor stays until the new one replaces it
            for name in ('log.txt', 'stats.jsonl'):
                if os.path.exists(os.path.join(rerun_dir, name)):
                    os.remove(os.path.join(rerun_dir, name))
        os.makedirs(c.run_dir, exist_ok=True)
        cli.write_settings(os.path.join(c.run_dir, 'training_options.json'), c)
        Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)
    dist.barrier()
    from training.training_loop import training_loop
    state = os.path.join(c.run_dir, 'training-state.pt')
    import torch
    try:
        training_loop(**c, resume_state=state if resume_dir else None)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except (MemoryError, torch.cuda.OutOfMemoryError):  # the check before the run counts the states only
        raise click.ClickException(f'out of memory during training at --batch={opts.batch}; lower --batch') from None
    # Stopped early (SIGTERM, Ctrl-C): exit 130/143, so that a script running train.py stops too (launch.sh).
    if dist.should_stop() and not glob.glob(os.path.join(glob.escape(c.run_dir), 'network-snapshot-*')):
        sys.exit(dist.stop_exit_code())
    dist.print0('Done.')

#----------------------------------------------------------------------------


if __name__ == '__main__':
    cli.run(main)

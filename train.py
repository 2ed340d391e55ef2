"""Distill an AdaSDE predictor (per-step solver coefficients) for a pretrained diffusion model."""

# ruff: noqa: E402 -- torch_utils.cli comes first: the thread policy must be set before torch loads OpenMP.
from torch_utils import cli

cli.apply_thread_policy()

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
from torch_utils import distributed as dist

#----------------------------------------------------------------------------
# Run directory name of the official AdaSDE train.py, with the NFE counted for
# any number of points: <id>-<dataset>-<N>-<nfe>-adasde-dpm-<M>-<sched>[-afs]<desc>


def schedule_tag(schedule_type, schedule_rho):
    return dict(polynomial=f'poly{float(schedule_rho)}', logsnr='logsnr', time_uniform=f'uni{float(schedule_rho)}',
                discrete='discrete')[schedule_type]


def next_run_dir(outdir, desc):
    ids = [int(m.group()) for d in (os.listdir(outdir) if os.path.isdir(outdir) else [])
           if os.path.isdir(os.path.join(outdir, d)) and (m := re.match(r'^\d+', d))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def _runs_with_state(outdir):
    """(run_dir, its options) of the runs in outdir that have a training state, newest first."""
    if not os.path.isdir(outdir):
        return
    for d in sorted(os.listdir(outdir), reverse=True):
        run_dir = os.path.join(outdir, d)
        try:
            with open(os.path.join(run_dir, 'training_options.json')) as f:
                old = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(old, dict) and os.path.isfile(os.path.join(run_dir, 'training-state.pt')):
            yield run_dir, {k: v for k, v in old.items() if k != 'run_dir'}


def find_resumable(outdir, c):
    """The newest run in outdir with exactly these options and a training state to continue from."""
    new = {k: v for k, v in c.items() if k != 'run_dir'}
    for run_dir, old in _runs_with_state(outdir):
        if not cli.differing(old, new):
            return run_dir
    return None


def check_no_conflicting_run(outdir, desc, c):
    """--resume found no run with these options: refuse if the newest run of the same name (<id>-<desc>), the
    one meant to be continued, was made with other options, naming the first that differs."""
    new = {k: v for k, v in c.items() if k != 'run_dir'}
    for run_dir, old in _runs_with_state(outdir):
        if re.fullmatch(r'\d+-' + re.escape(desc), os.path.basename(run_dir)):
            raise click.UsageError(f'--resume: {cli.mismatch_message(run_dir, old, new)}; give the same options to '
                                   'continue it, or leave out --resume to start a new run')


def check_training_state(path):
    """One line, never torch's advice to unpickle, when training-state.pt is not a state that train.py wrote."""
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

#----------------------------------------------------------------------------


@click.command(context_settings=dict(show_default=True, max_content_width=120))
# Main options.
@cli.model_options(dataset_default='digits')
@click.option('--outdir', help='Where to put the run directories', type=str, default='./exps')
@click.option('--desc', help='String appended to the run directory name', type=str, default='')
@click.option('--num_steps', help='Time points of the student (num_steps - 1 steps)', type=click.IntRange(min=2),
              default=4)
@click.option('--num_points', help='Parallel intermediate points per step (K)', type=click.IntRange(min=1), default=1)
@click.option('--sampler_stu', help='Student solver', type=click.Choice(['adasde']), default='adasde')
@click.option('--sampler_tea', help='Teacher solver on the teacher grid: dpm (the official AdaSDE teacher: '
              'DPM-Solver-2 with 2 sub-steps per interval), heun (2 sub-steps: the EPD teacher), ipndm, dpmpp, '
              'euler (order --max_order)', type=click.Choice(list(TEACHERS)), default='dpm')
@click.option('--M', 'M', help='Teacher intervals inserted per student interval', type=click.IntRange(min=0),
              default=3)
@click.option('--afs', help='Analytical first step (saves one NFE)', type=bool, default=True)
@click.option('--schedule_type', help='Time discretization', type=click.Choice(list(solvers.SCHEDULES)),
              default='time_uniform')
@click.option('--schedule_rho', help='Exponent of the schedule', type=float, default=1.0)
# AdaSDE hyperparameters.
@click.option('--scale_dir', help='Half-width of the c_n range [1-s, 1+s] (0: off)', type=click.FloatRange(min=0),
              default=0.05)
@click.option('--scale_time', help='Half-width of the a_n range [1-s, 1+s] (0: off)',
              type=click.FloatRange(min=0), default=0.2)
@click.option('--gamma', help='Upper end of the learned churn range (0: an ODE solver)', type=click.FloatRange(min=0),
              default=0.02)
@click.option('--fcn', help='Fix c_n = 1 on the last step', is_flag=True)
@click.option('--base', help='Step structure: dpm (the paper: 1 + K calls per step), or the plug-in form on a '
              'multistep base, ipndm or deis (1 call per step, past derivatives reused)',
              type=click.Choice(['dpm', 'ipndm', 'deis']), default='dpm')
@click.option('--max_order', help='Derivatives kept by a multistep base', type=click.IntRange(1, 4), default=4)
@click.option('--loss_steps', help='all: a loss and an Adam step per student step (the official code); last: only '
              'the final state is fitted', type=click.Choice(['all', 'last']), default='all')
@click.option('--alpha', help='Weight of the feature loss on the last step (0: L2 there too)',
              type=click.FloatRange(min=0), default=20.0)
@click.option('--feature_net', help='Loss network of that loss: inception (official code), lpips (the paper), '
              'digits_loss, digits (the digits FID detector: ablations only), none  [default: the zoo entry\'s, '
              'digits_loss for digits, else inception]', type=click.Choice(['inception', 'lpips', 'digits_loss',
              'digits', 'none']), default=None)
# Text-to-image models.
@click.option('--prompts', help='Captions CSV (column "text") of text-to-image models  [default: the 30k MS-COCO '
              'captions of the zoo entry "prompts"]', type=str, default=None)
# Optimisation.
@click.option('--lr', help='Adam learning rate', type=click.FloatRange(min=0, min_open=True), default=0.2)
@click.option('--coslr', help='Cosine learning-rate decay (to the official code\'s absolute floor 0.01)', is_flag=True)
@click.option('--batch', help='Total batch size', type=click.IntRange(min=1), default=32)
@click.option('--batch-gpu', 'batch_gpu', help='Per-process batch per round (gradient accumulation)',
              type=click.IntRange(min=1), default=None)
@click.option('--total_kimg', help='Training length in thousands of trajectories', type=click.FloatRange(min=0,
              min_open=True), default=10)
@click.option('--seed', help='Random seed', type=click.IntRange(min=0, max=2**32 - 1), default=0)
@click.option('--device', help='torch device [default: cuda if available, else cpu]', type=str, default=None)
@click.option('-n', '--dry-run', 'dry_run', help='Print the options and exit', is_flag=True)
@click.option('--resume', help='Continue the newest run with identical options from its last state', is_flag=True)
def main(**kwargs):
    """Distill an AdaSDE predictor against a DPM-Solver-2 teacher.

    \b
    Examples:
    # Embedded digits model, 5 NFE (num_steps=4 with AFS), on the CPU:
    python train.py --dataset_name=digits --num_steps=4 --batch=32 --total_kimg=1
    # CIFAR-10 as in the paper, 2 GPUs:
    torchrun --standalone --nproc_per_node=2 train.py --dataset_name=cifar10 --num_steps=4 --M=3 \\
        --schedule_type=time_uniform --schedule_rho=1 --gamma=0.02 --lr=0.2 --coslr --batch=64 --total_kimg=10
    """
    opts = EasyDict(kwargs)
    dist.init()
    dist.stop_on_signals()  # SIGTERM / Ctrl-C: save the state at the end of the iteration, then stop
    from models.zoo import ZOO, detector_for
    models = sorted(name for name, entry in ZOO.items() if entry.kind != 'file')
    if opts.model_path is None and opts.dataset_name not in models:
        raise click.BadParameter(f'unknown dataset {opts.dataset_name!r}; choose from {", ".join(models)} '
                                 'or give --model_path', param_hint='--dataset_name')
    if opts.model_kind is not None and click.get_current_context().get_parameter_source('dataset_name') \
            == click.core.ParameterSource.DEFAULT:
        # A user's cm/adm/ldm checkpoint is not the digits model: name the run after its file (and so use the
        # default Inception feature loss rather than the digits detector).
        opts.dataset_name = os.path.splitext(os.path.basename(opts.model_path or opts.model_kind))[0]
    model = opts.model_path or opts.dataset_name
    feature_net = opts.feature_net or getattr(ZOO.get(opts.dataset_name), 'feature_net', None) or 'inception'
    if feature_net == 'none' or opts.alpha == 0:
        feature_net = None
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
    model_kwargs = {k: opts[k] for k in ('guidance_type', 'guidance_rate', 'classifier_path', 'classifier_arch')
                    if opts[k] is not None}
    model_kwargs.update({k: v for k, v in (('kind', opts.model_kind), ('arch', opts.model_arch)) if v is not None})
    for name in ('model_arch', 'classifier_arch'):
        if opts[name] is not None:
            from models.adapters import parse_arch
            try:
                parse_arch(opts[name], name)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint=f'--{name}') from None
    nfe = solvers.nfe('adasde', opts.num_steps, afs=opts.afs, predictor=EasyDict(num_points=opts.num_points,
                                                                                     base=opts.base))

    # Configuration: click -> EasyDict -> training_options.json -> training_loop.
    c = EasyDict(
        dataset_name=opts.dataset_name, model=model, model_kwargs=model_kwargs,
        predictor_kwargs=dict(num_steps=opts.num_steps, num_points=opts.num_points, scale_dir=opts.scale_dir,
                              scale_time=opts.scale_time, gamma=opts.gamma, fcn=opts.fcn, base=opts.base,
                              max_order=opts.max_order),
        sampler_tea=opts.sampler_tea, M=opts.M, afs=opts.afs, schedule_type=opts.schedule_type,
        schedule_rho=opts.schedule_rho,
        alpha=opts.alpha if feature_net else 0.0, feature_net=feature_net, loss_steps=opts.loss_steps,
        prompts=prompts, lr=opts.lr,
        coslr=opts.coslr,
        batch=opts.batch, batch_gpu=opts.batch_gpu, total_kimg=opts.total_kimg, seed=opts.seed, device=opts.device)
    student = opts.sampler_stu if opts.base == 'dpm' else f'{opts.sampler_stu}_{opts.base}'
    desc = (f'{opts.dataset_name}-{opts.num_steps}-{nfe}-{student}-{opts.sampler_tea}-{opts.M}-'
            f'{schedule_tag(opts.schedule_type, opts.schedule_rho)}{"-afs" if opts.afs else ""}{opts.desc}')

    if opts.device is not None:
        cli.resolve_device(opts.device)
    cli.check_output_dir(opts.outdir, need_bytes=2**20)
    resume_dir = find_resumable(opts.outdir, c) if opts.resume else None
    if opts.resume and resume_dir is None:
        check_no_conflicting_run(opts.outdir, desc, c)
        dist.print0('No run with these options to resume; starting a new one.')
    if resume_dir is not None:
        check_training_state(os.path.join(resume_dir, 'training-state.pt'))
    c.run_dir = resume_dir or next_run_dir(opts.outdir, desc)

    dist.print0(json.dumps(c, indent=2))
    dist.print0(f'Student: {student}, {opts.num_steps} time points, {nfe} NFE; teacher: {opts.sampler_tea} on '
                f'{(opts.M + 1) * (opts.num_steps - 1) + 1} points.')
    dist.print0(f'Output directory: {c.run_dir}')
    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return

    # Create the run directory and go.
    if dist.get_rank() == 0:
        os.makedirs(c.run_dir, exist_ok=True)
        cli.write_settings(os.path.join(c.run_dir, 'training_options.json'), c)
        Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)
    dist.barrier()
    from training.training_loop import training_loop
    state = os.path.join(c.run_dir, 'training-state.pt')
    try:
        training_loop(**c, resume_state=state if resume_dir else None)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    # Stopped early (SIGTERM, Ctrl-C): exit 130/143, so that a script running train.py stops too (launch.sh).
    if dist.should_stop() and not glob.glob(os.path.join(glob.escape(c.run_dir), 'network-snapshot-*')):
        sys.exit(dist.stop_exit_code())
    dist.print0('Done.')

#----------------------------------------------------------------------------


if __name__ == '__main__':
    cli.run(main)

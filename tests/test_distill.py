"""AdaSDE distillation: it must beat its own starting point (DPM-Solver-2) and be reproducible."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import solvers
from models.analytic import GaussianMixture
from solvers.adasde import AdaSDEPredictor
from solvers.distill import student_and_teacher_sigmas, teacher_targets
from torch_utils.misc import StackedRandomGenerator
from training.training_loop import training_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------


def mixture():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64) * 0.6
    return GaussianMixture(means, torch.tensor([0.1, 0.2, 0.15, 0.3]))


def final_error(net, predictor, num_steps, M, afs, solver):
    """Mean L2 distance of a solver's final state to the teacher's, on held-out latents."""
    sig_student, sig_teacher = student_and_teacher_sigmas(net, num_steps, M, 'time_uniform', 1)
    rnd = StackedRandomGenerator('cpu', range(10**6, 10**6 + 256))
    x = rnd.randn([256, 1, 4, 4], dtype=torch.float64) * float(sig_student[0])
    y = teacher_targets(net, x, sig_teacher, M)[-1]
    if solver == 'adasde':
        out = solvers.get_solver('adasde')(net, x, sig_student, afs=afs, predictor=predictor, randn_like=rnd.randn_like)
    else:
        out = solvers.get_solver(solver)(net, x, sig_student, afs=afs)
    return float(((out - y) ** 2).flatten(1).sum(1).sqrt().mean())


@pytest.mark.parametrize('gamma', [0.0, 0.02])
def test_distilled_student_beats_dpm_at_equal_nfe(tmp_path, gamma):
    net = mixture()
    predictor = training_loop(run_dir=str(tmp_path), model=net, M=3, alpha=0, lr=0.2, coslr=True, batch=64,
                              total_kimg=1.28, kimg_per_tick=100, device='cpu',
                              predictor_kwargs=dict(num_steps=4, gamma=gamma))
    # Both solvers make 5 network calls: 3 steps of 2 evaluations, minus 1 for AFS.
    assert solvers.nfe('adasde', 4, afs=True, predictor=predictor) == solvers.nfe('dpm', 4, afs=True) == 5
    student = final_error(net, predictor, 4, 3, True, 'adasde')
    baseline = final_error(net, None, 4, 3, True, 'dpm')
    untrained = final_error(net, AdaSDEPredictor(4, gamma=gamma, seed=0), 4, 3, True, 'adasde')
    assert student < 0.5 * baseline, (student, baseline)
    assert student < untrained
    assert os.path.isfile(tmp_path / 'network-snapshot-000001.safetensors')

#----------------------------------------------------------------------------
# Same tables for 1 and 2 processes (same total batch), and after a resume.

SCRIPT = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, {root!r})
    from torch_utils import distributed as dist
    from training.training_loop import training_loop
    from tests.test_distill import mixture
    dist.init()
    run_dir, total_kimg, resume, stop_after = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    kind, base = (sys.argv[5:7] + ['adasde', ''])[:2] if len(sys.argv) > 5 else ('adasde', '')
    resume = resume or None
    calls = []
    dist.should_stop = lambda: calls.append(1) or 0 < stop_after <= len(calls)  # simulated preemption
    kwargs = dict(num_steps=3, gamma=0.02) if kind == 'adasde' else dict(num_steps=3, base=base, scale_time=0.2)
    p = training_loop(run_dir=run_dir, model=mixture(), M=1, alpha=0, lr=0.1, coslr=True, batch=16, batch_gpu=4,
                      total_kimg=total_kimg, kimg_per_tick=0.032, device='cpu', resume_state=resume,
                      sampler_stu=kind, predictor_kwargs=kwargs, seed=3)
    if dist.get_rank() == 0:
        torch.save({{k: v.clone() for k, v in p.state_dict().items()}}, run_dir + '/final.pt')
''')


def launcher(nproc):
    """Python itself for one process, torchrun (as a module) for several."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']


def run_script(tmp_path, run_dir, args, nproc=1):
    script = tmp_path / 'run.py'
    script.write_text(SCRIPT.format(root=ROOT))
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    proc = subprocess.run(launcher(nproc) + [str(script), str(run_dir)] + args, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(os.path.join(run_dir, 'final.pt'), weights_only=True)


def test_two_processes_and_resume_give_the_same_tables(tmp_path):
    one = run_script(tmp_path, tmp_path / 'one', ['0.16', '', '0'])
    two = run_script(tmp_path, tmp_path / 'two', ['0.16', '', '0'], nproc=2)
    # Preempted after 5 of 10 iterations, then the same run resumed to the end.
    part = run_script(tmp_path, tmp_path / 'part', ['0.16', '', '5'])
    state = torch.load(tmp_path / 'part' / 'training-state.pt', weights_only=True)
    assert state['cur_iter'] == 5 and not torch.equal(part['r_params'], one['r_params'])
    resumed = run_script(tmp_path, tmp_path / 'part', ['0.16', str(tmp_path / 'part' / 'training-state.pt'), '0'])
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=0), name
        assert torch.allclose(one[name], resumed[name], atol=1e-6, rtol=0), name
    assert not torch.equal(one['r_params'], AdaSDEPredictor(3, seed=3).r_params.detach())  # it did train



@pytest.mark.parametrize('kind,base', [('amed', 'amed'), ('amed', 'ipndm'), ('epd', 'epd'), ('epd', 'ipndm')])
def test_learned_peers_train_the_same_in_one_and_two_processes(tmp_path, kind, base):
    # AMED (detached states; teacher forcing on its single-step bases) and EPD (BPTT) under torchrun: the same
    # predictor as one process, and one that differs from its initialisation.
    one = run_script(tmp_path, tmp_path / 'one', ['0.032', '', '0', kind, base])
    two = run_script(tmp_path, tmp_path / 'two', ['0.032', '', '0', kind, base], nproc=2)
    assert set(one) == set(two)
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=0), name
    from solvers.learned import make_predictor
    init = make_predictor(kind, num_steps=3, base=base, scale_time=0.2, seed=3).state_dict()
    assert any(not torch.allclose(one[name], init[name]) for name in one)

#----------------------------------------------------------------------------
# The same through train.py on the digits model (with its feature loss): torchrun with 2 processes, and a run
# stopped by SIGTERM (as a cluster preempts a job) then continued with --resume.

TRAIN = ['train.py', '--dataset_name=digits', '--num_steps=3', '--M=1', '--batch=8', '--batch-gpu=4',
         '--total_kimg=0.16', '--lr=0.1', '--coslr', '--gamma=0.02', '--device=cpu']


def train_cli(outdir, *extra, nproc=1):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen(launcher(nproc) + TRAIN + [f'--outdir={outdir}', *extra], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def snapshot_tables(outdir):
    run_dir, = [os.path.join(outdir, d) for d in os.listdir(outdir)]
    snapshot, = [f for f in os.listdir(run_dir) if f.startswith('network-snapshot-')]
    return AdaSDEPredictor.load(os.path.join(run_dir, snapshot)).state_dict(), run_dir


def test_train_py_torchrun_and_sigterm_resume(tmp_path):
    import signal
    for outdir, nproc in (('one', 1), ('two', 2)):
        proc = train_cli(tmp_path / outdir, nproc=nproc)
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0 and 'Done.' in output, output
    one, _ = snapshot_tables(tmp_path / 'one')
    two, _ = snapshot_tables(tmp_path / 'two')

    # SIGTERM once the run directory is chosen: the loop finishes its iteration, saves the state and exits 143
    # (128 + SIGTERM), so that a script running train.py (launch.sh) stops too.
    proc = train_cli(tmp_path / 'stopped')
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('Output directory:'):
            proc.send_signal(signal.SIGTERM)
            break
    output = ''.join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143 and 'SIGTERM: stopping' in output and 'Done.' not in output, output
    assert output.count('Run the same command with --resume to continue.') == 1, output
    run_dir, = (tmp_path / 'stopped').iterdir()
    state = torch.load(run_dir / 'training-state.pt', weights_only=True)
    assert 1 <= state['cur_iter'] < 20, state['cur_iter']
    assert not list(run_dir.glob('network-snapshot-*'))
    proc = train_cli(tmp_path / 'stopped', '--resume')
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and 'Done.' in output, output
    resumed, resumed_dir = snapshot_tables(tmp_path / 'stopped')
    assert resumed_dir == str(run_dir)  # continued in place, not a new run
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5, rtol=0), name
        assert torch.allclose(one[name], resumed[name], atol=1e-6, rtol=0), name
    assert not torch.equal(one['r_params'], AdaSDEPredictor(3, seed=0).r_params)  # it trained


@pytest.mark.parametrize('name', ['nope', 'prompts'])
def test_train_py_unknown_model_is_one_line(name, tmp_path):
    from click.testing import CliRunner

    import train
    result = CliRunner().invoke(train.main, [f'--dataset_name={name}', f'--outdir={tmp_path}'])
    assert result.exit_code == 2 and not os.listdir(tmp_path)
    assert f"unknown dataset '{name}'; choose from afhqv2, cifar10, digits," in result.output
    assert 'prompts' not in result.output.split('choose from')[1]

#----------------------------------------------------------------------------
# train.py takes the learned peers' launch lines as their codes write them.


def _dry_run(*args, outdir='exps-dry-run-not-created'):
    import json

    from click.testing import CliRunner

    import train
    result = CliRunner().invoke(train.main, [f'--outdir={outdir}', *args, '-n'])
    out = result.output
    options = json.loads(out[out.index('{'):out.index('\n}\n') + 3]) if result.exit_code == 0 else None
    return result, options


def test_train_py_takes_the_references_launch_lines():
    # AMED's CIFAR-10 iPNDM plug-in line (its launch.sh): a plain 'ipndm' is AMED's plug-in.
    result, c = _dry_run('--dataset_name=digits', '--sampler_stu=ipndm', '--sampler_tea=ipndm', '--num_steps=4',
                         '--M=2', '--afs=True', '--scale_dir=0.01', '--scale_time=0.2', '--max_order=4',
                         '--schedule_type=polynomial', '--schedule_rho=7', '--batch=128', '--total_kimg=10')
    assert result.exit_code == 0, result.output
    assert (c['sampler_stu'], c['predictor_kwargs']['base'], c['sampler_tea'], c['substeps']) == \
        ('amed', 'ipndm', 'ipndm', 1)
    assert c['lr'] == 5e-3 and c['alpha'] == 0 and 'Student: amed_ipndm, 4 time points, 5 NFE' in result.output
    # EPD's released ipndm runs (EPD-only flags: --coslr, --num_points): the EPD-Plugin, with EPD's 2 sub-steps.
    result, c = _dry_run('--dataset_name=digits', '--sampler_stu=ipndm', '--sampler_tea=dpm', '--num_steps=4',
                         '--M=3', '--num_points=2', '--afs=True', '--scale_dir=0.05', '--scale_time=0.2',
                         '--max_order=3', '--schedule_type=time_uniform', '--schedule_rho=1', '--lr=0.2', '--coslr',
                         '--predict_x0=False', '--seed=0')
    assert result.exit_code == 0, result.output
    assert (c['sampler_stu'], c['predictor_kwargs']['base'], c['predictor_kwargs']['num_points'], c['substeps']) \
        == ('epd', 'ipndm', 2, 2)
    assert 'Note: --predict_x0 has no effect on --sampler_stu=ipndm (epd)' in result.output
    assert '8 NFE (real network calls; 5 as the EPD code counts them)' in result.output
    # The AMED-Solver with nothing but its name: the AMED code's defaults.
    result, c = _dry_run('--sampler_stu=amed')
    assert (c['sampler_tea'], c['M'], c['schedule_type'], c['schedule_rho'], c['predictor_kwargs']['scale_dir']) \
        == ('heun', 1, 'polynomial', 7.0, 0.01)
    # An option of another solver is refused in one line.
    result, _ = _dry_run('--sampler_stu=amed', '--gamma=0.1')
    assert result.exit_code != 0 and 'Error: --gamma is an option of adasde, not of --sampler_stu=amed' in result.output
    result, _ = _dry_run('--sampler_stu=epd', '--sampler_tea=ipndm', '--tea_substeps=2')
    assert result.exit_code != 0 and '--tea_substeps is for a dpm or heun teacher' in result.output

"""sample.py: a sample's bytes depend on its seed only (batch size, process count, resume), file layout, errors."""

import errno
import hashlib
import io
import os
import shutil
import subprocess
import sys
import threading
import types

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import models
import sample
import solvers
from models.edm import EDMPrecond, save_model
from solvers.adasde import AdaSDEPredictor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLVER_ARGS = {  # one ODE and one SDE solver
    'dpmpp': ['--solver=dpmpp', '--num_steps=5'],
    'er_sde': ['--solver=er_sde', '--num_steps=5'],
}

#----------------------------------------------------------------------------
# A small EDM network with random weights (the digits model's shape, fewer
# channels), saved as a local model folder.


def _tiny_net(label_dim=0, seed=0):
    torch.manual_seed(seed)
    net = EDMPrecond(8, 1, label_dim=label_dim, model_channels=16, channel_mult=(1, 2), num_blocks=1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net.eval()


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('model') / 'tiny')
    save_model(_tiny_net(), path)
    return path


def _run(*args):
    result = CliRunner().invoke(sample.main, [str(a) for a in args])
    return result


def _ok(*args):
    result = _run(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _pngs(outdir):
    """{relative path: bytes} of every PNG under outdir."""
    files = {}
    for root, _, names in os.walk(outdir):
        for name in names:
            if name.endswith('.png'):
                path = os.path.join(root, name)
                with open(path, 'rb') as f:
                    files[os.path.relpath(path, outdir)] = f.read()
    return files

#----------------------------------------------------------------------------
# Pieces.


def _lists(batches):
    return [list(b) for b in batches]


def test_split_seeds_edm_batches_contiguous_per_rank():
    batches = sample.split_seeds(list(range(50000)), 64)[0]
    sizes = [len(b) for b in batches]
    assert len(batches) == 782 and sizes.count(64) == 734 and sizes.count(63) == 48
    assert sum(_lists(batches), []) == list(range(50000))
    # EDM's batches (torch.tensor_split of the seeds into num_batches pieces), each rank a contiguous run of them.
    for n, batch, world in [(50000, 64, 1), (10, 4, 2), (1001, 7, 3), (5, 64, 4)]:
        pieces = [t.tolist() for t in torch.arange(n).tensor_split(((n - 1) // (batch * world) + 1) * world)]
        per = len(pieces) // world
        assert [_lists(b) for b in sample.split_seeds(list(range(n)), batch, world)] == \
            [pieces[r * per:(r + 1) * per] for r in range(world)]
    per_rank = sample.split_seeds(list(range(10)), 4, world_size=2)
    assert [_lists(b) for b in per_rank] == [[[0, 1, 2], [3, 4, 5]], [[6, 7], [8, 9]]]
    assert [_lists(b) for b in sample.split_seeds(list(range(5)), 64, world_size=4)] == [[[0, 1]], [[2]], [[3]], [[4]]]
    assert [_lists(b) for b in sample.split_seeds([], 4, world_size=2)] == [[], []]
    # 50k seeds on 8 ranks in batches of 64: every rank writes into its own 1000-seed folders, but for the one it
    # shares with its neighbour.
    folders = [{s // 1000 for b in r for s in b} for r in sample.split_seeds(range(50000), 64, world_size=8)]
    assert all(len(a & b) <= 1 for i, a in enumerate(folders) for b in folders[i + 1:])
    # A hundred million seeds: split on demand, as ranges.
    huge = sample.split_seeds(sample.parse_int_list('0-99999999'), 64, world_size=2)
    assert len(huge[1]) == 781250 and list(huge[1][-1]) == list(range(99999936, 100000000))
    assert list(huge[0][-1]) == list(range(49999936, 50000000)) and list(huge[1][0]) == list(range(50000000, 50000064))


def test_image_conversion_and_paths():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 7)
    # round(127.5 x + 127.5): -1 -> 0, -0.999 -> 0.1275 -> 0, 0 -> 127.5 -> 128, 0.5 -> 191.25 -> 191, 1 -> 255.
    assert sample.to_uint8(x).reshape(-1).tolist() == [0, 0, 128, 191, 255, 255, 255]
    assert sample.image_path('out', 49999) == os.path.join('out', '049000', '049999.png')
    assert sample.image_path('out', 7, subdirs=False) == os.path.join('out', '000007.png')


def test_fixed_batch_denoiser_is_batch_invariant():
    net = _tiny_net(label_dim=3)
    fixed = sample.FixedBatchDenoiser(net, 16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn([40, 1, 8, 8], generator=g) * 5
    sigma = torch.rand([40], generator=g) * 10 + 0.01
    labels = torch.eye(3)[torch.randint(3, [40], generator=g)]
    with torch.no_grad():
        whole = fixed(x, sigma, class_labels=labels)
        assert whole.shape == x.shape
        for rows in ([7], [0, 39], list(range(5, 21)), list(range(39, 3, -3))):
            part = fixed(x[rows], sigma[rows], class_labels=labels[rows])
            assert torch.equal(part, whole[rows])
        # A scalar sigma and labels shared by the batch are broadcast, then chunked like x.
        shared = fixed(x[:20], torch.tensor(2.0), class_labels=labels[:1])
        assert torch.equal(shared[3:4], fixed(x[3:4], torch.tensor([2.0]), class_labels=labels[:1]))

#----------------------------------------------------------------------------
# Seed-only dependence through the CLI.


@pytest.mark.parametrize('solver', SOLVER_ARGS)
def test_batch_size_does_not_change_bytes(model_dir, tmp_path, solver):
    common = ['--model_path', model_dir, '--seeds=0-11', '--net_batch=8', *SOLVER_ARGS[solver]]
    _ok(*common, '--batch=1', '--outdir', tmp_path / 'b1')
    _ok(*common, '--batch=64', '--outdir', tmp_path / 'b64')
    _ok(*common, '--batch=5', '--outdir', tmp_path / 'b5')
    ref = _pngs(tmp_path / 'b64')
    assert sorted(ref) == [os.path.join('000000', f'{s:06d}.png') for s in range(12)]
    assert _pngs(tmp_path / 'b1') == ref and _pngs(tmp_path / 'b5') == ref
    assert len(set(ref.values())) == 12  # every seed its own image


def test_sde_samples_depend_on_their_own_noise(model_dir, tmp_path):
    # er_sde draws fresh noise per step; the same seeds with the ODE variant (noise_fn=1) must differ.
    common = ['--model_path', model_dir, '--seeds=0-3', '--solver=er_sde', '--num_steps=5']
    _ok(*common, '--outdir', tmp_path / 'sde')
    _ok(*common, '--noise_fn=1', '--outdir', tmp_path / 'ode')
    assert _pngs(tmp_path / 'sde').keys() == _pngs(tmp_path / 'ode').keys()
    assert all(a != b for a, b in zip(_pngs(tmp_path / 'sde').values(), _pngs(tmp_path / 'ode').values()))


@pytest.mark.parametrize('solver', SOLVER_ARGS)
def test_two_processes_match_one(model_dir, tmp_path, solver):
    common = ['--model_path', model_dir, '--seeds=0-9', '--batch=3', *SOLVER_ARGS[solver]]
    _ok(*common, '--outdir', tmp_path / 'one')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(REPO, 'sample.py'), *common, '--outdir', str(tmp_path / 'two')]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '2 process(es)' in proc.stdout and proc.stdout.count('Done.') == 1
    assert _pngs(tmp_path / 'two') == _pngs(tmp_path / 'one')


@pytest.mark.parametrize('solver', SOLVER_ARGS)
def test_interrupted_run_resumes_to_the_same_bytes(model_dir, tmp_path, monkeypatch, solver):
    common = ['--model_path', model_dir, '--seeds=0-13', '--batch=4', *SOLVER_ARGS[solver]]
    _ok(*common, '--outdir', tmp_path / 'full')

    # Kill the run after 6 images, in its second batch.
    class Killed(Exception):
        pass
    write, saved, lock = sample.atomic_write_bytes, [], threading.Lock()

    def write_then_die(path, data):
        with lock:  # the writer threads write one at a time already; the lock keeps the test independent of it
            if len(saved) == 6:
                raise Killed
            write(path, data)
            saved.append(path)
    monkeypatch.setattr(sample, 'atomic_write_bytes', write_then_die)
    assert isinstance(_run(*common, '--outdir', tmp_path / 'cut').exception, Killed)
    monkeypatch.setattr(sample, 'atomic_write_bytes', write)
    assert len(_pngs(tmp_path / 'cut')) == 6

    # Also lose two images of the first batch. The same command finishes the job without touching the rest.
    for seed in (1, 2):
        os.remove(sample.image_path(str(tmp_path / 'cut'), seed))
    kept = {p: os.stat(p) for p in saved if os.path.exists(p)}
    result = _ok(*common, '--outdir', tmp_path / 'cut')
    assert '(4 already done)' in result.output
    assert _pngs(tmp_path / 'cut') == _pngs(tmp_path / 'full')
    for path, st in kept.items():
        assert (os.stat(path).st_mtime_ns, os.stat(path).st_ino) == (st.st_mtime_ns, st.st_ino)
    others = [n for _, _, names in os.walk(tmp_path / 'cut') for n in names if not n.endswith('.png')]
    assert others == [sample.SETTINGS_FILE]  # no temporary file left behind


def test_no_resume_rewrites(model_dir, tmp_path):
    common = ['--model_path', model_dir, '--seeds=0-1', '--num_steps=3', '--outdir', tmp_path]
    _ok(*common)
    result = _ok(*common, '--no-resume')
    assert '(0 already done)' in result.output

#----------------------------------------------------------------------------
# Output layout, printout, grid, predictor.


def test_layout_printout_and_grid(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _ok('--model_path', model_dir, '--seeds=998-1001,5', '--grid', '--solver=euler', '--num_steps=4')
    outdir = os.path.join('samples', 'tiny', 'euler_nfe3')  # default: samples/<model>/<solver>_nfe<NFE>
    expected = [os.path.join(d, f'{s:06d}.png') for d, s in [('000000', 5), ('000000', 998), ('000000', 999),
                                                              ('001000', 1000), ('001000', 1001)]]
    assert sorted(_pngs(outdir)) == sorted(expected)  # the grid is next to the folder, not in it
    assert 'Grid:     ' + outdir + '-grid.png' in result.output
    lines = result.output.splitlines()
    assert lines[0].startswith('Model:') and '1x8x8' in lines[0]
    assert lines[1].startswith('Solver:   euler')
    assert lines[2].startswith('Schedule: polynomial rho=7, 4 points: 80 ') and lines[2].endswith(' 0.002')
    assert lines[3] == 'NFE:      3 real network calls per image'
    # A long schedule prints its first and last ten levels (100,000 points printed 700 kB on one line).
    result = _ok('--model_path', model_dir, '--seeds=0', '--solver=euler', '--num_steps=31', '--outdir=long')
    schedule = next(line for line in result.output.splitlines() if line.startswith('Schedule:'))
    levels = schedule.split('points: ')[1].split()
    assert len(levels) == 21 and levels[:2] == ['80', '66.53'] and levels[10] == '...' and levels[-1] == '0.002'
    # Grid of 5 images: 2 per row, 3 rows, in seed order, each upscaled 8x to 64x64, 4-pixel gray gaps.
    grid = np.asarray(PIL.Image.open(outdir + '-grid.png'))
    assert grid.shape == (3 * 68 + 4, 2 * 68 + 4)
    first = np.asarray(PIL.Image.open(sample.image_path(outdir, 998)))
    assert PIL.Image.open(sample.image_path(outdir, 998)).mode == 'L'
    assert np.array_equal(grid[4:68, 4:68], first.repeat(8, axis=0).repeat(8, axis=1))
    assert (grid[:4] == 128).all() and (grid[:, 68:72] == 128).all() and (grid[140:, 72:] == 128).all()
    # fid.py on the folder finds the 5 samples only.
    import fid
    assert len(fid.ImageFolder(outdir)) == 5


def test_no_subdirs(model_dir, tmp_path):
    _ok('--model_path', model_dir, '--seeds=1,1500', '--num_steps=3', '--no-subdirs', '--outdir', tmp_path)
    assert sorted(_pngs(tmp_path)) == ['000001.png', '001500.png']


def test_class_labels(tmp_path):
    save_model(_tiny_net(label_dim=3), str(tmp_path / 'cond'))
    common = ['--model_path', tmp_path / 'cond', '--seeds=0-5', '--num_steps=3']
    _ok(*common, '--outdir', tmp_path / 'random')
    _ok(*common, '--class=2', '--outdir', tmp_path / 'c2')
    _ok(*common, '--class=2', '--batch=1', '--outdir', tmp_path / 'c2b1')
    assert _pngs(tmp_path / 'c2') == _pngs(tmp_path / 'c2b1') != _pngs(tmp_path / 'random')
    result = _run(*common, '--class=3', '--outdir', tmp_path / 'c3')
    assert result.exit_code == 2 and '--class=3: the model has 3 classes' in result.output


def _save_predictor(path, model, num_steps=4, gamma=0.02):
    predictor = AdaSDEPredictor(num_steps=num_steps, gamma=gamma, seed=0,
                                settings=dict(dataset_name=None, model=model, schedule_type='time_uniform',
                                              schedule_rho=1.0, afs=True))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    predictor.save(path)


def test_predictor_sets_every_setting(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = os.path.join('exps', '00003-tiny-4-5-adasde-dpm-3')
    _save_predictor(os.path.join(run, 'network-snapshot-000002.safetensors'), model_dir)
    _save_predictor(os.path.join(run, 'network-snapshot-000010.safetensors'), model_dir, gamma=0.01)
    _save_predictor(os.path.join(run, 'network-snapshot-000005.safetensors'), model_dir)
    result = _ok('--predictor_path=3', '--seeds=0-5', '--batch=4', '--outdir', 'a')
    assert 'network-snapshot-000010.safetensors' in result.output  # the newest snapshot
    assert 'Schedule: time_uniform rho=1, 4 points' in result.output and 'NFE:      5' in result.output
    _ok('--predictor_path', run, '--seeds=0-5', '--batch=1', '--dataset_name', model_dir, '--outdir', 'b')
    assert _pngs('a') == _pngs('b') and len(_pngs('a')) == 6
    # Shipped predictors live under ./exp; ./exps (this machine's runs) is searched first.
    _save_predictor(os.path.join('exp', '00007-digits', 'predictor.safetensors'), model_dir)
    assert sample.resolve_predictor_path('7') == os.path.join('exp', '00007-digits', 'predictor.safetensors')
    assert sample.resolve_predictor_path('03') == os.path.join(run, 'network-snapshot-000010.safetensors')

#----------------------------------------------------------------------------
# Bad input: one line, no traceback.


def _assert_error(message, *args):
    result = _run(*args)
    assert isinstance(result.exception, SystemExit) and result.exit_code in (1, 2), result.output
    assert 'Traceback' not in result.output
    assert [line for line in result.output.splitlines() if line.startswith('Error:')] == [f'Error: {message}']


def test_bad_input(model_dir, tmp_path):
    m = ['--model_path', model_dir, '--outdir', tmp_path]
    _assert_error(f"unknown solver 'rk45'; choose from {', '.join(sorted(solvers.SOLVERS))}", *m, '--solver=rk45')
    _assert_error("solver 'euler' has no option S_churn; its options: none", *m, '--solver=euler', '--S_churn=10')
    _assert_error('--seeds: Invalid range "5-2" in \'5-2\': the end is smaller than the start', *m, '--seeds=5-2')
    _assert_error('--seeds: Invalid item "x" in \'x\': expected a non-negative integer or a range "a-b"',
                  *m, '--seeds=x')
    _assert_error('--seeds: seed 2 appears twice', *m, '--seeds=1-3,2')
    _assert_error('give --dataset_name, --model_path or --predictor_path', '--seeds=1')
    _assert_error(f'network pickle not found: {tmp_path / "missing.pkl"}', '--model_path', tmp_path / 'missing.pkl')
    _assert_error(f"unknown model 'no_such_dataset': not a zoo name ({', '.join(models.ZOO)}), nor an existing "
                  'file, directory or URL', '--dataset_name=no_such_dataset')
    assert not _pngs(tmp_path)


def test_sizes_that_cannot_fit_fail_up_front(model_dir, tmp_path, monkeypatch):
    m = ['--model_path', model_dir, '--outdir', tmp_path]
    monkeypatch.setattr(sample.cli, 'available_memory', lambda device: 10 * 2**30)
    # 10^9 images of 1x8x8 float32 = 238.4 GiB for one network call's input.
    _assert_error('--net_batch=1000000000: 1000000000 images of 1x8x8 need 238.4 GiB for the input alone, and cpu has '
                  '10.0 GiB available; give a smaller --net_batch', *m, '--net_batch=1000000000')
    _assert_error('--batch=100000000: 100000000 images of 1x8x8 need 47.7 GiB for the input alone, and cpu has '
                  '10.0 GiB available; give a smaller --batch', *m, '--batch=100000000', '--seeds=0-99999999')
    # A hundred million seeds: every PNG takes at least one block of the disk (4 KiB here).
    monkeypatch.setattr(sample.cli.shutil, 'disk_usage', lambda path: types.SimpleNamespace(free=2**36))
    monkeypatch.setattr(sample.cli, 'bytes_on_disk', lambda size, path: -(-size // 4096) * 4096)
    _assert_error(f'--outdir={tmp_path}: 65536 MiB free on that disk, this run needs about 390625 MiB',
                  *m, '--seeds=0-99999999')
    assert not _pngs(tmp_path)


def test_existing_seeds_are_found_by_folder(tmp_path):
    out = str(tmp_path)
    for seed in (3, 4, 5, 999, 1000, 7001, 123456):
        sample.save_image(np.zeros([2, 2, 1], np.uint8), sample.image_path(out, seed))
    sample.save_image(np.zeros([2, 2, 1], np.uint8), os.path.join(out, '001000', '000005.png'))  # wrong folder
    os.makedirs(os.path.join(out, '002000', '002001.png'))  # a folder, not an image
    seeds = sample.parse_int_list('0-99999999')
    assert sample.done_seeds(out, seeds).ranges == (range(3, 6), range(999, 1001), range(7001, 7002),
                                                    range(123456, 123457))
    assert list(sample.done_seeds(out, sample.parse_int_list('7000-7999,5'))) == [3, 4, 5, 999, 7001]  # 2 folders
    todo = seeds.without(sample.done_seeds(out, seeds))
    assert len(todo) == 10**8 - 7 and todo[:4] == sample.parse_int_list('0-2,6')
    flat = str(tmp_path / 'flat')
    for seed in (0, 1, 2, 10):
        sample.save_image(np.zeros([2, 2, 1], np.uint8), sample.image_path(flat, seed, subdirs=False))
    assert sample.done_seeds(flat, seeds, subdirs=False).ranges == (range(0, 3), range(10, 11))


def test_full_disk_says_how_to_resume(model_dir, tmp_path, monkeypatch):
    common = ['--model_path', model_dir, '--seeds=0-13', '--batch=4', '--solver=euler', '--num_steps=3']
    _ok(*common, '--outdir', tmp_path / 'full')
    write, calls, lock = sample.atomic_write_bytes, [], threading.Lock()

    def write_until_full(path, data):  # the disk fills after 6 images
        with lock:
            calls.append(path)
            if len(calls) > 6:
                raise OSError(errno.ENOSPC, 'No space left on device')
        write(path, data)
    monkeypatch.setattr(sample, 'atomic_write_bytes', write_until_full)
    result = _run(*common, '--outdir', tmp_path / 'cut')
    assert result.exit_code == 1 and 'Traceback' not in result.output
    assert [line for line in result.output.splitlines() if line.startswith('Error:')] == [
        f'Error: {tmp_path / "cut"}: no space left on the disk after 6 new image(s) of this process, all whole; free '
        'some space and run the same command again: the images already written are skipped']
    cut = _pngs(tmp_path / 'cut')
    full = _pngs(tmp_path / 'full')
    assert len(cut) == 6 and all(full[name] == data for name, data in cut.items())
    monkeypatch.setattr(sample, 'atomic_write_bytes', write)
    assert '(6 already done)' in _ok(*common, '--outdir', tmp_path / 'cut').output
    assert _pngs(tmp_path / 'cut') == full


def test_bad_solver_option_values_fail_before_sampling(model_dir, tmp_path):
    m = ['--model_path', model_dir, '--outdir', tmp_path]
    result = _run(*m, '--solver=er_sde', '--noise_fn=9')
    assert result.exit_code == 2
    assert 'Error: er_sde: noise_fn must be one of 1, 2, 3, 4, 5, 6, 7, got 9' in result.output
    assert not _pngs(tmp_path)


def test_predictor_conflicts(model_dir, tmp_path):
    path = str(tmp_path / 'p.safetensors')
    _save_predictor(path, model_dir)
    _assert_error(f"this predictor was trained for model '{model_dir}', not 'cifar10'",
                  '--predictor_path', path, '--dataset_name=cifar10')
    _assert_error('this predictor was trained for num_steps=4, not 6', '--predictor_path', path, '--num_steps=6')
    _assert_error('--predictor_path runs the adasde solver, not --solver=euler', '--predictor_path', path,
                  '--solver=euler')
    _assert_error(f'--predictor_path={tmp_path / "none.safetensors"}: no such file',
                  '--predictor_path', tmp_path / 'none.safetensors')
    _assert_error('--predictor_path=9999: no experiment 09999-* with a snapshot under ./exps or ./exp',
                  '--predictor_path=9999')

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# Every learned solver through sample.py: a saved predictor and its re-saved copy give the same PNG bytes, and the
# summary prints real network calls (and EPD's "parallel NFE" beside them).


@pytest.mark.parametrize('kind,hyper,nfe_line', [
    ('adasde', dict(num_steps=4), 'NFE:      5 real network calls per image'),
    ('amed', dict(num_steps=4, base='dpmpp', scale_time=0.2), 'NFE:      5 real network calls per image'),
    ('epd', dict(num_steps=3, num_points=2), 'NFE:      5 real network calls per image (3 "parallel NFE" as the '
     'EPD code counts them)'),
])
def test_every_learned_solver_samples_and_round_trips(tmp_path, kind, hyper, nfe_line):
    from solvers.learned import load_predictor, make_predictor
    settings = dict(dataset_name='digits', model='digits', schedule_type='time_uniform', schedule_rho=1.0, afs=True)
    make_predictor(kind, **hyper, seed=2, settings=settings).save(tmp_path / 'a.safetensors')
    load_predictor(tmp_path / 'a.safetensors').save(tmp_path / 'b.safetensors')
    first = _ok('--predictor_path', tmp_path / 'a.safetensors', '--seeds=0-5', '--outdir', tmp_path / 'a')
    _ok('--predictor_path', tmp_path / 'b.safetensors', '--seeds=0-5', '--outdir', tmp_path / 'b', '--batch=4')
    assert nfe_line in first.output and f'Solver:   {kind}' in first.output
    pngs = _pngs(tmp_path / 'a')
    assert len(pngs) == 6 and pngs == _pngs(tmp_path / 'b')
    # Its settings are enforced, and another solver is refused.
    bad = _run('--predictor_path', tmp_path / 'a.safetensors', '--schedule_type=logsnr', '--outdir', tmp_path / 'c')
    assert bad.exit_code != 0 and "trained for schedule_type='time_uniform', not 'logsnr'" in bad.output
    bad = _run('--predictor_path', tmp_path / 'a.safetensors', '--solver=euler', '--outdir', tmp_path / 'c')
    assert bad.exit_code != 0 and f'--predictor_path runs the {kind} solver, not --solver=euler' in bad.output
    bad = _run('--dataset_name=digits', f'--solver={kind}', '--outdir', tmp_path / 'c')
    assert bad.exit_code != 0 and f'the {kind} solver needs a trained predictor' in bad.output

#----------------------------------------------------------------------------
# The speed options (writer threads, network precision, layout): the defaults give the bytes of the version
# before them, whatever the number of writer threads.

# sha256 of the PNGs (sorted by path, concatenated) of the digits model, seeds 0-9, --batch=4, written by sample.py
# before the writer threads, the seed ranges and the speed options existed.
DIGITS_BEFORE = {'dpmpp': 'e3f2e630576d0002d0322391811c50dd2ca6125ef846e45c2439bc6c7038867d',
                 'er_sde': '246aa4d91c846dedc74c6f693bd264d827dfd655dc2b71dde314adb970c5b24e'}


def _digest(outdir):
    files = _pngs(outdir)
    return hashlib.sha256(b''.join(files[name] for name in sorted(files))).hexdigest()


@pytest.mark.parametrize('solver', SOLVER_ARGS)
def test_defaults_write_the_bytes_of_before(tmp_path, solver):
    common = ['--dataset_name=digits', '--seeds=0-9', '--batch=4', *SOLVER_ARGS[solver]]
    _ok(*common, '--outdir', tmp_path / 'a')
    _ok(*common, '--writers=1', '--batch=3', '--outdir', tmp_path / 'b')
    assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b') == DIGITS_BEFORE[solver]


def test_speed_options(tmp_path, monkeypatch):
    common = ['--dataset_name=digits', '--seeds=0-5', '--solver=euler', '--num_steps=3']
    result = _ok(*common, '--channels_last', '--outdir', tmp_path / 'cl')
    assert 'channels_last=True' in result.output and len(_pngs(tmp_path / 'cl')) == 6
    assert sample.cli.read_settings(str(tmp_path / 'cl' / sample.SETTINGS_FILE))['channels_last'] is True
    _assert_error('--net_dtype=bfloat16: this model switches its precision on CUDA only; on cpu it runs in float32',
                  *common, '--net_dtype=bfloat16', '--outdir', tmp_path / 'bf')
    # A model without its own switch runs under autocast; float32 and auto are the same call.
    class Probe(torch.nn.Module):
        def forward(self, x, sigma, **kwargs):
            return torch.nn.functional.linear(x.float(), torch.eye(x.shape[-1]))
    x = torch.randn(2, 1, 3, 3)
    for name, dtype in [('auto', torch.float32), ('float32', torch.float32), ('bfloat16', torch.bfloat16)]:
        assert sample.NetCall(Probe(), net_dtype=name)(x, torch.ones(2)).dtype == dtype
    # EDM's switch is set, not wrapped.
    net = models.load_model('digits')
    sample.NetCall(net, net_dtype='bfloat16')
    assert net.use_fp16 and net.amp_dtype == torch.bfloat16


def test_writer_encodes_together_and_makes_files_one_at_a_time(tmp_path, monkeypatch):
    # Files made at once in one folder contend for its lock; the writer threads encode concurrently but write one
    # file at a time. Both are observed with slowed-down stand-ins.
    state = dict(encoding=0, writing=0, max_encoding=0, max_writing=0)
    lock = threading.Lock()
    encode, write = sample.encode_png, sample.atomic_write_bytes

    def track(key, fn, *args):
        with lock:
            state[key] += 1
            state['max_' + key] = max(state['max_' + key], state[key])
        try:
            threading.Event().wait(0.02)
            return fn(*args)
        finally:
            with lock:
                state[key] -= 1
    monkeypatch.setattr(sample, 'encode_png', lambda array: track('encoding', encode, array))
    monkeypatch.setattr(sample, 'atomic_write_bytes', lambda path, data: track('writing', write, path, data))
    arrays = np.zeros([8, 4, 4, 3], np.uint8) + np.arange(8, dtype=np.uint8)[:, None, None, None]
    with sample.ImageWriter(threads=4) as writer:
        for half in (arrays[:4], arrays[4:]):
            writer.submit(half[:2], [str(tmp_path / f'{int(a[0, 0, 0])}.png') for a in half[:2]])
            writer.submit(half[2:], [str(tmp_path / f'{int(a[0, 0, 0])}.png') for a in half[2:]])
    assert writer.written == 8 and state['max_writing'] == 1 and state['max_encoding'] >= 2
    assert [np.asarray(PIL.Image.open(tmp_path / f'{i}.png'))[0, 0, 0] for i in range(8)] == list(range(8))


def test_next_batch_is_drawn_ahead_in_a_helper_thread(monkeypatch):
    net = models.load_model('digits')
    seeds = list(range(10))
    sigmas = solvers.get_schedule(4, net.sigma_min, net.sigma_max, 'polynomial', 7)
    threads, drawn, draw = [], [], sample.draw_inputs

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        drawn.append(draw(*args, **kwargs))
        return drawn[-1]
    monkeypatch.setattr(sample, 'draw_inputs', recorded)
    batches = [[0, 1, 2], [], [3, 4, 5], [6, 7, 8], [9]]
    got = list(sample.generate_batches(net, batches, 'er_sde', None, sigmas, dtype=torch.float64))
    assert [b for b, _ in got] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]] and len(threads) == 4
    assert all(name.startswith('seed-draws') for name in threads)
    # The step noise too, from the third batch on (the plan is what the solver asked of the batch before last,
    # known when the next batch's draws start): er_sde draws once in each of its 3 steps.
    noises = [inputs[0] for inputs in drawn]
    assert [len(n.calls) for n in noises] == [3, 3, 3, 3] and [n.given for n in noises] == [0, 0, 3, 3]
    # The same numbers as drawing in the caller's thread on demand: the latents, then every step's noise, per seed
    # (the network in chunks of 64 rows, as generate_batches calls it).
    monkeypatch.setattr(sample, 'draw_inputs', draw)
    alone = sample.sample_batch(sample.FixedBatchDenoiser(net, 64), seeds, 'er_sde', sigmas, dtype=torch.float64)
    assert torch.equal(torch.cat([x for _, x in got]), alone)


@pytest.mark.skipif(shutil.which(os.environ.get('CXX', 'g++')) is None,
                    reason='torch.compile on the CPU needs a C++ compiler')
def test_compile_end_to_end(tmp_path):
    # The network compiled with torch.compile (inductor, about a minute on 2 cores) gives the images of the
    # network as loaded; the folder records the option.
    torch._dynamo.reset()
    common = ['--dataset_name=digits', '--seeds=0-3', '--solver=euler', '--num_steps=3']
    result = _ok(*common, '--compile', '--outdir', tmp_path / 'compiled')
    assert 'compile=True' in result.output
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] >= 1  # dynamo did compile the network
    assert sample.cli.read_settings(str(tmp_path / 'compiled' / sample.SETTINGS_FILE))['compile'] is True
    _ok(*common, '--outdir', tmp_path / 'eager')
    compiled, eager = _pngs(tmp_path / 'compiled'), _pngs(tmp_path / 'eager')
    assert compiled.keys() == eager.keys() and len(compiled) == 4
    for name in compiled:
        a, b = (np.asarray(PIL.Image.open(io.BytesIO(files[name]))).astype(int) for files in (compiled, eager))
        assert np.abs(a - b).max() <= 1  # fused kernels may round differently; on this machine they were equal

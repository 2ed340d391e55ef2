"""The failure modes a new user meets (issue 14): each case gives its exit code and one line, and the silent ones
now refuse without overwriting or scoring anything."""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from test_rerun import files_under

import dataset_tool
import fid
import sample
import solvers
import train
from models.edm import EDMPrecond, save_model
from torch_utils import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_REF = os.path.join(REPO, 'src', 'digits', 'fid-ref.npz')
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)

#----------------------------------------------------------------------------
# Helpers.


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    net = EDMPrecond(8, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    path = str(tmp_path_factory.mktemp('model') / 'tiny')
    save_model(net.eval(), path)
    return path


def _invoke(command, *args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    return result.exit_code, result.output, result.exception


def _error_lines(output):
    return [line for line in output.splitlines() if line.startswith('Error:')]


def _assert_one_line(command, expected, *args, exit_code=2, exact=True):
    """The command fails with `exit_code`, prints no traceback, and exactly one 'Error:' line: `expected` (or one
    starting with it, when not `exact`)."""
    code, output, exc = _invoke(command, *args)
    assert code == exit_code and isinstance(exc, SystemExit), (code, output, exc)
    assert 'Traceback' not in output
    lines = _error_lines(output)
    assert len(lines) == 1, output
    if exact:
        assert lines[0] == f'Error: {expected}', output
    else:
        assert lines[0].startswith(f'Error: {expected}'), output
    return output


def _script(*args, timeout=300, env=None):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _assert_script_one_line(expected, *args, exit_code=2):
    """As _assert_one_line, for the script run as `python <script> ...` (what a user sees)."""
    code, out, err = _script(*args)
    assert code == exit_code, (code, out, err)
    assert 'Traceback' not in out + err
    lines = _error_lines(out + err)
    assert len(lines) == 1 and lines[0].startswith(f'Error: {expected}'), out + err
    return out + err

#----------------------------------------------------------------------------
# 1. sample.py records its settings; adding to a folder made with other settings is refused.


def test_sample_resume_with_other_settings_is_refused(model_dir, tmp_path):
    outdir = tmp_path / 'D'
    m = ['--model_path', model_dir, '--outdir', outdir]
    code, output, _ = _invoke(sample.main, *m, '--solver=dpmpp', '--num_steps=5', '--seeds=0-3')
    assert code == 0, output
    settings = json.loads((outdir / sample.SETTINGS_FILE).read_text())
    assert settings['solver'] == 'dpmpp' and settings['num_steps'] == 5
    before = files_under(outdir)

    # The case: another solver into the same folder. Nothing is written, nothing is skipped as "done".
    _assert_one_line(sample.main, f'{outdir} was made with solver=\'dpmpp\', not \'euler\' (and 4 more setting(s): '
                     'options, num_steps, schedule_type, schedule_rho); give --overwrite to replace its images, or '
                     'another --outdir', *m, '--solver=euler', '--num_steps=3', '--seeds=0-3')
    # One differing setting is named alone.
    _assert_one_line(sample.main, f'{outdir} was made with num_steps=5, not 4; give --overwrite to replace its '
                     'images, or another --outdir', *m, '--solver=dpmpp', '--num_steps=4', '--seeds=0-3')
    assert files_under(outdir) == before

    # Same settings: more seeds are added, the old ones skipped.
    code, output, _ = _invoke(sample.main, *m, '--solver=dpmpp', '--num_steps=5', '--seeds=0-5')
    assert code == 0 and '(4 already done)' in output, output

    # --overwrite: the earlier images go, all are made anew with the new settings.
    code, output, _ = _invoke(sample.main, *m, '--solver=euler', '--num_steps=3', '--seeds=0-1', '--overwrite')
    assert code == 0, output
    assert f'--overwrite: removed the 6 images of the earlier run in {outdir}' in output
    assert sorted(p for p in files_under(outdir) if p.endswith('.png')) == [os.path.join('000000', '000000.png'),
                                                                       os.path.join('000000', '000001.png')]
    assert json.loads((outdir / sample.SETTINGS_FILE).read_text())['solver'] == 'euler'
    fresh = tmp_path / 'fresh'
    assert _invoke(sample.main, '--model_path', model_dir, '--outdir', fresh, '--solver=euler', '--num_steps=3',
                   '--seeds=0-1')[0] == 0
    assert {p: b for p, b in files_under(outdir).items() if p.endswith('.png')} == \
        {p: b for p, b in files_under(fresh).items() if p.endswith('.png')}


def test_sample_folder_without_settings_is_refused(model_dir, tmp_path):
    outdir = tmp_path / 'old'
    png = outdir / '000000' / '000000.png'
    png.parent.mkdir(parents=True)
    PIL.Image.fromarray(np.zeros([8, 8], np.uint8)).save(png)
    _assert_one_line(sample.main, f'{outdir} holds images but no {sample.SETTINGS_FILE} saying how they were made; '
                     'give --overwrite to replace them, or another --outdir',
                     '--model_path', model_dir, '--outdir', outdir, '--seeds=0-1', '--num_steps=3')
    assert sorted(files_under(outdir)) == [os.path.join('000000', '000000.png')]


def test_sample_help_lists_the_solvers():
    code, output, _ = _invoke(sample.main, '--help')
    assert code == 0
    flat = ' '.join(output.split())
    assert f'Solver: {", ".join(sorted(solvers.SOLVERS))} [default: dpmpp]' in flat

#----------------------------------------------------------------------------
# 3. An unavailable device is an error.


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_cuda_without_cuda_is_an_error(model_dir, tmp_path):
    expected = f'--device=cuda: CUDA is not available on this machine (torch {torch.__version__}); use --device=cpu'
    _assert_one_line(sample.main, expected, '--model_path', model_dir, '--outdir', tmp_path / 's', '--device=cuda')
    assert not (tmp_path / 's').exists()
    _assert_one_line(train.main, expected, '--outdir', tmp_path / 'e', '--device=cuda', '--total_kimg=0.032')
    assert not (tmp_path / 'e').exists()
    _assert_one_line(sample.main, '--device=nonsense: not a device', '--model_path', model_dir, '--outdir',
                     tmp_path / 's', '--device=nonsense', exact=False)

#----------------------------------------------------------------------------
# 5. File system problems, before any work; seeds that overflow.


def test_outdir_problems_are_found_before_the_work(model_dir, tmp_path, monkeypatch):
    a_file = tmp_path / 'file'
    a_file.write_text('not a folder')
    m = ['--model_path', model_dir, '--seeds=0-1', '--num_steps=3']
    _assert_one_line(sample.main, f'--outdir={a_file}: this is a file, not a folder', *m, '--outdir', a_file)
    _assert_one_line(sample.main, f'--outdir={a_file / "sub"}: {a_file} is a file, not a folder', *m,
                     '--outdir', a_file / 'sub')
    _assert_one_line(train.main, f'--outdir={a_file}: this is a file, not a folder', '--outdir', a_file,
                     '--total_kimg=0.032')
    _assert_one_line(fid.main, f'--dest={a_file / "x.npz"}: {a_file} is a file, not a folder', 'ref',
                     f'--data={tmp_path}', f'--dest={a_file / "x.npz"}')
    _assert_one_line(fid.main, f'--dest={tmp_path}: this is a folder, not a file', 'ref', f'--data={tmp_path}',
                     f'--dest={tmp_path}')

    # A read-only file system (simulated: the tests run as root, for whom permissions do not stop a write).
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, 'Read-only file system')
    with monkeypatch.context() as patch:
        patch.setattr(tempfile, 'mkstemp', read_only)
        ro = tmp_path / 'ro' / 'out'
        _assert_one_line(sample.main, f'--outdir={ro}: cannot write in {tmp_path} (read-only file system)', *m,
                         '--outdir', ro)
        _assert_one_line(train.main, f'--outdir={ro}: cannot write in {tmp_path} (read-only file system)',
                         '--outdir', ro, '--total_kimg=0.032')
        _assert_one_line(fid.main, f'--dest={ro / "x.npz"}: cannot write in {tmp_path} (read-only file system)',
                         'ref', f'--data={tmp_path}', f'--dest={ro / "x.npz"}')

    # A full disk (simulated): 64 images of 8x8 need about 70 KiB.
    with monkeypatch.context() as patch:
        patch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
        full = tmp_path / 'full'
        _assert_one_line(sample.main, f'--outdir={full}: 0 MiB free on that disk, this run needs about 0 MiB',
                         '--model_path', model_dir, '--seeds=0-63', '--num_steps=3', '--outdir', full)
        _assert_one_line(train.main, f'--outdir={full}: 0 MiB free on that disk, this run needs about 1 MiB',
                         '--outdir', full, '--total_kimg=0.032')
    assert not (tmp_path / 'ro').exists() and not (tmp_path / 'full').exists()

    # An empty path is one line, not the current folder (dataset_tool wrote there) or a failed rename (fid.py).
    _assert_one_line(train.main, '--outdir is empty: give a folder', '--outdir=', '--total_kimg=0.032')
    _assert_one_line(fid.main, '--dest is empty: give a file name', 'ref', f'--data={tmp_path}', '--dest=')
    _assert_one_line(dataset_tool.main, '--dest is empty: give a folder', '--source=digits', '--dest=')
    # A path through a missing folder: the checks read it normalised, and so must the writers (sample.py made
    # 'out' beside 'missing', then failed to rename its options file into 'missing/../out').
    code, output, exc = _invoke(sample.main, *m, '--outdir', tmp_path / 'missing' / '..' / 'out')
    assert code == 0, output
    assert sorted(files_under(tmp_path / 'out')) == [os.path.join('000000', '000000.png'),
                                                   os.path.join('000000', '000001.png'), 'sample_options.json']
    code, output, exc = _invoke(dataset_tool.main, '--source=digits', '--max-images=3',
                                f'--dest={tmp_path / "missing" / ".." / "d.zip"}')
    assert code == 0 and (tmp_path / 'd.zip').is_file() and not (tmp_path / 'missing').exists(), output


def test_train_refuses_before_making_its_run_folder(tmp_path):
    """These were found only by training_loop, after the run folder, its log and its options file were written."""
    out = tmp_path / 'exps'
    _assert_one_line(train.main, '--batch-gpu=2 does not divide the per-process batch 3', '--batch=3', '--batch-gpu=2',
                     f'--outdir={out}')
    _assert_one_line(train.main, f"Invalid value for --prompts: prompt file not found: {tmp_path / 'none.csv'}",
                     f'--prompts={tmp_path / "none.csv"}', f'--outdir={out}')
    _assert_one_line(train.main, "Invalid value for --desc: '-a/b': part of the run folder's name, it cannot hold a "
                     'path separator', '--desc=-a/b', f'--outdir={out}')  # made a nested run folder
    assert not out.exists()
    _assert_one_line(sample.main, "unknown solver ''; choose from", '--dataset_name=digits', '--solver=',
                     f'--outdir={out}', exact=False)  # an empty name ran dpmpp


@pytest.mark.parametrize('command,args,option,value', [
    (train.main, ['--total_kimg=0.032'], '--lr', 'inf'),
    (train.main, ['--total_kimg=0.032'], '--total_kimg', 'nan'),
    (train.main, ['--total_kimg=0.032'], '--gamma', 'nan'),
    (train.main, ['--total_kimg=0.032'], '--schedule_rho', '-inf'),
    (sample.main, ['--dataset_name=digits', '--solver=edm'], '--S_noise', 'inf'),
    (sample.main, ['--dataset_name=digits'], '--schedule_rho', 'nan'),
    (sample.main, ['--dataset_name=digits'], '--guidance_rate', 'nan'),
])
def test_non_finite_numbers_are_refused(command, args, option, value, tmp_path):
    """click's FLOAT takes nan and inf, and a range check lets nan through: NaN tables and black images followed."""
    _assert_one_line(command, f"Invalid value for '{option}': '{value}' is not a finite number.", *args,
                     f'--outdir={tmp_path / "out"}', f'{option}={value}')
    assert not (tmp_path / 'out').exists()


def test_fid_ref_checks_dest_before_the_work(tmp_path, monkeypatch):
    """fid.py ref used to compute all statistics, then fail writing them."""
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(3):
        PIL.Image.fromarray(np.full([8, 8], i * 50, np.uint8)).save(images / f'{i}.png')
    computed = []
    monkeypatch.setattr(fid, 'compute_dataset_stats', lambda *a, **k: computed.append(1))
    a_file = tmp_path / 'file'
    a_file.write_text('x')
    _assert_one_line(fid.main, f'--dest={a_file / "r.npz"}: {a_file} is a file, not a folder', 'ref',
                     f'--data={images}', f'--dest={a_file / "r.npz"}')
    assert not computed


def test_overflowing_seeds(model_dir, tmp_path):
    m = ['--model_path', model_dir, '--outdir', tmp_path / 's']
    _assert_one_line(sample.main, "--seeds: 99999999999999999999 in '99999999999999999999' is too large (at most "
                     "4294967295)", *m, '--seeds=99999999999999999999')
    _assert_one_line(sample.main, "--seeds: 99999999999999999999 in '0-99999999999999999999' is too large (at most "
                     "4294967295)", *m, '--seeds=0-99999999999999999999')
    code, output, _ = _invoke(sample.main, *m, '--seeds=4294967295', '--num_steps=3')
    assert code == 0, output
    assert not os.path.exists(tmp_path / 'e')
    _assert_one_line(train.main, "Invalid value for '--seed': 99999999999999999999 is not in the range "
                     "0<=x<=4294967295.", '--outdir', tmp_path / 'e', '--seed=99999999999999999999')

#----------------------------------------------------------------------------
# 2. Statistics record the image shape; calc refuses other images (EDM's and the digits' statistics: the zoo's).


def _write_pngs(folder, num, size, channels=1, value_seed=0):
    rnd = np.random.RandomState(value_seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(num):
        pixels = rnd.randint(0, 256, size=[size, size, channels], dtype=np.uint8)
        PIL.Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(os.path.join(folder, f'{i:06d}.png'))
    return folder


def test_fid_refuses_images_of_another_resolution(tmp_path, monkeypatch):
    scored = []
    real = fid.compute_dataset_stats
    monkeypatch.setattr(fid, 'compute_dataset_stats', lambda *a, **k: scored.append(1) or real(*a, **k))
    big = _write_pngs(str(tmp_path / 'big'), 50, 16)
    # The case: 16x16 grayscale against the digits statistics (which record no shape; the zoo knows it).
    _assert_one_line(fid.main, f'The images in {big} are 16x16 with 1 channel, but reference statistics '
                     f'{DIGITS_REF} are of 8x8 with 1 channel images', 'calc', f'--images={big}',
                     f'--ref={DIGITS_REF}', exit_code=1)
    # EDM's published statistics, by name: a file in the download cache stands in for cifar10-32x32.npz (which,
    # like the real one, holds mu and sigma only); the shape is the zoo's.
    import hashlib

    import dnnlib
    monkeypatch.setattr(dnnlib.util, '_dnnlib_cache_dir', str(tmp_path / 'cache'))
    os.makedirs(tmp_path / 'cache' / 'downloads')
    url_md5 = hashlib.md5(fid.ref_location('cifar10').encode('utf-8')).hexdigest()
    np.savez(str(tmp_path / 'cache' / 'downloads' / f'{url_md5}_cifar10-32x32.npz'), mu=np.zeros(2048),
             sigma=np.eye(2048))
    assert fid.load_stats('cifar10')['image_shape'] == (3, 32, 32)
    _assert_one_line(fid.main, f'The images in {big} are 16x16 with 1 channel, but reference statistics cifar10 '
                     'are of 32x32 with 3 channels images', 'calc', f'--images={big}', '--ref=cifar10', exit_code=1)
    assert fid.published_image_shape(fid.ref_location('imagenet64')) == (3, 64, 64)
    assert not scored  # refused before any feature was computed
    monkeypatch.undo()

    # Statistics written by fid.py ref record the shape and are checked the same way.
    small = _write_pngs(str(tmp_path / 'small'), 20, 8)
    ref = str(tmp_path / 'small.npz')
    code, output, _ = _invoke(fid.main, 'ref', f'--data={small}', f'--dest={ref}', '--detector=digits')
    assert code == 0, output
    assert fid.load_stats(ref)['image_shape'] == (1, 8, 8)
    with np.load(ref) as data:
        assert data['image_shape'].tolist() == [1, 8, 8]
    scored.clear()
    monkeypatch.setattr(fid, 'compute_dataset_stats', lambda *a, **k: scored.append(1) or real(*a, **k))
    _assert_one_line(fid.main, f'The images in {big} are 16x16 with 1 channel, but reference statistics {ref} '
                     'are of 8x8 with 1 channel images', 'calc', f'--images={big}', f'--ref={ref}', exit_code=1)
    assert not scored  # refused before any feature was computed
    code, output, _ = _invoke(fid.main, 'calc', f'--images={small}', f'--ref={ref}')
    assert code == 0 and abs(float(output.split()[-1])) < 1e-3, output


def test_text_file_as_ref_gives_no_unpickling_advice(tmp_path):
    images = _write_pngs(str(tmp_path / 'img'), 4, 8)
    text = tmp_path / 'notes.npz'
    text.write_text('these are not statistics\n')
    output = _assert_one_line(fid.main, f'Reference statistics {text} are not an .npz file', 'calc',
                              f'--images={images}', f'--ref={text}', exit_code=1)
    assert 'pickle' not in output.lower()

#----------------------------------------------------------------------------
# 5. A damaged training-state.pt with --resume: one line, without torch's advice to unpickle.


TRAIN = ['--num_steps=3', '--M=1', '--batch=4', '--total_kimg=0.004', '--alpha=0']


def test_corrupt_training_state(tmp_path):
    outdir = tmp_path / 'exps'
    code, output, _ = _invoke(train.main, '--outdir', outdir, *TRAIN)
    assert code == 0, output
    run_dir, = outdir.iterdir()
    state = run_dir / 'training-state.pt'
    snapshots = sorted(p.name for p in run_dir.iterdir())
    for damage in (b'garbage, not a zip', state.read_bytes()[:200]):
        state.write_bytes(damage)
        output = _assert_one_line(train.main, f'cannot resume from {state}: not a file written by train.py '
                                  '(damaged or truncated); delete it to restart that run, or leave out --resume to '
                                  'start a new one', '--outdir', outdir, *TRAIN, '--resume', exit_code=1)
        assert 'weights_only' not in output and 'pickle' not in output.lower()
        assert sorted(p.name for p in run_dir.iterdir()) == snapshots and state.read_bytes() == damage

#----------------------------------------------------------------------------
# 1. train.py --resume into the run of that name made with other options: the differing option is named.


def test_train_resume_with_other_options_is_refused(tmp_path):
    outdir = tmp_path / 'exps'
    assert _invoke(train.main, '--outdir', outdir, *TRAIN)[0] == 0
    run_dir, = outdir.iterdir()
    before = files_under(run_dir)
    _assert_one_line(train.main, f'--resume: {run_dir} was made with lr=0.2, not 0.1; give the same options to '
                     'continue it, or leave out --resume to start a new run', '--outdir', outdir, *TRAIN,
                     '--lr=0.1', '--resume')
    assert list(outdir.iterdir()) == [run_dir] and files_under(run_dir) == before
    # The same options resume it; another run name (other num_steps) is another experiment: a new run.
    code, output, _ = _invoke(train.main, '--outdir', outdir, *TRAIN, '--resume')
    assert code == 0 and f'--resume: {run_dir} is finished' in output, output
    code, output, _ = _invoke(train.main, '--outdir', outdir, *TRAIN, '--num_steps=4', '--resume', '--dry-run')
    assert code == 0 and 'No run with these options to resume; starting a new one.' in output, output

#----------------------------------------------------------------------------
# 6. Model files are recognised by their content.


def test_model_files_by_content(model_dir, tmp_path):
    accepted = ('accepted: an EDM network pickle, a Stable Diffusion checkpoint (.ckpt torch zip or .safetensors), '
                'a folder with model.json (models.edm.save_model), a diffusers folder, a URL of a network pickle, '
                'a zoo name, or a cm/adm/ldm checkpoint with its kind (--model_kind)')
    m = ['--outdir', tmp_path / 's', '--seeds=0']
    noise = tmp_path / 'random.safetensors'
    noise.write_bytes(np.random.RandomState(0).bytes(4096))
    _assert_one_line(sample.main, f'{noise}: not a model file of a format this project reads; {accepted}',
                     '--model_path', noise, *m, exit_code=1)
    text = tmp_path / 'model.ckpt'
    text.write_text('hello')
    _assert_one_line(sample.main, f'{text}: not a model file of a format this project reads; {accepted}',
                     '--model_path', text, *m, exit_code=1)
    # A pickle is a network pickle whatever its name.
    import pickle
    renamed = tmp_path / 'net.bin'
    renamed.write_bytes(pickle.dumps(dict(G=1)))
    _assert_one_line(sample.main, f'{renamed}: not an EDM network pickle (expected a dict with key "ema", got G)',
                     '--model_path', renamed, *m, exit_code=1)
    # A valid safetensors file that is no Stable Diffusion checkpoint, and an AdaSDE predictor.
    import safetensors.torch
    plain = tmp_path / 'weights.safetensors'
    safetensors.torch.save_file({'w': torch.zeros(2)}, str(plain))
    _assert_one_line(sample.main, f'{plain}: a safetensors file without Stable Diffusion weights '
                     f'(model.diffusion_model.*); {accepted}', '--model_path', plain, *m, exit_code=1)
    from solvers.adasde import AdaSDEPredictor
    predictor = tmp_path / 'p.safetensors'
    AdaSDEPredictor(num_steps=3).save(str(predictor))
    _assert_one_line(sample.main, f'{predictor} is a learned-solver predictor, not a diffusion model (give it as '
                     '--predictor_path)', '--model_path', predictor, *m, exit_code=1)
    assert not (tmp_path / 's').exists()

#----------------------------------------------------------------------------
# 7. Under torchrun, one line from the project states the error, whatever torchrun adds after it.

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


@pytest.mark.parametrize('script, args, expected', [
    ('sample.py', ['--dataset_name=digits', '--no_such_flag'], "No such option '--no_such_flag'."),
    ('sample.py', ['--dataset_name=digits', '--seeds=5-2'],
     '--seeds: Invalid range "5-2" in \'5-2\': the end is smaller than the start'),
    ('train.py', ['--no_such_flag'], "No such option '--no_such_flag'."),
    ('fid.py', ['calc', '--images=nowhere', f'--ref={DIGITS_REF}'], 'Image path not found: nowhere'),
])
def test_torchrun_errors_are_one_line(script, args, expected, tmp_path):
    outdir = [] if script == 'fid.py' else [f'--outdir={tmp_path}']
    proc = subprocess.run(TORCHRUN + [script, *outdir, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert [line for line in output.splitlines() if line.startswith('Error:')] == [f'Error: {expected}'], output
    # Nothing of the project's before it (torchrun's own report and traceback follow it), no trace of the script.
    assert 'Traceback' not in output.split('Error:')[0] and f'{script}", line' not in output, output

#----------------------------------------------------------------------------
# 4. The thread policy: by default half the cores (at least 1) and passive OpenMP waiting; the environment wins.


def test_thread_policy_defaults_and_overrides():
    env = {}
    assert cli.apply_thread_policy(env) == str(cli.default_num_threads())
    assert env == dict(OMP_NUM_THREADS=env['OMP_NUM_THREADS'], MKL_NUM_THREADS=env['OMP_NUM_THREADS'],
                       OMP_WAIT_POLICY='PASSIVE')
    env = dict(OMP_NUM_THREADS='3', OMP_WAIT_POLICY='ACTIVE')
    assert cli.apply_thread_policy(env) == '3' and env['OMP_WAIT_POLICY'] == 'ACTIVE' and env['MKL_NUM_THREADS'] == '3'
    assert 1 <= cli.default_num_threads() <= 8


@pytest.mark.parametrize('script', ['sample', 'train', 'fid'])
def test_scripts_apply_the_thread_policy_before_torch(script):
    probe = (f'import {script}, os, torch; print(torch.get_num_threads(), os.environ["OMP_WAIT_POLICY"])')
    clean = {k: v for k, v in ENV.items() if k not in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OMP_WAIT_POLICY')}
    code, out, err = _script('-c', probe, env=clean)
    assert code == 0, err
    assert out.split() == [str(cli.default_num_threads()), 'PASSIVE']
    code, out, err = _script('-c', probe, env=dict(clean, OMP_NUM_THREADS='2'))
    assert code == 0 and out.split() == ['2', 'PASSIVE'], err


def test_demo_load_benchmark_starts(tmp_path):
    code, out, err = _script(os.path.join('bench', 'demo_load.py'), '--dry-run')
    assert code == 0 and 'launch.sh parses; dry run, nothing timed.' in out, out + err
    assert 'OMP_NUM_THREADS=(unset: the scripts choose)' in out
    # The harness around a quick command: a fresh copy per run, idle then busy, both times printed.
    code, out, err = _script(os.path.join('bench', 'demo_load.py'), '--command=bash launch.sh --help',
                             f'--logs={tmp_path}')
    assert code == 0, out + err
    assert out.count('FLUX.1-dev') == 2 and 'Demo wall time: idle ' in out and 'issue 14 asks for at most 2x' in out
    assert sorted(os.listdir(tmp_path)) == ['demo-load-busy.log', 'demo-load-idle.log']


def test_predictor_files_by_content(tmp_path):
    from solvers.adasde import AdaSDEPredictor
    named_pkl = tmp_path / 'predictor.pkl'  # a safetensors predictor under a pickle's name
    AdaSDEPredictor(num_steps=3).save(str(tmp_path / 'p.safetensors'))
    shutil.copy(tmp_path / 'p.safetensors', named_pkl)
    assert AdaSDEPredictor.load(str(named_pkl)).num_steps == 3
    cut = tmp_path / 'snapshot.bin'  # a (cut) pickle under another name goes to the snapshot importer
    cut.write_bytes(b'\x80\x04garbage')
    _assert_one_line(sample.main, f"--predictor_path: cannot read an official learned-solver snapshot from {cut}: "
                     "pickle data was truncated", '--predictor_path', cut,
                     '--outdir', tmp_path / 's')

#----------------------------------------------------------------------------
# 8. Ctrl-C: train.py stops after its iteration with exit code 130 (launch.sh stops on it); sample.py stops with
# one line and 130, keeping the images it wrote.


def _interrupt_when(args, marker, tmp_path):
    import signal
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=dict(ENV, PYTHONUNBUFFERED='1'),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(marker):
            proc.send_signal(signal.SIGINT)
            break
    return proc.wait(timeout=300), ''.join(lines) + proc.stdout.read()


def test_ctrl_c_exit_codes(tmp_path):
    code, output = _interrupt_when(['train.py', '--outdir', tmp_path / 'exps', '--num_steps=3', '--M=1', '--batch=4',
                                    '--total_kimg=1', '--alpha=0'], 'Output directory:', tmp_path)
    assert code == 130 and 'SIGINT: stopping after this iteration' in output and 'Done.' not in output, output
    assert output.count('Run the same command with --resume to continue.') == 1 and 'Traceback' not in output

    code, output = _interrupt_when(['sample.py', '--dataset_name=digits', '--seeds=0-99999', '--batch=8',
                                    '--net_batch=8', '--outdir', tmp_path / 's'], 'Seeds:', tmp_path)
    assert code == 130 and 'Traceback' not in output, output
    assert [line for line in output.splitlines() if 'stopped' in line] == [
        'sample.py: stopped (Ctrl-C); files written so far are whole and kept. Run the same command again to continue.']

"""Model and file cases of issue 18, each one clear line (or accepted): a file of random bytes given as a
checkpoint, --model_kind without --model_path, the predictor's model named by a path, dataset_tool.py's --dest
under a file, fid.py rmse on folders that share only some seeds, and the error line at the end of torchrun's
report."""

import glob
import os
import subprocess
import sys

import numpy as np
import PIL.Image
from click.testing import CliRunner

import fid
import sample
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
DIGITS_PREDICTOR = glob.glob(os.path.join(REPO, 'exp', '00000-digits-*', 'network-snapshot-*.safetensors'))[0]


def _error_lines(output):
    return [line for line in output.splitlines() if line.startswith('Error:')]


def _invoke(command, *args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert 'Traceback' not in result.output, result.output
    return result


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / 'edm_bedroom256_ema.pt'
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    result = _invoke(sample.main, f'--model_path={path}', '--model_kind=cm', f'--outdir={tmp_path / "out"}')
    assert result.exit_code == 1
    lines = _error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith(f'Error: {path}: not a PyTorch checkpoint ('), result.output
    assert 'weights_only' not in result.output and not (tmp_path / 'out').exists()


def test_model_kind_needs_a_model_path(tmp_path):
    expected = ('Error: --model_kind=cm is the family of a --model_path checkpoint: give --model_path (a zoo model '
                'from --dataset_name knows its own kind)')
    for command in (sample.main, train.main):
        result = _invoke(command, '--dataset_name=digits', '--model_kind=cm', f'--outdir={tmp_path / "out"}')
        assert result.exit_code == 2 and _error_lines(result.output) == [expected], result.output
    assert not (tmp_path / 'out').exists()


def test_the_predictors_model_by_path(tmp_path):
    """A digits predictor with --model_path=<repo>/src/digits (the folder the zoo name 'digits' loads) is the same
    model: accepted, and the images are those of --dataset_name=digits. Another model is still refused."""
    common = [f'--predictor_path={DIGITS_PREDICTOR}', '--seeds=0-2']
    by_name = _invoke(sample.main, *common, '--dataset_name=digits', f'--outdir={tmp_path / "name"}')
    by_path = _invoke(sample.main, *common, f'--model_path={os.path.join(REPO, "src", "digits")}{os.sep}',
                      f'--outdir={tmp_path / "path"}')
    assert by_name.exit_code == 0 and by_path.exit_code == 0, by_path.output
    pngs = sorted(glob.glob(str(tmp_path / 'name' / '*' / '*.png')))
    assert len(pngs) == 3
    for png in pngs:
        with open(png, 'rb') as a, open(png.replace(str(tmp_path / 'name'), str(tmp_path / 'path')), 'rb') as b:
            assert a.read() == b.read()
    other = _invoke(sample.main, *common, '--dataset_name=cifar10', f'--outdir={tmp_path / "other"}')
    assert other.exit_code == 2
    assert _error_lines(other.output) == ["Error: this predictor was trained for model 'digits', not 'cifar10'"]


def test_dataset_tool_dest_under_a_file(tmp_path):
    (tmp_path / 'file').write_text('x')
    for dest in (tmp_path / 'file' / 'sub' / 'digits.zip', tmp_path / 'file' / 'sub'):
        proc = subprocess.run([sys.executable, 'dataset_tool.py', '--source=digits', f'--dest={dest}'], cwd=REPO,
                              env=ENV, capture_output=True, text=True, timeout=120)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2 and 'Traceback' not in output, output
        assert _error_lines(output) == [f'Error: --dest={dest}: {tmp_path / "file"} is a file, not a folder'], output


def test_rmse_says_what_it_scored(tmp_path):
    """Images of seeds 0-3, a reference of seeds 1, 2 and 9: the two shared are scored, and a line says so."""
    for folder, seeds in (('images', [0, 1, 2, 3]), ('reference', [1, 2, 9])):
        os.makedirs(tmp_path / folder / '000000')
        for seed in seeds:
            value = 10 * seed if folder == 'images' else 0
            PIL.Image.fromarray(np.full([2, 2], value, np.uint8)).save(tmp_path / folder / '000000' / f'{seed:06d}.png')
    result = _invoke(fid.main, 'rmse', f'--images={tmp_path / "images"}', f'--reference={tmp_path / "reference"}')
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-2] == ('Scoring 2 images found in both folders; 2 only under --images, 1 only under --reference '
                         '(not scored)')
    assert lines[-1] == f'{(10 / 255 + 20 / 255) / 2:g}'  # seeds 1 and 2: RMSE 10/255 and 20/255


def test_torchrun_report_ends_with_the_error(tmp_path):
    """Under torchrun the launcher's failure report comes last; the project's line is on its final `traceback :`
    line, just above the closing rule, for every failed rank."""
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           'sample.py', '--dataset_name=digits', '--seeds=5-2', f'--outdir={tmp_path}'], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    expected = 'Error: --seeds: Invalid range "5-2" in \'5-2\': the end is smaller than the start'
    assert proc.returncode != 0 and _error_lines(output) == [expected], output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1].strip('=') == '' and lines[-2] == f'  traceback : {expected}', output
    assert sum(line == f'  traceback : {expected}' for line in lines) == 2, output

"""launch.sh's glue: --help, presets that cannot run, a stopped or failing step ends the preset with one line.

The steps themselves are replaced by a stand-in `python` on PATH that records its arguments and plays a step's
outcome (what train.py, sample.py and fid.py really do on Ctrl-C or bad input is tested elsewhere); anything else
(`python -c ...`) goes to the real interpreter.
"""

import os
import shutil
import subprocess
import sys

import pytest

from models.zoo import ZOO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_PYTHON = '''#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$1" in
train.py) mkdir -p exps/00000-digits-4-5-adasde-dpm-3-uni1.0-afs-demo; exit "${TRAIN_RC:-0}" ;;
sample.py) exit "${SAMPLE_RC:-0}" ;;
fid.py)
    if [ -n "${FID_ERROR:-}" ]; then
        printf '  0%%|          | 0/1 [00:00<?, ?batch/s]' >&2; echo "Error: $FID_ERROR" >&2; exit 1
    fi
    echo "Loading..."; echo 1.234 ;;
*) exec "$REAL_PYTHON" "$@" ;;
esac
'''


@pytest.fixture
def checkout(tmp_path):
    """A copy of launch.sh in an empty folder, with the stand-in python first on PATH."""
    folder = tmp_path / 'repo'
    folder.mkdir()
    shutil.copy(os.path.join(REPO, 'launch.sh'), folder / 'launch.sh')
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'python').write_text(FAKE_PYTHON)
    (bin_dir / 'python').chmod(0o755)
    return folder, bin_dir


def _launch(checkout, *args, **env):
    folder, bin_dir = checkout
    calls = folder.parent / 'calls.txt'
    full_env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', CALLS=str(calls),
                    REAL_PYTHON=sys.executable, PYTHONPATH=REPO, OMP_NUM_THREADS='1', **env)
    proc = subprocess.run(['bash', str(folder / 'launch.sh'), *args], env=full_env, capture_output=True, text=True,
                          timeout=120)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc, [line.split()[0] for line in lines if line.split() and line.split()[0].endswith('.py')]


def _launch_lines(text):
    return [line for line in text.splitlines() if line.startswith('launch.sh:')]


def test_help_lists_the_presets_that_can_run(checkout):
    proc, steps = _launch(checkout, '--help')
    assert proc.returncode == 0 and not steps, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith('  ')]
    assert listed == ['demo', 'digits-nfe3', 'cifar10', 'ffhq', 'imagenet64', 'ms_coco']
    assert 'digits-nfe5|7|9' in proc.stdout
    # The zoo's unbuilt models are not offered (lsun_bedroom is a preset, waiting for its adapter).
    assert ZOO['lsun_bedroom'].missing and 'lsun_bedroom' not in proc.stdout


def test_a_preset_that_cannot_run_is_refused_before_any_step(checkout):
    proc, steps = _launch(checkout, 'lsun_bedroom')
    assert proc.returncode == 2 and not steps
    assert _launch_lines(proc.stderr) == [f"launch.sh: preset 'lsun_bedroom' cannot run yet: "
                                          f"{ZOO['lsun_bedroom'].missing}"]
    assert sorted(os.listdir(checkout[0])) == ['launch.sh']  # no run directory left behind
    proc, steps = _launch(checkout, 'nonsense')
    assert proc.returncode == 2 and not steps
    assert _launch_lines(proc.stderr) == ["launch.sh: unknown preset 'nonsense'; bash launch.sh --help lists the "
                                          'presets']


@pytest.mark.parametrize('code', [130, 143])
def test_a_stopped_training_stops_the_demo(checkout, code):
    proc, steps = _launch(checkout, TRAIN_RC=str(code))
    assert proc.returncode == code and steps == ['train.py']  # sample.py never ran
    assert _launch_lines(proc.stderr) == ['launch.sh: stopped during train.py (step 1/3). To continue: bash '
                                          'launch.sh demo (it resumes: train.py from its saved state, sample.py '
                                          'skips the images it has)']
    assert '=== 1/3 train.py' in proc.stdout and '=== 2/3' not in proc.stdout


def test_a_failing_sample_step_stops_the_demo(checkout):
    proc, steps = _launch(checkout, SAMPLE_RC='2')
    assert proc.returncode == 2 and steps == ['train.py', 'sample.py']
    assert _launch_lines(proc.stderr) == ['launch.sh: sample.py adasde (step 2/3) failed (exit code 2; its error '
                                          'is above). After fixing it: bash launch.sh demo']


def test_a_failing_fid_step_shows_its_error(checkout):
    proc, steps = _launch(checkout, FID_ERROR='Cannot read image 000000/000003.png: truncated')
    assert proc.returncode == 1 and steps == ['train.py'] + ['sample.py'] * 8 + ['fid.py']
    assert 'Error: Cannot read image 000000/000003.png: truncated' in proc.stderr.splitlines()
    assert _launch_lines(proc.stderr) == ['launch.sh: fid.py adasde (step 3/3) failed (exit code 1; its error is '
                                          'above). After fixing it: bash launch.sh demo']
    assert 'Demo done' not in proc.stdout


def test_the_demo_explains_its_table(checkout):
    proc, steps = _launch(checkout)
    assert proc.returncode == 0, proc.stderr
    assert steps == ['train.py'] + ['sample.py'] * 8 + ['fid.py'] * 8
    out = proc.stdout
    for header in ('=== 1/3 train.py', '=== 2/3 sample.py', '=== 3/3 fid.py'):
        assert header in out
    assert '| adasde | learned, N=4, AFS | 1.234 |' in out
    flat = ' '.join(out.split())
    assert 'Lower is better; a converged sampler (Heun, 100 NFE) scores 0.68 on this model' in flat
    assert 'training digits (src/digits/fid-ref.npz)' in flat
    assert 'Look at 64 AdaSDE samples: samples/demo/adasde-grid.png' in out
    # The AdaSDE step writes the grid; train.py continues a stopped demo run.
    calls = [line for line in (checkout[0].parent / 'calls.txt').read_text().splitlines()
             if line.split() and line.split()[0].endswith('.py')]
    assert '--grid' in calls[1] and '--predictor_path=exps/00000-digits-4-5-adasde-dpm-3-uni1.0-afs-demo' in calls[1]
    assert '--resume' in calls[0] and '--desc=-demo' in calls[0]

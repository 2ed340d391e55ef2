"""launch.sh's glue: --help, presets that cannot run, a stopped or failing step ends the preset with one line.

The steps themselves are replaced by a stand-in `python` on PATH that records its arguments and plays a step's
outcome (what train.py, sample.py and fid.py really do on Ctrl-C or bad input is tested elsewhere); anything else
(`python -c ...`) goes to the real interpreter.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_PYTHON = '''#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$1" in
train.py)
    case "$*" in
    *digits_flow*) mkdir -p exps/00001-digits_flow-7-5-adasde_deis-dpm-1-flow-afs-flow ;;
    *) mkdir -p exps/00000-digits-7-5-adasde_deis-dpm-1-uni2.0-afs-demo ;;
    esac
    exit "${TRAIN_RC:-0}" ;;
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
                    REAL_PYTHON=sys.executable, PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    full_env.update(env)
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
    assert listed == ['demo', 'digits-nfe3', 'digits-paper-nfe3', 'digits-peers', 'digits-flow', 'cifar10', 'ffhq',
                      'imagenet64', 'lsun_bedroom', 'imagenet256', 'lsun_bedroom_ldm', 'ms_coco', 'sdxl', 'sd3', 'flux']
    assert 'digits-nfe5|7|9' in proc.stdout


def test_a_preset_that_cannot_run_is_refused_before_any_step(checkout):
    # Every zoo model is built now; a preset whose model is marked missing is refused before any step.
    zoo_py = checkout[0] / 'models' / 'zoo.py'
    shutil.copytree(os.path.join(REPO, 'models'), zoo_py.parent)
    for name in ('torch_utils', 'dnnlib', 'solvers'):
        shutil.copytree(os.path.join(REPO, name), checkout[0] / name)
    zoo_py.write_text(zoo_py.read_text() + "\nZOO['lsun_bedroom'] = dataclasses.replace(ZOO['lsun_bedroom'], "
                      "missing='its adapter is not built (test)')\n")
    proc, steps = _launch(checkout, 'lsun_bedroom', PYTHONPATH=str(checkout[0]))
    assert proc.returncode == 2 and not steps, proc.stderr
    assert _launch_lines(proc.stderr) == ["launch.sh: preset 'lsun_bedroom' cannot run yet: its adapter is not built "
                                          '(test)']
    assert not [d for d in os.listdir(checkout[0]) if d.startswith(('exps', 'samples'))]  # no run directory
    proc, steps = _launch(checkout, 'nonsense')
    assert proc.returncode == 2 and not steps
    assert _launch_lines(proc.stderr) == ["launch.sh: unknown preset 'nonsense'; bash launch.sh --help lists the "
                                          'presets']


@pytest.mark.parametrize('preset', ['sd3', 'flux'])
def test_flow_presets(checkout, preset):
    """SD3 and FLUX: ms_coco's recipe with each model's own guidance, on the 1024x1024 reference statistics."""
    run = f'exps/00000-{preset}-4-5-adasde-dpm-3-discrete-afs'
    os.makedirs(checkout[0] / run)
    proc, steps = _launch(checkout, preset)
    assert proc.returncode == 0 and steps == ['train.py', 'sample.py', 'fid.py'], proc.stderr
    train, sample, fid = [line for line in (checkout[0].parent / 'calls.txt').read_text().splitlines()
                          if line.split()[0].endswith('.py')]
    guidance = '--guidance_type=cfg --guidance_rate=7.0' if preset == 'sd3' else \
        '--guidance_type=distilled --guidance_rate=3.5'
    assert f'--dataset_name={preset} ' in train and guidance in train and '--schedule_type=discrete' in train
    assert f'--predictor_path={run} ' in sample and '--prompt=src/prompts/MS-COCO_val2014_30k_captions.csv' in sample
    assert '--ref=src/ms_coco/coco-val2014-1024.npz' in fid


@pytest.mark.parametrize('code', [130, 143])
def test_a_stopped_training_stops_the_demo(checkout, code):
    proc, steps = _launch(checkout, TRAIN_RC=str(code))
    assert proc.returncode == code and steps == ['train.py']  # sample.py never ran
    assert _launch_lines(proc.stderr) == ['launch.sh: stopped during train.py (step 1/4). To continue: bash '
                                          'launch.sh demo (it resumes: train.py from its saved state, sample.py '
                                          'skips the images it has)']
    assert '=== 1/4 train.py' in proc.stdout and '=== 2/4' not in proc.stdout


def test_a_failing_sample_step_stops_the_demo(checkout):
    proc, steps = _launch(checkout, SAMPLE_RC='2')
    assert proc.returncode == 2 and steps == ['train.py', 'sample.py']
    assert _launch_lines(proc.stderr) == ['launch.sh: sample.py adasde (step 2/4) failed (exit code 2; its error '
                                          'is above). After fixing it: bash launch.sh demo']


def test_a_failing_fid_step_shows_its_error(checkout):
    proc, steps = _launch(checkout, FID_ERROR='Cannot read image 000000/000003.png: truncated')
    assert proc.returncode == 1 and steps == ['train.py'] + ['sample.py'] * 10 + ['fid.py']
    assert 'Error: Cannot read image 000000/000003.png: truncated' in proc.stderr.splitlines()
    assert _launch_lines(proc.stderr) == ['launch.sh: fid.py adasde (step 4/4) failed (exit code 1; its error is '
                                          'above). After fixing it: bash launch.sh demo']
    assert 'Demo done' not in proc.stdout


def test_the_digits_flow_preset(checkout):
    proc, steps = _launch(checkout, 'digits-flow')
    assert proc.returncode == 0, proc.stderr
    assert steps == ['train.py'] + ['sample.py'] * 5 + ['fid.py'] * 5
    calls = [line for line in (checkout[0].parent / 'calls.txt').read_text().splitlines()
             if line.split() and line.split()[0].endswith('.py')]
    assert all('--dataset_name=digits_flow' in line for line in calls[:6])
    assert all('--schedule_type=flow' in line for line in calls[:1] + calls[2:6])  # the baselines and the training
    assert '--predictor_path=exps/00001-digits_flow-7-5-adasde_deis-dpm-1-flow-afs-flow' in calls[1]
    assert all('--ref=digits_flow' in line for line in calls[6:])
    assert ('| adasde | learned, deis base, N=7, AFS, exps/00001-digits_flow-7-5-adasde_deis-dpm-1-flow-afs-flow '
            '| 1.234 |' in proc.stdout)
    assert '| euler | --solver=euler --num_steps=6 | 1.234 |' in proc.stdout
    # Each baseline makes 5 network calls, as its row says.
    import solvers
    assert [solvers.nfe(n, k, afs=a) for n, k, a in [('euler', 6, False), ('heun', 4, True), ('dpmpp', 6, False),
                                                      ('unipc', 6, False)]] == [5] * 4


def test_the_demo_explains_its_table(checkout):
    proc, steps = _launch(checkout)
    assert proc.returncode == 0, proc.stderr
    assert steps == ['train.py'] + ['sample.py'] * 10 + ['fid.py'] * 18  # FID and RMSE of each
    out = proc.stdout
    for header in ('=== 1/4 train.py', '=== 2/4 sample.py', '=== 3/4 sample.py', '=== 4/4 fid.py'):
        assert header in out
    assert '| adasde | learned, deis base, N=7, AFS | 1.234 | 1.234 |' in out
    assert '| epd_ipndm | learned, EPD-Plugin, K=2, N=3, AFS (EPD counts 3) | 1.234 | 1.234 |' in out
    flat = ' '.join(out.split())
    assert 'Lower is better; a converged sampler (Heun, 100 NFE) scores 0.68 on this model' in flat
    assert 'training digits (src/digits/fid-ref.npz)' in flat
    assert 'Look at 64 AdaSDE samples: samples/demo/adasde-grid.png' in out
    # The AdaSDE step writes the grid; train.py continues a stopped demo run.
    calls = [line for line in (checkout[0].parent / 'calls.txt').read_text().splitlines()
             if line.split() and line.split()[0].endswith('.py')]
    assert '--grid' in calls[1] and '--predictor_path=exps/00000-digits-7-5-adasde_deis-dpm-1-uni2.0-afs-demo' \
        in calls[1]
    assert 'fid.py rmse --images=samples/demo/adasde --reference=samples/demo/converged' in ' '.join(calls)
    assert 'the same seed, averaged over seeds 0-999; it needs no network' in flat
    assert '--resume' in calls[0] and '--desc=-demo' in calls[0]
    assert '--predictor_path=exp/00012-digits-3-5-epd_ipndm-dpm-3-uni1.0-afs' in ' '.join(calls)  # the shipped peer
    assert os.path.isdir(os.path.join(REPO, 'exp', '00012-digits-3-5-epd_ipndm-dpm-3-uni1.0-afs'))


@pytest.mark.parametrize('preset', ['digits-nfe3', 'digits-nfe5', 'digits-nfe7', 'digits-nfe9', 'digits-paper-nfe3',
                                    'digits-paper-nfe5'])
def test_each_shipped_predictor_is_what_its_preset_trains(checkout, preset):
    """The predictors in exp/ (and so every number measured with them) come from the launch.sh presets as written:
    the preset's train.py command gives exactly the options recorded in the shipped run."""
    import glob
    import json
    proc, steps = _launch(checkout, preset)
    assert proc.returncode == 0 and steps == ['train.py'], proc.stderr
    line, = [c for c in (checkout[0].parent / 'calls.txt').read_text().splitlines() if c.startswith('train.py ')]
    args = line.split()[1:]
    dry = subprocess.run([sys.executable, 'train.py', *args, '-n'], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=120)
    assert dry.returncode == 0, dry.stderr
    options = json.loads(dry.stdout[dry.stdout.index('{'):dry.stdout.index('\n}\n') + 3])
    num_steps = options['predictor_kwargs']['num_steps']
    nfe = int(re.search(r'(\d+) NFE', dry.stdout).group(1))
    form = '' if options['predictor_kwargs']['base'] == 'dpm' else '_' + options['predictor_kwargs']['base']
    run, = [r for r in glob.glob(os.path.join(REPO, 'exp', f'*-digits-{num_steps}-{nfe}-adasde{form}-dpm-*'))
            if not r.endswith('-nogamma')]  # those are digits-peers' ablations
    with open(os.path.join(run, 'training_options.json')) as f:
        shipped = json.load(f)
    assert {k: v for k, v in options.items() if k != 'run_dir'} == {k: v for k, v in shipped.items() if k != 'run_dir'}
    assert glob.glob(os.path.join(run, 'network-snapshot-*.safetensors'))
    # The preset retrains that run in place (exp/ holds no training state), never into a new exp/<id>-... folder.
    assert f'Output directory: exp/{os.path.basename(run)}\n' in dry.stdout
    assert f'--resume: exp/{os.path.basename(run)} has these options but no training state' in dry.stdout


def test_each_shipped_peer_is_what_digits_peers_trains(checkout, monkeypatch):
    """The learned peers in exp/ (AMED, its plug-ins, EPD, EPD-Plugin, AdaSDE without gamma) are exactly the runs of
    `bash launch.sh digits-peers`: each of its train.py commands gives the options recorded in one shipped run."""
    import glob
    import json

    from click.testing import CliRunner

    import train
    proc, steps = _launch(checkout, 'digits-peers')
    assert proc.returncode == 0 and steps == ['train.py'] * 30, proc.stderr
    lines = [c for c in (checkout[0].parent / 'calls.txt').read_text().splitlines() if c.startswith('train.py ')]
    shipped = {}
    for path in glob.glob(os.path.join(REPO, 'exp', '*', 'training_options.json')):
        with open(path) as f:
            options = json.load(f)
        shipped[os.path.basename(os.path.dirname(path))] = {k: v for k, v in options.items() if k != 'run_dir'}
    matched = set()
    monkeypatch.chdir(REPO)  # the preset's --outdir=exp, as launch.sh runs it (a dry run writes nothing)
    for line in lines:
        dry = CliRunner().invoke(train.main, line.split()[1:] + ['-n'])
        assert dry.exit_code == 0, dry.output
        out = dry.output
        options = {k: v for k, v in json.loads(out[out.index('{'):out.index('\n}\n') + 3]).items() if k != 'run_dir'}
        runs = [name for name, recorded in shipped.items() if recorded == options]
        assert len(runs) == 1, (line, runs)
        assert glob.glob(os.path.join(REPO, 'exp', runs[0], 'network-snapshot-*.safetensors')), runs[0]
        assert f'Output directory: exp/{runs[0]}\n' in out  # retrained in place, not into a new folder
        matched.add(runs[0])
    assert len(matched) == 30

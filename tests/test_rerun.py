"""Running things twice (issue 18): the same training writes the same predictor file byte for byte, train.py
--resume on a finished run changes nothing, and sample.py's folder check compares a predictor's content, not its
file's bytes."""

import json
import os
import struct
import subprocess
import sys

import pytest
import safetensors.torch
from click.testing import CliRunner

import sample
import train
from solvers.learned import load_predictor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
TINY = ['--num_steps=3', '--M=1', '--batch=4', '--total_kimg=0.008', '--alpha=0']


def files_under(folder, mtimes=False):
    """{relative path: bytes} of every file under folder; with `mtimes`, {relative path: (bytes, mtime_ns)}."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                data = f.read()
            out[os.path.relpath(path, folder)] = (data, os.stat(path).st_mtime_ns) if mtimes else data
    return out


def _train_process(outdir, *args):
    proc = subprocess.run([sys.executable, 'train.py', f'--outdir={outdir}', *TINY, *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    snapshot, = [os.path.join(root, n) for root, _, names in os.walk(outdir) for n in names
                 if n.startswith('network-snapshot-')]
    return snapshot


@pytest.mark.parametrize('student', ['adasde', 'amed', 'epd'])
def test_the_same_training_writes_the_same_bytes(tmp_path, student):
    # Two processes: safetensors' metadata order changed from process to process before (another sha256 each time).
    a = _train_process(tmp_path / 'a', f'--sampler_stu={student}')
    b = _train_process(tmp_path / 'b', f'--sampler_stu={student}')
    with open(a, 'rb') as fa, open(b, 'rb') as fb:
        data = fa.read()
        assert data == fb.read()
    # The header is the sorted, compact JSON of the format, padded to 8 bytes; the file still reads everywhere.
    size = struct.unpack('<Q', data[:8])[0]
    header = data[8:8 + size]
    assert size % 8 == 0 and header.decode().rstrip(' ') == json.dumps(json.loads(header), sort_keys=True,
                                                                       separators=(',', ':'))
    assert load_predictor(a).kind == student
    assert set(safetensors.torch.load_file(a)) == set(load_predictor(a).state_dict())


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    outdir = tmp_path / 'exps'
    result = CliRunner().invoke(train.main, [f'--outdir={outdir}', *TINY])
    assert result.exit_code == 0, result.output
    run_dir, = outdir.iterdir()
    before = files_under(outdir, mtimes=True)
    result = CliRunner().invoke(train.main, [f'--outdir={outdir}', *TINY, '--resume'])
    assert result.exit_code == 0, result.output
    snapshot = run_dir / 'network-snapshot-000000.safetensors'
    assert result.output.splitlines()[-1] == (f'--resume: {run_dir} is finished (2/2 iterations); its predictor: '
                                              f'{snapshot}. Nothing to do (delete that run to train it again).')
    assert 'iter ' not in result.output  # no training
    # not a byte, not a timestamp: no log line, no options file, no snapshot
    assert files_under(outdir, mtimes=True) == before


def test_sample_compares_the_predictor_content(tmp_path):
    outdir = tmp_path / 'exps'
    assert CliRunner().invoke(train.main, [f'--outdir={outdir}', *TINY]).exit_code == 0
    snapshot = str(next(outdir.glob('*/network-snapshot-*')))
    images = tmp_path / 'images'

    def run_sample(path, *extra):
        return CliRunner().invoke(sample.main, [f'--predictor_path={path}', '--seeds=0-1', f'--outdir={images}',
                                                *extra])
    result = run_sample(snapshot)
    assert result.exit_code == 0, result.output

    # The same content in a file of other bytes (another header order, written by plain safetensors) and under
    # another name: the folder takes it, the images are skipped as done.
    predictor = load_predictor(snapshot)
    meta = dict(settings=json.dumps(predictor.settings), hyperparams=json.dumps(predictor.hyperparams()),
                version=str(predictor.format_version), format='adasde-predictor')
    copy = tmp_path / 'copy.safetensors'
    safetensors.torch.save_file(predictor.state_dict(), str(copy), metadata=meta)
    assert copy.read_bytes() != open(snapshot, 'rb').read()
    result = run_sample(copy)
    assert result.exit_code == 0 and '(2 already done)' in result.output, result.output

    # Another predictor (one coefficient changed) is refused, naming the predictor.
    predictor.state_dict()[next(iter(predictor.state_dict()))].view(-1)[0] += 1e-3
    other = tmp_path / 'other.safetensors'
    predictor.save(other)
    result = run_sample(other)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    error, = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert error.startswith(f"Error: {images} was made with predictor={{'content_sha256': ") and \
        'give --overwrite to replace its images, or another --outdir' in error, result.output


def test_resume_retrains_a_run_without_state_in_place(tmp_path):
    """A shipped run (exp/ keeps options, log and predictor, not the training state): --resume with its options
    trains it again into its own folder, with a fresh log, to the same bytes; never into a new <id>-... folder."""
    outdir = tmp_path / 'exp'
    assert CliRunner().invoke(train.main, [f'--outdir={outdir}', *TINY]).exit_code == 0
    run_dir, = outdir.iterdir()
    (run_dir / 'training-state.pt').unlink()
    shipped = files_under(run_dir)
    result = CliRunner().invoke(train.main, [f'--outdir={outdir}', *TINY, '--resume'])
    assert result.exit_code == 0, result.output
    assert f'--resume: {run_dir} has these options but no training state (a shipped run keeps only its predictor): ' \
        'training it again in place, from the start; its log and predictor are replaced.' in result.output
    assert list(outdir.iterdir()) == [run_dir]
    again = files_under(run_dir)
    assert set(again) == set(shipped) | {'training-state.pt'}
    for name in ('network-snapshot-000000.safetensors', 'training_options.json'):
        assert again[name] == shipped[name], name
    assert len(again['stats.jsonl'].splitlines()) == len(shipped['stats.jsonl'].splitlines())  # replaced, not added
    assert again['log.txt'].count(b'iter 2/2') == 1

#----------------------------------------------------------------------------
# Options that were dropped in silence or ended in a traceback: one Error line each, before any work (no run
# folder).


def _assert_error(command, expected, *args, tmp_path):
    outdir = tmp_path / 'out'
    result = CliRunner().invoke(command, [*map(str, args), f'--outdir={outdir}'])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert 'Traceback' not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert errors == [f'Error: {expected}'], result.output
    assert not outdir.exists()


def test_train_base_of_an_amed_or_epd_student(tmp_path):
    _assert_error(train.main, '--base is an option of adasde; the base of epd is chosen by --sampler_stu (one of epd, '
                  'epd_ipndm), here epd_ipndm: ipndm', '--sampler_stu=epd_ipndm', '--base=deis', tmp_path=tmp_path)
    _assert_error(train.main, '--base is an option of adasde; the base of amed is chosen by --sampler_stu (one of '
                  'amed, euler, dpm, dpmpp, amed_ipndm), here dpm: dpm', '--sampler_stu=dpm', '--base=ipndm',
                  tmp_path=tmp_path)
    # The base the student has anyway is no contradiction.
    result = CliRunner().invoke(train.main, ['--sampler_stu=epd_ipndm', '--base=ipndm', f'--outdir={tmp_path}', '-n'])
    assert result.exit_code == 0 and '"base": "ipndm"' in result.output, result.output


def test_train_feature_net_without_feature_loss(tmp_path):
    _assert_error(train.main, '--feature_net=lpips is the network of the feature loss, which --alpha=0 turns off; '
                  'give --alpha > 0 to use it, or leave out --feature_net', '--feature_net=lpips', '--alpha=0',
                  tmp_path=tmp_path)
    _assert_error(train.main, '--feature_net=digits is the network of the feature loss, which --alpha=0 (the default '
                  'of amed) leaves out; give --alpha > 0 to use it, or leave out --feature_net', '--sampler_stu=amed',
                  '--feature_net=digits', tmp_path=tmp_path)
    result = CliRunner().invoke(train.main, ['--feature_net=none', '--alpha=0', f'--outdir={tmp_path}', '-n'])
    assert result.exit_code == 0 and '"feature_net": null' in result.output, result.output


@pytest.mark.parametrize('schedule', ['polynomial', 'time_uniform'])
def test_schedule_rho_zero(tmp_path, schedule):
    expected = (f'Invalid value for --schedule_rho: the {schedule} schedule takes the 1/rho power: rho must be '
                'finite and nonzero, not 0')
    _assert_error(train.main, expected, f'--schedule_type={schedule}', '--schedule_rho=0', tmp_path=tmp_path)
    _assert_error(sample.main, expected, '--dataset_name=digits', '--solver=euler', f'--schedule_type={schedule}',
                  '--schedule_rho=0', tmp_path=tmp_path)


def test_train_batch_that_cannot_fit(tmp_path):
    from training.training_loop import memory_of
    have = memory_of('cpu') / 2**30
    _assert_error(train.main, f'--batch=1000000000: one iteration holds at least 1192.1 GiB per process (1000000000 '
                  f'trajectories x 5 states of 1x8x8 float32), more than the {have:.1f} GiB of cpu; lower --batch (or '
                  'spread it over more processes)', '--batch=1000000000', tmp_path=tmp_path)

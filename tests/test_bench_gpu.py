"""bench/gpu.py runs end to end on the CPU with --tiny, so that the GPU run does not fail on a path nobody ran."""

import os
import sys
import tempfile

from click.testing import CliRunner

import sample

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
import gpu  # noqa: E402


def test_tiny_run_prints_every_network(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))  # the bench's image folders
    monkeypatch.setattr(sample, 'load_net', sample.load_net)  # the bench replaces it; restored after the test
    result = CliRunner().invoke(gpu.main, ['--device=cpu', '--tiny', '--solvers=dpmpp', '--batches=1'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = [line.split() for line in result.output.splitlines() if line.split()[:1] and line.split()[0] in gpu.NETS]
    assert [row[0] for row in rows] == list(gpu.NETS)
    for row in rows:
        e2e, net, ratio = float(row[4]), float(row[5]), float(row[6])
        assert row[1] == 'dpmpp' and e2e > 0 and net > 0 and abs(ratio - e2e / net) < 0.01 * ratio + 2e-3
    assert not [n for n in os.listdir(tmp_path) if n.startswith('bench-gpu-')]  # the bench removed its images


def test_tiny_pixel_difference(tmp_path, monkeypatch):
    result = CliRunner().invoke(gpu.main, ['--device=cpu', '--tiny', '--diff', '--net_dtype=bfloat16',
                                           '--nets=edm_cifar10,sd15_unet', '--solvers=euler'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert 'edm_cifar10     euler   its own precision switch works on CUDA only' in result.output
    assert 'sd15_unet       euler   bfloat16 vs float32: max ' in result.output
    # float32 against itself: no difference at all.
    result = CliRunner().invoke(gpu.main, ['--device=cpu', '--tiny', '--diff', '--net_dtype=float32',
                                           '--nets=sd15_unet', '--solvers=euler'])
    assert 'float32 vs float32: max 0 levels, mean 0.000 levels, 0.0% of values differ' in result.output

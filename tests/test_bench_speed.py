"""bench/pipeline_speed.py, file_writes.py and solver_memory.py run end to end on small counts and print what they
say."""

import os
import sys

import torch
from click.testing import CliRunner

import sample

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
import file_writes  # noqa: E402
import pipeline_speed  # noqa: E402
import solver_memory  # noqa: E402


def test_pipeline_speed_small(tmp_path):
    result = CliRunner().invoke(pipeline_speed.main, ['--sizes=8', '--procs=1', '--num=8:70', '--repeat=1', '--parts',
                                                      '--dir', str(tmp_path), '--', '--batch=32'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    row, parts = result.output.splitlines()[-2].split(), result.output.splitlines()[-1]
    names, values = zip(*(item.rsplit(' ', 1) for item in parts.split(': ', 1)[1].split(', ')))
    assert names == ('encode', 'file', 'solver', 'draws', 'pixels', 'rest')
    assert all(float(v) > 0 for v in values[:5])
    assert row[:3] == ['8x8', '1', '70']
    rate, raw, ratio, cpu, raw_cpu, cpu_ratio = map(float, row[3:])
    assert rate > 0 and raw > 0 and abs(ratio - rate / raw) < 0.002 + 0.01 * ratio
    assert abs(cpu_ratio - raw_cpu / cpu) < 0.002 + 0.01 * cpu_ratio
    assert os.listdir(tmp_path) == []  # everything it wrote is gone


def test_raw_rate_writes_each_ranks_own_files(tmp_path, monkeypatch):
    # The raw side writes the same files as sample.py, each process the seeds of sample.py's rank.
    out = tmp_path / 'out'
    for seed in range(10):
        sample.save_image(sample.to_uint8(torch.zeros(1, 3, 2, 2))[0], sample.image_path(str(out), seed))
    record = tmp_path / 'jobs'
    record.mkdir()

    def write(job):  # runs in the forked child: one file per process, listing its files
        (record / str(os.getpid())).write_text(' '.join(os.path.basename(p) for p in job[1]))
    monkeypatch.setattr(pipeline_speed, '_write', write)
    pipeline_speed.raw_rate(str(out), 2, 4)
    jobs = sorted(p.read_text().split() for p in record.iterdir())
    assert jobs == [[f'{s:06d}.png' for s in range(0, 6)], [f'{s:06d}.png' for s in range(6, 10)]]


def test_file_writes_small(tmp_path):
    result = CliRunner().invoke(file_writes.main, ['--files=30', '--repeat=1', '--dir', str(tmp_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = result.output.splitlines()
    assert [line[:32].strip() for line in lines] == list(file_writes.CASES)
    assert all(float(line.split()[-5]) > 0 for line in lines) and os.listdir(tmp_path) == []


def test_solver_memory_small():
    result = CliRunner().invoke(solver_memory.main, ['--batch=2', '--resolution=4', '--rounds=1'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = [line.split() for line in result.output.splitlines()[2:]]
    on = 'on' if sys.platform.startswith('linux') else 'off'  # glibc's mallopt
    assert [row[:2] for row in rows] == [['float64', 'off'], ['float64', on], ['float32', 'off'], ['float32', on]]
    assert all(float(row[2]) > 0 for row in rows)

"""How soon sample.py writes its first image, and its peak memory until then, for a given --seeds (issue: huge seed
ranges such as --seeds=0-99999999 must start within seconds, in memory independent of the count).

Starts `python sample.py <args>` in a fresh folder, waits for the first PNG, keeps it running for --extra seconds,
then stops it (SIGINT, as Ctrl-C) and prints the time to the first PNG, the images written and the peak resident
memory (VmHWM of the process). A run that ends by itself (an error line) is reported with its output.

    python bench/start_time.py -- --dataset_name=digits --seeds=0-9999999
    python bench/start_time.py --no_space_check -- --dataset_name=digits --seeds=0-99999999

--no_space_check runs sample.py with the free-space check off (in the process, for this measurement only), to
time a range that the disk of the machine could not hold (sample.py itself refuses it up front, in one line).
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

import click

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_SPACE_CHECK = ('import sys, runpy; from torch_utils import cli; check = cli.check_output_dir; '
                  'cli.check_output_dir = lambda *a, **k: check(*a, **dict(k, need_bytes=0, need_files=0)); '
                  'sys.argv[0] = "sample.py"; runpy.run_path("sample.py", run_name="__main__")')


def peak_rss(pid):
    try:
        with open(f'/proc/{pid}/status') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
    except (OSError, StopIteration):
        return None


def count_pngs(folder):
    return sum(name.endswith('.png') for _, _, names in os.walk(folder) for name in names)


@click.command(context_settings=dict(ignore_unknown_options=True))
@click.option('--extra', help='Seconds to keep running after the first image', type=float, default=3,
              show_default=True)
@click.option('--timeout', help='Give up after this many seconds', type=float, default=120, show_default=True)
@click.option('--no_space_check', is_flag=True, help='Turn off the free-space check (see above)')
@click.argument('args', nargs=-1, type=click.UNPROCESSED)
def main(extra, timeout, no_space_check, args):
    outdir = tempfile.mkdtemp(prefix='start-time-')
    code = ['-c', NO_SPACE_CHECK] if no_space_check else [os.path.join(REPO, 'sample.py')]
    cmd = [sys.executable, *code, *args, f'--outdir={outdir}']
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
    first, rss = None, None
    while proc.poll() is None and time.perf_counter() - start < timeout:
        rss = peak_rss(proc.pid) or rss
        if first is None and count_pngs(outdir):
            first = time.perf_counter() - start
        if first is not None and time.perf_counter() - start > first + extra:
            break
        time.sleep(0.05)
    rss = peak_rss(proc.pid) or rss
    ended = proc.poll() is not None
    if not ended:
        proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    written = count_pngs(outdir)
    subprocess.run(['rm', '-rf', outdir], check=False)
    print(f'args: {" ".join(args)}' + (' (free-space check off)' if no_space_check else ''))
    if first is None:
        lines = [line for line in output.splitlines() if line.strip()]
        print(f'no image after {time.perf_counter() - start:.1f} s; last line: {lines[-1] if lines else ""}')
        return
    print(f'first image after {first:.1f} s (process start and imports included); {written} images by '
          f'{first + extra:.1f} s; peak RSS {rss / 2**20:.0f} MiB')


if __name__ == '__main__':
    main()

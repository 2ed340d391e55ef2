"""Wall time of the demo (`bash launch.sh`) on an idle machine and beside one competing CPU-bound process.

Each run starts from a fresh copy of the checkout (its tracked and untracked-but-not-ignored files, no exps/ or
samples/), as a fresh clone would, with the thread settings the scripts choose themselves (OMP_NUM_THREADS and
OMP_WAIT_POLICY removed from the environment unless --keep-env). The competing process is
`python -c 'while True: pass'`, started before the demo and killed after it.

    python bench/demo_load.py                 # both runs, ~15 minutes on 2 cores; prints both wall times
    python bench/demo_load.py --dry-run       # what it would run, and checks that launch.sh parses
    python bench/demo_load.py --command='bash launch.sh --help'   # the same harness around a quick command

Acceptance (issue 14): the loaded time is within twice the idle time.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREAD_VARS = ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OMP_WAIT_POLICY')


def fresh_copy(dest):
    """Copy the checkout's files as git knows them (tracked, plus untracked ones that are not ignored)."""
    names = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split('\0')
    for name in filter(None, names):
        src = os.path.join(REPO, name)
        if not os.path.isfile(src):  # deleted in the work tree
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, name))


def timed_run(command, env, competing, log_path):
    """(wall seconds, exit code, last lines of the output) of `command` in a fresh copy."""
    with tempfile.TemporaryDirectory(prefix='demo-load-') as work:
        fresh_copy(work)
        burner = subprocess.Popen([sys.executable, '-c', 'while True: pass']) if competing else None
        try:
            start = time.perf_counter()
            with open(log_path, 'w') as log:
                code = subprocess.run(command, shell=True, cwd=work, env=env, stdout=log,
                                      stderr=subprocess.STDOUT).returncode
            wall = time.perf_counter() - start
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
    with open(log_path, errors='replace') as f:
        tail = f.read().splitlines()[-14:]
    return wall, code, tail


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--command', default='bash launch.sh', help='what to time (run in the fresh copy)')
    parser.add_argument('--keep-env', action='store_true', help='keep OMP_NUM_THREADS etc. from the environment')
    parser.add_argument('--logs', default='.', help='folder for demo-load-idle.log and demo-load-busy.log')
    parser.add_argument('--dry-run', action='store_true', help='print the plan, check launch.sh, run nothing')
    args = parser.parse_args()

    env = dict(os.environ)
    if not args.keep_env:
        for name in THREAD_VARS:
            env.pop(name, None)
    shown = {name: env.get(name, '(unset: the scripts choose)') for name in THREAD_VARS}
    print(f'Command: {args.command}  (in a fresh copy of {REPO})')
    print('Threads: ' + ', '.join(f'{k}={v}' for k, v in shown.items()) + f'; {os.cpu_count()} CPUs')
    print(f"Runs:    idle, then beside `{sys.executable} -c 'while True: pass'`")
    if args.dry_run:
        subprocess.run(['bash', '-n', os.path.join(REPO, 'launch.sh')], check=True)
        print('launch.sh parses; dry run, nothing timed.')
        return 0

    results = {}
    for label, competing in (('idle', False), ('busy', True)):
        log = os.path.join(args.logs, f'demo-load-{label}.log')
        wall, code, tail = timed_run(args.command, env, competing, log)
        results[label] = wall
        print(f'\n{label}: {wall:.0f} s, exit code {code} (output in {log}); its last lines:')
        print('\n'.join('    ' + line for line in tail))
        if code != 0:
            print(f'{label} run failed; see {log}', file=sys.stderr)
            return 1
    ratio = results['busy'] / results['idle']
    print(f'\nDemo wall time: idle {results["idle"]:.0f} s, with one competing CPU-bound process '
          f'{results["busy"]:.0f} s ({ratio:.2f}x; issue 14 asks for at most 2x).')
    return 0


if __name__ == '__main__':
    sys.exit(main())

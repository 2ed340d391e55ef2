"""What making small files costs on this machine's disk, and what sample.py's writing choices save.

sample.py writes one small PNG per seed. Two of its choices rest on what making a file costs where it is made:

1. its ranks each take a contiguous run of the batches, so that two processes do not make files in one folder at
   the same time (EDM's split interleaves the ranks' batches, so they all write into the same folder);
2. its writer threads encode at the same time but make their files one at a time.

This measures both: CPU time per file (user + system, summed over the writers) of 2 writers making files of
`--size` bytes (a 32x32 PNG is about 2.5 kB) through sample.py's own atomic write (temporary name, rename), in one
shared folder and in a folder each; as 2 processes (choice 1) and as 2 threads of one process (choice 2, against
the same threads taking turns under a lock). The cases run in turn, `--repeat` times (the best of each is
printed): on a virtual disk the cost of making a file drifts by several times within minutes, most after many
files were deleted, so nothing is deleted until the end.

    python bench/file_writes.py [--files 2000] [--size 2500] [--repeat 3] [--dir D]
"""

import contextlib
import functools
import multiprocessing
import os
import resource
import shutil
import tempfile
import threading
import time

import click

from torch_utils.misc import atomic_write_bytes

#----------------------------------------------------------------------------


def _write_files(folder, prefix, count, data, lock=None):
    for i in range(count):
        with lock or contextlib.nullcontext():
            atomic_write_bytes(os.path.join(folder, f'{prefix}{i:06d}.png'), data)


def _folder(parent, tag):
    path = os.path.join(parent, tag)
    os.makedirs(path, exist_ok=True)
    return path


def in_processes(folders, count, data):
    """CPU seconds per file of one child process per folder entry (entries may repeat: a shared folder)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers = [multiprocessing.get_context('fork').Process(target=_write_files, args=(f, f'p{r}_', count, data))
               for r, f in enumerate(folders)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return cpu / (count * len(folders))


def in_threads(folder, threads, count, data, take_turns):
    """CPU seconds per file of `threads` threads of this process making files in one folder."""
    lock = threading.Lock() if take_turns else None
    start = time.process_time()
    workers = [threading.Thread(target=_write_files, args=(folder, f't{t}_', count, data, lock))
               for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return (time.process_time() - start) / (count * threads)


CASES = ('2 processes, one folder', '2 processes, a folder each', '2 threads, one folder, at once',
         '2 threads, one folder, in turn')


@click.command()
@click.option('--files', help='Files per writer', type=click.IntRange(min=1), default=2000, show_default=True)
@click.option('--size', help='Bytes per file', type=click.IntRange(min=1), default=2500, show_default=True)
@click.option('--repeat', help='Rounds (the best of each case is printed)', type=click.IntRange(min=1), default=3,
              show_default=True)
@click.option('--dir', 'parent', help='Where to write (a temporary folder in it, removed at the end)  [default: the '
              "system's temporary folder]", type=click.Path(file_okay=False))
def main(files, size, repeat, parent):
    data = os.urandom(size)
    cases = dict(zip(CASES, [
        lambda d: in_processes([d('shared')] * 2, files, data),
        lambda d: in_processes([d('own0'), d('own1')], files, data),
        lambda d: in_threads(d('threads'), 2, files, data, take_turns=False),
        lambda d: in_threads(d('turns'), 2, files, data, take_turns=True),
    ]))
    best = dict.fromkeys(cases, float('inf'))
    top = tempfile.mkdtemp(prefix='file-writes-', dir=parent)
    try:
        for r in range(repeat):
            for name, case in cases.items():
                best[name] = min(best[name], case(functools.partial(_folder, os.path.join(top, str(r)))))
        for name, cpu in best.items():
            print(f'{name:32s} {cpu * 1e6:7.0f} us CPU per file')
    finally:
        shutil.rmtree(top)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

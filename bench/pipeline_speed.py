"""Speed of sample.py around the network: images per second with a denoiser that costs nothing, against the raw
PNG-encoding rate of the same images on the same cores.

For each size (32x32x3 and 256x256x3 by default) and process count (1 and 2), this

1. runs sample.py's own command (`sample.main`, under torchrun for 2 processes) with the model replaced by a free
   denoiser (D = x / (1 + sigma^2), the exact denoiser of unit-variance Gaussian data: no weights, no network time),
   so that what is timed is everything sample.py does besides the network: seeds, per-seed noise, the solver's
   arithmetic, pixel conversion, PNG encoding and the atomic writes;
2. reads the PNGs it wrote (untimed) and writes the same images again with nothing but PIL's `save` into files of
   the same layout, each process the files of one of sample.py's ranks: the raw PNG rate;

and prints both rates and their ratio (1.0: sample.py is as fast as writing the PNGs alone). Times are wall times
of the whole call (process start and imports excluded, torchrun's rendezvous included). It also prints the CPU time
(user + system, all threads, summed over the processes) per image of both, and their ratio: on a machine shared
with other jobs, where the wall times carry the others' load, that is the figure to read.

The cost of making a file can drift by several times within minutes (on the development machine's virtual disk,
most after many files were deleted), so the two sides are measured in pairs close in time, in alternating order
(sample.py then raw, raw then sample.py, ...; the raw side of an odd round writes the previous round's images),
nothing is deleted until the end, and the medians over `--repeat` rounds are printed: of each rate and CPU time,
and of the ratios of the pairs. `--dir /dev/shm` (a RAM file system, where making a file costs almost nothing)
shows sample.py's own costs without the disk's. `--parts` also prints where sample.py's CPU time per image goes:
PNG encoding, making the file, the solver (with the network), the per-seed draws, the pixel conversion, the rest.

    python bench/pipeline_speed.py [--sizes 32,256] [--procs 1,2] [--num 32:8000,256:400] [--repeat 3] [--dir D]
                                   [-- sample.py options]
"""

import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import click
import numpy as np
import PIL.Image
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------


class FreeDenoiser(torch.nn.Module):
    """D = x / (1 + sigma^2): the exact denoiser of N(0, I) data, with the attributes sample.py reads."""
    label_dim = 0
    sigma_min = 0.002
    sigma_max = 80.0
    bottleneck = ''

    def __init__(self, channels, resolution):
        super().__init__()
        self.img_channels = channels
        self.img_resolution = resolution

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, **kwargs):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        return x / (1 + sigma ** 2)


def cpu_seconds(who=resource.RUSAGE_SELF):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


PARTS = dict(encode='encode_png', file='atomic_write_bytes', solver='sample_batch', draws='draw_inputs',
             pixels='to_uint8')


def run_sample(channels, resolution, args, parts=False):
    """sample.py's command with the free denoiser in place of the model; returns its wall and CPU time (seconds)
    and, with `parts`, the CPU seconds of each part (thread CPU clocks around sample.py's own functions)."""
    import sample
    sample.load_net = lambda c, device: FreeDenoiser(channels, resolution).to(device)
    spent, lock = dict.fromkeys(PARTS, 0.0), threading.Lock()

    def timed(name, fn):
        def call(*a, **kw):
            start = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                with lock:
                    spent[name] += time.thread_time() - start
        return call
    if parts:
        for name, attr in PARTS.items():
            setattr(sample, attr, timed(name, getattr(sample, attr)))
    start, cpu = time.perf_counter(), cpu_seconds()
    sample.main.main(args, standalone_mode=False)
    return time.perf_counter() - start, cpu_seconds() - cpu, spent

#----------------------------------------------------------------------------
# The raw rate: the same images, written with PIL alone.


def _write(job):
    arrays, paths = job
    for array, path in zip(arrays, paths):
        PIL.Image.fromarray(array, 'RGB').save(path, format='PNG')


def raw_rate(outdir, procs, batch):
    """Images per second and CPU seconds per image of PIL alone writing the PNGs under outdir again, into a sibling
    folder of the same layout, in `procs` child processes that each write the files sample.py's rank wrote (the
    same split of the seeds)."""
    import sample
    num = sum(name.endswith('.png') for _, _, names in os.walk(outdir) for name in names)
    target = tempfile.mkdtemp(dir=os.path.dirname(outdir), prefix='raw-')
    jobs = []
    for rank_batches in sample.split_seeds(range(num), batch, procs):
        seeds = [seed for seeds in rank_batches for seed in seeds]
        arrays = [np.asarray(PIL.Image.open(sample.image_path(outdir, seed))) for seed in seeds]
        jobs.append((arrays, [sample.image_path(target, seed) for seed in seeds]))
    for folder in {os.path.dirname(p) for _, paths in jobs for p in paths}:
        os.makedirs(folder, exist_ok=True)
    start, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
    workers = [multiprocessing.get_context('fork').Process(target=_write, args=(job,)) for job in jobs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    return num / elapsed, cpu / num

#----------------------------------------------------------------------------


def sample_rate(resolution, procs, num, extra, workdir, parts=False):
    """sample.py's rate: (outdir, images per second, CPU seconds per image, {part: CPU seconds per image})."""
    outdir = os.path.join(workdir, f'{resolution}-{procs}')
    args = ['--dataset_name=digits', f'--seeds=0-{num - 1}', f'--outdir={outdir}', *extra]
    worker = [os.path.abspath(__file__), '--worker', json.dumps([3, resolution, args, parts])]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO, BENCH_TIMES=os.path.join(workdir, 'times'))
    if procs == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}', *worker]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f'sample.py failed: {proc.stderr.strip().splitlines()[-1:]}')
    times = []
    for r in range(procs):
        with open(os.path.join(workdir, f'times.{r}')) as f:
            times.append(json.load(f))
    wall, cpu = max(t['wall'] for t in times), sum(t['cpu'] for t in times)
    spent = {name: sum(t['parts'][name] for t in times) / num for name in PARTS}
    return outdir, num / wall, cpu / num, spent


@click.command(context_settings=dict(ignore_unknown_options=True))
@click.option('--sizes', help='Image sides (3 channels)', default='32,256', show_default=True)
@click.option('--procs', help='Process counts', default='1,2', show_default=True)
@click.option('--num', help='Images per size', default='32:8000,256:400', show_default=True)
@click.option('--repeat', help='Rounds of a pair (sample.py, raw) in alternating order; medians printed',
              type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--dir', 'parent', help='Where to write (a temporary folder in it, removed at the end)  [default: the '
              "system's temporary folder]", type=click.Path(file_okay=False))
@click.option('--parts', help="Also print where sample.py's CPU time per image goes", is_flag=True)
@click.option('--worker', help='(internal) run sample.py in this process: JSON [channels, resolution, args, parts]')
@click.argument('extra', nargs=-1, type=click.UNPROCESSED)
def main(sizes, procs, num, repeat, parent, parts, worker, extra):
    if worker is not None:
        channels, resolution, args, with_parts = json.loads(worker)
        wall, cpu, spent = run_sample(channels, resolution, args, with_parts)
        with open(f'{os.environ["BENCH_TIMES"]}.{os.environ.get("RANK", "0")}', 'w') as f:
            json.dump(dict(wall=wall, cpu=cpu, parts=spent), f)
        return
    counts = dict(item.split(':') for item in num.split(','))
    batch = next((int(a.split('=', 1)[1]) for a in extra if a.startswith('--batch=')), 64)
    print(f'{"size":>9s} {"procs":>5s} {"images":>6s} {"sample.py img/s":>15s} {"raw PNG img/s":>13s} {"ratio":>6s} '
          f'{"sample.py CPU us/img":>20s} {"raw CPU us/img":>14s} {"CPU ratio":>9s}', flush=True)
    # Nothing is deleted until the end: on some file systems, making files is slower for a while after many were
    # deleted, which would bias whichever side runs next.
    top = tempfile.mkdtemp(prefix='pipeline-speed-', dir=parent)
    try:
        for resolution in [int(s) for s in sizes.split(',')]:
            for p in [int(s) for s in procs.split(',')]:
                count = int(counts[str(resolution)])
                rows, outdir, split = [], None, []
                for i in range(repeat):
                    workdir = os.path.join(top, f'{resolution}-{p}-{i}')
                    os.makedirs(workdir)
                    if i % 2 and outdir is not None:  # raw first, on the previous round's images
                        raw_i, raw_cpu_i = raw_rate(outdir, p, batch)
                        outdir, rate_i, cpu_i, spent = sample_rate(resolution, p, count, list(extra), workdir, parts)
                    else:
                        outdir, rate_i, cpu_i, spent = sample_rate(resolution, p, count, list(extra), workdir, parts)
                        raw_i, raw_cpu_i = raw_rate(outdir, p, batch)
                    split.append([*spent.values(), cpu_i - sum(spent.values())])
                    rows.append([rate_i, raw_i, rate_i / raw_i, cpu_i, raw_cpu_i, raw_cpu_i / cpu_i])
                rate, raw, ratio, cpu, raw_cpu, cpu_ratio = np.median(np.array(rows), axis=0)
                print(f'{resolution:4d}x{resolution:<4d} {p:5d} {count:6d} {rate:15.0f} {raw:13.0f} {ratio:6.3f} '
                      f'{cpu * 1e6:20.0f} {raw_cpu * 1e6:14.0f} {cpu_ratio:9.3f}', flush=True)
                if parts:
                    shown = ', '.join(f'{name} {us:.0f}' for name, us in
                                      zip([*PARTS, 'rest'], np.median(np.array(split), axis=0) * 1e6))
                    print(f'{"":>9s} sample.py CPU us/img: {shown}', flush=True)
    finally:
        shutil.rmtree(top)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""What the memory policy (torch_utils.cli.apply_memory_policy) saves: a solver's arithmetic with and without it.

Runs dpmpp (5 NFE) with a denoiser that costs nothing on a batch of 64 images of 3x32x32 (default), in float64
(the CPU default) and float32, each in a fresh process with the policy on and off, and prints the CPU time per
image (user and system) and the page faults per batch. Without the policy glibc's malloc hands every temporary of
more than its threshold back to the kernel, so the next one comes back as fresh pages.

    python bench/solver_memory.py [--batch 64] [--resolution 32] [--rounds 50]
"""

import json
import os
import subprocess
import sys

import click

PROBE = r'''
import json, resource, sys, time
from torch_utils import cli
policy, batch, resolution, rounds, dtype = sys.argv[1] == 'on', *map(int, sys.argv[2:5]), sys.argv[5]
on = cli.apply_memory_policy() if policy else False
import torch
import solvers
torch.set_num_threads(1)
net = lambda x, sigma, **kwargs: x / (1 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) ** 2)
sigmas = solvers.get_schedule(6, 0.002, 80.0, 'logsnr', 1)
x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
for _ in range(3):
    solvers.get_solver('dpmpp')(net, x * 80, sigmas)
r0 = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(rounds):
    solvers.get_solver('dpmpp')(net, x * 80, sigmas)
r1 = resource.getrusage(resource.RUSAGE_SELF)
n = rounds * batch
print(json.dumps(dict(on=on, user=(r1.ru_utime - r0.ru_utime) / n, system=(r1.ru_stime - r0.ru_stime) / n,
                      faults=(r1.ru_minflt - r0.ru_minflt) / rounds)))
'''


@click.command()
@click.option('--batch', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--resolution', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--rounds', help='Timed solver runs', type=click.IntRange(min=1), default=50, show_default=True)
def main(batch, resolution, rounds):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    env['OMP_NUM_THREADS'] = '1'
    print(f'dpmpp, 5 NFE, free denoiser, batch {batch} of 3x{resolution}x{resolution}, 1 thread')
    print(f'{"state":>8s} {"policy":>6s} {"CPU us/img":>10s} {"user":>7s} {"system":>7s} {"faults/batch":>12s}')
    for dtype in ('float64', 'float32'):
        for policy in ('off', 'on'):
            proc = subprocess.run([sys.executable, '-c', PROBE, policy, str(batch), str(resolution), str(rounds),
                                   dtype], cwd=root, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise click.ClickException(f'the probe failed: {(proc.stderr.strip().splitlines() or ["?"])[-1]}')
            r = json.loads(proc.stdout.splitlines()[-1])
            shown = 'on' if r['on'] else 'off'
            print(f'{dtype:>8s} {shown:>6s} {(r["user"] + r["system"]) * 1e6:10.1f} {r["user"] * 1e6:7.1f} '
                  f'{r["system"] * 1e6:7.1f} {r["faults"]:12.0f}', flush=True)


if __name__ == '__main__':
    main()

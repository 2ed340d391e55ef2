"""Solver overhead of sample.py: each solver's wall time over NFE x (one network call), at one batch size.

For every registered solver, runs one batch the way sample.py does (per-seed RNG for the noise of stochastic
steps, the fixed-chunk network evaluation, float64 state on the CPU) and prints

    overhead     = sampler wall time / (NFE x wall time of one network call on the same batch)
    own overhead = 1 + (sampler wall time with a free denoiser) / (NFE x network call)

1.00 means the solver costs nothing beyond its network calls. The first is the direct measurement; the second
times the solver's own work (arithmetic, schedule, per-seed noise) alone, with a denoiser that costs nothing, and
is what to read on a machine shared with other jobs, where the direct ratio carries their noise. Times are the
minimum over --repeat runs (for the network: NFE calls in a row, divided by NFE), taken in turn. AdaSDE runs with
a random predictor (the tables' values do not change the cost).

    python bench/sample_speed.py [--model digits] [--batch 500] [--num_steps 6]
"""

import time

import click
import torch

import models
import solvers
from sample import FixedBatchDenoiser
from solvers.learned import PREDICTORS, make_predictor
from torch_utils.misc import StackedRandomGenerator

#----------------------------------------------------------------------------


class _Free(torch.nn.Module):
    """A denoiser that costs nothing (D = x): what the solvers' own overhead is measured on."""
    bottleneck = ''  # AMED reads this module's own output

    def forward(self, x, sigma, **kwargs):
        return x.to(torch.float32)


def timed(fn, repeat):
    best = float('inf')
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@click.command()
@click.option('--model', help='Model (zoo name or path)', default='digits', show_default=True)
@click.option('--batch', help='Batch size', type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--net_batch', help='Network chunk size (as sample.py)', type=click.IntRange(min=0), default=64,
              show_default=True)
@click.option('--num_steps', help='Time points', type=click.IntRange(min=2), default=6, show_default=True)
@click.option('--repeat', help='Runs per measurement (minimum taken)', type=click.IntRange(min=1), default=5,
              show_default=True)
@click.option('--device', help='Device', default='cpu', show_default=True)
def main(model, batch, net_batch, num_steps, repeat, device):
    torch.set_grad_enabled(False)
    device = torch.device(device)
    dtype = torch.float64 if device.type == 'cpu' else torch.float32
    net = models.load_model(model, device=device)
    evaluator = FixedBatchDenoiser(net, net_batch)
    seeds = list(range(batch))
    shape = [batch, net.img_channels, net.img_resolution, net.img_resolution]
    x = StackedRandomGenerator(device, seeds).randn(shape, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def net_call():
        evaluator(x, torch.tensor(1.0, dtype=dtype, device=device).expand(batch))
        sync()

    print(f'{model}: batch {batch}, net_batch {net_batch}, num_steps {num_steps}, {device}, '
          f'{torch.get_num_threads()} threads')
    print(f'{"solver":10s} {"NFE":>4s} {"sampler ms":>11s} {"NFE x net ms":>13s} {"own ms":>7s} {"overhead":>9s} '
          f'{"own overhead":>13s}')
    free = FixedBatchDenoiser(_Free(), net_batch)
    for name in sorted(solvers.SOLVERS):
        info = solvers.solver_info(name)
        # A learned solver runs with a freshly initialised predictor: its values do not change the cost.
        options = dict(predictor=make_predictor(name, num_steps=num_steps, seed=0)) if name in PREDICTORS else {}
        sigmas = solvers.get_schedule(num_steps, net.sigma_min, net.sigma_max, *info.schedule, net=net)
        nfe = solvers.nfe(name, num_steps, **options)

        def run(denoiser=evaluator, fn=info.fn, sigmas=sigmas, options=options):
            rnd = StackedRandomGenerator(device, seeds)
            fn(denoiser, x * float(sigmas[0]), sigmas, randn_like=rnd.randn_like, **options)
            sync()

        run()  # warm-up
        t_sampler, t_net, t_own = float('inf'), float('inf'), float('inf')
        for _ in range(repeat):  # interleaved, so that all three see the same machine load
            t_sampler = min(t_sampler, timed(run, 1))
            t_net = min(t_net, timed(lambda: [net_call() for _ in range(nfe)], 1) / nfe)  # noqa: B023
            t_own = min(t_own, timed(lambda: run(free), 1))  # noqa: B023
        print(f'{name:10s} {nfe:4d} {t_sampler * 1e3:11.1f} {nfe * t_net * 1e3:13.1f} {t_own * 1e3:7.1f} '
              f'{t_sampler / (nfe * t_net):9.3f} {1 + t_own / (nfe * t_net):13.3f}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Quality per NFE of every solver on an exact Gaussian-mixture denoiser (no network, no training data).

For each solver and NFE in {3, 5, 7, 9, 15}, prints
  - ode: RMS distance of the final state to the probability-flow ODE solution from the same latent
         (reference: DPM-Solver-2 with 2000 steps), the error a deterministic solver is built to reduce;
  - fd:  Frechet distance between the samples and the mixture itself (data space), which also scores
         stochastic solvers fairly.
Each solver runs on its recommended schedule, with AFS on or off, whichever reaches the NFE (the better of
the two when both do). AdaSDE predictors are distilled on the spot (5 kimg, seconds each).

    python bench/solver_error.py [--num 2000] [--out docs/bench-solvers.md]
"""

import tempfile

import click
import numpy as np
import torch

import solvers
from fid import frechet_distance
from models.analytic import GaussianMixture
from torch_utils.misc import StackedRandomGenerator
from training.training_loop import training_loop

NFES = (3, 5, 7, 9, 15)
BASELINES = [('euler', {}), ('heun', {}), ('dpm', {}), ('dpmpp', dict(max_order=2)), ('dpmpp', dict(max_order=3)),
             ('unipc', {}), ('ipndm', {}), ('ipndm_v', {}), ('deis', {}), ('edm', {}), ('er_sde', {})]

#----------------------------------------------------------------------------


def mixture():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64) * 0.7
    return GaussianMixture(means, torch.linspace(0.05, 0.3, 8, dtype=torch.float64))


def configs_for(name, nfe, options):
    """(num_steps, afs) pairs that give exactly `nfe` network calls."""
    return [(n, afs) for afs in (False, True) for n in range(2, 64)
            if solvers.nfe(name, n, afs=afs, **options) == nfe]


def stats(x):
    f = x.flatten(1).double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def run(net, name, options, num_steps, afs, latents, rnd):
    schedule_type, rho = solvers.solver_info(name).schedule
    sigmas = solvers.get_schedule(num_steps, net.sigma_min, net.sigma_max, schedule_type, rho)
    return solvers.get_solver(name)(net, latents * float(sigmas[0]), sigmas, randn_like=rnd.randn_like, afs=afs,
                                    **options)


@click.command()
@click.option('--num', help='Samples per configuration', type=int, default=2000, show_default=True)
@click.option('--out', help='Also write the table (markdown) here', type=str, default=None)
def main(num, out):
    torch.set_num_threads(2)
    net = mixture()
    seeds = list(range(num))
    latents = StackedRandomGenerator('cpu', seeds).randn([num, *net.shape], dtype=torch.float64)
    ref_sigmas = solvers.get_schedule(2000, net.sigma_min, net.sigma_max, 'logsnr')
    ode = solvers.get_solver('dpm')(net, latents * net.sigma_max, ref_sigmas)
    true = stats(net.sample(20000, torch.Generator().manual_seed(1)))

    rows = []
    for name, options in BASELINES + [('adasde', {})]:
        label = name + ''.join(f' {k}={v}' for k, v in options.items())
        cells = []
        for nfe in NFES:
            best = None
            for num_steps, afs in configs_for(name, nfe, dict(predictor=None) if name == 'adasde' else options):
                opts = dict(options)
                if name == 'adasde':
                    with tempfile.TemporaryDirectory() as run_dir:
                        opts['predictor'] = training_loop(
                            run_dir=run_dir, model=net, M=3, alpha=0, lr=0.2, coslr=True, batch=64, total_kimg=5,
                            kimg_per_tick=1e9, device='cpu', afs=afs, predictor_kwargs=dict(num_steps=num_steps))
                x = run(net, name, opts, num_steps, afs, latents, StackedRandomGenerator('cpu', seeds))
                err = float(((x - ode) ** 2).flatten(1).sum(1).mean().sqrt())
                fd = frechet_distance(*stats(x), *true)
                if best is None or err < best[0]:
                    best = (err, fd, num_steps, afs)
            cells.append(best)
        rows.append((label, cells))
        line = ' | '.join('n/a' if c is None else f'{c[0]:.3g} / {c[1]:.3g}' for c in cells)
        print(f'{label:32s} | {line}', flush=True)

    header = '| solver | ' + ' | '.join(f'NFE {n}: ode / fd' for n in NFES) + ' |'
    table = [header, '|' + '---|' * (len(NFES) + 1)]
    for label, cells in rows:
        table.append(f'| {label} | ' + ' | '.join(
            'n/a' if c is None else f'{c[0]:.3g} / {c[1]:.3g} (N={c[2]}{", afs" if c[3] else ""})' for c in cells)
            + ' |')
    print('\n'.join(table))
    if out:
        with open(out, 'w') as f:
            f.write('\n'.join(table) + '\n')

#----------------------------------------------------------------------------


if __name__ == '__main__':
    main()

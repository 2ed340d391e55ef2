"""What the SDE solvers' noise does on the digits flow model, added where the project adds it (the EDM state,
models.flow.FlowDenoiser) and where ComfyUI added it before its PR #8744 (the flow state, models.flow.FlowStateView):
mean and std of the pixels against the data's, and FID (digits detector, src/digits/fid-ref.npz) of `--num` samples.
All on flow sigmas (schedule 'flow'); the ODE solver heun is the reference. docs/flow.md shows the table.

    python bench/flow_churn.py [--num 1000]
"""

import os

import click
import numpy as np
import torch

import dataset_tool
import solvers
from fid import frechet_distance, load_stats
from models import load_model
from models.detectors import get_detector
from models.flow import FlowStateView, sigma_to_t
from models.zoo import ZOO
from torch_utils.misc import StackedRandomGenerator

DATA = os.path.join(os.path.dirname(ZOO['digits_flow'].fid_ref), 'digits-8x8.zip')
CASES = [  # solver, time points, in the flow state?, options
    ('heun', 21, False, {}),
    ('edm', 21, False, dict(S_churn=10)),
    ('edm', 21, True, dict(S_churn=10, S_max=0.6)),  # the flow state: t_hat = (1 + gamma) t must stay below 1
    ('er_sde', 20, False, dict(noise_fn=7)),
    ('er_sde', 20, True, dict(noise_fn=7)),
    ('er_sde', 20, False, dict(noise_fn=2)),
    ('er_sde', 20, True, dict(noise_fn=2)),
]


@click.command()
@click.option('--num', help='Images per case (seeds 0 .. num - 1)', type=click.IntRange(min=2), default=1000,
              show_default=True)
def main(num):
    """Mean, std and FID of the digits flow model's samples with the noise in the EDM state and in the flow state."""
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 1)))
    net = load_model('digits_flow')
    detector = get_detector('digits')
    ref = load_stats(ZOO['digits_flow'].fid_ref)
    data = dataset_tool.read_dataset(DATA)[0] / 127.5 - 1
    print(f'data: mean pixel {data.mean():+.4f}, std {data.std():.4f}\n')
    print(f'| solver | time points | options | noise added in | mean pixel | std | FID ({num}) |')
    print('|---|---|---|---|---|---|---|')
    seeds = list(range(num))
    for name, num_steps, flow_state, options in CASES:
        sigmas = solvers.get_schedule(num_steps, net.sigma_min, net.sigma_max, 'flow')
        grid = sigma_to_t(sigmas) if flow_state else sigmas
        rnd = StackedRandomGenerator('cpu', seeds)
        x = rnd.randn([num, net.img_channels, net.img_resolution, net.img_resolution], dtype=torch.float64)
        with torch.no_grad():
            out = solvers.get_solver(name)(FlowStateView(net) if flow_state else net, x * float(grid[0]), grid,
                                           randn_like=rnd.randn_like, **options)
        if flow_state:  # x_t at t_min back to the EDM state
            out = out / (1 - float(grid[-1]))
        pixels = (out.float() * 127.5 + 128).clip(0, 255).to(torch.uint8)
        features = detector(pixels).double().numpy()
        fid = frechet_distance(features.mean(0), np.cov(features, rowvar=False), ref['mu'], ref['sigma'])
        print(f'| {name} | {num_steps} | {options} | {"flow state (sigma := t)" if flow_state else "EDM state"} | '
              f'{float(out.mean()):+.4f} | {float(out.std()):.4f} | {fid:.2f} |', flush=True)


if __name__ == '__main__':
    main()

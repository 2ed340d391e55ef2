"""DPM-Solver-2, single-step (Lu et al. 2022), in the VE sigma-form of diff-sampler, with optional sub-steps."""

import torch

from .common import check_sigmas, check_substeps, denoise, inner_grid, to_d
from .registry import register

#----------------------------------------------------------------------------
# With `substeps=k`, each interval [t_cur, t_next] is split into k DPM-2
# sub-steps on an inner polynomial rho=7 grid; k=2, r=0.5 is the AdaSDE
# teacher (the official AdaSDE code's dpm_sampler; docs/references.md). AFS replaces only the first call of the run.


@register('dpm', nfe=lambda num_steps, r=0.5, substeps=1: 2 * substeps * (num_steps - 1), schedule=('polynomial', 7))
@torch.no_grad()
def sample_dpm(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False, *, r=0.5, substeps=1):
    """DPM-Solver-2: Euler to t_mid = t_next^r t_cur^(1-r), then a full step along d_mid / 2r + (1 - 1 / 2r) d_cur."""
    if not 0 < r <= 1:
        raise ValueError(f'dpm: r must be in (0, 1], got {r}')
    substeps = check_substeps('dpm', substeps)
    sigmas = check_sigmas(sigmas)
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        v = inner_grid(t_cur, t_next, substeps)
        for j, (v_cur, v_next) in enumerate(zip(v[:-1], v[1:])):
            denoised_sub = denoise(net, x, v_cur, extra_args, afs=afs and i == 0 and j == 0)
            if j == 0:
                denoised = denoised_sub
            d_cur = to_d(x, denoised_sub, v_cur)
            t_mid = v_next ** r * v_cur ** (1 - r)
            x_mid = x + (t_mid - v_cur) * d_cur
            d_mid = to_d(x_mid, denoise(net, x_mid, t_mid, extra_args), t_mid)
            x = x + (v_next - v_cur) * (1 / (2 * r) * d_mid + (1 - 1 / (2 * r)) * d_cur)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=t_cur, sigma_next=t_next, denoised=denoised))
    return x

#----------------------------------------------------------------------------

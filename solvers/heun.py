"""Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, EDM Algorithm 1, no churn)."""

import torch

from .common import check_sigmas, check_substeps, denoise, inner_grid, to_d
from .registry import register

#----------------------------------------------------------------------------


@register('heun', nfe=lambda num_steps, substeps=1: 2 * substeps * (num_steps - 1), schedule=('polynomial', 7))
@torch.no_grad()
def sample_heun(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False, *, substeps=1):
    """Euler predictor, trapezoidal corrector on every step (the last too: sigma_min > 0). 2 NFE per step; with
    `substeps=k` each interval is k Heun steps on an inner rho-7 grid (k=2: the official EPD code's teacher)."""
    substeps = check_substeps('heun', substeps)
    sigmas = check_sigmas(sigmas)
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        v = inner_grid(t_cur, t_next, substeps) if substeps > 1 else [t_cur, t_next]
        for j, (v_cur, v_next) in enumerate(zip(v[:-1], v[1:])):
            denoised_sub = denoise(net, x, v_cur, extra_args, afs=afs and i == 0 and j == 0)
            if j == 0:
                denoised = denoised_sub
            d_cur = to_d(x, denoised_sub, v_cur)
            x_next = x + (v_next - v_cur) * d_cur
            d_prime = to_d(x_next, denoise(net, x_next, v_next, extra_args), v_next)
            x = x + (v_next - v_cur) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=t_cur, sigma_next=t_next, denoised=denoised))
    return x

#----------------------------------------------------------------------------

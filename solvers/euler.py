"""Euler's method on the probability-flow ODE, which in the VE form is DDIM (eta = 0)."""

import torch

from .common import check_sigmas, denoise, to_d
from .registry import register

#----------------------------------------------------------------------------


@register('euler', nfe=lambda num_steps: num_steps - 1, schedule=('polynomial', 7))
@torch.no_grad()
def sample_euler(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False):
    """Euler / DDIM: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d(x_i, sigma_i). 1 NFE per step."""
    sigmas = check_sigmas(sigmas)
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoise(net, x, t_cur, extra_args, afs=afs and i == 0)
        x = x + (t_next - t_cur) * to_d(x, denoised, t_cur)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=t_cur, sigma_next=t_next, denoised=denoised))
    return x

#----------------------------------------------------------------------------

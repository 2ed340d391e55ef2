"""Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, EDM Algorithm 1, no churn)."""

import torch

from .common import check_sigmas, denoise, to_d
from .registry import register

#----------------------------------------------------------------------------


@register('heun', nfe=lambda num_steps: 2 * (num_steps - 1), schedule=('polynomial', 7))
@torch.no_grad()
def sample_heun(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False):
    """Euler predictor, trapezoidal corrector on every step (the last too: sigma_min > 0). 2 NFE per step."""
    sigmas = check_sigmas(sigmas)
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoise(net, x, t_cur, extra_args, afs=afs and i == 0)
        d_cur = to_d(x, denoised, t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        d_prime = to_d(x_next, denoise(net, x_next, t_next, extra_args), t_next)
        x = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=t_cur, sigma_next=t_next, denoised=denoised))
    return x

#----------------------------------------------------------------------------

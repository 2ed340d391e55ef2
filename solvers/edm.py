"""The EDM stochastic sampler (Karras et al. 2022, Algorithm 2): churn, Euler step, Heun correction."""

import math

import torch

from .common import check_sigmas, denoise, to_d
from .registry import register

#----------------------------------------------------------------------------
# Like EDM, a final noise level 0 is appended: N levels give N steps, the last
# a plain Euler step to 0 (which returns D(x_hat; t_hat)). With S_churn > 0 one
# noise tensor is drawn on every step, inside the [S_min, S_max] window or not,
# so that a seed's noise stream is EDM's; with S_churn = 0 none is drawn.


def _stochastic(S_churn=0, **options):
    return S_churn > 0


@register('edm', nfe=lambda num_steps, **options: 2 * num_steps - 1, schedule=('polynomial', 7),
          stochastic=_stochastic)
@torch.no_grad()
def sample_edm(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False, *,
               S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    """EDM Algorithm 2 with gamma_i = min(S_churn / N, sqrt(2) - 1) for S_min <= t_i <= S_max, N = len(sigmas)."""
    if not S_churn >= 0:
        raise ValueError(f'edm: S_churn must be >= 0, got {S_churn}')
    if not 0 <= S_min <= S_max:
        raise ValueError(f'edm: need 0 <= S_min <= S_max, got S_min={S_min}, S_max={S_max}')
    if not S_noise >= 0:
        raise ValueError(f'edm: S_noise must be >= 0, got {S_noise}')
    randn_like = randn_like or torch.randn_like
    t_steps = check_sigmas(sigmas)
    num_steps = len(t_steps)
    t_steps = t_steps + [0.0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        # Increase noise temporarily.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * randn_like(x) if S_churn > 0 else x

        # Euler step.
        denoised = denoise(net, x_hat, t_hat, extra_args, afs=afs and i == 0)
        d_cur = to_d(x_hat, denoised, t_hat)
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply 2nd order correction, except on the step to 0.
        if i < num_steps - 1:
            d_prime = to_d(x_next, denoise(net, x_next, t_next, extra_args), t_next)
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
        if callback is not None:
            callback(dict(i=i, x=x, sigma=t_cur, sigma_next=t_next, denoised=denoised, sigma_hat=t_hat))
    return x

#----------------------------------------------------------------------------

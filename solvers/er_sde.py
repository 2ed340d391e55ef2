"""ER-SDE-Solvers 1-3 (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDEs"), VE form."""

import math

import numpy as np
import torch

from .common import check_sigmas, denoise
from .registry import register

#----------------------------------------------------------------------------
# Noise-scale functions phi(sigma) of the ER-SDE paper, by `noise_fn` number.
# 1 is the probability-flow ODE (DDIM); 7 ("ER-SDE 5") is the recommended one.
# Each works on floats and NumPy arrays; phi(sigma) / sigma is non-decreasing.

NOISE_FNS = {
    1: lambda s: s,
    2: lambda s: s ** 2,
    3: lambda s: s * (np.exp(-1 / s) + 10),
    4: lambda s: s ** 1.5,
    5: lambda s: s ** 2.5,
    6: lambda s: s ** 0.9 * np.log10(1 + 100 * s ** 1.5),
    7: lambda s: s * (np.exp(s ** 0.3) + 10),
}

#----------------------------------------------------------------------------
# The integrals S1 = int 1/phi and S2 = int (sigma - t_cur)/phi over
# [t_next, t_cur], as the ER-SDE-Solver code (QinpengCui/ER-SDE-Solver) computes them: a left Riemann sum of
# `num_quad` points t_next + k (t_cur - t_next) / num_quad, k = 0 ... num_quad-1.


def _quadrature(phi, t_cur, t_next, num_quad):
    delta = (t_cur - t_next) / num_quad
    nodes = t_next + np.arange(num_quad, dtype=np.float64) / num_quad * (t_cur - t_next)
    s1 = float(np.sum(delta / phi(nodes)))
    s2 = float(np.sum(delta * (nodes - t_cur) / phi(nodes)))
    return s1, s2


def _clip(v, eps=1e-6):
    """The reference's guard against rounding: a variance within eps of 0 is 0."""
    return 0.0 if abs(v) < eps else v


def _stochastic(order=3, noise_fn=7, num_quad=100):
    return noise_fn != 1

#----------------------------------------------------------------------------
# x_next = r x + (1 - r) x0 + c1 dx0 + c2 ddx0 + sqrt(t_next^2 - t_cur^2 r^2) eps,
# r = phi(t_next) / phi(t_cur), with dx0, ddx0 backward differences of past x0.
# A final level 0 is appended; the step to 0 is first order (it returns x0).


@register('er_sde', nfe=lambda num_steps, **options: num_steps, schedule=('polynomial', 7), stochastic=_stochastic)
@torch.no_grad()
def sample_er_sde(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False, *,
                  order=3, noise_fn=7, num_quad=100):
    """ER-SDE-Solver of `order` 1-3 with noise-scale function `noise_fn` (1 = ODE). 1 NFE per noise level."""
    if order not in (1, 2, 3):
        raise ValueError(f'er_sde: order must be 1, 2 or 3, got {order}')
    if noise_fn not in NOISE_FNS:
        raise ValueError(f'er_sde: noise_fn must be one of {", ".join(map(str, NOISE_FNS))}, got {noise_fn}')
    if int(num_quad) != num_quad or num_quad < 1:
        raise ValueError(f'er_sde: num_quad must be a positive integer, got {num_quad}')
    phi = NOISE_FNS[noise_fn]
    randn_like = randn_like or torch.randn_like
    t_steps = check_sigmas(sigmas) + [0.0]
    x0_prev = dx0_prev = None
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x0 = denoise(net, x, t_cur, extra_args, afs=afs and i == 0)
        dx0 = None if i == 0 else (x0 - x0_prev) / (t_cur - t_steps[i - 1])
        step_order = 1 if t_next == 0 else min(order, i + 1)

        # First order (exact for a constant x0).
        r = phi(t_next) / phi(t_cur) if t_next > 0 else 0.0
        x_next = r * x + (1 - r) * x0

        # Taylor terms in x0 around t_cur.
        if step_order >= 2:
            s1, s2 = _quadrature(phi, t_cur, t_next, int(num_quad))
            x_next = x_next + (t_next - t_cur + s1 * phi(t_next)) * dx0
        if step_order == 3:
            ddx0 = 2 * (dx0 - dx0_prev) / (t_cur - t_steps[i - 2])
            x_next = x_next + ((t_next - t_cur) ** 2 / 2 + s2 * phi(t_next)) * ddx0

        # Noise.
        if noise_fn != 1 and t_next > 0:
            x_next = x_next + math.sqrt(_clip(t_next ** 2 - t_cur ** 2 * r ** 2)) * randn_like(x)
        x, x0_prev, dx0_prev = x_next, x0, dx0
        if callback is not None:
            callback(dict(i=i, x=x, sigma=t_cur, sigma_next=t_next, denoised=x0))
    return x

#----------------------------------------------------------------------------

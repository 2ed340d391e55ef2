"""Pseudo linear multistep solvers on the probability-flow ODE in sigma: iPNDM (Zhang & Chen 2023,
fixed Adams-Bashforth weights, spec/solvers.md §4.5) and iPNDM_v (variable-step Adams-Bashforth, §4.6)."""

import torch

from .common import check_sigmas, denoise, to_d
from .multistep import check_max_order, lagrange_integrals
from .registry import register

#----------------------------------------------------------------------------
# Adams-Bashforth weights of a uniform grid, current derivative first.

AB_WEIGHTS = {
    1: (1,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}

#----------------------------------------------------------------------------


@register('ipndm', nfe=lambda num_steps, **options: num_steps - 1, schedule=('polynomial', 7))
@torch.no_grad()
def sample_ipndm(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False, *, max_order=4):
    """iPNDM: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_k b_k d_{i-k}, b = uniform-grid AB weights of order p."""
    check_max_order('ipndm', max_order, 4)
    sigmas = check_sigmas(sigmas)
    d_hist = []
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoise(net, x, t_cur, extra_args, afs=afs and i == 0)
        d_hist = ([to_d(x, denoised, t_cur)] + d_hist)[:max_order]
        x = x + (t_next - t_cur) * sum(b * d for b, d in zip(AB_WEIGHTS[len(d_hist)], d_hist))
        if callback is not None:
            callback(dict(i=i, x=x, sigma=t_cur, sigma_next=t_next, denoised=denoised))
    return x

#----------------------------------------------------------------------------
# Exact variable-step Adams-Bashforth: the derivative is replaced by its Lagrange
# interpolant through the last p points (sigma_i, d_i), ..., (sigma_{i-p+1}, d_{i-p+1})
# and integrated exactly over [sigma_i, sigma_{i+1}]. On a uniform grid this gives
# the iPNDM weights times (sigma_{i+1} - sigma_i).


@register('ipndm_v', nfe=lambda num_steps, **options: num_steps - 1, schedule=('polynomial', 7))
@torch.no_grad()
def sample_ipndm_v(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False, *, max_order=4):
    """iPNDM_v: x_{i+1} = x_i + sum_k c_k d_{i-k}, c_k = integral of the k-th Lagrange basis over the step."""
    check_max_order('ipndm_v', max_order, 4)
    sigmas = check_sigmas(sigmas)
    d_hist = []
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoise(net, x, t_cur, extra_args, afs=afs and i == 0)
        d_hist = ([to_d(x, denoised, t_cur)] + d_hist)[:max_order]
        nodes = sigmas[i::-1][:len(d_hist)]
        coeffs = lagrange_integrals(nodes, t_cur, t_next)
        x = x + sum(c * d for c, d in zip(coeffs, d_hist))
        if callback is not None:
            callback(dict(i=i, x=x, sigma=t_cur, sigma_next=t_next, denoised=denoised))
    return x

#----------------------------------------------------------------------------

"""Pseudo linear multistep solvers on the probability-flow ODE in sigma: iPNDM (Zhang & Chen 2023, fixed
Adams-Bashforth weights) and iPNDM_v (variable-step Adams-Bashforth), as diff-sampler's ipndm_sampler and
ipndm_v_sampler (docs/references.md)."""

import torch

from .common import check_sigmas
from .multistep import check_max_order, lagrange_integrals, linear_multistep
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
    coeffs = lambda i, p: [(sigmas[i + 1] - sigmas[i]) * b for b in AB_WEIGHTS[p]]  # noqa: E731
    return linear_multistep(net, x, sigmas, coeffs, max_order, extra_args, callback, afs)

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
    coeffs = lambda i, p: lagrange_integrals(sigmas[i::-1][:p], sigmas[i], sigmas[i + 1])  # noqa: E731
    return linear_multistep(net, x, sigmas, coeffs, max_order, extra_args, callback, afs)

#----------------------------------------------------------------------------

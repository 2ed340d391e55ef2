"""DEIS, time-based Adams-Bashforth mode tAB (Zhang & Chen 2023, arXiv:2204.13902), as diff-sampler's deis_sampler
(docs/references.md).
The derivative d = dx/dsigma is interpolated by a Lagrange polynomial in the VP time tau."""

import torch

from .common import check_sigmas
from .multistep import check_max_order, lagrange_integrals, linear_multistep
from .registry import register
from .schedules import VPTime

#----------------------------------------------------------------------------
# Coefficients of step i with p = min(i + 1, max_order) points tau_i, ..., tau_{i-p+1}:
#   c_{i,j} = int_{tau_i}^{tau_{i+1}} sigma'(tau) l_j(tau) dtau = int_{sigma_i}^{sigma_{i+1}} l_j(tau(sigma)) dsigma,
# taken in log(sigma) by 32-point Gauss-Legendre (agrees with adaptive quadrature to ~1e-14
# relative; diff-sampler uses a 10000-point Riemann sum in float32). The tau map uses the fixed
# EDM-range constants (sigma 0.002..80) as diff-sampler does: it is only a reparametrisation.


def deis_coefficients(sigmas, max_order):
    vp = VPTime(sigma_min=0.002, sigma_max=80.0)
    tau = vp.tau
    coeffs = []
    for i in range(len(sigmas) - 1):
        nodes = [float(tau(s)) for s in sigmas[i::-1][:min(i + 1, max_order)]]
        coeffs.append(lagrange_integrals(nodes, sigmas[i], sigmas[i + 1], to_node=tau))
    return coeffs

#----------------------------------------------------------------------------


@register('deis', nfe=lambda num_steps, **options: num_steps - 1, schedule=('time_uniform', 2))
@torch.no_grad()
def sample_deis(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False, *, max_order=4):
    """DEIS-tAB(max_order - 1): x_{i+1} = x_i + sum_j c_{i,j} d_{i-j}; 1 NFE per step."""
    check_max_order('deis', max_order, 4)
    sigmas = check_sigmas(sigmas)
    coeffs = deis_coefficients(sigmas, max_order)
    return linear_multistep(net, x, sigmas, lambda i, p: coeffs[i], max_order, extra_args, callback, afs)

#----------------------------------------------------------------------------

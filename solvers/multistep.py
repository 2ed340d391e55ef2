"""Pieces shared by the multistep solvers (DPM-Solver++, UniPC, iPNDM, DEIS): option checks,
dynamic thresholding, integrals of Lagrange basis polynomials, and the linear multistep loop in sigma."""

import math

import numpy as np
import torch

from .common import denoise, to_d

#----------------------------------------------------------------------------
# Option checks: one clear ValueError per bad value.


def check_max_order(solver, max_order, highest):
    if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= highest:
        raise ValueError(f'{solver}: max_order must be an integer from 1 to {highest}, got {max_order!r}')


def check_flag(solver, name, value):
    if not isinstance(value, bool):
        raise ValueError(f'{solver}: {name} must be True or False, got {value!r}')

#----------------------------------------------------------------------------
# Dynamic thresholding (Imagen; DPM-Solver++ §4.4): per sample, s = max(1, the
# 99.5th percentile of |x0|), then x0 <- clip(x0, -s, s) / s.


def dynamic_threshold(x0, percentile=0.995):
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), percentile, dim=1).clamp(min=1)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.minimum(torch.maximum(x0, -s), s) / s

#----------------------------------------------------------------------------
# Integrals of the Lagrange basis over one step, in float64:
#   c_j = int_{sigma_a}^{sigma_b} l_j(u(sigma)) dsigma,
# where l_j is the Lagrange basis over `nodes` (in the variable u) and u = to_node(sigma).
# With u = sigma (to_node=None) the integrand is a polynomial of degree len(nodes)-1 and
# Gauss-Legendre with len(nodes) points is exact. Otherwise the integral is taken in
# log(sigma) (d sigma = sigma d log(sigma)), where a smooth map such as the VP time
# tau(sigma) is far from its complex singularities, with `num_points` Gauss-Legendre points.


def lagrange_integrals(nodes, sigma_a, sigma_b, to_node=None, num_points=32):
    nodes = np.asarray(nodes, dtype=np.float64)
    if to_node is None:
        g, w = np.polynomial.legendre.leggauss(len(nodes))
        sigma = (sigma_a + sigma_b) / 2 + (sigma_b - sigma_a) / 2 * g
        w = w * (sigma_b - sigma_a) / 2
        u = sigma
    else:
        g, w = np.polynomial.legendre.leggauss(num_points)
        v_a, v_b = math.log(sigma_a), math.log(sigma_b)
        sigma = np.exp((v_a + v_b) / 2 + (v_b - v_a) / 2 * g)
        w = w * (v_b - v_a) / 2 * sigma
        u = to_node(sigma)
    coeffs = []
    for j in range(len(nodes)):
        others = np.delete(nodes, j)
        ell = np.prod((u[:, None] - others) / (nodes[j] - others), axis=1)
        coeffs.append(float(np.sum(w * ell)))
    return coeffs

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# Linear multistep on the probability-flow ODE in sigma (iPNDM, iPNDM_v, DEIS-tAB):
#   x_{i+1} = x_i + sum_k c_{i,k} d_{i-k},   d = (x - D(x, sigma)) / sigma,   1 NFE per step,
# where coeffs(i, p) gives the p coefficients of step i (p = how many derivatives are kept).


def linear_multistep(net, x, sigmas, coeffs, max_order, extra_args=None, callback=None, afs=False):
    d_hist = []
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoise(net, x, t_cur, extra_args, afs=afs and i == 0)
        d_hist = ([to_d(x, denoised, t_cur)] + d_hist)[:max_order]
        x = x + sum(c * d for c, d in zip(coeffs(i, len(d_hist)), d_hist))
        if callback is not None:
            callback(dict(i=i, x=x, sigma=t_cur, sigma_next=t_next, denoised=denoised))
    return x

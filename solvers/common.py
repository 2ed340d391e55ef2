"""Small pieces shared by every solver: the denoiser call, AFS, the ODE derivative."""

import math

import torch

#----------------------------------------------------------------------------
# Denoiser call. `sigma` is a float, a 0-d tensor, or a [B] tensor with one
# noise level per row of x (EPD evaluates its K points in one call); a tensor
# stays in the autograd graph (distillation differentiates through it). The
# output is cast to x's dtype so that solvers can run in float64 around a
# float32 net.


def denoise(net, x, sigma, extra_args=None, afs=False):
    """D(x; sigma), or with `afs` the analytical first step of AMED: D = x - sigma * x / sqrt(1 + sigma^2)."""
    if torch.is_tensor(sigma) and sigma.ndim > 0:
        if sigma.ndim != 1 or sigma.shape[0] not in (1, x.shape[0]):
            raise ValueError(f'sigma must be a scalar or hold one level per row ({x.shape[0]}), '
                             f'got shape {tuple(sigma.shape)}')
        if afs:  # one level per row: broadcast over the row's pixels
            sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    if afs:
        return x - sigma * x / _sqrt(1 + sigma ** 2)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return net(x, sigma.expand(x.shape[0]), **(extra_args or {})).to(x.dtype)


def repeat_rows(extra_args, copies, batch):
    """extra_args for a call on `copies` stacked copies of a batch of `batch` rows (copy-major: row j * batch + b).

    Every tensor whose first dimension is the batch (class labels, text conditions, ...) is repeated `copies`
    times along it; tensors with one row (shared by the batch) and all other values pass unchanged.
    """
    def rows(value):
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
            return value.repeat(copies, *([1] * (value.ndim - 1)))
        return value
    return {key: rows(value) for key, value in (extra_args or {}).items()}


def to_d(x, denoised, sigma):
    """Probability-flow ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma (= the noise prediction)."""
    return (x - denoised) / sigma


def inner_grid(t_cur, t_next, substeps, rho=7):
    """`substeps` + 1 noise levels from t_cur to t_next, uniform in sigma^(1/rho), with exact endpoints: the
    sub-steps of the official AdaSDE and EPD teachers (dpm, heun with substeps=2)."""
    v = [(t_cur ** (1 / rho) + j / substeps * (t_next ** (1 / rho) - t_cur ** (1 / rho))) ** rho
         for j in range(substeps + 1)]
    v[0], v[-1] = t_cur, t_next
    return v


def check_substeps(name, substeps):
    if int(substeps) != substeps or substeps < 1:
        raise ValueError(f'{name}: substeps must be a positive integer, got {substeps}')
    return int(substeps)


def _sqrt(v):
    return torch.sqrt(v) if torch.is_tensor(v) else math.sqrt(v)


def check_sigmas(sigmas):
    """Solvers take a decreasing 1-D schedule of at least two noise levels, all > 0."""
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f'sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}')
    if not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas[-1]) <= 0:
        raise ValueError('sigmas must be strictly decreasing and positive')
    return [float(s) for s in sigmas]

#----------------------------------------------------------------------------

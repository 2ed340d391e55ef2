"""UniPC: unified predictor-corrector (Zhao et al. 2023, arXiv:2302.04867), orders 1-3, variants B1/B2,
in the VE sigma-form, as diff-sampler's unipc_sampler (docs/references.md). Every network call goes through
common.denoise."""

import math

import numpy as np
import torch

from .common import check_sigmas, denoise, to_d
from .dpmpp import check_dpmpp_options
from .multistep import dynamic_threshold
from .registry import register

VARIANTS = ('bh1', 'bh2')

#----------------------------------------------------------------------------
# Predictor and corrector weights of one step of order p. r_k = (lambda_{s_k} - lambda_s) / h
# for the p - 1 history points (negative), hh = -h (data) or h (noise), B(h) = hh (bh1) or
# e^hh - 1 (bh2); b_n = g_n n! / B(h) with g_1 = (e^hh - 1) / hh - 1, g_{n+1} = g_n / hh - 1 / (n+1)!;
# R[n, k] = r_k^n over the columns (r_1, ..., r_{p-1}, 1).


def unipc_weights(r, hh, variant):
    p = len(r) + 1
    B_h = hh if variant == 'bh1' else math.expm1(hh)
    g, factorial, b = math.expm1(hh) / hh - 1, 1, []
    for n in range(1, p + 1):
        b.append(g * factorial / B_h)
        factorial *= n + 1
        g = g / hh - 1 / factorial
    R = np.array([[rk ** n for rk in [*r, 1.0]] for n in range(p)])
    b = np.array(b)
    if p == 1:
        rhos_p = []
    elif p == 2:
        rhos_p = [0.5]
    else:
        rhos_p = np.linalg.solve(R[:p - 1, :p - 1], b[:p - 1]).tolist()
    rhos_c = [0.5] if p == 1 else np.linalg.solve(R, b).tolist()
    return B_h, rhos_p, rhos_c

#----------------------------------------------------------------------------
# One UniPC step from sigma_s = t_hist[-1] to t_next: predictor UniP-p, then (optionally) the
# corrector UniC-p using the model output m_t at the predicted point. Returns the corrected x_t,
# m_t and D(x_t^P) (None without corrector). m_t becomes the next step's m_s, so 1 NFE per step.


def unipc_update(net, x, m_hist, t_hist, t_next, order, extra_args=None, variant='bh2', predict_x0=True,
                 thresholding=False, use_corrector=True):
    t_cur, m_cur = t_hist[-1], m_hist[-1]
    h = math.log(t_cur / t_next)
    r = [math.log(t_cur / t_hist[-1 - k]) / h for k in range(1, order)]
    D = [(m_hist[-1 - k] - m_cur) / r[k - 1] for k in range(1, order)]
    hh = -h if predict_x0 else h
    B_h, rhos_p, rhos_c = unipc_weights(r, hh, variant)
    scale = 1 if predict_x0 else t_next  # noise prediction carries an extra sigma_t
    if predict_x0:
        x_base = (t_next / t_cur) * x - math.expm1(hh) * m_cur
    else:
        x_base = x - t_next * math.expm1(hh) * m_cur
    x_pred = x_base - scale * B_h * sum(rho * Dk for rho, Dk in zip(rhos_p, D)) if rhos_p else x_base
    if not use_corrector:
        return x_pred, None, None
    denoised = denoise(net, x_pred, t_next, extra_args)
    if thresholding:
        denoised = dynamic_threshold(denoised)
    m_next = denoised if predict_x0 else to_d(x_pred, denoised, t_next)
    corr = sum(rho * Dk for rho, Dk in zip(rhos_c[:-1], D)) + rhos_c[-1] * (m_next - m_cur)
    return x_base - scale * B_h * corr, m_next, denoised

#----------------------------------------------------------------------------


def _unipc_nfe(num_steps, max_order=3, **options):
    return num_steps - 1 + int(num_steps <= max_order)  # the final step gets a corrector during warm-up


@register('unipc', nfe=_unipc_nfe, schedule=('logsnr', 1))
@torch.no_grad()
def sample_unipc(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False, *,
                 max_order=3, variant='bh2', predict_x0=True, lower_order_final=True, thresholding=False):
    """UniPC-max_order with B(h) `variant`: corrector on every step but the last (after warm-up)."""
    check_dpmpp_options('unipc', max_order, predict_x0, lower_order_final, thresholding)
    if variant not in VARIANTS:
        raise ValueError(f'unipc: unknown variant {variant!r}; choose from {", ".join(VARIANTS)}')
    sigmas = check_sigmas(sigmas)
    num_steps = len(sigmas)
    denoised = denoise(net, x, sigmas[0], extra_args, afs=afs)
    if thresholding:
        denoised = dynamic_threshold(denoised)
    m_hist = [denoised if predict_x0 else to_d(x, denoised, sigmas[0])]
    t_hist = [sigmas[0]]
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if i + 1 < max_order:  # warm-up: the order grows with the history, corrector always on
            order, use_corrector = i + 1, True
        else:
            order = min(max_order, num_steps - 1 - i) if lower_order_final else max_order
            use_corrector = i < num_steps - 2
        x, m_next, denoised_next = unipc_update(net, x, m_hist, t_hist, t_next, order, extra_args, variant,
                                                predict_x0, thresholding, use_corrector)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=t_cur, sigma_next=t_next, denoised=denoised))
        if m_next is not None:
            m_hist, t_hist = (m_hist + [m_next])[-max_order:], (t_hist + [t_next])[-max_order:]
            denoised = denoised_next
    return x

#----------------------------------------------------------------------------

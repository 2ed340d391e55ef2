"""Multistep DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095), orders 1-3, in the VE sigma-form
(as diff-sampler's dpm_pp_sampler; docs/references.md). Data prediction (predict_x0=True) or noise prediction."""

import math

import torch

from .common import check_sigmas, denoise, to_d
from .multistep import check_flag, check_max_order, dynamic_threshold
from .registry import register

#----------------------------------------------------------------------------
# One multistep update from sigma_s = t_hist[-1] to t_next with lambda = -log(sigma),
# h = lambda_t - lambda_s. `m_hist` holds the model outputs (data or noise prediction)
# at the noise levels `t_hist`, most recent last. The noise levels are floats, or
# (the AMED plug-in, solvers/amed.py) tensors of one level per sample; `scale`
# (a float, or a tensor broadcasting against x) multiplies every term but the
# leading (t_next / t_cur) x, resp. x, as in AMED's plug-in. With float levels
# and scale = 1 this is the plain DPM-Solver++ update, bit for bit.


def dpmpp_update(x, m_hist, t_hist, t_next, order, predict_x0=True, exact_third_order=False, scale=1):
    times = [*t_hist[-order:], t_next]
    if any(torch.is_tensor(t) for t in times):
        shape = [-1] + [1] * (x.ndim - 1)
        times = [torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(shape) for t in times]
        log, expm1 = torch.log, torch.expm1
    else:
        log, expm1 = math.log, math.expm1
    *t_hist, t_next = times
    t_cur, m_cur = t_hist[-1], m_hist[-1]
    h = log(t_cur / t_next)
    phi_1 = expm1(-h) if predict_x0 else expm1(h)
    x_next = (t_next / t_cur) * x - scale * phi_1 * m_cur if predict_x0 else x - scale * t_next * phi_1 * m_cur
    if order == 1:
        return x_next
    r_0 = log(t_hist[-2] / t_cur) / h
    D1_0 = (m_cur - m_hist[-2]) / r_0
    if order == 2:
        return x_next - scale * 0.5 * phi_1 * D1_0 if predict_x0 else x_next - scale * 0.5 * t_next * phi_1 * D1_0
    r_1 = log(t_hist[-3] / t_hist[-2]) / h
    D1_1 = (m_hist[-2] - m_hist[-3]) / r_1
    # D1 ~ h m'(lambda_s) but D2 ~ h^2 m''/2, so the published update (diff-sampler's, copied there from the
    # official DPM-Solver code) gives the h^2 m'' Taylor term half its weight and is globally second order. It is
    # the default, for parity with published baselines; exact_third_order doubles D2 (docs/deviations.md).
    D1 = D1_0 + r_0 / (r_0 + r_1) * (D1_0 - D1_1)
    D2 = (D1_0 - D1_1) / (r_0 + r_1) * (2 if exact_third_order else 1)
    phi_2 = phi_1 / h + 1 if predict_x0 else phi_1 / h - 1
    phi_3 = phi_2 / h - 0.5
    if predict_x0:
        return x_next + scale * phi_2 * D1 - scale * phi_3 * D2
    return x_next - scale * t_next * (phi_2 * D1 + phi_3 * D2)


def dpmpp_order(k, num_points, max_order, lower_order_final=True):
    """Order of step k (0-based) of a run over `num_points` noise levels: it rises by one per step up to max_order;
    with lower_order_final the last steps fall back to the number of steps left (the last one is first order)."""
    if lower_order_final:
        return k + 1 if k + 1 < max_order else min(max_order, num_points - 1 - k)
    return min(max_order, k + 1)

#----------------------------------------------------------------------------


def check_dpmpp_options(solver, max_order, predict_x0, lower_order_final, thresholding):
    check_max_order(solver, max_order, 3)
    check_flag(solver, 'predict_x0', predict_x0)
    check_flag(solver, 'lower_order_final', lower_order_final)
    check_flag(solver, 'thresholding', thresholding)
    if thresholding and not predict_x0:
        raise ValueError(f'{solver}: thresholding clips the data prediction; it needs predict_x0=True')

#----------------------------------------------------------------------------


@register('dpmpp', nfe=lambda num_steps, **options: num_steps - 1, schedule=('logsnr', 1))
@torch.no_grad()
def sample_dpmpp(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False, *,
                 max_order=3, predict_x0=True, lower_order_final=True, thresholding=False, exact_third_order=False):
    """DPM-Solver++(max_order M): 1 NFE per step; lower_order_final lowers the order on the last steps."""
    check_dpmpp_options('dpmpp', max_order, predict_x0, lower_order_final, thresholding)
    check_flag('dpmpp', 'exact_third_order', exact_third_order)
    sigmas = check_sigmas(sigmas)
    num_steps = len(sigmas)
    m_hist, t_hist = [], []
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = denoise(net, x, t_cur, extra_args, afs=afs and i == 0)
        if thresholding:
            denoised = dynamic_threshold(denoised)
        m_hist = (m_hist + [denoised if predict_x0 else to_d(x, denoised, t_cur)])[-3:]
        t_hist = (t_hist + [t_cur])[-3:]
        order = dpmpp_order(i, num_steps, max_order, lower_order_final)
        x = dpmpp_update(x, m_hist, t_hist, t_next, order, predict_x0, exact_third_order)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=t_cur, sigma_next=t_next, denoised=denoised))
    return x

#----------------------------------------------------------------------------

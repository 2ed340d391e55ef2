"""Time discretizations: the noise levels a sampler visits, in float64 (diff-sampler's and the official AdaSDE
code's get_schedule; docs/references.md)."""

import math

import numpy as np
import torch

SCHEDULES = ('polynomial', 'logsnr', 'time_uniform', 'discrete', 'flow')

#----------------------------------------------------------------------------
# VP "time" parameterisation used by the time_uniform schedule and by DEIS:
# sigma(tau) = sqrt(exp(beta_d tau^2 / 2 + beta_min tau) - 1), with the two
# constants chosen so that sigma(1) = sigma_max and sigma(eps_s) = sigma_min.


class VPTime:
    def __init__(self, sigma_min=0.002, sigma_max=80.0, eps_s=1e-3):
        self.eps_s = eps_s
        self.beta_d = 2 * (math.log1p(sigma_min ** 2) / eps_s - math.log1p(sigma_max ** 2)) / (eps_s - 1)
        self.beta_min = math.log1p(sigma_max ** 2) - self.beta_d / 2

    def sigma(self, tau):
        return np.sqrt(np.expm1(self.beta_d * tau ** 2 / 2 + self.beta_min * tau))

    def tau(self, sigma):
        return (np.sqrt(self.beta_min ** 2 + 2 * self.beta_d * np.log1p(sigma ** 2)) - self.beta_min) / self.beta_d

    def dsigma_dtau(self, tau):
        s = self.sigma(tau)
        return 0.5 * (self.beta_min + self.beta_d * tau) * (s + 1 / s)

#----------------------------------------------------------------------------
# Flow-matching time (docs/flow.md): the rectified-flow time of an EDM noise level is t = sigma / (1 + sigma), and
# the time shift of SD3/FLUX, t -> s t / (1 + (s - 1) t), multiplies sigma by s. diffusers' FlowMatchEuler
# schedule is uniform in the unshifted time, so in sigma it is uniform in u = sigma / (s + sigma).


def flow_time_shift(t, shift):
    """SD3's time shift t -> s t / (1 + (s - 1) t) (FLUX's exponential shift with mu is s = exp(mu)); in EDM
    noise levels it is sigma -> s sigma."""
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(u, sigma_min, sigma_max, shift=1.0):
    """Noise levels uniform in the unshifted flow time u = sigma / (shift + sigma), from sigma_max (u = 0) to
    sigma_min (u = 1) for u in [0, 1]: diffusers' FlowMatchEuler sigmas (without the final 0) mapped to EDM."""
    u_max, u_min = sigma_max / (shift + sigma_max), sigma_min / (shift + sigma_min)
    t = u_max + np.asarray(u, dtype=np.float64) * (u_min - u_max)
    return shift * t / (1 - t)

#----------------------------------------------------------------------------


def check_schedule(schedule_type, schedule_rho):
    """ValueError (one line) for a schedule that cannot be built whatever the model: an unknown type, or an
    exponent the type cannot take (polynomial, time_uniform and discrete take the 1/rho power; logsnr has none)."""
    if schedule_type not in SCHEDULES:
        raise ValueError(f'unknown schedule_type {schedule_type!r}; choose from {", ".join(SCHEDULES)}')
    rho_ok = math.isfinite(float(schedule_rho)) and float(schedule_rho) != 0
    if schedule_type not in ('logsnr', 'flow') and not rho_ok:  # logsnr and flow ignore rho
        raise ValueError(f'the {schedule_type} schedule takes the 1/rho power: rho must be finite and nonzero, not '
                         f'{float(schedule_rho):g}')


def get_schedule(num_steps, sigma_min, sigma_max, schedule_type='polynomial', schedule_rho=7, net=None):
    """Return `num_steps` decreasing noise levels from sigma_max to sigma_min as a float64 tensor.

    polynomial: EDM's rho-schedule; logsnr: uniform in log(sigma); time_uniform: uniform in VP time
    tau^(1/rho); discrete: uniform in the model's own time t^(1/rho) (needs net.sigma / net.sigma_inv); flow:
    uniform in flow time t = sigma / (1 + sigma) after the model's time shift `net.flow_shift` (1 without a net or
    attribute), diffusers' FlowMatchEuler sigmas (flow_sigmas). logsnr and flow ignore rho.
    """
    if num_steps < 2:
        raise ValueError(f'num_steps must be at least 2, got {num_steps}')
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}')
    check_schedule(schedule_type, schedule_rho)
    u = np.linspace(0, 1, num_steps, dtype=np.float64)
    rho = float(schedule_rho)
    if schedule_type == 'polynomial':
        sigmas = (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    elif schedule_type == 'logsnr':
        sigmas = np.exp(np.log(sigma_max) + u * (np.log(sigma_min) - np.log(sigma_max)))
    elif schedule_type == 'time_uniform':
        vp = VPTime(sigma_min, sigma_max)
        sigmas = vp.sigma((1 + u * (vp.eps_s ** (1 / rho) - 1)) ** rho)
    elif schedule_type == 'discrete':
        if net is None or not hasattr(net, 'sigma_inv'):
            raise ValueError("schedule_type='discrete' needs a discrete-time model (net.sigma, net.sigma_inv)")
        t_max = float(net.sigma_inv(torch.as_tensor(sigma_max, dtype=torch.float64)))
        t_min = float(net.sigma_inv(torch.as_tensor(sigma_min, dtype=torch.float64)))
        # The reference omits the 1/rho power on t_max (harmless at rho=1); this is the corrected form.
        t = (t_max ** (1 / rho) + u * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
        sigmas = net.sigma(torch.as_tensor(t, dtype=torch.float64)).double().cpu().numpy()
    elif schedule_type == 'flow':
        sigmas = flow_sigmas(u, sigma_min, sigma_max, float(getattr(net, 'flow_shift', 1.0)))
    else:
        raise ValueError(f'unknown schedule_type {schedule_type!r}; choose from {", ".join(SCHEDULES)}')
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact endpoints, whatever the rounding
    return sigmas

#----------------------------------------------------------------------------

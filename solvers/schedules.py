"""Time discretizations: the noise levels a sampler visits, in float64 (diff-sampler's and the official AdaSDE
code's get_schedule; docs/references.md)."""

import math

import numpy as np
import torch

SCHEDULES = ('polynomial', 'logsnr', 'time_uniform', 'discrete')

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


def check_schedule(schedule_type, schedule_rho):
    """ValueError (one line) for a schedule that cannot be built whatever the model: an unknown type, or an
    exponent the type cannot take (polynomial, time_uniform and discrete take the 1/rho power; logsnr has none)."""
    if schedule_type not in SCHEDULES:
        raise ValueError(f'unknown schedule_type {schedule_type!r}; choose from {", ".join(SCHEDULES)}')
    if schedule_type != 'logsnr' and not (math.isfinite(float(schedule_rho)) and float(schedule_rho) != 0):
        raise ValueError(f'the {schedule_type} schedule takes the 1/rho power: rho must be finite and nonzero, not '
                         f'{float(schedule_rho):g}')


def get_schedule(num_steps, sigma_min, sigma_max, schedule_type='polynomial', schedule_rho=7, net=None):
    """Return `num_steps` decreasing noise levels from sigma_max to sigma_min as a float64 tensor.

    polynomial: EDM's rho-schedule; logsnr: uniform in log(sigma); time_uniform: uniform in VP time
    tau^(1/rho); discrete: uniform in the model's own time t^(1/rho) (needs net.sigma / net.sigma_inv).
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
    else:  # discrete
        if net is None or not hasattr(net, 'sigma_inv'):
            raise ValueError("schedule_type='discrete' needs a discrete-time model (net.sigma, net.sigma_inv)")
        t_max = float(net.sigma_inv(torch.as_tensor(sigma_max, dtype=torch.float64)))
        t_min = float(net.sigma_inv(torch.as_tensor(sigma_min, dtype=torch.float64)))
        # The reference omits the 1/rho power on t_max (harmless at rho=1); this is the corrected form.
        t = (t_max ** (1 / rho) + u * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
        sigmas = net.sigma(torch.as_tensor(t, dtype=torch.float64)).double().cpu().numpy()
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact endpoints, whatever the rounding
    return sigmas

#----------------------------------------------------------------------------

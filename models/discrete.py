"""Discrete-time VP models (a DDPM alphas_cumprod table) seen in continuous time, shared by the Stable Diffusion
and latent-diffusion adapters.

The continuous time of the discrete schedule is DPM-Solver's: log sqrt(alphas_cumprod[n]) sits at t_n = (n + 1) / M
and is interpolated linearly in t (extrapolated linearly past the end knots); the network sees the continuous
index M t - 1. sigma(t) = sqrt(1 - alpha_t^2) / alpha_t. Everything is computed in float64.
"""

import torch


def _float(v):
    return v if torch.is_tensor(v) and v.is_floating_point() else torch.as_tensor(v, dtype=torch.float64)


def _interp(x, xp, fp):
    """Piecewise-linear interpolation (xp increasing) with linear extrapolation from the two outermost knots,
    differentiable in x."""
    idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, len(xp) - 1)
    x_lo, x_hi, f_lo, f_hi = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f_lo + (f_hi - f_lo) / (x_hi - x_lo) * (x - x_lo)


class DiscreteVPSchedule:
    """Mixin: call _init_schedule(alphas_cumprod, epsilon_t); provides sigma(t), sigma_inv(sigma), sigma_min,
    sigma_max and network_time(sigma) = M sigma_inv(sigma) - 1."""

    def _init_schedule(self, alphas_cumprod, epsilon_t=1e-3):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.M = len(alphas_cumprod)
        self.epsilon_t = float(epsilon_t)
        # The float64 tables are plain tensors, not buffers, so that net.half() or net.to(dtype) keeps them exact.
        self.t_array = torch.arange(1, self.M + 1, dtype=torch.float64) / self.M
        self.log_alpha_array = 0.5 * torch.log(alphas_cumprod)
        self._tables_on = {}
        self.sigma_min = float(self.sigma(self.epsilon_t))
        self.sigma_max = float(self.sigma(1.0))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def _tables(self, like):
        if like.device not in self._tables_on:
            self._tables_on[like.device] = (self.t_array.to(like.device), self.log_alpha_array.to(like.device))
        return self._tables_on[like.device]

    def sigma(self, t):
        """sigma(t) = sqrt(1 - alpha_t^2) / alpha_t, log alpha_t interpolated in t (computed in float64)."""
        t = _float(t)
        t_array, log_alpha_array = self._tables(t)
        log_alpha = _interp(t.double(), t_array, log_alpha_array)
        return torch.sqrt(torch.expm1(-2 * log_alpha)).to(t.dtype)

    def sigma_inv(self, sigma):
        """The inverse of sigma(t): log alpha = -log(1 + sigma^2) / 2, then the inverse interpolation."""
        sigma = _float(sigma)
        t_array, log_alpha_array = self._tables(sigma)
        log_alpha = -0.5 * torch.log1p(sigma.double() ** 2)
        return _interp(log_alpha, log_alpha_array.flip(0), t_array.flip(0)).to(sigma.dtype)

    def network_time(self, sigma):
        """The continuous DDPM index M t(sigma) - 1 in [0, M - 1] (float64)."""
        return self.M * self.sigma_inv(_float(sigma).double()) - 1

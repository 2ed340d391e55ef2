"""Exact denoisers: ground truth for tests and benchmarks (no training, no files).

Both follow the Denoiser contract of docs/design.md:
net(x, sigma, class_labels=None) -> D(x; sigma) = E[x_0 | x_0 + sigma n = x].
"""

import torch

#----------------------------------------------------------------------------
# Common attributes of an analytic denoiser over images of a given shape.


class _Analytic(torch.nn.Module):
    label_dim = 0
    # No network, so no bottleneck: AMED (solvers/amed.py) reads the denoiser's own output D(x; sigma) instead,
    # averaged over channels and pooled to its feature size.
    bottleneck = ''

    def __init__(self, shape, sigma_min, sigma_max):
        super().__init__()
        self.shape = tuple(shape)
        self.img_channels = self.shape[0]
        self.img_resolution = self.shape[-1]
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def _sigma(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        return sigma.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))

#----------------------------------------------------------------------------
# Mixture of axis-aligned Gaussians: p(x_0) = sum_k w_k N(mu_k, diag(s_k^2)).
# Computed in float64, one sample at a time (no cross-batch reductions), so a
# sample's output never depends on the batch it is in.


class GaussianMixture(_Analytic):
    def __init__(self, means, stds, weights=None, sigma_min=0.002, sigma_max=80.0):
        means = torch.as_tensor(means, dtype=torch.float64)  # [K, *shape]
        super().__init__(means.shape[1:], sigma_min, sigma_max)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        # One std per component, or one per coordinate.
        stds = stds.reshape(stds.shape + (1,) * (means.ndim - stds.ndim)).expand_as(means)
        weights = torch.ones(len(means), dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        self.register_buffer('means', means)
        self.register_buffer('stds', stds.clone())
        self.register_buffer('log_weights', torch.log(weights.double() / weights.double().sum()))

    def forward(self, x, sigma, class_labels=None, **kwargs):
        s = self._sigma(x, sigma).unsqueeze(1)                        # [B, 1, 1...]
        x64 = x.double().unsqueeze(1)                                 # [B, 1, *shape]
        var = self.stds ** 2 + s ** 2                                 # [B, K, *shape]: marginal variance at sigma
        diff = x64 - self.means                                       # [B, K, *shape]
        dims = tuple(range(2, diff.ndim))
        log_p = self.log_weights - 0.5 * (diff ** 2 / var + torch.log(var)).sum(dims)  # [B, K]
        resp = torch.softmax(log_p, dim=1).reshape(*log_p.shape, *([1] * len(dims)))
        x0_k = self.means + self.stds ** 2 / var * diff               # E[x_0 | x, k]
        return (resp * x0_k).sum(1).to(torch.float32 if x.dtype != torch.float64 else x.dtype)

    def sample(self, n, generator=None):
        """Draw n clean samples x_0 (float64)."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.shape), dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k] * noise

    def ode_solution(self, x, sigma_from, sigma_to):
        """Exact probability-flow ODE map from sigma_from to sigma_to, for a single component.

        Each coordinate evolves as x(sigma) = mu + (x - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_from^2).
        """
        if len(self.means) != 1:
            raise ValueError('the closed-form ODE solution exists for a single Gaussian component only')
        mu, std = self.means[0], self.stds[0]
        ratio = torch.sqrt((std ** 2 + sigma_to ** 2) / (std ** 2 + sigma_from ** 2))
        return mu + (x.double() - mu) * ratio

#----------------------------------------------------------------------------
# Empirical-data denoiser: the exact D(x; sigma) of the training set itself,
# D = sum_n softmax_n(-|x - y_n|^2 / (2 sigma^2)) y_n. An ideal "model" that
# memorises its data; useful to check samplers against a sharp target.


class EmpiricalDenoiser(_Analytic):
    def __init__(self, data, sigma_min=0.002, sigma_max=80.0):
        data = torch.as_tensor(data, dtype=torch.float64)  # [N, *shape]
        super().__init__(data.shape[1:], sigma_min, sigma_max)
        self.register_buffer('data', data)

    def forward(self, x, sigma, class_labels=None, **kwargs):
        s = self._sigma(x, sigma).reshape(-1, 1)                                        # [B, 1]
        flat = self.data.flatten(1)                                                     # [N, D]
        d2 = ((x.double().flatten(1).unsqueeze(1) - flat) ** 2).sum(-1)                 # [B, N]
        resp = torch.softmax(-d2 / (2 * s ** 2), dim=1)                                 # [B, N]
        out = (resp.unsqueeze(-1) * flat).sum(1).reshape(x.shape)
        return out.to(torch.float32 if x.dtype != torch.float64 else x.dtype)

#----------------------------------------------------------------------------

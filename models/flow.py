"""Rectified-flow (flow-matching) models seen as EDM denoisers.

A rectified-flow model is trained on the straight path x_t = (1 - t) x_0 + t n, t in [0, 1], and predicts the
velocity v = dx_t/dt = n - x_0. Dividing by (1 - t) gives x_t / (1 - t) = x_0 + t / (1 - t) n: the EDM "VE" state
x = x_0 + sigma n with

    sigma = t / (1 - t),    t = sigma / (1 + sigma),    x = x_t / (1 - t) = (1 + sigma) x_t,

and the clean-image estimate is D = E[x_0 | x_t] = x_t - t v. So one velocity network becomes one Denoiser
(docs/design.md) and every solver of the registry, training-free or learned, runs on it unchanged; the solvers'
noise (ER-SDE, EDM's churn, AdaSDE's gamma) is then added in the EDM state, where it keeps the marginals.

Two facts a user of flow pipelines meets, restated in sigma:
  * Euler in the EDM state is Euler in the flow state (FlowMatchEuler): x' = D + sigma' (x - D) / sigma maps
    to x_t' = (1 - t') D + t' n_hat with n_hat = x_t + (1 - t) v, which is x_t + (t' - t) v.
  * The time shift of SD3/FLUX, t -> s t / (1 + (s - 1) t), multiplies sigma by s: sigma -> s sigma
    (solvers.schedules.flow_time_shift; the schedule type 'flow' is diffusers' FlowMatchEuler grid, shifted by the
    model's `flow_shift`).

Subclasses implement `velocity(x_t, t, **cond)` (t a float tensor of one value per row) and set `t_min`/`t_max`.
"""

import torch

FLOW_NAME = 'flow'  # the digits flow model's files in src/digits/: flow.json + flow.safetensors (models.edm format)


def sigma_to_t(sigma):
    """Flow time of an EDM noise level: t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def t_to_sigma(t):
    """EDM noise level of a flow time: sigma = t / (1 - t) (infinite at t = 1)."""
    return t / (1 - t)


class FlowDenoiser(torch.nn.Module):
    """Base class: D(x; sigma) of a velocity model v(x_t, t). The mapping is computed in float64 and the network
    sees x_t in x's dtype."""

    label_dim = 0
    t_min = 1e-3          # sigma_min = t_min / (1 - t_min)
    t_max = 1 - 1e-3      # t = 1 is sigma = infinity: solvers start from a finite sigma_max
    flow_shift = 1.0      # the model's time shift s (sigma -> s sigma), read by the 'flow' schedule (SD3: 3)

    @property
    def sigma_min(self):
        return float(t_to_sigma(self.t_min))

    @property
    def sigma_max(self):
        return float(t_to_sigma(self.t_max))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def velocity(self, x_t, t, **cond):
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, **cond):
        sigma = sigma.to(x.device) if torch.is_tensor(sigma) else torch.as_tensor(sigma, dtype=torch.float64,
                                                                                   device=x.device)
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(-1)
        s = sigma.double().reshape(-1, *([1] * (x.ndim - 1)))
        t = sigma_to_t(s)
        x_t = x.double() / (1 + s)
        if class_labels is not None:
            cond['class_labels'] = class_labels
        v = self.velocity(x_t.to(x.dtype), t.reshape(-1).to(torch.float32 if x.dtype != torch.float64 else x.dtype),
                          **cond)
        return (x_t - t * v.double()).to(x.dtype)

#----------------------------------------------------------------------------
# An exact rectified-flow model: a Gaussian mixture's data distribution, its velocity in closed form
# (v = (x_t - D_edm((1 + sigma) x_t; sigma)) / t with the mixture's exact VE denoiser). Ground truth for tests.


class FlowGaussianMixture(FlowDenoiser):
    """The exact velocity field of the rectified flow from a `models.analytic.GaussianMixture`'s data to N(0, I)."""

    def __init__(self, mixture, t_min=1e-3, t_max=1 - 1e-3):
        super().__init__()
        self.mixture = mixture
        self.shape = mixture.shape
        self.img_channels = mixture.img_channels
        self.img_resolution = mixture.img_resolution
        self.t_min, self.t_max = float(t_min), float(t_max)

    def velocity(self, x_t, t, **cond):
        t = t.double().reshape(-1, *([1] * (x_t.ndim - 1)))
        sigma = t / (1 - t)
        x0 = self.mixture(x_t.double() * (1 + sigma), sigma.reshape(-1)).double()
        return ((x_t.double() - x0) / t).to(x_t.dtype)

#----------------------------------------------------------------------------
# The embedded digits flow model: the digits denoiser's U-Net (models.edm.UNet) with a velocity output and no
# preconditioning (x_t already has unit-order scale at every t). The network's time input is 1000 t, as SD3's
# transformer takes it (docs/flow.md).


class DigitsFlow(FlowDenoiser):
    """Rectified-flow velocity model v(x_t, t) on images; saved and loaded as models.edm.save_model/load_local do."""

    time_scale = 1000.0

    def __init__(self, img_resolution, img_channels, label_dim=0, t_min=1e-3, t_max=1 - 1e-3, **model_kwargs):
        super().__init__()
        from .edm import UNet
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                t_min=t_min, t_max=t_max, **model_kwargs)
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.model = UNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                          label_dim=label_dim, **model_kwargs)
        self.bottleneck = f'model.enc.{len(self.model.enc) - 1}'  # AMED's features, as EDMPrecond's

    def velocity(self, x_t, t, class_labels=None, **cond):
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is not None:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim).expand(x_t.shape[0], -1)
        t = t.to(torch.float32).reshape(-1).expand(x_t.shape[0])
        return self.model(x_t.to(torch.float32), t * self.time_scale, class_labels=class_labels).to(x_t.dtype)

#----------------------------------------------------------------------------
# The same flow in its own state, sigma := t and x := x_t, as EPD++'s backend and ComfyUI (before its PR #8744) run
# samplers on flow models. Its ODE dx_t/dt = v = (x_t - D) / t has EDM's form, so every ODE solver is right on it,
# but a solver's noise (written for x = x_0 + sigma n) then grows the noise without shrinking the signal. Kept for
# the counter-test (tests/test_flow.py) and the churn measurement (bench/flow_churn.py); samplers use FlowDenoiser.


class FlowStateView(torch.nn.Module):
    """D(x_t; t) = x_t - t v(x_t, t) of a FlowDenoiser, with the flow time t passed as the noise level."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x_t, t, class_labels=None, **cond):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_t.shape[0])
        t_net = t.to(torch.float32 if x_t.dtype != torch.float64 else x_t.dtype)
        if class_labels is not None:
            cond['class_labels'] = class_labels
        return x_t - t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype) * self.flow.velocity(x_t, t_net, **cond)

#----------------------------------------------------------------------------

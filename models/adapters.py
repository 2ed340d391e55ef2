"""Denoisers D(x; sigma) for the openai-UNet families:

  CMDenoiser        Consistency Models' EDM-trained teacher (lsun_bedroom): EDM preconditioning, sigma_data 0.5,
                    network time 250 ln sigma.
  ADMGuidedDenoiser guided-diffusion (imagenet256): eps network seen through the continuous VP schedule
                    (beta_min 0.1, beta_d 19.9), network time 999 t(sigma), the learned-variance channels dropped,
                    classifier guidance as a score shift, output clamped to [-1, 1].
  LDMDenoiser       latent diffusion (lsun_bedroom_ldm): eps network on the discrete DDPM schedule in continuous
                    time (models.discrete), network time 1000 t(sigma) - 1; decode() through the VQ first stage.

All take x in the EDM "VE" scaling and return D in x's dtype; gradients flow to x and sigma (except through the
guidance term, a constant as in the official code). The networks run in float32, or on CUDA under autocast in
float16 (default, as the published models were run) or bfloat16 (amp_dtype).
"""

import json
import math

import torch

from . import checkpoint, openai_unet, vqf4
from .discrete import DiscreteVPSchedule, _float
from .zoo import ModelError

KINDS = ('cm', 'adm', 'ldm')


def _sigma_rows(x, sigma):
    sigma = _float(sigma).to(x.device)
    return sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(-1)


def _col(v, dtype):
    return v.to(dtype).reshape(-1, 1, 1, 1)


class _Adapter(torch.nn.Module):
    label_dim = 0
    bottleneck = 'unet.middle_block'  # where AMED reads its features (solvers/amed.py)

    def __init__(self, amp_dtype='float16'):
        super().__init__()
        if amp_dtype not in ('float16', 'bfloat16', None):
            raise ModelError(f'amp_dtype must be float16, bfloat16 or None, got {amp_dtype!r}')
        self.amp_dtype = amp_dtype

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def _amp(self, x):
        enabled = self.amp_dtype is not None and x.device.type == 'cuda'
        return torch.autocast('cuda', dtype=getattr(torch, self.amp_dtype or 'float16'), enabled=enabled)

#----------------------------------------------------------------------------


class CMDenoiser(_Adapter):
    sigma_data = 0.5

    def __init__(self, unet, amp_dtype='float16'):
        super().__init__(amp_dtype)
        self.unet = unet
        self.img_channels = unet.in_channels
        self.img_resolution = unet.image_size
        self.sigma_min, self.sigma_max = 0.002, 80.0

    def forward(self, x, sigma, class_labels=None):
        sigma = _sigma_rows(x, sigma)
        dtype = torch.promote_types(x.dtype, sigma.dtype)
        s = sigma.to(dtype)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (s ** 2 + sd2)
        c_out = s * self.sigma_data / (s ** 2 + sd2).sqrt()
        s64 = sigma.double()  # the network's inputs from float64 coefficients, whatever the state's dtype
        c_in = 1 / (s64 ** 2 + sd2).sqrt()
        t_net = 250 * torch.log(s64)
        with self._amp(x):
            F_x = self.unet((_col(c_in, torch.float64) * x).float(), t_net.float())
        return (_col(c_skip, dtype) * x + _col(c_out, dtype) * F_x.to(dtype)).to(x.dtype)

#----------------------------------------------------------------------------


class ADMGuidedDenoiser(_Adapter):
    guidance_type = 'cg'
    beta_min, beta_d, M, epsilon_t = 0.1, 19.9, 1000, 1e-3

    def __init__(self, unet, classifier=None, guidance_rate=1.0, clamp=True, amp_dtype='float16'):
        super().__init__(amp_dtype)
        if unet.num_classes is None:
            raise ModelError('the adm adapter needs a class-conditional UNet (class_cond=true)')
        self.unet, self.classifier = unet, classifier
        self.guidance_rate = float(guidance_rate)
        if self.guidance_rate != 0 and classifier is None:
            raise ModelError(f'classifier guidance at rate {self.guidance_rate:g} needs a classifier '
                             '(--classifier_path), or give --guidance_rate=0')
        self.clamp = bool(clamp)
        self.img_channels = unet.in_channels
        self.img_resolution = unet.image_size
        self.label_dim = unet.num_classes
        # As the official wrapper: sigma(epsilon_t) evaluated in float32 (0.0104838; float64 gives 0.0104860).
        self.sigma_min = float(self.sigma(torch.tensor(self.epsilon_t, dtype=torch.float32)))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    def sigma(self, t):
        t = _float(t)
        return torch.sqrt(torch.exp(0.5 * self.beta_d * t ** 2 + self.beta_min * t) - 1)

    def sigma_inv(self, sigma):
        sigma = _float(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)).sqrt() - self.beta_min) / self.beta_d

    def network_time(self, sigma):
        return (self.M - 1) * self.sigma_inv(sigma)

    def _labels(self, class_labels, x):
        if class_labels is None:
            raise ValueError(f'this model is class-conditional: give class_labels ({self.label_dim} classes)')
        y = torch.as_tensor(class_labels, device=x.device)
        if y.is_floating_point():
            y = y.reshape(-1, self.label_dim).argmax(1)  # one-hot rows, as the project's samplers draw them
        y = y.reshape(-1).long()
        y = y.expand(x.shape[0]) if y.numel() == 1 else y
        if y.numel() != x.shape[0] or bool(((y < 0) | (y >= self.label_dim)).any()):
            raise ValueError(f'class_labels must be {x.shape[0]} indices in [0, {self.label_dim}) or one-hot rows')
        return y

    def forward(self, x, sigma, class_labels=None):
        y = self._labels(class_labels, x)
        sigma = _sigma_rows(x, sigma)
        dtype = torch.promote_types(x.dtype, sigma.dtype)
        s = sigma.to(dtype)
        # The network's inputs from float64 coefficients, whatever the state's dtype (as LDMDenoiser): the time
        # computed in float32 lands a float32 step or two off, and the time embedding follows it.
        s64 = sigma.double()
        c_noise = self.network_time(s64).float()
        x_in = (_col(1 / (1 + s64 ** 2).sqrt(), torch.float64) * x).float()
        with self._amp(x):
            eps = self.unet(x_in, c_noise, y)[:, :self.img_channels].to(dtype)
        if self.guidance_rate != 0:
            g = self.cond_grad(x_in, c_noise, y).to(dtype)
            eps = eps - _col(s / (1 + s ** 2).sqrt(), dtype) * self.guidance_rate * g
        D = x - _col(s, dtype) * eps
        return (D.clamp(-1, 1) if self.clamp else D).to(x.dtype)

    def cond_grad(self, x_in, c_noise, y):
        """grad of log p(y | x_in, t) with respect to the VP-scaled input x_in; no graph is kept (a constant)."""
        with torch.enable_grad():
            x_in = x_in.detach().requires_grad_(True)
            with self._amp(x_in):
                logits = self.classifier(x_in, c_noise.detach())
            log_p = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(y), device=y.device), y]
            grad, = torch.autograd.grad(log_p.sum(), x_in)
        return grad.detach()

#----------------------------------------------------------------------------


class LDMDenoiser(DiscreteVPSchedule, _Adapter):
    guidance_type = 'uncond'

    def __init__(self, unet, first_stage, alphas_cumprod, scale_factor=1.0, amp_dtype='float16'):
        _Adapter.__init__(self, amp_dtype)
        self.unet, self.first_stage = unet, first_stage
        self.scale_factor = float(scale_factor)
        self.img_channels = unet.in_channels
        self.img_resolution = unet.image_size
        self.decoded_resolution = self.img_resolution * first_stage.downsampling
        self.guidance_rate = 1.0
        self._init_schedule(alphas_cumprod)

    def forward(self, x, sigma, class_labels=None):
        sigma = _sigma_rows(x, sigma)
        dtype = torch.promote_types(x.dtype, sigma.dtype)
        s = sigma.to(dtype)
        s64 = sigma.double()  # the network's inputs from float64 coefficients, as the other adapters
        with self._amp(x):
            eps = self.unet((_col(1 / (1 + s64 ** 2).sqrt(), torch.float64) * x).float(),
                            self.network_time(s64).float())
        return (x - _col(s, dtype) * eps.to(dtype)).to(x.dtype)

    def decode(self, latents):
        """Images (float32, about [-1, 1], not clamped) from final latents: quantised, then the VQ decoder.
        Differentiable (straight-through quantiser), for the feature loss of distillation."""
        z = latents.to(next(self.first_stage.parameters()).device, torch.float32) / self.scale_factor
        with self._amp(z):
            return self.first_stage.decode(z).float()

#----------------------------------------------------------------------------
# Architectures: the published one (zoo entry) updated by the user's keys, in the original code's names.

LDM_UNET_KEYS = ('image_size', 'in_channels', 'out_channels', 'model_channels', 'attention_resolutions',
                 'num_res_blocks', 'channel_mult', 'num_head_channels', 'num_heads', 'num_heads_upsample',
                 'use_scale_shift_norm', 'resblock_updown', 'dropout', 'conv_resample', 'use_fp16', 'use_checkpoint',
                 'legacy', 'use_new_attention_order', 'dims', 'use_spatial_transformer', 'num_classes')
LDM_KEYS = LDM_UNET_KEYS + ('embed_dim', 'n_embed', 'ddconfig', 'linear_start', 'linear_end', 'timesteps',
                            'scale_factor')


def parse_arch(arch, what='model_arch'):
    """A dict from a JSON string, a dict or None."""
    if arch is None or isinstance(arch, dict):
        return dict(arch or {})
    try:
        value = json.loads(arch)
    except ValueError as err:
        raise ModelError(f'{what} is not valid JSON ({err})') from None
    if not isinstance(value, dict):
        raise ModelError(f'{what} must be a JSON object of architecture settings, got {type(value).__name__}')
    return value


def merged(published, arch, valid, what):
    try:
        openai_unet.check_keys(arch, valid, what)
    except ValueError as err:
        raise ModelError(str(err)) from None
    return dict(published or {}, **arch)


def _guided(flags, layout=None):
    try:
        return openai_unet.guided_unet_kwargs(flags, qkv_layout=layout)
    except (ValueError, TypeError) as err:
        raise ModelError(f'model_arch: {err}') from None


def build_cm(arch):
    kwargs, _ = _guided(arch, layout='three')  # Consistency Models' flash attention: [q|k|v][head][d]
    return openai_unet.UNetModel(**kwargs)


def build_adm(arch):
    kwargs, _ = _guided(arch)
    return openai_unet.UNetModel(**kwargs)


def build_classifier(arch):
    try:
        return openai_unet.EncoderUNetModel(**openai_unet.classifier_kwargs(arch))
    except (ValueError, TypeError) as err:
        raise ModelError(f'classifier_arch: {err}') from None


def ldm_parts(arch):
    """(UNetModel, VQModel, alphas_cumprod float32, scale_factor) from the flat LDM arch dict."""
    a = dict(arch)
    unsupported = {k: a[k] for k, off in (('use_spatial_transformer', False), ('dims', 2), ('num_classes', None))
                   if a.get(k, off) != off}
    if unsupported:
        raise ModelError(f'model_arch: unconditional 2-d LDM UNets only; not supported: {unsupported}')
    if a.get('legacy', True) is False:
        raise ModelError('model_arch: legacy=false (head width from num_heads) is not supported')
    try:
        unet = openai_unet.UNetModel(
            image_size=int(a['image_size']), in_channels=int(a['in_channels']), out_channels=int(a['out_channels']),
            model_channels=int(a['model_channels']), num_res_blocks=int(a['num_res_blocks']),
            attention_ds={int(r) for r in a['attention_resolutions']}, dropout=float(a.get('dropout', 0.0)),
            channel_mult=tuple(a.get('channel_mult', (1, 2, 4, 8))), num_heads=int(a.get('num_heads', -1)),
            num_head_channels=int(a.get('num_head_channels', -1)),
            num_heads_upsample=int(a.get('num_heads_upsample', -1)),
            use_scale_shift_norm=bool(a.get('use_scale_shift_norm', False)),
            resblock_updown=bool(a.get('resblock_updown', False)), conv_resample=bool(a.get('conv_resample', True)),
            qkv_layout='three' if a.get('use_new_attention_order', False) else 'legacy')
        ddconfig = dict(a.get('ddconfig') or {})
        openai_unet.check_keys(ddconfig, vqf4.DDCONFIG_KEYS, 'ddconfig')
        first_stage = vqf4.VQModel(embed_dim=int(a['embed_dim']), n_embed=int(a['n_embed']), ddconfig=ddconfig)
    except KeyError as err:
        raise ModelError(f'model_arch: missing key {err.args[0]}') from None
    except (ValueError, TypeError) as err:
        raise ModelError(f'model_arch: {err}') from None
    timesteps = int(a.get('timesteps', 1000))
    betas = torch.linspace(math.sqrt(a.get('linear_start', 0.0015)), math.sqrt(a.get('linear_end', 0.0195)),
                           timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()  # stored as a float32 buffer by latent diffusion
    return unet, first_stage, alphas_cumprod, float(a.get('scale_factor', 1.0))

#----------------------------------------------------------------------------
# Loading.


def cm_attention_as_conv1d(sd, unet):
    """The Consistency Models code builds attention's qkv and proj_out as 1x1 Conv2d (weights [out, in, 1, 1]),
    guided-diffusion and this UNet as Conv1d ([out, in, 1]) on the flattened pixels: the same map, so a published
    weight of that shape is taken with its last axis dropped. Files in this UNet's own layout pass unchanged."""
    own = unet.state_dict()

    def fits(k, v):
        return (k.endswith(('.qkv.weight', '.proj_out.weight')) and k in own and own[k].ndim == 3 and v.ndim == 4
                and tuple(v.shape) == (*own[k].shape, 1))
    return {k: v[..., 0] if fits(k, v) else v for k, v in sd.items()}


def load_cm(path, arch=None, published=None, amp_dtype='float16'):
    flags = merged(published, parse_arch(arch), openai_unet.GUIDED_DEFAULTS, 'model_arch')
    unet = build_cm(flags)
    sd = checkpoint.state_dict_of(checkpoint.read(path, 'cm checkpoint'), path)
    checkpoint.load_strict(unet, cm_attention_as_conv1d(sd, unet), path, 'cm (consistency-models UNet)')
    return CMDenoiser(unet, amp_dtype=amp_dtype)


def load_adm(path, arch=None, classifier_path=None, classifier_arch=None, guidance_rate=1.0, published=None,
             published_classifier=None, clamp=True, amp_dtype='float16'):
    flags = merged(published, parse_arch(arch), openai_unet.GUIDED_DEFAULTS, 'model_arch')
    unet = build_adm(flags)
    checkpoint.load_strict(unet, checkpoint.state_dict_of(checkpoint.read(path, 'adm checkpoint'), path), path,
                           'adm (guided-diffusion UNet)')
    classifier = None
    if classifier_path is not None:
        cflags = merged(published_classifier, parse_arch(classifier_arch, 'classifier_arch'),
                        openai_unet.CLASSIFIER_DEFAULTS, 'classifier_arch')
        cflags.setdefault('num_classes', flags.get('num_classes', 1000))
        classifier = build_classifier(cflags)
        sd = checkpoint.state_dict_of(checkpoint.read(classifier_path, 'classifier checkpoint'), classifier_path)
        checkpoint.load_strict(classifier, sd, classifier_path, 'guided-diffusion classifier')
        if classifier.out[2].c_proj.out_channels != unet.num_classes:
            raise ModelError(f'{classifier_path}: the classifier has {classifier.out[2].c_proj.out_channels} '
                             f'classes, the UNet {unet.num_classes}')
    elif classifier_arch is not None:
        raise ModelError('classifier_arch given without classifier_path')
    return ADMGuidedDenoiser(unet, classifier, guidance_rate=guidance_rate, clamp=clamp, amp_dtype=amp_dtype)


def ema_key(name):
    """latent diffusion's EMA buffer name of UNet parameter `name` (LitEma drops the dots)."""
    return 'model_ema.' + ('diffusion_model.' + name).replace('.', '')


def load_ldm(path, arch=None, published=None, first_stage_path=None, use_ema=True, amp_dtype='float16'):
    """A latent-diffusion checkpoint (Lightning .ckpt, or the .zip holding it). The UNet takes the EMA weights
    (model_ema.*) when the file has them; the first stage comes from first_stage_model.*, else `first_stage_path`
    (a taming VQ checkpoint)."""
    a = merged(published, parse_arch(arch), LDM_KEYS, 'model_arch')
    unet, first_stage, alphas_cumprod, scale_factor = ldm_parts(a)
    sd = checkpoint.state_dict_of(checkpoint.read(path, 'ldm checkpoint'), path)
    prefix = 'model.diffusion_model.'
    if not any(k.startswith(prefix) for k in sd):
        raise ModelError(f'{path}: no latent-diffusion UNet (model.diffusion_model.*) in it; the file looks like '
                         f'{checkpoint.looks_like(sd)}')
    live = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if use_ema and any(k.startswith('model_ema.') for k in sd):
        missing = [k for k in live if ema_key(k) not in sd]
        if missing:
            raise ModelError(f'{path}: incomplete EMA weights ({len(missing)} UNet tensors without an EMA copy, '
                             f'e.g. {ema_key(missing[0])})')
        live = {k: sd[ema_key(k)] for k in live}
    checkpoint.load_strict(unet, live, path, 'ldm UNet')
    stage = {k[len('first_stage_model.'):]: v for k, v in sd.items() if k.startswith('first_stage_model.')}
    stage_path = path
    if not stage:
        first_stage_path = first_stage_path() if callable(first_stage_path) else first_stage_path
        if first_stage_path is None:
            raise ModelError(f'{path}: no first stage (first_stage_model.*) in it, and no VQ checkpoint given')
        stage_path = first_stage_path
        vq = checkpoint.state_dict_of(checkpoint.read(first_stage_path, 'VQ checkpoint'), first_stage_path)
        stage = {k: v for k, v in vq.items() if not k.startswith('loss.')}
    checkpoint.load_strict(first_stage, stage, stage_path, 'VQ first stage')
    if 'alphas_cumprod' in sd:
        if len(sd['alphas_cumprod']) != len(alphas_cumprod):
            raise ModelError(f'{path}: {len(sd["alphas_cumprod"])} diffusion steps, model_arch says '
                             f'{len(alphas_cumprod)}')
        alphas_cumprod = sd['alphas_cumprod']
    return LDMDenoiser(unet, first_stage, alphas_cumprod, scale_factor=scale_factor, amp_dtype=amp_dtype)


__all__ = ['CMDenoiser', 'ADMGuidedDenoiser', 'LDMDenoiser', 'load_cm', 'load_adm', 'load_ldm', 'KINDS', 'ema_key']

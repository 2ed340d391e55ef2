"""Stable Diffusion through diffusers: a discrete-time VP eps-model with classifier-free guidance,
adapted to the EDM "VE" denoiser D(x; sigma) (the official AdaSDE code's CFGPrecond, docs/references.md).

The continuous time of the discrete DDPM schedule is DPM-Solver's: log sqrt(alphas_cumprod[n]) sits at
t_n = (n + 1) / M and is interpolated linearly in t; the UNet sees the continuous index M t - 1.
"""

import csv
import os

import torch

from torch_utils.cli import one_line

from .discrete import DiscreteVPSchedule, _float, _interp  # noqa: F401 (the schedule helpers)

SD_DEFAULT = 'stable-diffusion-v1-5/stable-diffusion-v1-5'
SINGLE_FILE_SUFFIXES = ('.ckpt', '.safetensors')

#----------------------------------------------------------------------------
# The adapter. `condition` / `unconditional_condition` are CLIP text embeddings
# [B, 77, D] (or [1, 77, D], shared by the batch) from `encode_prompts`.


class SDDenoiser(DiscreteVPSchedule, torch.nn.Module):
    guidance_type = 'cfg'  # classifier-free, spelled as in the zoo (models/zoo.py)
    label_dim = 0  # no class labels: conditioning is text, passed as `condition=...`
    bottleneck = 'unet.mid_block'  # where AMED reads its features (solvers/amed.py)

    def __init__(self, unet, vae, text_encoder, tokenizer, alphas_cumprod, guidance_rate=7.5, epsilon_t=1e-3,
                 prediction_type='epsilon', prompts=None):
        super().__init__()
        if prediction_type not in ('epsilon', 'v_prediction'):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.prediction_type = prediction_type
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.guidance_rate = float(guidance_rate)
        self.img_channels = int(unet.config.in_channels)
        self.img_resolution = int(unet.config.sample_size)
        self.decoded_resolution = self.img_resolution * 2 ** (len(vae.config.block_out_channels) - 1)
        self.context_dim = int(text_encoder.config.hidden_size)
        self._init_schedule(alphas_cumprod, epsilon_t)
        self.prompts = prompts  # the captions distillation draws from (training_conditioning)
        self._empty_condition = None
        self.requires_grad_(False)
        self.eval()

    @property
    def bottleneck_cond_half(self):
        """With guidance the UNet runs on [unconditional; conditional] rows: AMED keeps the conditional half."""
        return self.guidance_rate != 1

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    @property
    def device(self):
        return next(self.unet.parameters()).device

    def forward(self, x, sigma, condition=None, unconditional_condition=None, class_labels=None):
        if class_labels is not None:
            raise ValueError('Stable Diffusion takes text conditioning (condition=...), not class_labels')
        if condition is None:
            raise ValueError('Stable Diffusion needs condition=encode_prompts(prompts)')
        batch = x.shape[0]
        sigma = _float(sigma).to(x.device).reshape(-1).expand(batch)
        c_noise = self.M * self.sigma_inv(sigma.double()) - 1  # continuous DDPM index in [0, M - 1]
        x_vp = x * input_scale(sigma, x)
        condition = self._batch(condition, batch)
        if self.guidance_rate != 1:
            if unconditional_condition is None:
                unconditional_condition = self.empty_condition()
            context = torch.cat([self._batch(unconditional_condition, batch), condition])
            out_u, out_c = self._unet(x_vp.repeat(2, 1, 1, 1), c_noise.repeat(2), context).to(x.dtype).chunk(2)
            out = out_u + self.guidance_rate * (out_c - out_u)
        else:
            out = self._unet(x_vp, c_noise, condition).to(x.dtype)
        return denoised_from_output(x, sigma, out, self.prediction_type)

    def _unet(self, x_vp, t, context):
        return self.unet(x_vp.to(self.dtype), t.float(), encoder_hidden_states=context.to(self.dtype),
                         return_dict=False)[0]

    @staticmethod
    def _batch(c, batch):
        if c.shape[0] == batch:
            return c
        if c.shape[0] == 1:
            return c.expand(batch, *c.shape[1:])
        raise ValueError(f'conditioning has batch size {c.shape[0]}, expected 1 or {batch}')

    #------------------------------------------------------------------------
    # Text in, images out.

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """CLIP text embeddings [B, 77, D] of a list of prompts (SD's last hidden state, padded to max length)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(list(prompts), padding='max_length', max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors='pt')
        return self.text_encoder(tokens.input_ids.to(self.device), return_dict=False)[0].to(self.dtype)

    def empty_condition(self):
        """The unconditional embedding: the empty prompt, encoded once."""
        cached = self._empty_condition
        if cached is None or cached.device != self.device or cached.dtype != self.dtype:
            self._empty_condition = self.encode_prompts([''])
        return self._empty_condition

    def prompt_args(self, prompts):
        """extra_args for the solvers: dict(condition=c, unconditional_condition=uc), uc only when guided."""
        args = dict(condition=self.encode_prompts(prompts))
        if self.guidance_rate != 1:
            args['unconditional_condition'] = self.empty_condition().expand_as(args['condition'])
        return args

    def training_conditioning(self, rnd, batch_size):
        """extra_args for AdaSDE distillation: a caption of self.prompts per sample, drawn from its own generator."""
        if not self.prompts:
            raise ValueError('Stable Diffusion distillation draws captions from net.prompts: set it to '
                             'models.sd.load_prompts(<csv>)')
        index = rnd.randint(len(self.prompts), size=[batch_size], device=self.device)
        return self.prompt_args([self.prompts[i] for i in index.tolist()])

    def decode(self, latents):
        """VAE decode of final latents (divided by the VAE's scaling factor), as float32 images in [-1, 1].
        Differentiable: AdaSDE's final-step feature loss backpropagates through the decoder."""
        z = latents.to(self.device, self.dtype) / self.vae.config.scaling_factor
        if getattr(self.vae.config, 'shift_factor', None) is not None:
            z = z + self.vae.config.shift_factor
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

#----------------------------------------------------------------------------
# The two scalings of one call, shared with the diffusers scheduler (integrations/): the UNet sees
# x_vp = c_in x with c_in = 1 / sqrt(1 + sigma^2) = alpha, and its output (eps or v) at x_vp gives D = x - sigma eps.


def input_scale(sigma, x):
    """c_in = 1 / sqrt(1 + sigma^2) per row of x, [B, 1, 1, 1] in x's dtype (computed in float64)."""
    sigma = _float(sigma).to(x.device).reshape(-1)
    return (1 / torch.sqrt(1 + sigma.double() ** 2)).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def denoised_from_output(x, sigma, out, prediction_type='epsilon'):
    """D(x; sigma) from the UNet's output `out` at x_vp = c_in x (classifier-free guidance already applied).
    v-prediction: v = alpha (eps - sigma x0) with alpha = c_in, hence eps = alpha (v + sigma x_vp)."""
    if prediction_type not in ('epsilon', 'v_prediction'):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    out = out.to(x.dtype)
    if prediction_type == 'v_prediction':
        c_in = input_scale(sigma, x)
        out = c_in * (out + _float(sigma).to(x.device, x.dtype).reshape(c_in.shape) * (x * c_in))
    return x - _float(sigma).to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1))) * out

#----------------------------------------------------------------------------
# NFE honesty. A solver's NFE counts network calls; with guidance each call
# runs the UNet on a doubled batch, so "model evaluations" are twice that.


def cfg_nfe_factor(net):
    """Model evaluations per network call: 2 for a denoiser with classifier-free guidance ('cfg') at a rate
    other than 1, else 1."""
    guided = getattr(net, 'guidance_type', None) == 'cfg' and getattr(net, 'guidance_rate', 1) != 1
    return 2 if guided else 1

#----------------------------------------------------------------------------
# Loading: a diffusers directory or hub id (from_pretrained), or a single
# original checkpoint (.ckpt / .safetensors, from_single_file).


def load_sd(path_or_id=SD_DEFAULT, device='cpu', guidance_rate=7.5, dtype=None, epsilon_t=1e-3,
            guidance_type='cfg', prompts=None, **kwargs):
    """Load Stable Diffusion as an SDDenoiser. dtype (torch dtype or name) defaults to float16 on CUDA and float32
    elsewhere; extra kwargs go to diffusers (e.g. local_files_only=True, config=<dir> for single files)."""
    from diffusers import StableDiffusionPipeline

    if guidance_type != 'cfg':
        raise ValueError(f"Stable Diffusion uses classifier-free guidance (guidance_type 'cfg'), not {guidance_type!r}")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == 'cuda' else torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    path = os.fspath(path_or_id)
    looks_local = os.path.isabs(path) or path.startswith('.') or path.endswith(SINGLE_FILE_SUFFIXES)
    if looks_local and not os.path.exists(path):
        raise ValueError(f'no Stable Diffusion model at {path}')
    try:
        if os.path.isfile(path):
            if not path.endswith(SINGLE_FILE_SUFFIXES):
                raise ValueError(f'{path}: expected a diffusers directory, a hub id, or a .ckpt/.safetensors file')
            pipe = StableDiffusionPipeline.from_single_file(path, **kwargs)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None,
                                                           requires_safety_checker=False, **kwargs)
    except (OSError, KeyError, TypeError) as e:
        raise ValueError(f'cannot load Stable Diffusion from {path}: {one_line(e)}') from e
    # Cast after loading, as plain torch modules: diffusers renamed its dtype argument across versions, and its own
    # .to() warns on every cast (SD v1/v2 have no modules that must stay in float32).
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        torch.nn.Module.to(module, device=device, dtype=dtype)
    net = SDDenoiser(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.alphas_cumprod,
                     guidance_rate=guidance_rate, epsilon_t=epsilon_t,
                     prediction_type=pipe.scheduler.config.get('prediction_type', 'epsilon'), prompts=prompts)
    return net


def is_sd_path(path):
    """Whether a local path holds a diffusers Stable Diffusion pipeline or a single SD checkpoint file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, 'model_index.json')) and os.path.isdir(os.path.join(path, 'unet'))
    return os.path.isfile(path) and path.endswith(SINGLE_FILE_SUFFIXES)

#----------------------------------------------------------------------------
# MS-COCO prompts (the official AdaSDE download table's `prompts` entry): the 30k val2014 captions,
# column `text`; the caption of seed s is prompts[s].


def load_prompts(path):
    """The captions of a CSV file with a `text` column, in file order."""
    if not os.path.isfile(path):
        raise ValueError(f'prompt file not found: {path}')
    with open(path, newline='', encoding='utf-8') as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or 'text' not in reader.fieldnames:
            raise ValueError(f'{path}: expected a CSV with a "text" column, got columns {reader.fieldnames}')
        prompts = [row['text'] for row in reader]
    if not prompts:
        raise ValueError(f'{path}: no prompts')
    return prompts


def prompts_for_seeds(prompts, seeds):
    """The prompt of each seed (caption index = seed), so a sample depends on its seed only."""
    seeds = [int(s) for s in seeds]
    bad = [s for s in seeds if not 0 <= s < len(prompts)]
    if bad:
        raise ValueError(f'seed {bad[0]} has no prompt: {len(prompts)} prompts cover seeds 0-{len(prompts) - 1}')
    return [prompts[s] for s in seeds]

__all__ = ['SDDenoiser', 'load_sd', 'input_scale', 'denoised_from_output', 'is_sd_path', 'cfg_nfe_factor',
           'load_prompts', 'prompts_for_seeds', 'SD_DEFAULT']

#----------------------------------------------------------------------------

"""Stable Diffusion (1.x/2.x and XL) through diffusers: a discrete-time VP eps-model with classifier-free guidance,
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
SDXL_DEFAULT = 'stabilityai/stable-diffusion-xl-base-1.0'
SINGLE_FILE_SUFFIXES = ('.ckpt', '.safetensors')

#----------------------------------------------------------------------------
# The adapter. One denoiser for the UNet families of Stable Diffusion; a family
# says what conditioning its UNet takes (`text_keys`, `shared_keys`), how a
# prompt becomes that conditioning (`text_conditioning`), what the unconditional
# half of a guided call sees (`unconditional`) and how the UNet is called
# (`_unet`). SD 1.x/2.x: `condition` / `unconditional_condition` are CLIP text
# embeddings [B, 77, D] (or [1, 77, D], shared by the batch).


class SDDenoiser(DiscreteVPSchedule, torch.nn.Module):
    guidance_type = 'cfg'  # classifier-free, spelled as in the zoo (models/zoo.py)
    label_dim = 0  # no class labels: conditioning is text, passed as `condition=...`
    bottleneck = 'unet.mid_block'  # where AMED reads its features (solvers/amed.py)
    family = 'Stable Diffusion'
    text_keys = ('condition',)  # from the prompt; each has an unconditional twin 'unconditional_<key>' (CFG)
    shared_keys = ()  # given alike to both halves of a guided call

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
        self.context_dim = int(unet.config.cross_attention_dim)
        self._init_schedule(alphas_cumprod, epsilon_t)
        self.prompts = prompts  # the captions distillation draws from (training_conditioning)
        self._unconditional = None
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

    def forward(self, x, sigma, class_labels=None, **conditioning):
        if class_labels is not None:
            raise ValueError(f'{self.family} takes text conditioning (condition=...), not class_labels')
        batch = x.shape[0]
        cond = self._conditioning(conditioning, batch)
        sigma = _float(sigma).to(x.device).reshape(-1).expand(batch)
        c_noise = self.M * self.sigma_inv(sigma.double()) - 1  # continuous DDPM index in [0, M - 1]
        x_vp = x * input_scale(sigma, x)
        if self.guidance_rate != 1:
            both = {k: torch.cat([cond[f'unconditional_{k}'], cond[k]]) for k in self.text_keys}
            both.update({k: torch.cat([cond[k], cond[k]]) for k in self.shared_keys})
            out_u, out_c = self._unet(x_vp.repeat(2, 1, 1, 1), c_noise.repeat(2), **both).to(x.dtype).chunk(2)
            out = out_u + self.guidance_rate * (out_c - out_u)
        else:
            out = self._unet(x_vp, c_noise, **{k: cond[k] for k in self.text_keys + self.shared_keys}).to(x.dtype)
        return denoised_from_output(x, sigma, out, self.prediction_type)

    def _conditioning(self, given, batch):
        """The conditioning of one call, each tensor with `batch` rows: the given extra_args, checked, completed by
        the family's defaults (the unconditional twins when guided, the shared keys)."""
        uncond_keys = tuple(f'unconditional_{k}' for k in self.text_keys)
        unknown = sorted(set(given) - set(self.text_keys + uncond_keys + self.shared_keys))
        if unknown:
            raise ValueError(f'{self.family} takes no conditioning {", ".join(unknown)} (it takes '
                             f'{", ".join(self.text_keys + uncond_keys + self.shared_keys)})')
        missing = [k for k in self.text_keys if given.get(k) is None]
        if missing:
            raise ValueError(f'{self.family} needs {missing[0]}=...: pass net.prompt_args(prompts) as extra_args')
        cond = {k: v for k, v in given.items() if v is not None}
        for k, v in self.shared_defaults().items():
            cond.setdefault(k, v)
        if self.guidance_rate != 1 and not set(uncond_keys) <= set(cond):
            for k, v in self.unconditional().items():
                cond.setdefault(f'unconditional_{k}', v)
        return {k: self._batch(v, batch) for k, v in cond.items()}

    def _unet(self, x_vp, t, condition):
        return self.unet(x_vp.to(self.dtype), t.float(), encoder_hidden_states=condition.to(self.dtype),
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

    def _token_ids(self, tokenizer, prompts):
        """A list of prompts as CLIP token ids [B, 77], padded to the tokenizer's maximum length (as diffusers)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = tokenizer(list(prompts), padding='max_length', max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors='pt')
        return tokens.input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """CLIP text embeddings [B, 77, D] of a list of prompts (SD's last hidden state, padded to max length)."""
        return self.text_encoder(self._token_ids(self.tokenizer, prompts), return_dict=False)[0].to(self.dtype)

    def text_conditioning(self, prompts):
        """The `text_keys` of a list of prompts: dict(condition=CLIP embeddings)."""
        return dict(condition=self.encode_prompts(prompts))

    def shared_defaults(self):
        """The `shared_keys` a call gets when they are not given (none for SD 1.x/2.x)."""
        return {}

    def unconditional(self):
        """The unconditional twins of the `text_keys` ([1, ...] each), computed once per device and dtype: the
        empty prompt's embeddings."""
        cached = self._unconditional
        if cached is None or any(v.device != self.device or v.dtype != self.dtype for v in cached.values()):
            self._unconditional = self._compute_unconditional()
        return self._unconditional

    def _compute_unconditional(self):
        return self.text_conditioning([''])

    def prompt_args(self, prompts):
        """extra_args for the solvers: the `text_keys` of the prompts, their unconditional twins when guided, and
        the `shared_keys` (SD 1.x/2.x: dict(condition=c, unconditional_condition=uc))."""
        args = self.text_conditioning(prompts)
        batch = args[self.text_keys[0]].shape[0]
        if self.guidance_rate != 1:
            args.update({f'unconditional_{k}': v.expand_as(args[k]) for k, v in self.unconditional().items()})
        args.update({k: self._batch(v, batch) for k, v in self.shared_defaults().items()})
        return args

    def training_conditioning(self, rnd, batch_size):
        """extra_args for AdaSDE distillation: a caption of self.prompts per sample, drawn from its own generator."""
        if not self.prompts:
            raise ValueError(f'{self.family} distillation draws captions from net.prompts: set it to '
                             'models.sd.load_prompts(<csv>)')
        index = rnd.randint(len(self.prompts), size=[batch_size], device=self.device)
        return self.prompt_args([self.prompts[i] for i in index.tolist()])

    def decode(self, latents):
        """VAE decode of final latents (divided by the VAE's scaling factor), as float32 images in [-1, 1], in the
        VAE's own dtype (float32 for SDXL). Differentiable: AdaSDE's final-step feature loss backpropagates
        through the decoder."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents.to(self.device, vae_dtype) / self.vae.config.scaling_factor
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
# SDXL: two text encoders (CLIP ViT-L, then OpenCLIP ViT-bigG with projection).
# `condition` is the concatenation of both penultimate hidden states [B, 77,
# 768 + 1280], `pooled` the second encoder's projected pooled embedding [B,
# 1280], `time_ids` the size and crop conditioning [B, 6]: original_size (h, w),
# crops_coords_top_left (top, left), target_size (h, w), given alike to both
# halves of a guided call (as diffusers does without negative sizes). With the
# pipeline's force_zeros_for_empty_prompt (SDXL base: true) the unconditional
# half sees zero embeddings, not the encoded empty prompt.


class SDXLDenoiser(SDDenoiser):
    family = 'SDXL'
    text_keys = ('condition', 'pooled')
    shared_keys = ('time_ids',)

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, alphas_cumprod,
                 guidance_rate=5.0, force_zeros_for_empty_prompt=True, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, **kwargs):
        if getattr(unet.config, 'addition_embed_type', None) != 'text_time':
            raise ValueError("not an SDXL UNet: its addition_embed_type is "
                             f"{getattr(unet.config, 'addition_embed_type', None)!r}, SDXL's is 'text_time'")
        super().__init__(unet, vae, text_encoder, tokenizer, alphas_cumprod, guidance_rate=guidance_rate, **kwargs)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        size = (self.decoded_resolution, self.decoded_resolution)
        self.original_size = tuple(original_size or size)
        self.crops_coords_top_left = tuple(crops_coords_top_left)
        self.target_size = tuple(target_size or size)
        expected = int(unet.add_embedding.linear_1.in_features)
        got = int(unet.config.addition_time_embed_dim) * 6 + int(text_encoder_2.config.projection_dim)
        if got != expected:
            raise ValueError(f'the SDXL UNet expects {expected} added conditioning features, the text encoder and '
                             f'six size/crop values give {got}')
        self.requires_grad_(False)
        self.eval()

    def _unet(self, x_vp, t, condition, pooled, time_ids):
        added = dict(text_embeds=pooled.to(self.dtype), time_ids=time_ids.to(self.dtype))
        return self.unet(x_vp.to(self.dtype), t.float(), encoder_hidden_states=condition.to(self.dtype),
                         added_cond_kwargs=added, return_dict=False)[0]

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """(condition, pooled) of a list of prompts: both encoders' penultimate hidden states concatenated
        [B, 77, D1 + D2], and the second encoder's projected pooled embedding [B, P] (diffusers' encode_prompt,
        no clip skip)."""
        states = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self._token_ids(tokenizer, prompts), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1).to(self.dtype), out.text_embeds.to(self.dtype)

    def text_conditioning(self, prompts):
        condition, pooled = self.encode_prompts(prompts)
        return dict(condition=condition, pooled=pooled)

    def shared_defaults(self):
        """time_ids [1, 6]: original_size + crops_coords_top_left + target_size (settable attributes; diffusers'
        defaults: the image size and no crop)."""
        values = [*self.original_size, *self.crops_coords_top_left, *self.target_size]
        return dict(time_ids=torch.tensor([values], dtype=self.dtype, device=self.device))

    def _compute_unconditional(self):
        empty = self.text_conditioning([''])
        return {k: torch.zeros_like(v) for k, v in empty.items()} if self.force_zeros_for_empty_prompt else empty

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


def _check_guidance(family, guidance_type):
    if guidance_type != 'cfg':
        raise ValueError(f"{family} uses classifier-free guidance (guidance_type 'cfg'), not {guidance_type!r}")


def _device_dtype(device, dtype):
    """The torch device, and the dtype (a torch dtype or its name): float16 on CUDA and float32 elsewhere unless
    given."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == 'cuda' else torch.float32
    return device, getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _load_pipeline(pipeline_class, family, path_or_id, **kwargs):
    """A diffusers pipeline of `pipeline_class` from a folder or hub id (from_pretrained) or one original checkpoint
    (from_single_file); ValueError with one line if it cannot be read."""
    path = os.fspath(path_or_id)
    looks_local = os.path.isabs(path) or path.startswith('.') or path.endswith(SINGLE_FILE_SUFFIXES)
    if looks_local and not os.path.exists(path):
        raise ValueError(f'no {family} model at {path}')
    try:
        if os.path.isfile(path):
            if not path.endswith(SINGLE_FILE_SUFFIXES):
                raise ValueError(f'{path}: expected a diffusers directory, a hub id, or a .ckpt/.safetensors file')
            return pipeline_class.from_single_file(path, **kwargs)
        return pipeline_class.from_pretrained(path, **kwargs)
    except (OSError, KeyError, TypeError) as e:
        raise ValueError(f'cannot load {family} from {path}: {one_line(e)}') from e


def _cast(modules, device, dtype):
    # As plain torch modules: diffusers renamed its dtype argument across versions, and its own .to() warns on
    # every cast.
    for module in modules:
        torch.nn.Module.to(module, device=device, dtype=dtype)


def load_sd(path_or_id=SD_DEFAULT, device='cpu', guidance_rate=7.5, dtype=None, epsilon_t=1e-3,
            guidance_type='cfg', prompts=None, **kwargs):
    """Load Stable Diffusion 1.x/2.x as an SDDenoiser. dtype (torch dtype or name) defaults to float16 on CUDA and
    float32 elsewhere; extra kwargs go to diffusers (e.g. local_files_only=True, config=<dir> for single files)."""
    from diffusers import StableDiffusionPipeline

    _check_guidance('Stable Diffusion', guidance_type)
    device, dtype = _device_dtype(device, dtype)
    if not os.path.isfile(os.fspath(path_or_id)):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = _load_pipeline(StableDiffusionPipeline, 'Stable Diffusion', path_or_id, **kwargs)
    _cast((pipe.unet, pipe.vae, pipe.text_encoder), device, dtype)  # SD v1/v2 have no module that must stay float32
    return SDDenoiser(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.alphas_cumprod,
                      guidance_rate=guidance_rate, epsilon_t=epsilon_t,
                      prediction_type=pipe.scheduler.config.get('prediction_type', 'epsilon'), prompts=prompts)


def load_sdxl(path_or_id=SDXL_DEFAULT, device='cpu', guidance_rate=5.0, dtype=None, epsilon_t=1e-3,
              guidance_type='cfg', prompts=None, **kwargs):
    """Load Stable Diffusion XL as an SDXLDenoiser, as load_sd. The UNet and both text encoders take `dtype`; the
    VAE stays float32 whatever it is (SDXL's VAE overflows in float16: diffusers upcasts it, force_upcast)."""
    from diffusers import StableDiffusionXLPipeline

    _check_guidance('SDXL', guidance_type)
    device, dtype = _device_dtype(device, dtype)
    pipe = _load_pipeline(StableDiffusionXLPipeline, 'SDXL', path_or_id, add_watermarker=False, **kwargs)
    if pipe.text_encoder is None or pipe.text_encoder_2 is None:
        raise ValueError(f'{os.fspath(path_or_id)}: an SDXL pipeline without both text encoders (the refiner?) is '
                         'not supported')
    _cast((pipe.unet, pipe.text_encoder, pipe.text_encoder_2), device, dtype)
    _cast((pipe.vae,), device, torch.float32)
    return SDXLDenoiser(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer,
                        pipe.tokenizer_2, pipe.scheduler.alphas_cumprod, guidance_rate=guidance_rate,
                        epsilon_t=epsilon_t, prediction_type=pipe.scheduler.config.get('prediction_type', 'epsilon'),
                        force_zeros_for_empty_prompt=pipe.config.get('force_zeros_for_empty_prompt', True),
                        prompts=prompts)


def pipeline_class(folder):
    """The `_class_name` of a local diffusers folder's model_index.json (e.g. 'StableDiffusionXLPipeline'), or None
    if there is none or it cannot be read."""
    import json
    index = os.path.join(os.fspath(folder), 'model_index.json')
    if not os.path.isfile(index):
        return None
    try:
        with open(index, encoding='utf-8') as f:
            return str(json.load(f).get('_class_name', ''))
    except (OSError, ValueError, AttributeError):
        return None


def pipeline_family(path):
    """'sdxl' or 'sd' for a local diffusers folder (by model_index.json's `_class_name`: StableDiffusionXL* is
    SDXL) or a single checkpoint file (SDXL by its second text encoder's keys, safetensors only; a .ckpt is
    taken as SD 1.x/2.x); None if the path holds neither."""
    path = os.fspath(path)
    if os.path.isdir(path):
        name = pipeline_class(path) if os.path.isdir(os.path.join(path, 'unet')) else None
        if name is None:
            return None
        return 'sdxl' if name.startswith('StableDiffusionXL') else 'sd'
    if not (os.path.isfile(path) and path.endswith(SINGLE_FILE_SUFFIXES)):
        return None
    from . import sniff_model_file
    return 'sdxl' if sniff_model_file(path) == 'sdxl-safetensors' else 'sd'


def is_sd_path(path):
    """Whether a local path holds a diffusers Stable Diffusion (1.x/2.x or XL) pipeline or a single checkpoint."""
    return pipeline_family(path) is not None

#----------------------------------------------------------------------------
# MS-COCO prompts (the official AdaSDE download table's `prompts` entry): the 30k val2014 captions,
# column `text`; the caption of seed s is prompts[s].


def check_prompt_file(path):
    """ValueError unless `path` names a file (what load_prompts checks before it reads; train.py checks it before
    making its run folder)."""
    if os.path.isdir(path):
        raise ValueError(f'prompt file {path} is a folder')
    if not os.path.isfile(path):
        raise ValueError(f'prompt file not found: {path}')


def load_prompts(path):
    """The captions of a CSV file with a `text` column, in file order."""
    check_prompt_file(path)
    try:
        with open(path, newline='', encoding='utf-8') as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or 'text' not in reader.fieldnames:
                raise ValueError(f'{path}: expected a CSV with a "text" column, got columns {reader.fieldnames}')
            prompts = [row['text'] for row in reader]
    except UnicodeDecodeError as e:
        raise ValueError(f'{path}: not a UTF-8 text file ({e.reason} at byte {e.start})') from None
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

__all__ = ['SDDenoiser', 'SDXLDenoiser', 'load_sd', 'load_sdxl', 'pipeline_family', 'is_sd_path', 'cfg_nfe_factor',
           'input_scale', 'denoised_from_output', 'load_prompts', 'prompts_for_seeds', 'SD_DEFAULT', 'SDXL_DEFAULT']

#----------------------------------------------------------------------------

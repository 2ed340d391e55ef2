"""SD3 and FLUX through diffusers: rectified-flow transformers adapted at load time to the project's denoiser
(models/flow.py's FlowDenoiser: sigma = t / (1 - t), x_t = x / (1 + sigma), D = x_t - t v), with their text
encoders, guidance and VAE, so that every solver and learned predictor samples them as it samples SD v1.5.

What each transformer takes (diffusers 0.42):
  * SD3Transformer2DModel: the latents [B, C, H, W], `timestep` = 1000 t (the pipeline feeds the scheduler's
    timesteps, 1000 sigma_flow), the joint text sequence (two CLIP penultimate hidden states side by side, padded to
    T5's width, then T5's sequence) and the two CLIP projections side by side as `pooled_projections`; guidance is
    classifier-free (one call on the doubled batch [uncond; cond]).
  * FluxTransformer2DModel: the latents packed into 2x2 patches [B, H W / 4, 4 C] with their grid positions
    `img_ids`, `timestep` = t itself (it multiplies by 1000 inside), `guidance` = the guidance scale (embedded:
    FLUX.1-dev is guidance-distilled, one call per step), the CLIP pooled output and the T5 sequence.

The time shift. Both schedulers shift the flow time, t -> s t / (1 + (s - 1) t), which in sigma is sigma -> s
sigma. SD3 has a fixed s (its scheduler's `shift`, 3); FLUX's depends on the image's token count n: s = exp(mu)
with mu linear in n between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), diffusers'
calculate_shift. The shift lives in the denoiser's range and time: sigma_min, sigma_max are s times the unshifted
ones, and `sigma(u)` / `sigma_inv(sigma)` take the unshifted time u, so that the `discrete` schedule with rho 1
(uniform in the model's own time) is the pipelines' own schedule, shifted. The network itself sees the shifted t.

The start. diffusers starts at t = 1 (pure noise; sigma = infinity). The solvers start at the finite sigma_max
(t_max = 1 - 1e-3 before the shift) from x = sigma_max n, which is x_t = t_max n: pure noise scaled by t_max, the
data term (1 - t_max) x0 dropped, as every EDM-style sampler drops it. A pipeline run from its `latents=t_0 n` on
the same times gives the same states (tests/test_flow_pipes.py).
"""

import math
import os

import torch

from torch_utils.cli import one_line

from .flow import FlowDenoiser, sigma_to_t, t_to_sigma
from .sd import SDDenoiser, pipeline_class

SD3_DEFAULT = 'stabilityai/stable-diffusion-3-medium-diffusers'
FLUX_DEFAULT = 'black-forest-labs/FLUX.1-dev'
FAMILIES = {'StableDiffusion3Pipeline': 'sd3', 'FluxPipeline': 'flux'}  # model_index.json's _class_name -> family

#----------------------------------------------------------------------------
# The time shift of a FlowMatchEulerDiscreteScheduler configuration.


def time_shift(config, seq_len):
    """The factor s of the scheduler's shift (sigma -> s sigma) for images of `seq_len` tokens."""
    if not config.get('use_dynamic_shifting', False):
        return float(config.get('shift', 1.0))
    base_len, max_len = config['base_image_seq_len'], config['max_image_seq_len']
    base, top = config['base_shift'], config['max_shift']
    mu = base + (top - base) * (seq_len - base_len) / (max_len - base_len)
    return math.exp(mu) if config.get('time_shift_type', 'exponential') == 'exponential' else mu

#----------------------------------------------------------------------------
# AMED's features of a transformer (solvers/amed.py reads a [B, C, H, W] map): the image tokens a block puts out,
# laid back on their square grid by a module of the denoiser that a forward hook on that block calls.


class TokenGrid(torch.nn.Module):
    """Image tokens [B, h * w, D] as a map [B, D, h, w] (h = w)."""

    def forward(self, tokens):
        side = math.isqrt(tokens.shape[1])
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)

#----------------------------------------------------------------------------
# What SD3 and FLUX share: the VAE, the shifted range, prompts, AMED's features.


class FlowPipeDenoiser(FlowDenoiser):
    bottleneck = 'bottleneck_map'  # the TokenGrid of the image tokens of the middle block (of blocks())

    # The decoder and the captions of distillation are SD's (models/sd.py).
    decode = SDDenoiser.decode
    training_conditioning = SDDenoiser.training_conditioning
    _batch = staticmethod(SDDenoiser._batch)

    def __init__(self, transformer, vae, text_encoders, tokenizers, scheduler_config, patch, resolution=None,
                 guidance_rate=1.0, prompts=None, max_sequence_length=256):
        super().__init__()
        self.transformer = transformer
        self.vae = vae
        for i, (encoder, tokenizer) in enumerate(zip(text_encoders, tokenizers)):  # the pipeline's names
            setattr(self, 'text_encoder' + (f'_{i + 1}' if i else ''), encoder)
            setattr(self, 'tokenizer' + (f'_{i + 1}' if i else ''), tokenizer)
        self.patch = int(patch)  # latent pixels per token side
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        latent = self.default_latent_resolution() if resolution is None else int(resolution) // self.vae_scale
        if latent < self.patch or latent % self.patch or (resolution is not None and int(resolution) % self.vae_scale):
            raise ValueError(f'resolution {resolution}: the image side must be a multiple of '
                             f'{self.vae_scale * self.patch} (VAE factor {self.vae_scale} times patch {self.patch})')
        self.img_channels = int(vae.config.latent_channels)
        self.img_resolution = latent
        self.decoded_resolution = latent * self.vae_scale
        self.shift = time_shift(scheduler_config, (latent // self.patch) ** 2)
        self.guidance_rate = float(guidance_rate)
        self.max_sequence_length = int(max_sequence_length)
        self.prompts = prompts
        self._empty_condition = None
        self.bottleneck_map = TokenGrid()
        blocks = self.blocks()
        blocks[len(blocks) // 2].register_forward_hook(self._read_tokens)
        self.requires_grad_(False)
        self.eval()

    def _read_tokens(self, block, args, out):
        self.bottleneck_map(out[1])  # blocks return (text tokens, image tokens)

    # The range and the model's own (unshifted) time u: sigma = shift * u / (1 - u).
    @property
    def sigma_min(self):
        return self.shift * float(t_to_sigma(self.t_min))

    @property
    def sigma_max(self):
        return self.shift * float(t_to_sigma(self.t_max))

    def sigma(self, u):
        return self.shift * t_to_sigma(torch.as_tensor(u, dtype=torch.float64))

    def sigma_inv(self, sigma):
        return sigma_to_t(torch.as_tensor(sigma, dtype=torch.float64) / self.shift)

    @property
    def dtype(self):
        return next(self.transformer.parameters()).dtype

    @property
    def device(self):
        return next(self.transformer.parameters()).device

    def _check(self, class_labels, condition, pooled):
        if class_labels is not None:
            raise ValueError(f'{self.name} takes text conditioning (condition=...), not class_labels')
        if condition is None or pooled is None:
            raise ValueError(f'{self.name} needs the text conditioning of net.prompt_args(prompts)')

    # Text: each prompt is encoded on its own, so that a sample's conditioning does not depend on the batch around
    # it (sample.py's batch invariance).
    @torch.no_grad()
    def encode_prompts(self, prompts):
        """(sequence [B, L, D], pooled [B, P]) of a list of prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        encoded = [self.encode_prompt(p) for p in prompts]
        return torch.cat([s for s, _ in encoded]).to(self.dtype), torch.cat([p for _, p in encoded]).to(self.dtype)

    def _tokens(self, tokenizer, prompt, max_length):
        return tokenizer([prompt], padding='max_length', max_length=max_length, truncation=True,
                         return_tensors='pt').input_ids.to(self.device)

    def empty_condition(self):
        """The unconditional conditioning: the empty prompt, encoded once."""
        cached = self._empty_condition
        if cached is None or cached[0].device != self.device or cached[0].dtype != self.dtype:
            self._empty_condition = self.encode_prompts([''])
        return self._empty_condition

    def prompt_args(self, prompts):
        """extra_args for the solvers: condition and pooled, with their unconditional pair when guided by CFG."""
        condition, pooled = self.encode_prompts(prompts)
        args = dict(condition=condition, pooled=pooled)
        if self.guidance_type == 'cfg' and self.guidance_rate != 1:
            uc, upooled = self.empty_condition()
            args.update(unconditional_condition=uc.expand_as(condition), unconditional_pooled=upooled.expand_as(pooled))
        return args

#----------------------------------------------------------------------------
# SD3: three text encoders, classifier-free guidance, timestep 1000 t.


class SD3Denoiser(FlowPipeDenoiser):
    name = 'Stable Diffusion 3'
    guidance_type = 'cfg'

    def __init__(self, transformer, vae, text_encoders, tokenizers, scheduler_config, **kwargs):
        super().__init__(transformer, vae, text_encoders, tokenizers, scheduler_config, transformer.config.patch_size,
                         **kwargs)

    def blocks(self):
        return self.transformer.transformer_blocks

    def default_latent_resolution(self):
        return int(self.transformer.config.sample_size)

    @property
    def bottleneck_cond_half(self):
        return self.guidance_rate != 1

    def encode_prompt(self, prompt):
        """SD3's encoding (the pipeline's encode_prompt): the penultimate hidden states of both CLIPs side by side,
        zero-padded to T5's width, followed by T5's sequence (zeros without T5); the two CLIP projections."""
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self._tokens(tokenizer, prompt, self.tokenizer.model_max_length), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        if self.text_encoder_3 is None:
            t5 = hidden[0].new_zeros([1, self.max_sequence_length, self.transformer.config.joint_attention_dim])
        else:
            t5 = self.text_encoder_3(self._tokens(self.tokenizer_3, prompt, self.max_sequence_length))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def velocity(self, x_t, t, condition=None, pooled=None, unconditional_condition=None, unconditional_pooled=None,
                 class_labels=None):
        self._check(class_labels, condition, pooled)
        batch = x_t.shape[0]
        timestep = t.float() * 1000
        condition, pooled = self._batch(condition, batch), self._batch(pooled, batch)
        if self.guidance_rate != 1:
            if unconditional_condition is None:
                unconditional_condition, unconditional_pooled = self.empty_condition()
            context = torch.cat([self._batch(unconditional_condition, batch), condition])
            pooled = torch.cat([self._batch(unconditional_pooled, batch), pooled])
            v_u, v_c = self._transformer(x_t.repeat(2, 1, 1, 1), timestep.repeat(2), context, pooled).chunk(2)
            v = v_u + self.guidance_rate * (v_c - v_u)
        else:
            v = self._transformer(x_t, timestep, condition, pooled)
        return v.to(x_t.dtype)

    def _transformer(self, x, timestep, context, pooled):
        return self.transformer(hidden_states=x.to(self.dtype), timestep=timestep, encoder_hidden_states=context.to(
            self.dtype), pooled_projections=pooled.to(self.dtype), return_dict=False)[0]

#----------------------------------------------------------------------------
# FLUX: CLIP pooled + T5, the guidance embedding, packed latents, timestep t.


class FluxDenoiser(FlowPipeDenoiser):
    name = 'FLUX'
    guidance_type = 'distilled'  # the scale is an input of the network: one call per step, no doubled batch
    bottleneck_cond_half = False

    def __init__(self, transformer, vae, text_encoders, tokenizers, scheduler_config, **kwargs):
        super().__init__(transformer, vae, text_encoders, tokenizers, scheduler_config, 2, **kwargs)  # 2x2 patches

    def blocks(self):
        # The double-stream blocks: they return (text, image) tokens in every diffusers version (the single-stream
        # ones returned the joint sequence before 0.32).
        return self.transformer.transformer_blocks

    def default_latent_resolution(self):
        """The FLUX pipeline's default image (1024 for FLUX.1: its VAE's sample_size), in latent pixels."""
        return int(self.vae.config.sample_size) // self.vae_scale

    def encode_prompt(self, prompt):
        """FLUX's encoding (the pipeline's encode_prompt): T5's sequence and CLIP's pooled output."""
        pooled = self.text_encoder(self._tokens(self.tokenizer, prompt, self.tokenizer.model_max_length),
                                   output_hidden_states=False).pooler_output
        sequence = self.text_encoder_2(self._tokens(self.tokenizer_2, prompt, self.max_sequence_length))[0]
        return sequence, pooled.to(sequence.dtype)

    def velocity(self, x_t, t, condition=None, pooled=None, class_labels=None):
        self._check(class_labels, condition, pooled)
        b, c, h, w = x_t.shape
        packed = x_t.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x_t.device)
        img_ids[..., 1] += torch.arange(h // 2, device=x_t.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x_t.device)[None, :]
        condition = self._batch(condition, b)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([b], self.guidance_rate, device=x_t.device, dtype=torch.float32)
        out = self.transformer(hidden_states=packed.to(self.dtype), timestep=t.to(self.dtype), guidance=guidance,
                               pooled_projections=self._batch(pooled, b).to(self.dtype),
                               encoder_hidden_states=condition.to(self.dtype),
                               txt_ids=condition.new_zeros([condition.shape[1], 3]).to(self.dtype),
                               img_ids=img_ids.reshape(-1, 3).to(self.dtype), return_dict=False)[0]
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w).to(x_t.dtype)

#----------------------------------------------------------------------------
# Loading: a local diffusers folder (its model_index.json names the pipeline) or a hub id.


def pipeline_family(path):
    """'sd3' or 'flux' for a local diffusers folder of a StableDiffusion3Pipeline or FluxPipeline, else None."""
    return FAMILIES.get(pipeline_class(path))


# family: (pipeline class, denoiser, defaults: guidance type, guidance rate, T5 length).
_FAMILY = dict(sd3=('StableDiffusion3Pipeline', SD3Denoiser, 'cfg', 7.0, 256),
               flux=('FluxPipeline', FluxDenoiser, 'distilled', 3.5, 512))


def load_flow_pipeline(path_or_id, family=None, device='cpu', guidance_type=None, guidance_rate=None, dtype=None,
                       prompts=None, resolution=None, max_sequence_length=None, **kwargs):
    """Load SD3 or FLUX as a denoiser. `family` ('sd3' or 'flux') is read from a local folder's model_index.json
    when not given. dtype defaults to bfloat16 on CUDA and float32 elsewhere; `resolution` (image pixels) to the
    pipeline's default; extra kwargs go to diffusers' from_pretrained (e.g. local_files_only=True)."""
    import diffusers

    path = os.fspath(path_or_id)
    family = family or pipeline_family(path)
    if family not in _FAMILY:
        raise ValueError(f'{path}: not a StableDiffusion3Pipeline or FluxPipeline folder (model_index.json)')
    class_name, denoiser, default_type, default_rate, default_length = _FAMILY[family]
    if guidance_type not in (None, default_type):
        raise ValueError(f"{denoiser.name} takes guidance_type {default_type!r}, not {guidance_type!r}")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if (os.path.isabs(path) or path.startswith('.')) and not os.path.isdir(path):
        raise ValueError(f'no {denoiser.name} pipeline folder at {path}')
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(path, **kwargs)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f'cannot load {denoiser.name} from {path}: {one_line(e)}') from e
    encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, 'text_encoder_3', None))]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] + ([pipe.tokenizer_3] if family == 'sd3' else [])
    for module in [pipe.transformer, pipe.vae] + [e for e in encoders if e is not None]:
        torch.nn.Module.to(module, device=device, dtype=dtype)
    return denoiser(pipe.transformer, pipe.vae, encoders[:len(tokenizers)], tokenizers, dict(pipe.scheduler.config),
                    resolution=resolution, guidance_rate=default_rate if guidance_rate is None else guidance_rate,
                    prompts=prompts, max_sequence_length=max_sequence_length or default_length)


__all__ = ['SD3Denoiser', 'FluxDenoiser', 'load_flow_pipeline', 'pipeline_family', 'time_shift', 'SD3_DEFAULT',
           'FLUX_DEFAULT']

#----------------------------------------------------------------------------

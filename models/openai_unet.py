"""The openai UNet layout shared by guided-diffusion (ADM), Consistency Models and latent diffusion, and the ADM
noise-aware classifier (an encoder half with an attention-pooling head).

Parameter names are those of the published checkpoints (`input_blocks.3.0.in_layers.2.weight`, ...), so a
published state dict loads with `load_state_dict(strict=True)` and nothing is renamed. The constructors take the
architecture with the original code's own argument names; `attention_ds` is the set of downsampling factors
(1, 2, 4, ...) at which attention runs, as in the original constructors.

Attention splits its fused qkv projection in one of two channel orders (`qkv_layout`):
  'three'   [q|k|v][head][d]  -- Consistency Models (flash attention) and the classifier's pooling head;
  'legacy'  [head][q|k|v][d]  -- guided-diffusion and latent-diffusion attention blocks.
The two give different results on the same weights, so the layout is part of the architecture.
"""

import math

import torch

QKV_LAYOUTS = ('three', 'legacy')

#----------------------------------------------------------------------------
# Sinusoidal time embedding [cos | sin] of the (float) network time, in float32.


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1) if dim % 2 else emb


class GroupNorm32(torch.nn.GroupNorm):
    """GroupNorm(32, C) evaluated in float32 whatever the input dtype, then cast back."""

    def __init__(self, channels, eps=1e-5):
        super().__init__(32, channels, eps=eps)

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)

#----------------------------------------------------------------------------
# Blocks. Each takes (x, emb); blocks that ignore emb accept it anyway.


class Downsample(torch.nn.Module):
    def __init__(self, channels, use_conv):
        super().__init__()
        self.op = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else torch.nn.AvgPool2d(2)

    def forward(self, x, emb=None):
        return self.op(x)


class Upsample(torch.nn.Module):
    def __init__(self, channels, use_conv):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x, emb=None):
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')
        return self.conv(x) if self.conv is not None else x


class ResBlock(torch.nn.Module):
    def __init__(self, channels, emb_channels, out_channels=None, use_scale_shift_norm=False, up=False, down=False,
                 dropout=0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = torch.nn.Sequential(GroupNorm32(channels), torch.nn.SiLU(),
                                             torch.nn.Conv2d(channels, out_channels, 3, padding=1))
        self.resample = Upsample(channels, False) if up else Downsample(channels, False) if down else None
        self.emb_layers = torch.nn.Sequential(
            torch.nn.SiLU(), torch.nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = torch.nn.Sequential(GroupNorm32(out_channels), torch.nn.SiLU(), torch.nn.Dropout(dropout),
                                              torch.nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (torch.nn.Identity() if out_channels == channels
                                else torch.nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.in_layers[2](h)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = rest(norm(h + e))
        return self.skip_connection(x) + h


def qkv_attention(qkv, num_heads, layout):
    """Multi-head attention of a fused [B, 3 H d, T] projection; returns [B, H d, T]. Softmax in float32."""
    b, width, length = qkv.shape
    d = width // (3 * num_heads)
    if layout == 'three':
        q, k, v = (t.reshape(b * num_heads, d, length) for t in qkv.chunk(3, dim=1))
    elif layout == 'legacy':
        q, k, v = qkv.reshape(b * num_heads, 3 * d, length).split(d, dim=1)
    else:
        raise ValueError(f'qkv_layout must be one of {QKV_LAYOUTS}, got {layout!r}')
    scale = d ** -0.25
    weight = torch.einsum('bct,bcs->bts', q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(q.dtype)
    return torch.einsum('bts,bcs->bct', weight, v).reshape(b, num_heads * d, length)


class AttentionBlock(torch.nn.Module):
    def __init__(self, channels, num_heads=1, num_head_channels=-1, qkv_layout='legacy'):
        super().__init__()
        if qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f'qkv_layout must be one of {QKV_LAYOUTS}, got {qkv_layout!r}')
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f'{channels} channels do not split into heads of {num_head_channels}')
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.qkv_layout = qkv_layout
        self.norm = GroupNorm32(channels)
        self.qkv = torch.nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = torch.nn.Conv1d(channels, channels, 1)

    def forward(self, x, emb=None):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.qkv_layout)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class EmbedSequential(torch.nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if not isinstance(layer, torch.nn.Conv2d) else layer(x)
        return x

#----------------------------------------------------------------------------
# The encoder half (input_blocks, middle_block) common to the UNet and the classifier.


def _encoder(self, image_size, in_channels, model_channels, num_res_blocks, attention_ds, dropout, channel_mult,
             num_heads, num_head_channels, use_scale_shift_norm, resblock_updown, conv_resample, qkv_layout):
    emb_channels = model_channels * 4
    self.model_channels = model_channels
    self.time_embed = torch.nn.Sequential(torch.nn.Linear(model_channels, emb_channels), torch.nn.SiLU(),
                                          torch.nn.Linear(emb_channels, emb_channels))
    attn = dict(num_heads=num_heads, num_head_channels=num_head_channels, qkv_layout=qkv_layout)
    res = dict(emb_channels=emb_channels, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm)
    ch = int(channel_mult[0] * model_channels)
    self.input_blocks = torch.nn.ModuleList([EmbedSequential(torch.nn.Conv2d(in_channels, ch, 3, padding=1))])
    chans, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [ResBlock(ch, out_channels=int(mult * model_channels), **res)]
            ch = int(mult * model_channels)
            if ds in attention_ds:
                layers.append(AttentionBlock(ch, **attn))
            self.input_blocks.append(EmbedSequential(*layers))
            chans.append(ch)
        if level != len(channel_mult) - 1:
            down = ResBlock(ch, down=True, **res) if resblock_updown else Downsample(ch, conv_resample)
            self.input_blocks.append(EmbedSequential(down))
            chans.append(ch)
            ds *= 2
    self.middle_block = EmbedSequential(ResBlock(ch, **res), AttentionBlock(ch, **attn), ResBlock(ch, **res))
    return ch, chans, ds, res, attn


class UNetModel(torch.nn.Module):
    """eps (or EDM F) network: UNetModel(x, t, y=None) with t the float network time and y int64 class indices."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_ds,
                 dropout=0.0, channel_mult=(1, 2, 4, 8), num_classes=None, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False, conv_resample=True,
                 qkv_layout='legacy'):
        super().__init__()
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.num_classes = num_classes
        ch, chans, ds, res, attn = _encoder(self, image_size, in_channels, model_channels, num_res_blocks,
                                            attention_ds, dropout, channel_mult, num_heads, num_head_channels,
                                            use_scale_shift_norm, resblock_updown, conv_resample, qkv_layout)
        if num_classes is not None:
            self.label_emb = torch.nn.Embedding(num_classes, model_channels * 4)
        attn_up = dict(attn, num_heads=num_heads if num_heads_upsample == -1 else num_heads_upsample)
        input_ch = int(channel_mult[0] * model_channels)
        self.output_blocks = torch.nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), out_channels=int(model_channels * mult), **res)]
                ch = int(model_channels * mult)
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, **attn_up))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, up=True, **res) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = torch.nn.Sequential(GroupNorm32(ch), torch.nn.SiLU(),
                                       torch.nn.Conv2d(input_ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            if y is None:
                raise ValueError('this UNet is class-conditional: give class indices y')
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class AttentionPool2d(torch.nn.Module):
    """CLIP-style pooling: the mean token prepended to the spatial tokens, learned positions, one attention layer
    (qkv in the 'three' layout); the output is the mean token's."""

    def __init__(self, spacial_dim, embed_dim, num_head_channels, output_dim):
        super().__init__()
        self.positional_embedding = torch.nn.Parameter(torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = torch.nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = torch.nn.Conv1d(embed_dim, output_dim, 1)
        self.num_heads = embed_dim // num_head_channels

    def forward(self, x):
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        x = qkv_attention(self.qkv_proj(x), self.num_heads, 'three')
        return self.c_proj(x)[:, :, 0]


class EncoderUNetModel(torch.nn.Module):
    """The ADM noise-aware classifier: EncoderUNetModel(x, t) -> logits [B, out_channels] (attention pooling)."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_ds,
                 dropout=0.0, channel_mult=(1, 2, 4, 8), num_heads=1, num_head_channels=64,
                 use_scale_shift_norm=False, resblock_updown=False, conv_resample=True, qkv_layout='legacy'):
        super().__init__()
        if num_head_channels == -1:
            raise ValueError('the attention-pool classifier needs num_head_channels')
        ch, _, ds, _, _ = _encoder(self, image_size, in_channels, model_channels, num_res_blocks, attention_ds,
                                   dropout, channel_mult, num_heads, num_head_channels, use_scale_shift_norm,
                                   resblock_updown, conv_resample, qkv_layout)
        self.out = torch.nn.Sequential(GroupNorm32(ch), torch.nn.SiLU(),
                                       AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels))

    def forward(self, x, timesteps):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
        return self.out(self.middle_block(h, emb))

#----------------------------------------------------------------------------
# Published configurations and the translation from the original code's flags.
# guided-diffusion / consistency-models flags (script_util.create_model, create_classifier):
# attention_resolutions are image resolutions ("32,16,8"); the UNet wants downsampling factors.

GUIDED_DEFAULTS = dict(image_size=256, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                       num_head_channels=-1, attention_resolutions='16,8', channel_mult='', dropout=0.0,
                       class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
                       use_fp16=False, use_new_attention_order=False, learn_sigma=False, in_channels=3,
                       num_classes=1000)
CLASSIFIER_DEFAULTS = dict(image_size=256, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
                           classifier_attention_resolutions='32,16,8', classifier_use_scale_shift_norm=True,
                           classifier_resblock_updown=True, classifier_pool='attention', num_head_channels=64,
                           in_channels=3, num_classes=1000)


def _int_list(value):
    if isinstance(value, str):
        return tuple(int(v) for v in value.replace('(', '').replace(')', '').split(',') if v.strip())
    return tuple(int(v) for v in value)


def default_channel_mult(image_size):
    table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
             32: (1, 2, 2, 2)}
    if image_size not in table:
        raise ValueError(f'no default channel_mult for image_size {image_size}: give channel_mult')
    return table[image_size]


def check_keys(arch, valid, what):
    unknown = sorted(set(arch) - set(valid))
    if unknown:
        raise ValueError(f'unknown {what} key(s) {", ".join(unknown)}; valid keys: {", ".join(sorted(valid))}')


def guided_unet_kwargs(flags, qkv_layout=None):
    """UNetModel kwargs from guided-diffusion `create_model` flags (unknown keys are an error)."""
    check_keys(flags, GUIDED_DEFAULTS, 'model_arch')
    f = dict(GUIDED_DEFAULTS, **flags)
    mult = _int_list(f['channel_mult']) if f['channel_mult'] else default_channel_mult(int(f['image_size']))
    if qkv_layout is None:
        qkv_layout = 'three' if f['use_new_attention_order'] else 'legacy'
    return dict(image_size=int(f['image_size']), in_channels=int(f['in_channels']),
                model_channels=int(f['num_channels']),
                out_channels=int(f['in_channels']) * (2 if f['learn_sigma'] else 1),
                num_res_blocks=int(f['num_res_blocks']),
                attention_ds={int(f['image_size']) // r for r in _int_list(f['attention_resolutions'])},
                dropout=float(f['dropout']), channel_mult=mult,
                num_classes=int(f['num_classes']) if f['class_cond'] else None, num_heads=int(f['num_heads']),
                num_head_channels=int(f['num_head_channels']), num_heads_upsample=int(f['num_heads_upsample']),
                use_scale_shift_norm=bool(f['use_scale_shift_norm']), resblock_updown=bool(f['resblock_updown']),
                qkv_layout=qkv_layout), bool(f['use_fp16'])


def classifier_kwargs(flags):
    """EncoderUNetModel kwargs from guided-diffusion `create_classifier` flags (unknown keys are an error)."""
    check_keys(flags, CLASSIFIER_DEFAULTS, 'classifier_arch')
    f = dict(CLASSIFIER_DEFAULTS, **flags)
    if f['classifier_pool'] != 'attention':
        raise ValueError(f"classifier_pool {f['classifier_pool']!r} is not supported (only 'attention')")
    size = int(f['image_size'])
    return dict(image_size=size, in_channels=int(f['in_channels']), model_channels=int(f['classifier_width']),
                out_channels=int(f['num_classes']), num_res_blocks=int(f['classifier_depth']),
                attention_ds={size // r for r in _int_list(f['classifier_attention_resolutions'])},
                channel_mult=default_channel_mult(size),
                num_head_channels=int(f['num_head_channels']),
                use_scale_shift_norm=bool(f['classifier_use_scale_shift_norm']),
                resblock_updown=bool(f['classifier_resblock_updown']), qkv_layout='legacy')


__all__ = ['UNetModel', 'EncoderUNetModel', 'ResBlock', 'AttentionBlock', 'AttentionPool2d', 'timestep_embedding',
           'qkv_attention', 'guided_unet_kwargs', 'classifier_kwargs', 'QKV_LAYOUTS']

#----------------------------------------------------------------------------

"""EDM preconditioning (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models")
around a compact DDPM++-style U-Net, and this project's safe file format for it (safetensors + JSON config).

Published EDM network pickles load through models.load_model (torch_utils.persistence); the classes here are
plain nn.Modules and are never pickled: save_model/load_local store weights and constructor arguments only.
"""

import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn.functional import silu

from torch_utils.cli import one_line
from torch_utils.misc import atomic_write

from .zoo import ModelError

MODEL_NAME = 'model'  # <dir>/model.json + <dir>/model.safetensors (the digits flow model: flow.json, ...)
MODEL_JSON = MODEL_NAME + '.json'
MODEL_WEIGHTS = MODEL_NAME + '.safetensors'
FORMAT_VERSION = 1

#----------------------------------------------------------------------------
# Sinusoidal embedding of the noise level c_noise (as in the DDPM++ config of EDM).


class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / half
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x.to(torch.float32), freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
# Residual block: GroupNorm -> SiLU -> Conv, noise embedding as a per-channel
# scale and shift, optional 2x down/upsampling and optional self-attention.


def _group_norm(num_channels, eps=1e-6):
    num_groups = min(32, num_channels // 4)
    while num_channels % num_groups:
        num_groups -= 1
    return torch.nn.GroupNorm(num_groups=num_groups, num_channels=num_channels, eps=eps)


class UNetBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 channels_per_head=32, dropout=0):
        super().__init__()
        self.up = up
        self.down = down
        self.norm0 = _group_norm(in_channels)
        self.conv0 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = torch.nn.Linear(emb_channels, out_channels * 2)
        self.norm1 = _group_norm(out_channels)
        self.dropout = torch.nn.Dropout(dropout)
        self.conv1 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1)
        torch.nn.init.zeros_(self.conv1.weight)
        torch.nn.init.zeros_(self.conv1.bias)
        self.skip = torch.nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.num_heads = max(out_channels // channels_per_head, 1) if attention else 0
        if attention:
            self.norm2 = _group_norm(out_channels)
            self.qkv = torch.nn.Conv2d(out_channels, out_channels * 3, 1)
            self.proj = torch.nn.Conv2d(out_channels, out_channels, 1)
            torch.nn.init.zeros_(self.proj.weight)
            torch.nn.init.zeros_(self.proj.bias)

    def _resample(self, x):
        if self.up:
            return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')
        if self.down:
            return torch.nn.functional.avg_pool2d(x, 2)
        return x

    def forward(self, x, emb):
        orig = x
        x = self._resample(silu(self.norm0(x)))
        x = self.conv0(x)
        scale, shift = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype).chunk(2, dim=1)
        x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        x = self.conv1(self.dropout(x))
        orig = self._resample(orig)
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * np.sqrt(0.5)
        if self.num_heads:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
            a = torch.nn.functional.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                                                 v.transpose(-1, -2))
            x = (x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))) * np.sqrt(0.5)
        return x

#----------------------------------------------------------------------------
# Compact U-Net in the spirit of EDM's SongUNet (DDPM++): an encoder of residual
# blocks per resolution, a decoder that concatenates the encoder's skips.


class UNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, model_channels=64,
                 channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(4,), dropout=0.0, label_dropout=0.0):
        super().__init__()
        emb_channels = model_channels * 4
        self.label_dropout = label_dropout
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_label = torch.nn.Linear(label_dim, model_channels, bias=False) if label_dim else None
        self.map_layer0 = torch.nn.Linear(model_channels, emb_channels)
        self.map_layer1 = torch.nn.Linear(emb_channels, emb_channels)
        block = dict(emb_channels=emb_channels, dropout=dropout)

        self.conv_in = torch.nn.Conv2d(in_channels, model_channels * channel_mult[0], 3, padding=1)
        self.enc = torch.nn.ModuleList()
        skips = [model_channels * channel_mult[0]]
        cout = skips[0]
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(UNetBlock(cout, cout, down=True, **block))
                skips.append(cout)
            for _ in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc.append(UNetBlock(cin, cout, attention=res in attn_resolutions, **block))
                skips.append(cout)

        self.dec = torch.nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec.append(UNetBlock(cout, cout, attention=True, **block))
                self.dec.append(UNetBlock(cout, cout, **block))
            else:
                self.dec.append(UNetBlock(cout, cout, up=True, **block))
            for _ in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec.append(UNetBlock(cin, cout, attention=res in attn_resolutions, **block))
        self.norm_out = _group_norm(cout)
        self.conv_out = torch.nn.Conv2d(cout, out_channels, 3, padding=1)
        torch.nn.init.zeros_(self.conv_out.weight)
        torch.nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, noise_labels, class_labels=None):
        # Embedding of the noise level (and class): [B, emb_channels].
        emb = self.map_noise(noise_labels)
        if self.map_label is not None and class_labels is not None:
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * np.sqrt(labels.shape[1]))
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))

        # Encoder, then decoder consuming the skips in reverse order.
        x = self.conv_in(x)
        skips = [x]
        for blk in self.enc:
            x = blk(x, emb)
            skips.append(x)
        for blk in self.dec:
            if blk.conv0.in_channels != x.shape[1]:
                x = torch.cat([x, skips.pop()], dim=1)
            x = blk(x, emb)
        return self.conv_out(silu(self.norm_out(x)))

#----------------------------------------------------------------------------
# EDM preconditioning: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), with
# c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2),
# c_in = 1/sqrt(sd^2+sigma^2), c_noise = ln(sigma)/4 (formats.md §1.7).


class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, amp_dtype='float16',
                 sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, **model_kwargs):
        super().__init__()
        if amp_dtype not in ('float16', 'bfloat16'):
            raise ValueError(f'amp_dtype must be float16 or bfloat16, got {amp_dtype!r}')
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, amp_dtype=amp_dtype, sigma_min=sigma_min, sigma_max=sigma_max,
                                sigma_data=sigma_data, **model_kwargs)
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.use_fp16 = bool(use_fp16)
        self.amp_dtype = getattr(torch, amp_dtype)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.model = UNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                          label_dim=label_dim, **model_kwargs)
        self.bottleneck = f'model.enc.{len(self.model.enc) - 1}'  # AMED's features: the lowest-resolution encoder block

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        if class_labels is not None and class_labels.shape[0] != x.shape[0]:
            class_labels = class_labels.expand(x.shape[0], -1)
        amp = self.use_fp16 and not force_fp32 and x.device.type == 'cuda'

        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4

        with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype, enabled=amp):
            F_x = self.model(c_in * x, c_noise.flatten().expand(x.shape[0]), class_labels=class_labels,
                             **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
# Safe file format: <dir>/model.safetensors (weights) + <dir>/model.json
# ({"format", "class", "init_kwargs", and anything passed as `extra`}).


def save_weights_and_config(dirname, weights_name, state, json_name, config):
    """Write a state dict as safetensors (floating tensors in float32, others as they are) and its config as JSON
    into `dirname`, each file atomically."""
    state = {k: v.detach().to('cpu', torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in state.items()}
    atomic_write(os.path.join(dirname, weights_name), lambda tmp: save_file(state, tmp))

    def write_json(tmp):
        with open(tmp, 'w') as f:
            json.dump(config, f, indent=2)
            f.write('\n')
    atomic_write(os.path.join(dirname, json_name), write_json)


def model_classes():
    """The classes save_model writes and load_local builds: {class name: (class, kind)}."""
    from .flow import DigitsFlow
    return dict(EDMPrecond=(EDMPrecond, 'edm'), DigitsFlow=(DigitsFlow, 'flow'))


def save_model(net, dirname, name=MODEL_NAME, **extra):
    """Write an EDMPrecond (or a models.flow.DigitsFlow) as <name>.safetensors + <name>.json into `dirname`
    (atomically, file by file)."""
    config = dict(format=FORMAT_VERSION, kind=model_classes()[type(net).__name__][1],
                  **{'class': type(net).__name__}, init_kwargs=net.init_kwargs, **extra)
    save_weights_and_config(dirname, f'{name}.safetensors', net.state_dict(), f'{name}.json', config)


def load_local(dirname, device='cpu', name=MODEL_NAME):
    """Build the network described by <dirname>/<name>.json and load its weights. Returns it in eval mode."""
    json_path = os.path.join(dirname, f'{name}.json')
    weights_path = os.path.join(dirname, f'{name}.safetensors')
    for path in (json_path, weights_path):
        if not os.path.isfile(path):
            raise ModelError(f'{dirname}: no {os.path.basename(path)} (not a model saved by models.edm.save_model)')
    with open(json_path) as f:
        config = json.load(f)
    classes = model_classes()
    if config.get('class') not in classes or config.get('format') != FORMAT_VERSION:
        raise ModelError(f'{json_path}: unsupported model class {config.get("class")!r} '
                         f'or format {config.get("format")!r}')
    net = classes[config['class']][0](**config['init_kwargs'])
    try:
        net.load_state_dict(load_file(weights_path, device='cpu'))
    except (RuntimeError, OSError) as err:
        raise ModelError(f'{weights_path}: weights do not match {json_path} ({one_line(err)})') from err
    net.training_options = config.get('training_options')
    return net.eval().requires_grad_(False).to(device)


def count_params(net):
    return sum(p.numel() for p in net.parameters())


__all__ = ['EDMPrecond', 'UNet', 'UNetBlock', 'PositionalEmbedding', 'save_model', 'load_local', 'count_params',
           'MODEL_JSON', 'MODEL_WEIGHTS']

#----------------------------------------------------------------------------

"""The VQ-regularised autoencoder of latent diffusion (taming-transformers' VQModel; vq-f4: 4x downsampling,
3 latent channels, 8192 codes), with the parameter names of its checkpoints (`encoder.down.0.block.1.conv2.weight`,
`decoder.up.2.upsample.conv.weight`, `quantize.embedding.weight`, ...), so they load with strict=True.

decode() quantises first (nearest code per latent pixel, straight-through gradient), as latent diffusion's
decode_first_stage does.
"""

import torch


def _norm(channels):
    return torch.nn.GroupNorm(32, channels, eps=1e-6)


def _swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels, dropout=0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = torch.nn.Dropout(dropout)
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = torch.nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, 'nin_shortcut') else x) + h


class AttnBlock(torch.nn.Module):
    """Single-head self-attention over pixels, with 1x1 convolutions as projections."""

    def __init__(self, channels):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (torch.nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (f(h).reshape(b, c, hh * ww) for f in (self.q, self.k, self.v))
        weight = torch.softmax(torch.einsum('bci,bcj->bij', q, k).float() * c ** -0.5, dim=2).to(q.dtype)
        h = torch.einsum('bcj,bij->bci', v, weight).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(torch.nn.functional.pad(x, (0, 1, 0, 1)))


class Upsample(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest'))


def _mid(channels, dropout):
    mid = torch.nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _level(blocks, attns):
    level = torch.nn.Module()
    level.block, level.attn = torch.nn.ModuleList(blocks), torch.nn.ModuleList(attns)
    return level


class Encoder(torch.nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels,
                 double_z=False, dropout=0.0, **unused):
        super().__init__()
        self.num_res_blocks = num_res_blocks
        self.conv_in = torch.nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = torch.nn.ModuleList()
        block_in, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = torch.nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, 'downsample'):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(torch.nn.Module):
    def __init__(self, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, dropout=0.0,
                 **unused):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = torch.nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout)
        levels = []
        for i in reversed(range(len(ch_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i], dropout))
                block_in = ch * ch_mult[i]
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        self.up = torch.nn.ModuleList(levels)  # up[0] is the full-resolution level; it runs last
        self.norm_out = _norm(block_in)
        self.conv_out = torch.nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, 'upsample'):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(torch.nn.Module):
    """Nearest code by |z|^2 + |e|^2 - 2 z.e per latent pixel; straight-through gradient to z."""

    def __init__(self, n_embed, embed_dim):
        super().__init__()
        self.embedding = torch.nn.Embedding(n_embed, embed_dim)

    def indices(self, z):
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = self.embedding.weight.to(flat.dtype)
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return dist.argmin(1).reshape(z.shape[0], *z.shape[2:])

    def forward(self, z):
        z_q = self.embedding(self.indices(z)).permute(0, 3, 1, 2).to(z.dtype)
        return z + (z_q - z).detach()


# vq-f4 as published (first_stage_config.params of the LSUN Bedrooms LDM).
VQF4_CONFIG = dict(embed_dim=3, n_embed=8192, ddconfig=dict(double_z=False, z_channels=3, resolution=256,
                                                              in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4],
                                                              num_res_blocks=2, attn_resolutions=[], dropout=0.0))
DDCONFIG_KEYS = ('double_z', 'z_channels', 'resolution', 'in_channels', 'out_ch', 'ch', 'ch_mult', 'num_res_blocks',
                 'attn_resolutions', 'dropout')


class VQModel(torch.nn.Module):
    def __init__(self, embed_dim=3, n_embed=8192, ddconfig=None):
        super().__init__()
        ddconfig = dict(VQF4_CONFIG['ddconfig'], **(ddconfig or {}))
        self.ddconfig = ddconfig
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = torch.nn.Conv2d(ddconfig['z_channels'], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig['z_channels'], 1)

    @property
    def downsampling(self):
        return 2 ** (len(self.ddconfig['ch_mult']) - 1)

    def encode(self, x):
        """Latents before quantisation (what latent diffusion trains on)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, h, quantize=True):
        return self.decoder(self.post_quant_conv(self.quantize(h) if quantize else h))


__all__ = ['VQModel', 'Encoder', 'Decoder', 'VectorQuantizer', 'VQF4_CONFIG', 'DDCONFIG_KEYS']

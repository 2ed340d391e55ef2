"""LPIPS-VGG v0.1 (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", 2018),
written for this project, loading the published weights in their original formats:

  the VGG-16 trunk: torchvision's ImageNet checkpoint `vgg16-397923af.pth` (keys `features.<i>.weight|bias`; the
      classifier keys in that file are ignored),
  the linear calibration: the LPIPS package's `weights/v0.1/vgg.pth` (keys `lin<k>.model.1.weight`, [1, C_k, 1, 1]).

For images x, y in [-1, 1]:
  x' = (x - shift) / scale per RGB channel (shift -0.030, -0.088, -0.188; scale 0.458, 0.448, 0.450),
  f_k = the VGG-16 activations after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (k = 0..4),
  u_k = f_k / (||f_k||_channels + 1e-10),
  LPIPS(x, y) = sum_k mean_{h,w} sum_c w_{k,c} (u_k(x) - u_k(y))_c^2.
Both files are downloaded on first use into the dnnlib cache, like the Inception detector. Images need at least
16x16 pixels (relu5_3 is then 1x1); one-channel images are repeated to RGB.
"""

import hashlib
import os

import torch

from torch_utils.cli import one_line

from .zoo import ModelError

VGG_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'
LIN_URL = 'https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth'
# VGG-16 `features` indices: convolutions (ReLU after each), max pools at 4, 9, 16, 23; the five taps end after
# the ReLUs at 3, 8, 15, 22, 29.
CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
POOLS = (4, 9, 16, 23)
TAPS = (3, 8, 15, 22, 29)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

#----------------------------------------------------------------------------


class LPIPS(torch.nn.Module):
    """LPIPS-VGG distance: forward(x, y) -> [N] for images [N, C, H, W] in [-1, 1] (C = 1 or 3)."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.ModuleDict()
        c_in = 3
        for idx, width in zip(CONVS, WIDTHS):
            self.features[str(idx)] = torch.nn.Conv2d(c_in, width, 3, padding=1)
            c_in = width
        self.lins = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(1, c, 1, 1))
                                           for c in (64, 128, 256, 512, 512))
        self.register_buffer('shift', torch.tensor(SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer('scale', torch.tensor(SCALE).reshape(1, 3, 1, 1))

    def taps(self, x):
        """The five normalised VGG activations of images in [-1, 1]."""
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != 3 or min(x.shape[2:]) < 16:
            raise ValueError(f'LPIPS needs [N, 1 or 3, H, W] images of at least 16x16 pixels, got {tuple(x.shape)}')
        x = (x.to(self.shift.dtype) - self.shift) / self.scale
        out = []
        for idx in range(TAPS[-1] + 1):
            if idx in POOLS:
                x = torch.nn.functional.max_pool2d(x, 2)
            elif str(idx) in self.features:
                x = torch.relu(self.features[str(idx)](x))
            if idx in TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x, y):
        with torch.no_grad():
            taps_y = self.taps(y)
        total = 0
        for lin, u_x, u_y in zip(self.lins, self.taps(x), taps_y):
            total = total + ((u_x - u_y) ** 2 * lin).sum(1).mean((1, 2))
        return total

    def load_published(self, vgg_state, lin_state):
        """Copy the weights from torchvision's VGG-16 state dict and the LPIPS package's v0.1 linear layers."""
        with torch.no_grad():
            for idx in CONVS:
                conv = self.features[str(idx)]
                conv.weight.copy_(vgg_state[f'features.{idx}.weight'])
                conv.bias.copy_(vgg_state[f'features.{idx}.bias'])
            for k, lin in enumerate(self.lins):
                lin.copy_(lin_state[f'lin{k}.model.1.weight'])
        return self

#----------------------------------------------------------------------------


def _fetch_state(url):
    """Download `url` into the dnnlib cache (once) and read it as a plain state dict, never unpickling code."""
    import io

    import dnnlib
    try:
        with dnnlib.util.open_url(url, num_attempts=3, verbose=False) as f:
            data = f.read()
        return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except Exception as err:  # no network, truncated or foreign file: one line, no pickle advice
        reason = one_line(err)
        if 'weights_only' in reason or 'Unpickl' in reason:
            reason = 'not a plain state dict'
        name = os.path.basename(url)
        raise ModelError(f'cannot load the LPIPS weights {name} from {url} ({reason[:200]}); without network, put the '
                         f'file in the dnnlib cache ({dnnlib.make_cache_dir_path("downloads")}) as '
                         f'{hashlib.md5(url.encode()).hexdigest()}_{name}') from None


def load_lpips(device='cpu'):
    """LPIPS-VGG v0.1 with its published weights, frozen, on `device`."""
    vgg, lin = _fetch_state(VGG_URL), _fetch_state(LIN_URL)
    try:
        net = LPIPS().load_published(vgg, lin)
    except (KeyError, RuntimeError) as err:
        raise ModelError(f'the LPIPS weight files do not have the published layout ({one_line(err)})') \
            from None
    return net.to(device).eval().requires_grad_(False)

#----------------------------------------------------------------------------

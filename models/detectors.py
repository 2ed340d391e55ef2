"""Feature networks. Two roles, kept apart on purpose: the network that judges a sampler (FID, KID) must never be
the one a distillation loss trains against, or the score rewards fitting the metric.

FID detectors: get_detector(name, device) -> detector with .name, .feature_dim and __call__(images) -> float32
features [N, D], for images [N, C, H, W] in 0..255 (uint8 or float).
  'inception': the Inception-v3 pool_3 features of EDM's fid.py (Heusel et al. 2017; StyleGAN3 translation of the
      TF graph, downloaded once).
  'digits': the penultimate features of a small CNN classifier of the 8x8 digits, shipped in src/digits/ (trained
      by train_digits.py detector).

Loss networks: get_feature_net(name, device) -> feature net with .name and .distance(x, y) -> per-sample float32
distances [N], images in 0..255, differentiable in x (see FEATURE_NETS).
  'inception': mean squared difference of the Inception features (the official AdaSDE code's loss).
  'lpips': LPIPS-VGG v0.1 (Zhang et al. 2018; models/lpips.py), the loss the AdaSDE paper describes.
  'digits_loss': mean squared difference of the spatial features of a second digits CNN, of another architecture,
      trained on another split with another seed than the 'digits' detector (train_digits.py feature_net).
  'digits': the digits FID detector itself; only for ablations, since FID with it is then not an independent score.
"""

import hashlib
import json
import os

import torch
from safetensors.torch import load_file
from torch.nn.functional import silu

from torch_utils.cli import one_line

from .edm import save_weights_and_config
from .zoo import REPO_SRC, ModelError

INCEPTION_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/'
                 'inception-2015-12-05.pkl')
DIGITS_DIR = os.path.join(REPO_SRC, 'digits')  # the embedded digits row's folder (models/zoo.py)
DIGITS_WEIGHTS = 'detector.safetensors'
DIGITS_JSON = 'detector.json'
LOSS_NET_WEIGHTS = 'feature_net.safetensors'
LOSS_NET_JSON = 'feature_net.json'

#----------------------------------------------------------------------------
# Digits classifier: three 3x3 convolutions on 8x8 inputs, global average
# pooling to a 128-d feature vector, and a linear layer over 10 classes.


class DigitsClassifier(torch.nn.Module):
    def __init__(self, channels=(32, 64, 128), num_classes=10):
        super().__init__()
        self.channels = tuple(channels)
        self.conv0 = torch.nn.Conv2d(1, channels[0], 3, padding=1)
        self.conv1 = torch.nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels[1], channels[2], 3, padding=1)
        self.fc = torch.nn.Linear(channels[2], num_classes)
        self.feature_dim = channels[2]

    def features(self, images):
        """Images [N, 1, 8, 8] in 0..255 -> features [N, 128] (float32)."""
        x = images.to(torch.float32) / 127.5 - 1
        x = silu(self.conv0(x))
        x = torch.nn.functional.avg_pool2d(silu(self.conv1(x)), 2)
        x = silu(self.conv2(x))
        return x.mean(dim=(2, 3))

    def classify(self, images):
        return self.fc(self.features(images))


#----------------------------------------------------------------------------
# The digits loss network: another architecture (a 5x5 then two 3x3
# convolutions, max pooling, no global pooling) whose features are the whole
# 64 x 4 x 4 map, so the loss compares where strokes are, not only which.


class DigitsLossNet(torch.nn.Module):
    def __init__(self, channels=(16, 32, 64), num_classes=10):
        super().__init__()
        self.channels = tuple(channels)
        self.conv0 = torch.nn.Conv2d(1, channels[0], 5, padding=2)
        self.conv1 = torch.nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels[1], channels[2], 3, padding=1)
        self.fc = torch.nn.Linear(channels[2] * 16, num_classes)
        self.feature_dim = channels[2] * 16

    def features(self, images):
        """Images [N, 1, 8, 8] in 0..255 -> features [N, 1024] (float32)."""
        x = images.to(torch.float32) / 127.5 - 1
        x = torch.nn.functional.max_pool2d(silu(self.conv1(silu(self.conv0(x)))), 2)
        return silu(self.conv2(x)).flatten(1)

    def classify(self, images):
        return self.fc(self.features(images))


_DIGITS_NETS = {  # kind -> (class, weights file, json file, train_digits.py command)
    'digits_classifier': (DigitsClassifier, DIGITS_WEIGHTS, DIGITS_JSON, 'detector'),
    'digits_loss_net': (DigitsLossNet, LOSS_NET_WEIGHTS, LOSS_NET_JSON, 'feature_net'),
}


def save_digits_net(net, dirname, **extra):
    """Write a DigitsClassifier (detector.*) or a DigitsLossNet (feature_net.*) as safetensors + JSON (atomically)."""
    kind, = [k for k, (cls, *_) in _DIGITS_NETS.items() if type(net) is cls]
    _, weights, config_name, _ = _DIGITS_NETS[kind]
    config = dict(format=1, kind=kind, channels=list(net.channels), feature_dim=net.feature_dim, **extra)
    save_weights_and_config(dirname, weights, net.state_dict(), config_name, config)


def load_digits_net(kind='digits_classifier', dirname=DIGITS_DIR):
    cls, weights, config_name, command = _DIGITS_NETS[kind]
    json_path, weights_path = os.path.join(dirname, config_name), os.path.join(dirname, weights)
    if not (os.path.isfile(json_path) and os.path.isfile(weights_path)):
        raise ModelError(f'digits network not found: expected {weights} and {config_name} in {dirname} '
                         f'(train it with: python train_digits.py {command} --outdir={dirname})')
    with open(json_path) as f:
        config = json.load(f)
    net = cls(channels=config['channels'])
    net.load_state_dict(load_file(weights_path))
    return net.eval().requires_grad_(False)


def load_digits_classifier(dirname=DIGITS_DIR):
    return load_digits_net('digits_classifier', dirname)

#----------------------------------------------------------------------------
# The common interface.


class Detector:
    def __init__(self, name, feature_dim, fn, channels=None):
        self.name = name
        self.feature_dim = feature_dim
        self.channels = channels  # channels the network takes (1-channel input is repeated for 3)
        self._fn = fn

    def __call__(self, images):
        if images.ndim != 4:
            raise ValueError(f'{self.name} detector: images must be [N, C, H, W], got shape {tuple(images.shape)}')
        if self.channels == 3 and images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if self.channels is not None and images.shape[1] != self.channels:
            raise ValueError(f'{self.name} detector: expected {self.channels} channels, got {images.shape[1]}')
        if not images.is_floating_point():
            images = images.to(torch.float32)
        return self._fn(images).to(torch.float32)


def _digits_detector(device):
    net = load_digits_classifier().to(device)
    return Detector('digits', net.feature_dim, net.features, channels=1)


def _inception_detector(device):
    import pickle

    import dnnlib
    from torch_utils import persistence
    try:
        with dnnlib.util.open_url(INCEPTION_URL, num_attempts=3, verbose=False) as f:
            net = persistence.load_network_pickle(f)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ModelError(f'cannot load the Inception detector from {INCEPTION_URL} ({one_line(err)}); without '
                         f'network, put the file in the dnnlib cache ({dnnlib.make_cache_dir_path("downloads")}) as '
                         f'{hashlib.md5(INCEPTION_URL.encode()).hexdigest()}_inception-2015-12-05.pkl') from err
    net = net.to(device).eval().requires_grad_(False)
    return Detector('inception', 2048, lambda x: net(x, return_features=True), channels=3)


DETECTORS = {'digits': _digits_detector, 'inception': _inception_detector}
_cache = {}


def get_detector(name, device='cpu'):
    """The FID feature network `name` ('inception' or 'digits') on `device`, built once per (name, device)."""
    if name not in DETECTORS:
        raise ValueError(f'unknown detector {name!r}; choose from {", ".join(DETECTORS)}')
    key = (name, str(torch.device(device)))
    if key not in _cache:
        _cache[key] = DETECTORS[name](torch.device(device))
    return _cache[key]


#----------------------------------------------------------------------------
# Loss networks of the distillation's last-step feature loss.


class FeatureNet:
    """A loss network: distance(x, y) -> [N] per-sample distances of images in 0..255, differentiable in x."""

    def __init__(self, name, distance):
        self.name = name
        self.distance = distance


def _mse_of(detector):
    def distance(x, y):
        f_x = detector(x)
        with torch.no_grad():
            f_y = detector(y)
        return ((f_x - f_y) ** 2).mean(1)
    return distance


def _digits_loss_net(device):
    net = load_digits_net('digits_loss_net').to(device)
    return FeatureNet('digits_loss', _mse_of(Detector('digits_loss', net.feature_dim, net.features, channels=1)))


def _lpips_net(device):
    from .lpips import load_lpips
    lpips = load_lpips(device)
    return FeatureNet('lpips', lambda x, y: lpips(x / 127.5 - 1, y / 127.5 - 1))


FEATURE_NETS = {
    'inception': lambda device: FeatureNet('inception', _mse_of(get_detector('inception', device))),
    'lpips': _lpips_net,
    'digits_loss': _digits_loss_net,
    'digits': lambda device: FeatureNet('digits', _mse_of(get_detector('digits', device))),
}


def get_feature_net(name, device='cpu'):
    """The loss network `name` (see FEATURE_NETS) on `device`, built once per (name, device). The loss on a FID
    detector wraps get_detector's own cached network, so it is not cached a second time (a second copy would
    outlive a replaced or cleared detector)."""
    if name not in FEATURE_NETS:
        raise ValueError(f'unknown feature network {name!r}; choose from {", ".join(FEATURE_NETS)} or none')
    if name in DETECTORS:
        return FEATURE_NETS[name](torch.device(device))
    key = ('feature_net', name, str(torch.device(device)))
    if key not in _cache:
        _cache[key] = FEATURE_NETS[name](torch.device(device))
    return _cache[key]

#----------------------------------------------------------------------------

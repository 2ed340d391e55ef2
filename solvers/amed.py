"""AMED-Solver and AMED-Plugin (Zhou et al., CVPR 2024): a small network predicts, per sample and per step, where
to place one intermediate noise level, from the denoiser's bottleneck features of the step's first call.

Each step from sigma_i to sigma_{i+1} takes the denoiser at the state point (its bottleneck activation is captured
by a forward hook on that call, no extra call), lets the predictor map (features, sigma_i, sigma_{i+1}) to
(r, c, a), and evaluates the denoiser once more at s = sigma_{i+1}^r sigma_i^(1-r) (at noise level a s). The base
decides how the two evaluations combine: 'amed' (the AMED-Solver) and the plug-ins on 'euler', 'dpm'
(DPM-Solver-2), 'ipndm' and 'dpmpp' (DPM-Solver++), the last two on the merged grid sigma_0, s_0, sigma_1, ...
Every base makes 2 network calls per step. docs/amed.md describes the maps, steps and references.
"""

import math

import torch
from torch.nn.functional import silu

from torch_utils.cli import one_line

from . import snapshot
from .common import denoise, to_d
from .dpmpp import dpmpp_order, dpmpp_update
from .ipndm import AB_WEIGHTS
from .learned import LearnedPredictor, learned_sampler, register_predictor
from .multistep import dynamic_threshold
from .registry import register

BASES = ('amed', 'euler', 'dpm', 'ipndm', 'dpmpp')
SINGLE_STEP_BASES = ('amed', 'euler', 'dpm')   # trained with teacher forcing

# The reference's fixed sizes: an 8-channel embedding of each noise level, a 128-wide bottleneck encoder with 4
# outputs, heads on the 4 + 8 + 8 = 20 concatenated values.
NOISE_CHANNELS = 8
MAX_POSITIONS = 10000
HIDDEN_DIM = 128
ENCODED_DIM = 4
HEAD_DIM = ENCODED_DIM + 2 * NOISE_CHANNELS
LAYERS = ('map_layer0', 'enc_layer0', 'enc_layer1', 'fc_r', 'fc_scale_dir', 'fc_scale_time')

#----------------------------------------------------------------------------
# The predictor g. Maps of its raw head outputs u (the AMED code writes them as
# sigmoid(u) 2s + 1 - s, the same function):
#   r = sigmoid(u_r)                  position of the intermediate point in log sigma, in (0, 1)
#   c = 1 + scale_dir tanh(u_c / 2)   scale of the step's final direction, c = 1 if scale_dir = 0
#   a = 1 + scale_time tanh(u_a / 2)  scale of the noise level given to the net at s, a = 1 if scale_time = 0


def _init_linear(layer, mode, generator):
    """The reference's initialisation: 'kaiming_normal' is N(0, 1/fan_in), 'xavier_uniform' is
    U(-b, b) with b = sqrt(6 / (fan_in + fan_out)); biases start at zero."""
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        if mode == 'xavier_uniform':
            u = torch.rand(layer.weight.shape, generator=generator) * 2 - 1
            layer.weight.copy_(math.sqrt(6 / (fan_in + fan_out)) * u)
        else:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / math.sqrt(fan_in))
        layer.bias.zero_()


def _linear(layer, h):
    return torch.nn.functional.linear(h, layer.weight.to(h), layer.bias.to(h))


@register_predictor
class AMEDPredictor(LearnedPredictor):
    kind = 'amed'
    title = 'AMED'
    official_class = 'AMED_predictor'
    detach_state = True  # every base: the student state is detached between steps

    def __init__(self,
        num_steps,                      # Time points of the student schedule (num_steps - 1 steps).
        base            = 'amed',       # Step structure: 'amed', or a plug-in on 'euler', 'dpm', 'ipndm', 'dpmpp'.
        scale_dir       = 0.01,         # Half-width of the c range; 0: c = 1 (no head).
        scale_time      = 0.0,          # Half-width of the a range; 0: a = 1 (no head).
        max_order       = 3,            # Multistep bases: highest order (ipndm 1-4, dpmpp 1-3).
        predict_x0      = True,         # dpmpp: data prediction (True) or noise prediction.
        lower_order_final = True,       # dpmpp: lower the order on the last steps of the merged grid.
        thresholding    = False,        # dpmpp: dynamic thresholding of the data prediction (the AMED code's).
        bottleneck_dim  = 64,           # Features read per sample: a square map of this many values (8 x 8).
        settings        = None,         # Sampling settings it was trained for: schedule, AFS, model, guidance, ...
        seed            = None,         # Seed of the initialisation.
    ):
        super().__init__()
        if base not in BASES:
            raise ValueError(f'unknown AMED base {base!r}; choose from {", ".join(BASES)}')
        if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 2:
            raise ValueError(f'need an integer num_steps >= 2, got {num_steps!r}')
        highest = 3 if base == 'dpmpp' else 4
        if isinstance(max_order, bool) or int(max_order) != max_order or not 1 <= max_order <= highest:
            raise ValueError(f'max_order must be 1 to {highest} for the {base} base, got {max_order!r}')
        if scale_dir < 0 or scale_time < 0:
            raise ValueError(f'scale_dir and scale_time must be >= 0, got {scale_dir}, {scale_time}')
        if thresholding and (base != 'dpmpp' or not predict_x0):
            raise ValueError('thresholding clips the data prediction of the dpmpp base: it needs base=dpmpp and '
                             'predict_x0=True')
        side = math.isqrt(int(bottleneck_dim))
        if side < 1 or side * side != bottleneck_dim:
            raise ValueError(f'bottleneck_dim must be a square number of features (64 = 8 x 8), got {bottleneck_dim}')
        self.num_steps = int(num_steps)
        self.base = str(base)
        self.scale_dir = float(scale_dir)
        self.scale_time = float(scale_time)
        self.max_order = int(max_order)
        self.predict_x0 = bool(predict_x0)
        self.lower_order_final = bool(lower_order_final)
        self.thresholding = bool(thresholding)
        self.bottleneck_dim = int(bottleneck_dim)
        self.feature_side = side
        self.settings = dict(settings or {})

        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.map_layer0 = torch.nn.Linear(NOISE_CHANNELS, NOISE_CHANNELS)      # shared by sigma_i and sigma_{i+1}
        self.enc_layer0 = torch.nn.Linear(self.bottleneck_dim, HIDDEN_DIM)
        self.enc_layer1 = torch.nn.Linear(HIDDEN_DIM, ENCODED_DIM)
        self.fc_r = torch.nn.Linear(HEAD_DIM, 1)
        if self.scale_dir > 0:
            self.fc_scale_dir = torch.nn.Linear(HEAD_DIM, 1)
        if self.scale_time > 0:
            self.fc_scale_time = torch.nn.Linear(HEAD_DIM, 1)
        for name in self.layer_names():
            _init_linear(getattr(self, name), 'xavier_uniform' if name == 'map_layer0' else 'kaiming_normal',
                         generator)

    def layer_names(self):
        return [name for name in LAYERS if hasattr(self, name)]

    def hyperparams(self):
        return dict(num_steps=self.num_steps, base=self.base, scale_dir=self.scale_dir, scale_time=self.scale_time,
                    max_order=self.max_order, predict_x0=self.predict_x0, lower_order_final=self.lower_order_final,
                    thresholding=self.thresholding, bottleneck_dim=self.bottleneck_dim)

    @property
    def teacher_forcing(self):
        """Single-step bases start each training step from the teacher's state; multistep bases continue from their
        own (detached) state and carry their history across steps."""
        return self.base in SINGLE_STEP_BASES

    def nfe(self, num_steps):
        """Network calls per image of a run over num_steps time points without AFS: 2 per step, every base."""
        return 2 * (num_steps - 1)

    def parallel_nfe(self, num_steps):
        """What the AMED code reports (without AFS); its count is truthful, so it equals nfe."""
        return self.nfe(num_steps)

    def step(self, net, i, x, sigmas, state=None, extra_args=None, randn_like=None, afs=False):
        return predictor_step(net, self, i, x, sigmas, state, extra_args, afs=afs)

    @classmethod
    def from_official(cls, state, path):
        return from_official(state, path)

    #------------------------------------------------------------------------
    # Forward pass, in float64 whatever the parameters' dtype (a few thousand
    # multiply-adds), so that a sample's coefficients do not depend on the batch.

    def time_embedding(self, sigma):
        """silu(map_layer0(e)) with e the 8-channel sinusoidal embedding of sigma (frequencies 1e-4^(j/3), j = 0..3),
        sines first (EDM's embedding has the cosines first; the AMED code swaps the halves)."""
        weight = self.map_layer0.weight
        half = NOISE_CHANNELS // 2
        freqs = (1 / MAX_POSITIONS) ** (torch.arange(half, dtype=torch.float64, device=weight.device) / (half - 1))
        arg = torch.as_tensor(sigma, dtype=torch.float64, device=weight.device).reshape(-1, 1) * freqs
        return silu(_linear(self.map_layer0, torch.cat([arg.sin(), arg.cos()], dim=1)))

    def forward(self, features, sigma_cur, sigma_next):
        """(r, c, a), each [B] float64, from bottleneck features [B, side, side] and the step's two noise levels."""
        h = features.to(self.map_layer0.weight.device, torch.float64).reshape(features.shape[0], -1)
        if h.shape[1] != self.bottleneck_dim:
            raise ValueError(f'the predictor reads {self.bottleneck_dim} features per sample, got {h.shape[1]}')
        h = _linear(self.enc_layer1, silu(_linear(self.enc_layer0, h)))
        emb = torch.cat([self.time_embedding(sigma_cur), self.time_embedding(sigma_next)], dim=1)
        out = torch.cat([h, emb.expand(h.shape[0], -1)], dim=1)
        r = torch.sigmoid(_linear(self.fc_r, out)).squeeze(1)
        ones = torch.ones_like(r)
        c = 1 + self.scale_dir * torch.tanh(_linear(self.fc_scale_dir, out).squeeze(1) / 2) if self.scale_dir > 0 \
            else ones
        a = 1 + self.scale_time * torch.tanh(_linear(self.fc_scale_time, out).squeeze(1) / 2) if self.scale_time > 0 \
            else ones
        return r, c, a

    #------------------------------------------------------------------------
    # Safe format: one .safetensors file with the layers' weights (float32);
    # hyperparameters and settings as JSON in its metadata. No pickled code.

#----------------------------------------------------------------------------
# Import of the official snapshots: a pickle of {'model': AMED_predictor,
# 'loss_fn': AMED_loss}, persistence-decorated classes of the AMED code's
# training/networks.py and training/loss.py. Read as data (solvers.snapshot);
# nothing embedded runs. The layers are the AMED code's own persistent Linear
# (weight [out, in], bias [out]), so they map one to one onto ours.

OFFICIAL_SETTINGS = ('dataset_name', 'schedule_type', 'schedule_rho', 'afs', 'guidance_type', 'guidance_rate', 'M',
                     'sampler_tea')


def from_official(state, path):
    """An AMEDPredictor with the network and settings of an official snapshot's captured `AMED_predictor`."""
    modules = state['_modules']
    weights = {name: (snapshot.parameter(modules[name], 'weight'), snapshot.parameter(modules[name], 'bias'))
               for name in LAYERS if name in modules}
    embedding = snapshot.module_state(modules['map_noise'])
    base, predict_x0 = state['sampler_stu'], bool(state.get('predict_x0', True))
    if (embedding or {}).get('num_channels') != NOISE_CHANNELS or embedding.get('endpoint') is not True \
            or embedding.get('max_positions') != MAX_POSITIONS:
        raise ValueError(f'{path}: unexpected noise embedding {embedding!r}')
    if 'scale_dir' in state:
        scale_dir, scale_time = float(state['scale_dir']), float(state['scale_time'])
    else:  # the first release: fixed ranges, c in [0.99, 1.01] ([0.95, 1.05] for dpmpp on x0), a in [0.8, 1.2]
        scale_dir = 0.05 if base == 'dpmpp' and predict_x0 else 0.01
        scale_time = 0.2 if state.get('scale_time') else 0.0
    settings = {key: state.get(key) for key in OFFICIAL_SETTINGS}
    settings['schedule_rho'] = None if settings['schedule_rho'] is None else float(settings['schedule_rho'])
    try:
        predictor = AMEDPredictor(
            num_steps=state['num_steps'], base=base, scale_dir=scale_dir, scale_time=scale_time,
            max_order=state.get('max_order') or 3, predict_x0=predict_x0,
            lower_order_final=bool(state.get('lower_order_final', True)),
            thresholding=base == 'dpmpp' and predict_x0,  # the AMED code always clips its data prediction
            bottleneck_dim=weights['enc_layer0'][0].shape[1], settings=settings)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f'{path}: unsupported AMED snapshot ({one_line(e)})') from None
    if set(weights) != set(predictor.layer_names()):
        raise ValueError(f'{path}: layers {sorted(weights)} do not match scale_dir={scale_dir}, '
                         f'scale_time={scale_time}')
    with torch.no_grad():
        for name, (weight, bias) in weights.items():
            layer = getattr(predictor, name)
            if weight.shape != layer.weight.shape or bias.shape != layer.bias.shape:
                raise ValueError(f'{path}: layer {name} has shape {tuple(weight.shape)}, expected '
                                 f'{tuple(layer.weight.shape)}')
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return predictor.requires_grad_(False).eval()

#----------------------------------------------------------------------------
# The bottleneck features. A denoiser names the module whose output AMED reads
# with a string attribute `bottleneck` (a path for get_submodule, set by each
# model family in models/; '' is the denoiser itself); `bottleneck_cond_half`
# says that the module sees [unconditional; conditional] rows (classifier-free
# guidance), of which the conditional half is kept. A wrapper that forwards
# attribute lookups (sample.FixedBatchDenoiser) finds both on the wrapped net;
# when it splits a call into padded chunks, the chunks' outputs are
# concatenated in order and cut to the batch.


def bottleneck_module(net):
    """The module of `net` whose output AMED reads (net.get_submodule(net.bottleneck))."""
    path = getattr(net, 'bottleneck', None)
    if not isinstance(path, str):
        raise ValueError('AMED reads the denoiser\'s bottleneck features, but this denoiser names no bottleneck '
                         'module (a string attribute `bottleneck`, e.g. "model.enc.8x8_block3")')
    lookup = getattr(net, 'get_submodule', None)
    if lookup is None:
        raise ValueError(f'the denoiser names its bottleneck {path!r} but has no get_submodule to find it')
    try:
        return lookup(path)
    except AttributeError:
        raise ValueError(f'the denoiser\'s bottleneck {path!r} is not one of its modules') from None


class BottleneckCapture:
    """`with BottleneckCapture(net) as cap:` records the bottleneck output of the denoiser calls made inside the
    block (detached, averaged over channels); `cap.features(batch, side)` is then [batch, side, side]."""

    def __init__(self, net):
        self.module = bottleneck_module(net)
        self.cond_half = bool(getattr(net, 'bottleneck_cond_half', False))
        self.maps = []

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def _hook(self, module, inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not torch.is_tensor(out) or out.ndim != 4:
            raise ValueError(f'the bottleneck module gives {type(out).__name__} '
                             f'{tuple(getattr(out, "shape", ()))}, not a [B, C, H, W] map')
        out = out.detach()
        if self.cond_half:
            out = out[out.shape[0] // 2:]
        self.maps.append(out.to(torch.promote_types(out.dtype, torch.float32)).mean(dim=1))

    def features(self, batch, side):
        if not self.maps:
            raise ValueError('the denoiser call did not run its bottleneck module')
        f = torch.cat(self.maps)
        if f.shape[0] < batch:
            raise ValueError(f'the bottleneck module saw {f.shape[0]} rows for a batch of {batch}')
        f = f[:batch]
        if tuple(f.shape[1:]) != (side, side):
            f = torch.nn.functional.adaptive_avg_pool2d(f.unsqueeze(1), side).squeeze(1)
        return f


def first_evaluation(net, predictor, x, sigma, extra_args=None, afs=False):
    """(D(x, sigma), features [B, side, side]) for the step's first call: the features come from that very call;
    with AFS (the call replaced by its analytic stand-in) they are zeros."""
    side = predictor.feature_side
    if afs:
        return denoise(net, x, sigma, extra_args, afs=True), x.new_zeros([x.shape[0], side, side])
    with BottleneckCapture(net) as capture:
        denoised = denoise(net, x, sigma, extra_args)
    return denoised, capture.features(x.shape[0], side)

#----------------------------------------------------------------------------
# One step from sigma_i to sigma_{i+1} (d = derivative at the state point,
# s = sigma_{i+1}^r sigma_i^(1-r), d' = (x' - D(x', a s)) / s):
#   amed   x' = x_i + (s - sigma_i) d;  x_{i+1} = x_i + c (sigma_{i+1} - sigma_i) d'
#   euler  x' as amed;  x_{i+1} = x' + c (sigma_{i+1} - s) d'
#   dpm    x' as amed;  x_{i+1} = x_i + c (sigma_{i+1} - sigma_i) [d' / 2r + (1 - 1 / 2r) d]
#   ipndm  x' = x_i + (s - sigma_i) AB(d; H), push d;  x_{i+1} = x' + c (sigma_{i+1} - s) AB(d'; H), push d'
#   dpmpp  two DPM-Solver++ updates on the merged grid, to s (scale 1) and to sigma_{i+1} (scale c)
# State: None for the single-step bases; the history H of detached derivatives
# (newest last, at most max_order - 1) for ipndm; the last 3 model outputs and
# their noise levels for dpmpp.


def _column(v, x):
    return v.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _adams_bashforth(d, history, max_order):
    """iPNDM's fixed Adams-Bashforth combination of the current derivative d and the history (newest last)."""
    weights = AB_WEIGHTS[min(max_order, len(history) + 1)]
    return sum(b * v for b, v in zip(weights, [d, *history[::-1]]))


def _push(history, d, keep):
    return [*history, d.detach()][-keep:] if keep > 0 else []


def predictor_step(net, predictor, i, x, sigmas, state, extra_args=None, afs=False):
    """Step i (sigmas[i] -> sigmas[i + 1], floats) of an AMED predictor of any base: returns (x_next, state).
    Differentiable with respect to the predictor; `afs` replaces the step's first call by the analytic step."""
    t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
    denoised, features = first_evaluation(net, predictor, x, t_cur, extra_args, afs)
    r, c, a = (_column(v, x) for v in predictor(features, t_cur, t_next))
    s = t_next ** r * t_cur ** (1 - r)
    if predictor.base == 'dpmpp':
        return _dpmpp_step(net, predictor, i, x, denoised, t_cur, t_next, s, c, a, state, extra_args)
    d = to_d(x, denoised, t_cur)
    if predictor.base == 'ipndm':
        history, keep = list(state or []), predictor.max_order - 1
        x_mid = x + (s - t_cur) * _adams_bashforth(d, history, predictor.max_order)
        history = _push(history, d, keep)
        d_mid = (x_mid - denoise(net, x_mid, (a * s).reshape(-1), extra_args)) / s
        x_next = x_mid + c * (t_next - s) * _adams_bashforth(d_mid, history, predictor.max_order)
        return x_next, _push(history, d_mid, keep)
    x_mid = x + (s - t_cur) * d
    d_mid = (x_mid - denoise(net, x_mid, (a * s).reshape(-1), extra_args)) / s
    if predictor.base == 'amed':
        return x + c * (t_next - t_cur) * d_mid, None
    if predictor.base == 'euler':
        return x_mid + c * (t_next - s) * d_mid, None
    return x + c * (t_next - t_cur) * (d_mid / (2 * r) + (1 - 1 / (2 * r)) * d), None


def _model_output(predictor, x, denoised, sigma):
    if not predictor.predict_x0:
        return to_d(x, denoised, sigma)
    return dynamic_threshold(denoised) if predictor.thresholding else denoised


def _dpmpp_step(net, predictor, i, x, denoised, t_cur, t_next, s, c, a, state, extra_args):
    """The state point is point k = 2i of the merged grid of 2 num_steps - 1 points, s is point 2i + 1. The stored
    noise level of the second model output is s, not a s. A step begun without its history (state None after
    step 0) runs at the order its history allows."""
    m_hist, t_hist = state if state is not None else ([], [])
    num_points, k = 2 * predictor.num_steps - 1, 2 * i
    m_hist = [*m_hist, _model_output(predictor, x, denoised, t_cur)]
    t_hist = [*t_hist, t_cur]
    order = min(dpmpp_order(k, num_points, predictor.max_order, predictor.lower_order_final), len(m_hist))
    x_mid = dpmpp_update(x, m_hist, t_hist, s, order, predictor.predict_x0)
    denoised_mid = denoise(net, x_mid, (a * s).reshape(-1), extra_args)
    m_hist = [*m_hist, _model_output(predictor, x_mid, denoised_mid, s)]
    t_hist = [*t_hist, s]
    order = min(dpmpp_order(k + 1, num_points, predictor.max_order, predictor.lower_order_final), len(m_hist))
    x_next = dpmpp_update(x_mid, m_hist, t_hist, t_next, order, predictor.predict_x0, scale=c)
    detached = lambda v: v.detach() if torch.is_tensor(v) else v  # noqa: E731
    return x_next, ([m.detach() for m in m_hist[-3:]], [detached(t) for t in t_hist[-3:]])

#----------------------------------------------------------------------------


def amed_nfe(num_steps, predictor=None):
    """Network calls of a run without AFS: 2 per step for every base (the multistep bases take one call per
    point of the merged grid of 2 num_steps - 1 points)."""
    return predictor.nfe(num_steps) if predictor is not None else 2 * (num_steps - 1)


sample_amed = register('amed', nfe=amed_nfe, schedule=('time_uniform', 1))(learned_sampler('amed'))

#----------------------------------------------------------------------------

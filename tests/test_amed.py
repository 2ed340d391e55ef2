"""AMED-Solver and AMED-Plugin: the predictor network and its maps by hand, each base's step by hand on the exact
Gaussian denoiser, the identities with the registry's solvers, NFE against counted calls, the bottleneck hook on
every model family, files, the official snapshot import, and the refusals."""

import builtins
import itertools
import math
import pickle
import sys
import textwrap
import types
from unittest import mock

import pytest
import torch

import solvers
from models.analytic import GaussianMixture
from solvers import amed
from solvers.amed import AMEDPredictor, BottleneckCapture, first_evaluation, predictor_step

#----------------------------------------------------------------------------
# Helpers.


def gaussian():
    return GaussianMixture(torch.full((1, 1, 1, 2), 0.3, dtype=torch.float64), 0.5)


def D(x, sigma):  # the exact denoiser of N(0.3, 0.5^2), by hand
    return 0.3 + 0.25 / (0.25 + sigma ** 2) * (x - 0.3)


def mixture():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 0.5
    return GaussianMixture(means, torch.tensor([0.05, 0.2, 0.4]), weights=[1, 2, 3])


def fixed(p, r, c=None, a=None):
    """Test-only: make the predictor's outputs constant (head weights zero, biases at the inverse maps), in float64."""
    p = p.double().requires_grad_(False)
    with torch.no_grad():
        for name, u in [('fc_r', math.log(r / (1 - r))),
                        ('fc_scale_dir', None if c is None else 2 * math.atanh((c - 1) / p.scale_dir)),
                        ('fc_scale_time', None if a is None else 2 * math.atanh((a - 1) / p.scale_time))]:
            if u is not None:
                getattr(p, name).weight.zero_()
                getattr(p, name).bias.fill_(u)
    return p


class Counting:
    """A wrapper that records each network call's sigma and forwards everything else, as sample.FixedBatchDenoiser."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, x, sigma, **kwargs):
        self.calls.append(torch.as_tensor(sigma).detach().clone())
        return self.net(x, sigma, **kwargs)


def latents(n, shape, seed=0, scale=80.0):
    return torch.randn(n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale

#----------------------------------------------------------------------------
# The network g and its maps.


def network_by_hand(p, features, t_cur, t_next):
    """The predictor's (r, c, a) for one sample, with plain Python arithmetic on its weights."""
    def lin(name, v):
        layer = getattr(p, name)
        return [sum(w * x for w, x in zip(row, v)) + b
                for row, b in zip(layer.weight.double().tolist(), layer.bias.double().tolist())]

    def silu(v):
        return [x / (1 + math.exp(-x)) for x in v]

    def emb(t):
        freqs = [1e-4 ** (j / 3) for j in range(4)]
        return silu(lin('map_layer0', [math.sin(t * f) for f in freqs] + [math.cos(t * f) for f in freqs]))

    h = lin('enc_layer1', silu(lin('enc_layer0', features)))
    out = h + emb(t_cur) + emb(t_next)
    r = 1 / (1 + math.exp(-lin('fc_r', out)[0]))
    c = 1 + p.scale_dir * math.tanh(lin('fc_scale_dir', out)[0] / 2) if p.scale_dir else 1.0
    a = 1 + p.scale_time * math.tanh(lin('fc_scale_time', out)[0] / 2) if p.scale_time else 1.0
    return r, c, a


def test_network_and_maps_by_hand():
    p = AMEDPredictor(4, scale_dir=0.05, scale_time=0.2, seed=1)
    with torch.no_grad():  # biases start at 0; make them matter
        for layer in p.layer_names():
            getattr(p, layer).bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    features = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        r, c, a = p(features, 6.95, 1.29)
    assert r.dtype == c.dtype == a.dtype == torch.float64 and r.shape == (3,)
    for b in range(3):
        expected = network_by_hand(p, features[b].flatten().double().tolist(), 6.95, 1.29)
        assert [float(v[b]) for v in (r, c, a)] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # The reference writes the maps as sigmoid(u) 2s + 1 - s: the same function as 1 + s tanh(u / 2).
    u = torch.tensor([-3.0, 0.0, 0.7], dtype=torch.float64)
    assert torch.allclose(torch.sigmoid(u) * 2 * 0.05 + 1 - 0.05, 1 + 0.05 * torch.tanh(u / 2), atol=1e-15)
    # Samples differ through their features only; the scales stay in their ranges.
    assert len(set(r.tolist())) == 3 and bool(((c - 1).abs() < 0.05).all() and ((a - 1).abs() < 0.2).all())


def test_layers_and_initialisation():
    p = AMEDPredictor(5, seed=0).requires_grad_(False)  # scale_dir 0.01, scale_time 0: no head for a
    shapes = {k: tuple(v.shape) for k, v in p.state_dict().items()}
    assert shapes == {'map_layer0.weight': (8, 8), 'map_layer0.bias': (8,), 'enc_layer0.weight': (128, 64),
                      'enc_layer0.bias': (128,), 'enc_layer1.weight': (4, 128), 'enc_layer1.bias': (4,),
                      'fc_r.weight': (1, 20), 'fc_r.bias': (1,), 'fc_scale_dir.weight': (1, 20),
                      'fc_scale_dir.bias': (1,)}
    assert all(not getattr(p, n).bias.any() for n in p.layer_names())
    # map_layer0: xavier-uniform, bound sqrt(6 / 16); the others N(0, 1 / fan_in).
    assert float(p.map_layer0.weight.abs().max()) <= math.sqrt(6 / 16)
    assert float(p.enc_layer0.weight.std()) == pytest.approx(1 / 8, rel=0.05)
    assert float(p.enc_layer1.weight.std()) == pytest.approx(1 / math.sqrt(128), rel=0.15)
    assert torch.equal(AMEDPredictor(5, seed=0).enc_layer0.weight, p.enc_layer0.weight)
    assert not torch.equal(AMEDPredictor(5, seed=1).enc_layer0.weight, p.enc_layer0.weight)
    _, c, a = p(torch.zeros(2, 8, 8), 80.0, 10.0)
    assert bool((a == 1).all()) and bool((c != 1).all())
    assert AMEDPredictor(5, scale_dir=0).layer_names() == ['map_layer0', 'enc_layer0', 'enc_layer1', 'fc_r']

#----------------------------------------------------------------------------
# One step of each base, by hand.

X = torch.tensor([[[[2.0, -1.0]]], [[[0.5, 3.0]]]], dtype=torch.float64)


@pytest.mark.parametrize('base', ['amed', 'euler', 'dpm'])
@pytest.mark.parametrize('afs', [False, True])
def test_single_step_bases_by_hand(base, afs):
    r, c, a = 0.3, 1.004, 0.9
    p = fixed(AMEDPredictor(3, base=base, scale_dir=0.01, scale_time=0.2), r, c, a)
    out, state = predictor_step(gaussian(), p, 0, X, [4.0, 1.5, 0.5], None, afs=afs)
    assert state is None
    for xv, got in zip(X.flatten().tolist(), out.flatten().tolist()):
        d = xv / math.sqrt(1 + 16) if afs else (xv - D(xv, 4.0)) / 4.0
        s = 1.5 ** r * 4.0 ** (1 - r)
        xm = xv + (s - 4.0) * d
        dm = (xm - D(xm, a * s)) / s
        expected = dict(amed=xv + c * (1.5 - 4.0) * dm, euler=xm + c * (1.5 - s) * dm,
                        dpm=xv + c * (1.5 - 4.0) * (dm / (2 * r) + (1 - 1 / (2 * r)) * d))[base]
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_ipndm_plugin_by_hand():
    """Two steps, max_order 3: both points of each step enter the history; the history is capped at 2."""
    r, c, a = 0.4, 0.995, 1.1
    p = fixed(AMEDPredictor(3, base='ipndm', max_order=3, scale_dir=0.01, scale_time=0.2), r, c, a)
    sig = [4.0, 1.5, 0.5]
    x1, h = predictor_step(gaussian(), p, 0, X, sig, None)
    x2, h2 = predictor_step(gaussian(), p, 1, x1, sig, h)
    assert len(h) == 2 and len(h2) == 2 and not any(v.requires_grad for v in h2)
    for xv, got1, got2 in zip(X.flatten().tolist(), x1.flatten().tolist(), x2.flatten().tolist()):
        dd = lambda v, t: (v - D(v, t)) / t  # noqa: E731
        s0, s1 = 1.5 ** r * 4.0 ** (1 - r), 0.5 ** r * 1.5 ** (1 - r)
        d0 = dd(xv, 4.0)
        xm = xv + (s0 - 4.0) * d0
        d0m = (xm - D(xm, a * s0)) / s0
        y1 = xm + c * (1.5 - s0) * (3 * d0m - d0) / 2
        d1 = dd(y1, 1.5)
        ym = y1 + (s1 - 1.5) * (23 * d1 - 16 * d0m + 5 * d0) / 12
        d1m = (ym - D(ym, a * s1)) / s1
        y2 = ym + c * (0.5 - s1) * (23 * d1m - 16 * d1 + 5 * d0m) / 12
        assert (got1, got2) == pytest.approx((y1, y2), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize('predict_x0', [True, False])
def test_dpmpp_plugin_by_hand(predict_x0):
    """N = 3: merged grid of 5 points, max_order 2 with lower_order_final: orders 1, 2, 2, 1; the model output at
    s is stored at s (not a s); c scales every term of the second update except the x term."""
    r, c, a = 0.45, 1.03, 0.95
    p = fixed(AMEDPredictor(3, base='dpmpp', max_order=2, predict_x0=predict_x0, scale_dir=0.05, scale_time=0.2),
              r, c, a)
    sig = [4.0, 1.5, 0.5]
    x1, state = predictor_step(gaussian(), p, 0, X, sig, None)
    x2, _ = predictor_step(gaussian(), p, 1, x1, sig, state)

    def model(v, t, t_net):
        return D(v, t_net) if predict_x0 else (v - D(v, t_net)) / t

    def update(v, hist, t, scale):  # DPM-Solver++ of order len(hist) (1 or 2), hist = [(m, sigma), ...] newest last
        (m, t_s), h = hist[-1], math.log(hist[-1][1] / t)
        phi = math.expm1(-h) if predict_x0 else math.expm1(h)
        corr = m if len(hist) == 1 else m + 0.5 * (m - hist[-2][0]) / (math.log(hist[-2][1] / t_s) / h)
        return t / t_s * v - scale * phi * corr if predict_x0 else v - scale * t * phi * corr

    for xv, got1, got2 in zip(X.flatten().tolist(), x1.flatten().tolist(), x2.flatten().tolist()):
        s0, s1 = 1.5 ** r * 4.0 ** (1 - r), 0.5 ** r * 1.5 ** (1 - r)
        hist = [(model(xv, 4.0, 4.0), 4.0)]
        xm = update(xv, hist, s0, 1)
        hist.append((model(xm, s0, a * s0), s0))
        y1 = update(xm, hist, 1.5, c)
        hist.append((model(y1, 1.5, 1.5), 1.5))
        ym = update(y1, hist, s1, 1)
        hist.append((model(ym, s1, a * s1), s1))
        y2 = update(ym, hist[-1:], 0.5, c)
        assert (got1, got2) == pytest.approx((y1, y2), rel=1e-12, abs=1e-12)

#----------------------------------------------------------------------------
# Identities with the registry's solvers (c = a = 1, fixed r).


def merged(sigmas, r):
    out = []
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        out += [t_cur, t_next ** r * t_cur ** (1 - r)]
    return torch.tensor(out + [sigmas[-1]], dtype=torch.float64)


def run(p, net, x, sigmas, afs=False):
    return solvers.get_solver('amed')(net, x, sigmas, afs=afs, predictor=p)


CASES = [
    ('amed', 0.5, {}, 'dpm', {}, False),           # x_i + (sigma_{i+1} - sigma_i) d' is DPM-Solver-2 with r = 1/2
    ('dpm', 0.3, {}, 'dpm', dict(r=0.3), False),   # the learned r replaces DPM-Solver-2's
    ('euler', 0.4, {}, 'euler', {}, True),         # two Euler sub-steps: Euler on the merged grid
    *[('ipndm', 0.4, dict(max_order=o), 'ipndm', dict(max_order=o), True) for o in [1, 2, 3, 4]],
    *[('dpmpp', 0.4, dict(max_order=o, predict_x0=x0, lower_order_final=lof), 'dpmpp',
       dict(max_order=o, predict_x0=x0, lower_order_final=lof), True)
      for o, x0, lof in itertools.product([1, 2, 3], [True, False], [True, False])],
    ('dpmpp', 0.4, dict(thresholding=True), 'dpmpp', dict(thresholding=True), True),
]


@pytest.mark.parametrize('base,r,opts,solver,solver_opts,on_merged', CASES)
@pytest.mark.parametrize('afs', [False, True])
def test_identities_with_the_base_solvers(base, r, opts, solver, solver_opts, on_merged, afs):
    net = mixture()
    sigmas = solvers.get_schedule(6, 0.002, 80, 'polynomial', 7)
    p = fixed(AMEDPredictor(6, base=base, scale_dir=0.01, scale_time=0.2, **opts), r, c=1.0, a=1.0)
    x = latents(3, net.shape)
    ours = run(p, net, x, sigmas, afs=afs)
    grid = merged(sigmas.tolist(), float(torch.sigmoid(p.fc_r.bias))) if on_merged else sigmas
    theirs = solvers.get_solver(solver)(net, x, grid, afs=afs, **solver_opts)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_thresholding_changes_the_dpmpp_plugin():
    """Data leaving [-1, 1] is clipped with thresholding, so the option is live (the identity above covers it)."""
    net = GaussianMixture(torch.full((1, 1, 4, 4), 1.5, dtype=torch.float64), 0.5)
    sigmas = solvers.get_schedule(4, 0.002, 80, 'logsnr', 1)
    x = latents(2, net.shape)
    plain = run(fixed(AMEDPredictor(4, base='dpmpp'), 0.4), net, x, sigmas)
    clipped = run(fixed(AMEDPredictor(4, base='dpmpp', thresholding=True), 0.4), net, x, sigmas)
    assert float((plain - clipped).abs().max()) > 0.1

#----------------------------------------------------------------------------
# NFE: counted calls, and where they are made.


@pytest.mark.parametrize('base', amed.BASES)
def test_network_calls_match_nfe(base):
    for num_steps, afs in itertools.product([2, 3, 5], [False, True]):
        p = fixed(AMEDPredictor(num_steps, base=base, scale_time=0.2, max_order=3), 0.35, a=0.9)
        net = Counting(mixture())
        sigmas = solvers.get_schedule(num_steps, 0.002, 80, 'polynomial', 7)
        run(p, net, latents(2, net.shape), sigmas, afs=afs)
        expected = 2 * (num_steps - 1) - afs
        assert len(net.calls) == expected == solvers.nfe('amed', num_steps, afs=afs, predictor=p)
        assert p.nfe(num_steps) - afs == p.parallel_nfe(num_steps) - afs == expected
        # Every base evaluates the merged grid sigma_0, a s_0, sigma_1, a s_1, ... (the first one skipped by AFS).
        grid = merged(sigmas.tolist(), float(torch.sigmoid(p.fc_r.bias)))[:-1]
        levels = grid * torch.tensor([1.0, 0.9] * (num_steps - 1), dtype=torch.float64)
        called = torch.stack([v.reshape(-1)[0].double() for v in net.calls])
        assert torch.allclose(called, levels[int(afs):], rtol=1e-14)
    assert solvers.nfe('amed', 7) == 12 and amed.amed_nfe(7) == 12

#----------------------------------------------------------------------------
# Bottleneck features: the hook, the stand-in of the analytic denoisers, zeros with AFS, wrappers and chunks.


def test_analytic_stand_in_and_afs_zeros():
    net, p = gaussian(), AMEDPredictor(3)
    x = X * 3
    denoised, f = first_evaluation(net, p, x, 2.0)
    assert f.shape == (2, 8, 8) and torch.equal(denoised, net(x, torch.tensor([2.0, 2.0])))
    for b in range(2):  # the 1x2 output D(x), pooled to 8x8: each half of every row is one of its values
        d0, d1 = (D(v, 2.0) for v in x[b].flatten().tolist())
        assert f[b, :, :4].flatten().tolist() == pytest.approx([d0] * 32, abs=1e-14)
        assert f[b, :, 4:].flatten().tolist() == pytest.approx([d1] * 32, abs=1e-14)
    _, zeros = first_evaluation(Counting(net), p, x, 80.0, afs=True)
    assert zeros.shape == (2, 8, 8) and not zeros.any()


def test_chunked_calls_give_the_unchunked_features():
    """sample.FixedBatchDenoiser splits a call into padded chunks; the captures are joined in order and cut."""
    import sample
    net, p = mixture(), AMEDPredictor(3)
    x = latents(5, net.shape, scale=3.0)
    _, whole = first_evaluation(net, p, x, 2.0)
    wrapped = sample.FixedBatchDenoiser(net, 2)
    with BottleneckCapture(wrapped) as capture:
        wrapped(x, torch.full([5], 2.0, dtype=torch.float64))
    assert [m.shape[0] for m in capture.maps] == [2, 2, 2]
    _, chunked = first_evaluation(wrapped, p, x, 2.0)
    assert torch.equal(chunked, whole)


def edm_explicit(net, x, sigma, class_labels=None):
    """The repository's EDM UNet run by hand up to the end of its encoder (models/edm.py)."""
    m, s = net.model, torch.full([x.shape[0], 1, 1, 1], sigma)
    c_in, c_noise = 1 / (net.sigma_data ** 2 + s ** 2).sqrt(), (s.log() / 4).flatten()
    emb = m.map_noise(c_noise)
    if class_labels is not None:
        emb = emb + m.map_label(class_labels * math.sqrt(class_labels.shape[1]))
    emb = torch.nn.functional.silu(m.map_layer1(torch.nn.functional.silu(m.map_layer0(emb))))
    h = m.conv_in(c_in * x.float())
    for blk in m.enc:
        h = blk(h, emb)
    return h


def openai_explicit(unet, x_in, t, y=None):
    """An openai UNet run by hand through its input blocks and middle block (models/openai_unet.py)."""
    from models.openai_unet import timestep_embedding
    emb = unet.time_embed(timestep_embedding(t, unet.model_channels))
    if y is not None:
        emb = emb + unet.label_emb(y)
    h = x_in
    for module in unet.input_blocks:
        h = module(h, emb)
    return unet.middle_block(h, emb)


def pooled(maps):
    f = maps.double().mean(1)
    return f if f.shape[-1] == 8 else torch.nn.functional.adaptive_avg_pool2d(f.unsqueeze(1), 8).squeeze(1)


def check_features(net, x, sigma, expected_map, extra_args=None, module=None):
    """Features from the hook during one denoiser call == the explicit map; one call only."""
    p = AMEDPredictor(3)
    if module is not None:
        assert net.get_submodule(net.bottleneck) is module
    counting = Counting(net)
    _, f = first_evaluation(counting, p, x, sigma, extra_args)
    assert len(counting.calls) == 1 and f.shape == (x.shape[0], 8, 8)
    expected = pooled(expected_map.detach())
    assert torch.allclose(f.double(), expected, rtol=1e-5, atol=1e-6 * (1 + float(expected.abs().max())))
    return f


def test_features_of_the_edm_family():
    from models import edm, load_model
    digits = load_model('digits')
    assert digits.bottleneck == f'model.enc.{len(digits.model.enc) - 1}'
    x = latents(3, (1, 8, 8), scale=1.5)
    check_features(digits, x, 1.5, edm_explicit(digits, x, 1.5), module=digits.model.enc[-1])
    # Lowest resolution of the digits model: 2x2, pooled (replicated) to 8x8.
    assert edm_explicit(digits, x, 1.5).shape[-1] == 2
    cond = edm.EDMPrecond(8, 1, label_dim=4, model_channels=16, channel_mult=[1, 2], num_blocks=1)
    labels = torch.eye(4)[[0, 2, 3]]
    check_features(cond, x, 0.7, edm_explicit(cond, x, 0.7, labels), dict(class_labels=labels))


EDM_PICKLE_SRC = '''
    """An EDM-style network whose encoder is a ModuleDict named as EDM's (test fixture)."""
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class Block(torch.nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
            self.emb = torch.nn.Linear(1, channels)

        def forward(self, x, emb):
            return torch.nn.functional.silu(self.conv(x) + self.emb(emb).reshape(x.shape[0], -1, 1, 1))

    @persistence.persistent_class
    class TinySongUNet(torch.nn.Module):
        def __init__(self, channels, hidden):
            super().__init__()
            self.enc = torch.nn.ModuleDict({'8x8_conv': torch.nn.Conv2d(channels, hidden, 3, padding=1)})
            for i in range(4):
                self.enc[f'8x8_block{i}'] = Block(hidden)
            self.out = torch.nn.Conv2d(hidden, channels, 3, padding=1)

        def forward(self, x, noise_labels, class_labels=None):
            emb = noise_labels.reshape(-1, 1)
            h = self.enc['8x8_conv'](x)
            for name, blk in self.enc.items():
                if name != '8x8_conv':
                    h = blk(h, emb)
            return self.out(h)

    @persistence.persistent_class
    class EDMPrecond(torch.nn.Module):
        def __init__(self, img_resolution, img_channels, label_dim=0, sigma_data=0.5, hidden=8):
            super().__init__()
            self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
            self.sigma_min, self.sigma_max, self.sigma_data = 0, float('inf'), sigma_data
            self.model = TinySongUNet(img_channels, hidden)

        def forward(self, x, sigma, class_labels=None, **kwargs):
            sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
            c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
            c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
            c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
            F_x = self.model(c_in * x.to(torch.float32), (sigma.log() / 4).flatten())
            return c_skip * x + c_out * F_x

        def round_sigma(self, sigma):
            return torch.as_tensor(sigma)
'''


def test_features_of_an_edm_pickle(tmp_path, monkeypatch):
    from models import edm_bottleneck, load_model
    module_name = 'tiny_edm_for_amed'
    (tmp_path / f'{module_name}.py').write_text(textwrap.dedent(EDM_PICKLE_SRC))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(module_name)
    torch.manual_seed(0)
    for label_dim in (0, 10):
        with open(tmp_path / f'net{label_dim}.pkl', 'wb') as f:
            pickle.dump(dict(ema=module.EDMPrecond(8, 2, label_dim=label_dim)), f)
    monkeypatch.delitem(sys.modules, module_name)
    x = latents(3, (2, 8, 8), scale=2.0).float()
    for label_dim, block in [(0, '8x8_block3'), (10, '8x8_block2')]:
        net = load_model(str(tmp_path / f'net{label_dim}.pkl'))
        assert net.bottleneck == f'model.enc.{block}'
        m, s = net.model, torch.full([3, 1, 1, 1], 0.9)
        h, emb = m.enc['8x8_conv'](x / (0.25 + s ** 2).sqrt()), (s.log() / 4).reshape(-1, 1)
        for i in range(int(block[-1]) + 1):
            h = m.enc[f'8x8_block{i}'](h, emb)
        check_features(net, x, 0.9, h, module=m.enc[block])
    # The rule on its own: a net without the named block gets its last encoder block; no ModuleDict, no location.
    enc = torch.nn.ModuleDict({'16x16_block0': torch.nn.Identity(), '4x4_block1': torch.nn.Identity()})
    assert edm_bottleneck(types.SimpleNamespace(model=types.SimpleNamespace(enc=enc), label_dim=0)) == \
        'model.enc.4x4_block1'
    assert edm_bottleneck(types.SimpleNamespace(model=torch.nn.Identity(), label_dim=0)) is None


OPENAI_ARCH = dict(
    cm=dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult='1,1', attention_resolutions='8',
            num_head_channels=16, use_scale_shift_norm=False, resblock_updown=True, dropout=0.0),
    adm=dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult='1,1,1', attention_resolutions='8',
             num_head_channels=16, class_cond=True, learn_sigma=True, num_classes=10),
    cls=dict(image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions='8',
             num_head_channels=16, num_classes=10),
    ldm=dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
             num_res_blocks=1, channel_mult=[1, 1], num_head_channels=16, embed_dim=3, n_embed=16,
             ddconfig=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=16, attn_resolutions=[]),
             linear_start=0.0015, linear_end=0.0195, timesteps=1000))


def test_features_of_the_openai_families():
    from models import adapters, zoo
    torch.manual_seed(0)
    cm = adapters.CMDenoiser(adapters.build_cm(OPENAI_ARCH['cm']))
    adm = adapters.ADMGuidedDenoiser(adapters.build_adm(OPENAI_ARCH['adm']),
                                     adapters.build_classifier(OPENAI_ARCH['cls']), guidance_rate=1.0)
    unet, vq, acp, _ = adapters.ldm_parts(dict(zoo.ZOO['lsun_bedroom_ldm'].arch['model'], **OPENAI_ARCH['ldm']))
    ldm = adapters.LDMDenoiser(unet, vq, acp)
    # The level as the denoiser receives it: denoise() gives sigma in the state's dtype (float32 here).
    sigma = torch.tensor(1.7, dtype=torch.float32).double()
    for net in (cm, adm, ldm):
        for p in net.parameters():  # the originals zero their output layers; random weights everywhere
            torch.nn.init.normal_(p, 0, 0.2)
        x = latents(3, (net.img_channels, net.img_resolution, net.img_resolution), scale=1.7).float()
        vp = (x.double() / torch.sqrt(1 + sigma ** 2)).float()  # scaled in float64, as the adapters
        if net is cm:
            expected = openai_explicit(net.unet, (x.double() / torch.sqrt(sigma ** 2 + 0.25)).float(),
                                       (250 * torch.log(sigma)).float().expand(3))
            extra = None
        elif net is adm:
            y = torch.tensor([1, 4, 9])
            expected = openai_explicit(net.unet, vp, net.network_time(sigma).float().expand(3), y)
            extra = dict(class_labels=y)
        else:
            expected = openai_explicit(net.unet, vp, net.network_time(sigma).float().expand(3))
            extra = None
        check_features(net, x, 1.7, expected, extra, module=net.unet.middle_block)


def test_openai_network_inputs_do_not_depend_on_the_state_dtype():
    """The UNet sees the same float32 input and time for a float32 and a float64 state: the coefficients are
    computed in float64 (a time computed in float32 was a float32 step off, 364.13544 for 364.13547 at sigma 1.7,
    and the ADM features moved by 1e-4)."""
    from models import adapters, zoo
    torch.manual_seed(0)
    unet, vq, acp, _ = adapters.ldm_parts(dict(zoo.ZOO['lsun_bedroom_ldm'].arch['model'], **OPENAI_ARCH['ldm']))
    nets = (adapters.CMDenoiser(adapters.build_cm(OPENAI_ARCH['cm'])),
            adapters.ADMGuidedDenoiser(adapters.build_adm(OPENAI_ARCH['adm']), guidance_rate=0),
            adapters.LDMDenoiser(unet, vq, acp))
    for net in nets:
        x = latents(3, (net.img_channels, net.img_resolution, net.img_resolution), scale=1.7).float()
        extra = dict(class_labels=torch.tensor([1, 4, 9])) if net.label_dim else {}
        seen = []
        handle = net.unet.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[:2]))
        try:
            with torch.no_grad():
                for state in (x, x.double()):
                    net(state, torch.tensor(1.7, dtype=torch.float32).to(state.dtype), **extra)
        finally:
            handle.remove()
        (x32, t32), (x64, t64) = seen
        assert t32.dtype == t64.dtype == torch.float32 and torch.equal(t32, t64) and torch.equal(x32, x64)


@pytest.fixture(scope='module')
def tiny_sd():
    """A tiny random Stable Diffusion UNet in the SD adapter (no VAE or text encoder: conditions given directly)."""
    pytest.importorskip('diffusers')
    from diffusers import UNet2DConditionModel

    from models.sd import SDDenoiser
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                                up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    ns = types.SimpleNamespace
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    net = SDDenoiser(unet, ns(config=ns(block_out_channels=(8, 16))), ns(config=ns(hidden_size=32)), None,
                     torch.cumprod(1 - betas, 0), guidance_rate=7.5)
    g = torch.Generator().manual_seed(1)
    return net, torch.randn(3, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)


def test_features_of_stable_diffusion(tiny_sd):
    """The conditional half of the guided batch; the mid block's input is taken at the call and the block rerun."""
    net, c, uc = tiny_sd
    assert net.get_submodule(net.bottleneck) is net.unet.mid_block and net.bottleneck_cond_half
    x = latents(3, (4, 8, 8), scale=2.0).float()
    extra = dict(condition=c, unconditional_condition=uc)
    seen = []
    handle = net.unet.mid_block.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)),
                                                          with_kwargs=True)
    try:
        counting = Counting(net)
        _, f = first_evaluation(counting, AMEDPredictor(3), x, 2.0, extra)
    finally:
        handle.remove()
    assert len(counting.calls) == 1 and len(seen) == 1
    args, kwargs = seen[0]
    with torch.no_grad():
        out = net.unet.mid_block(*args, **kwargs)
    assert out.shape[0] == 6
    assert torch.allclose(f.double(), pooled(out[3:]), atol=1e-6)
    assert not torch.allclose(f.double(), pooled(out[:3]), atol=1e-3)
    # Without guidance the UNet sees the conditional rows alone, and gives the same features.
    net.guidance_rate = 1.0
    try:
        assert not net.bottleneck_cond_half
        _, f1 = first_evaluation(net, AMEDPredictor(3), x, 2.0, dict(condition=c))
    finally:
        net.guidance_rate = 7.5
    assert torch.allclose(f1, f, atol=1e-5)


def test_sd_run_makes_no_extra_unet_call(tiny_sd):
    """A whole AMED run on the guided SD model: one UNet pass (on the doubled batch) per counted call, 2 per step."""
    import sample
    net, c, uc = tiny_sd
    passes = []
    handle = net.unet.register_forward_pre_hook(lambda m, args: passes.append(args[0].shape[0]))
    try:
        p = AMEDPredictor(4, base='dpmpp', predict_x0=False, scale_dir=0, scale_time=0.2, seed=0)
        wrapped = sample.FixedBatchDenoiser(net, 2)  # chunks of 2 rows: 3 images make 2 chunks per call
        sigmas = solvers.get_schedule(4, net.sigma_min, net.sigma_max, 'discrete', 1, net=net)
        x = latents(3, (4, 8, 8), scale=float(sigmas[0])).float()
        out = solvers.get_solver('amed')(wrapped, x, sigmas, dict(condition=c, unconditional_condition=uc), afs=True,
                                         predictor=p)
    finally:
        handle.remove()
    assert torch.isfinite(out).all()
    assert passes == [4] * 2 * solvers.nfe('amed', 4, afs=True, predictor=p)

#----------------------------------------------------------------------------
# Training policy and gradients.


def test_training_policy_and_gradients():
    for base in amed.BASES:
        p = AMEDPredictor(4, base=base)
        assert p.detach_state is True and p.teacher_forcing == (base in ('amed', 'euler', 'dpm'))
    net = mixture()
    p = AMEDPredictor(4, base='amed', scale_dir=0.05, scale_time=0.2, seed=0)
    sigmas = solvers.get_schedule(4, 0.002, 80, 'polynomial', 7).tolist()
    x = latents(2, net.shape, scale=sigmas[1])
    out, _ = predictor_step(net, p, 1, x, sigmas, None)
    out.square().sum().backward()
    for name, param in p.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    q = AMEDPredictor(4, base='dpmpp', scale_time=0.2, seed=0)
    _, state = predictor_step(net, q, 0, latents(2, net.shape), sigmas, None)
    out, state = predictor_step(net, q, 1, x, sigmas, state)
    assert out.requires_grad and not any(torch.is_tensor(v) and v.requires_grad for part in state for v in part)

#----------------------------------------------------------------------------
# Files.


def test_save_load_round_trip(tmp_path):
    net = mixture()
    sigmas = solvers.get_schedule(5, 0.002, 80, 'polynomial', 7)
    settings = dict(dataset_name='digits', schedule_type='polynomial', schedule_rho=7.0, afs=True)
    for base in amed.BASES:
        p = AMEDPredictor(5, base=base, scale_time=0.2, max_order=2, seed=3, settings=settings)
        p.save(tmp_path / f'{base}.safetensors')
        q = AMEDPredictor.load(tmp_path / f'{base}.safetensors')
        assert q.hyperparams() == p.hyperparams() and q.settings == settings and not q.training
        x = latents(3, net.shape)
        assert torch.equal(run(p, net, x, sigmas, afs=True), run(q, net, x, sigmas, afs=True))


def test_load_refusals(tmp_path):
    (tmp_path / 'junk').write_bytes(b'not a file')
    with pytest.raises(ValueError, match='cannot read AMED predictor'):
        AMEDPredictor.load(tmp_path / 'junk')
    with pytest.raises(ValueError, match='cannot read AMED predictor'):
        AMEDPredictor.load(tmp_path / 'missing.safetensors')
    solvers.adasde.AdaSDEPredictor(4).save(tmp_path / 'adasde.safetensors')
    with pytest.raises(ValueError, match="not an AMED predictor file \\(format 'adasde-predictor'\\)"):
        AMEDPredictor.load(tmp_path / 'adasde.safetensors')
    with open(tmp_path / 'other.pkl', 'wb') as f:
        pickle.dump(dict(model=None, loss_fn=None), f)
    with pytest.raises(ValueError, match='not an AMED snapshot'):
        AMEDPredictor.load(tmp_path / 'other.pkl')

#----------------------------------------------------------------------------
# The official snapshot: the reference's module and class names, persistence meta dicts, a cuda:0 tensor.

REFERENCE_NETWORKS = '''
    import builtins
    import numpy as np
    import torch
    from torch_utils import persistence
    from torch.nn.functional import silu

    builtins.AMED_SOURCE_RUNS = getattr(builtins, 'AMED_SOURCE_RUNS', 0) + 1

    @persistence.persistent_class
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) / np.sqrt(in_features))
            self.bias = torch.nn.Parameter(torch.randn(out_features) * 0.3)

        def forward(self, x):
            return x @ self.weight.to(x.dtype).t() + self.bias.to(x.dtype)

    @persistence.persistent_class
    class PositionalEmbedding(torch.nn.Module):
        def __init__(self, num_channels, max_positions=10000, endpoint=False):
            super().__init__()
            self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

        def forward(self, x):
            freqs = torch.arange(self.num_channels // 2, dtype=torch.float64)
            freqs = (1 / self.max_positions) ** (freqs / (self.num_channels // 2 - (1 if self.endpoint else 0)))
            x = x.ger(freqs.to(x.dtype))
            return torch.cat([x.cos(), x.sin()], dim=1)

    @persistence.persistent_class
    class AMED_predictor(torch.nn.Module):
        def __init__(self, num_steps, sampler_stu, scale_dir, scale_time, first_release=False, **settings):
            super().__init__()
            self.num_steps, self.sampler_stu, self.max_order = num_steps, sampler_stu, 4
            self.predict_x0, self.lower_order_final = False, True
            for key, value in settings.items():
                setattr(self, key, value)
            self.scale_dir = scale_dir
            self.scale_time = scale_time
            self.map_noise = PositionalEmbedding(num_channels=8, endpoint=True)
            self.map_layer0 = Linear(8, 8)
            self.enc_layer0 = Linear(64, 128)
            self.enc_layer1 = Linear(128, 4)
            self.fc_r = Linear(20, 1)
            if scale_dir:
                self.fc_scale_dir = Linear(20, 1)
            if scale_time:
                self.fc_scale_time = Linear(20, 1)
            self.sigmoid = torch.nn.Sigmoid()
            if first_release:  # the first release had no scale_dir attribute and a boolean scale_time
                del self.scale_dir
                self.scale_time = bool(scale_time)

        def forward(self, bottleneck, t_cur, t_next):
            def emb(t):
                e = self.map_noise(t.reshape(1,))
                e = e.reshape(e.shape[0], 2, -1).flip(1).reshape(*e.shape)
                return silu(self.map_layer0(e)).repeat(bottleneck.shape[0], 1)
            h = self.enc_layer1(silu(self.enc_layer0(bottleneck.reshape(bottleneck.shape[0], -1))))
            out = torch.cat((h, emb(t_cur), emb(t_next)), dim=1)
            r = self.sigmoid(self.fc_r(out))
            if not hasattr(self, 'scale_dir'):  # the first release's fixed maps
                wide = self.sampler_stu == 'dpmpp' and self.predict_x0
                c = self.sigmoid(self.fc_scale_dir(out)) / 10 + 0.95 if wide else \
                    self.sigmoid(self.fc_scale_dir(out)) / 50 + 0.99
                return r, c, self.sigmoid(self.fc_scale_time(out)) / 2.5 + 0.8
            c = self.sigmoid(self.fc_scale_dir(out)) / (1 / (2 * self.scale_dir)) + (1 - self.scale_dir)
            a = self.sigmoid(self.fc_scale_time(out)) / (1 / (2 * self.scale_time)) + (1 - self.scale_time)
            return r, c, a
'''

REFERENCE_LOSS = '''
    from torch_utils import persistence
    import solvers_amed

    @persistence.persistent_class
    class AMED_loss:
        def __init__(self, t_steps, buffer):
            self.solver_stu = solvers_amed.ipndm_sampler
            self.t_steps, self.buffer_model, self.tea_slice = t_steps, buffer, [2, 4, 6]
'''


@pytest.fixture
def reference_modules(reference_package, monkeypatch):
    """The reference's training/networks.py, training/loss.py and solvers_amed.py (as fixtures), importable."""
    reference_package({'training/__init__.py': '', 'training/networks.py': REFERENCE_NETWORKS,
                       'training/loss.py': REFERENCE_LOSS,
                       'solvers_amed.py': 'def ipndm_sampler(*args, **kwargs):\n    raise RuntimeError\n'})
    monkeypatch.setattr(builtins, 'AMED_SOURCE_RUNS', 0, raising=False)
    from training import loss, networks
    return networks, loss


def write_snapshot(path, model, loss_fn):
    with mock.patch('torch.serialization.location_tag', lambda storage: 'cuda:0'):  # as saved from a GPU
        with open(path, 'wb') as f:
            pickle.dump(dict(model=model, loss_fn=loss_fn), f)
    assert b'cuda:0' in path.read_bytes()


SETTINGS = dict(dataset_name='cifar10', schedule_type='polynomial', schedule_rho=7, afs=True, guidance_type=None,
                guidance_rate=0.0, M=2, sampler_tea='ipndm', img_resolution=32)


def test_official_snapshot_import(tmp_path, reference_modules):
    networks, loss = reference_modules
    torch.manual_seed(0)
    official = networks.AMED_predictor(4, 'ipndm', 0.01, 0.2, **SETTINGS).eval()
    loss_fn = loss.AMED_loss(torch.tensor([80.0, 9.72, 0.79, 0.002]), [torch.randn(2, 3)])
    write_snapshot(tmp_path / 'network-snapshot-000010.pkl', official, loss_fn)
    for name in ('training.networks', 'training.loss', 'training', 'solvers_amed'):
        del sys.modules[name]
    assert builtins.AMED_SOURCE_RUNS == 1

    p = AMEDPredictor.load(tmp_path / 'network-snapshot-000010.pkl')  # a pickle, by content
    assert builtins.AMED_SOURCE_RUNS == 1 and not any(m.startswith('_imported_module_') and
                                                      hasattr(sys.modules[m], 'AMED_predictor') for m in sys.modules)
    assert p.hyperparams() == dict(num_steps=4, base='ipndm', scale_dir=0.01, scale_time=0.2, max_order=4,
                                   predict_x0=False, lower_order_final=True, thresholding=False, bottleneck_dim=64)
    assert p.settings == dict(dataset_name='cifar10', schedule_type='polynomial', schedule_rho=7.0, afs=True,
                              guidance_type=None, guidance_rate=0.0, M=2, sampler_tea='ipndm')
    assert torch.equal(p.enc_layer0.weight, official.enc_layer0.weight.detach())
    assert torch.equal(p.fc_scale_time.bias, official.fc_scale_time.bias.detach())
    # The imported network gives the reference's (r, c, a) (its maps written the reference's way).
    features = torch.randn(3, 8, 8, dtype=torch.float64)
    t_cur, t_next = torch.tensor(9.72, dtype=torch.float64), torch.tensor(0.79, dtype=torch.float64)
    with torch.no_grad():
        theirs = official.double()(features, t_cur, t_next)
    for ours, ref in zip(p(features, 9.72, 0.79), theirs):
        assert torch.allclose(ours, ref.reshape(-1), rtol=1e-12, atol=1e-12)
    # The loss function's GPU tensor came back on the CPU; its solver function is an inert placeholder.
    loss_state = solvers.snapshot.load_snapshot(tmp_path / 'network-snapshot-000010.pkl')['loss_fn'].state
    assert loss_state['t_steps'].device.type == 'cpu' and loss_state['t_steps'][1] == pytest.approx(9.72)
    assert loss_state['solver_stu'] is solvers.snapshot.Placeholder


def test_official_snapshot_of_the_first_release(tmp_path, reference_modules):
    """No scale_dir attribute, scale_time a bool: the ranges were fixed (c in 1 +- 0.05 for dpmpp on x0)."""
    networks, loss = reference_modules
    official = networks.AMED_predictor(3, 'dpmpp', 0.05, 0.2, first_release=True, **SETTINGS)
    official.predict_x0, official.max_order = True, 3
    write_snapshot(tmp_path / 'old.pkl', official, None)
    p = AMEDPredictor.load_official(tmp_path / 'old.pkl')
    assert (p.base, p.scale_dir, p.scale_time, p.thresholding) == ('dpmpp', 0.05, 0.2, True)
    features = torch.randn(2, 8, 8, dtype=torch.float64)
    theirs = official.double()(features, torch.tensor(80.0, dtype=torch.float64), torch.tensor(2.0).double())
    for ours, ref in zip(p(features, 80.0, 2.0), theirs):
        assert torch.allclose(ours, ref.detach().reshape(-1), rtol=1e-12, atol=1e-12)
    official = networks.AMED_predictor(3, 'amed', 0.01, 0, **SETTINGS)  # no fc_scale_time: a = 1
    write_snapshot(tmp_path / 'amed.pkl', official, None)
    p = AMEDPredictor.load_official(tmp_path / 'amed.pkl')
    assert p.layer_names() == ['map_layer0', 'enc_layer0', 'enc_layer1', 'fc_r', 'fc_scale_dir']

#----------------------------------------------------------------------------
# Refusals.


def test_refusals():
    net, x = gaussian(), X
    sigmas = solvers.get_schedule(4, 0.002, 80)
    with pytest.raises(ValueError, match='trained for num_steps=5, not 4'):
        run(AMEDPredictor(5), net, x, sigmas)
    with pytest.raises(ValueError, match="'amed' solver needs a trained predictor"):
        solvers.get_solver('amed')(net, x, sigmas)

    def bare(x, sigma):
        return net(x, sigma)
    with pytest.raises(ValueError, match='names no bottleneck module'):
        run(AMEDPredictor(4), bare, x, sigmas)
    bare.bottleneck = 'model.enc'
    with pytest.raises(ValueError, match='has no get_submodule'):
        run(AMEDPredictor(4), bare, x, sigmas)
    wrong = gaussian()
    wrong.bottleneck = 'model.enc.8x8_block3'
    with pytest.raises(ValueError, match="bottleneck 'model.enc.8x8_block3' is not one of its modules"):
        run(AMEDPredictor(4), wrong, x, sigmas)
    # A one-step run with AFS never calls the network at the state point, so it reads no features (zeros).
    assert torch.isfinite(run(AMEDPredictor(2), wrong, x, solvers.get_schedule(2, 0.002, 80), afs=True)).all()
    for kwargs, match in [(dict(base='heun'), "unknown AMED base 'heun'"),
                          (dict(base='dpmpp', max_order=4), 'max_order must be 1 to 3 for the dpmpp base'),
                          (dict(base='ipndm', max_order=5), 'max_order must be 1 to 4'),
                          (dict(base='dpmpp', thresholding=True, predict_x0=False), 'needs base=dpmpp and predict_x0'),
                          (dict(thresholding=True), 'needs base=dpmpp'),
                          (dict(bottleneck_dim=60), 'must be a square number'),
                          (dict(scale_dir=-0.1), 'must be >= 0')]:
        with pytest.raises(ValueError, match=match):
            AMEDPredictor(4, **kwargs)
    with pytest.raises(ValueError, match='must be a square'):
        AMEDPredictor(4, bottleneck_dim=0)
    with pytest.raises(ValueError, match='num_steps >= 2'):
        AMEDPredictor(1)
    with pytest.raises(ValueError, match="trained for dataset_name='digits', not 'cifar10'"):
        AMEDPredictor(4, settings=dict(dataset_name='digits')).check_compatible(dataset_name='cifar10')
    with pytest.raises(ValueError, match='reads 64 features per sample, got 16'):
        AMEDPredictor(4)(torch.zeros(2, 4, 4), 1.0, 0.5)

#----------------------------------------------------------------------------

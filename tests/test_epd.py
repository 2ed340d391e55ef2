"""EPD-Solver and EPD-Plugin (solvers/epd.py): the maps, each step by hand on the exact Gaussian denoiser, the
DPM-Solver-2 identity, batched = sequential (conditioning repeated per point), NFE against counted calls, the
training policy, files, the official snapshot import and the released tables."""

import itertools
import math
import pickle
import sys

import pytest
import torch

import solvers
from models.analytic import GaussianMixture
from models.edm import EDMPrecond
from solvers.common import denoise, repeat_rows
from solvers.epd import EPDPredictor, predictor_step

#----------------------------------------------------------------------------
# The exact denoiser of N(0.3, 0.5^2) per coordinate, as a model and by hand.


def gaussian():
    return GaussianMixture(torch.full((1, 1, 1, 2), 0.3, dtype=torch.float64), 0.5)


def D(x, sigma):
    return 0.3 + 0.25 / (0.25 + sigma ** 2) * (x - 0.3)


def d(x, sigma):
    return (x - D(x, sigma)) / sigma


def sig(u):
    return 1 / (1 + math.exp(-u))


def set_tables(p, **tables):
    with torch.no_grad():
        for name, value in tables.items():
            getattr(p, name).copy_(torch.as_tensor(value, dtype=torch.float32))
    return p.requires_grad_(False)


def start(batch=3, seed=0, sigma=80.0):
    return torch.randn(batch, 1, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * sigma

#----------------------------------------------------------------------------
# Maps.


def test_maps_by_hand():
    raw = [[0.0, 1.0, -2.5], [-2.0, 0.5, 3.0]]
    p = set_tables(EPDPredictor(3, num_points=3, scale_dir=0.05, scale_time=0.2, seed=0), r_params=raw,
                   scale_dir_params=raw, scale_time_params=raw, weight_params=raw)
    u = [float(v) for v in torch.tensor(raw[1], dtype=torch.float32)]
    q = {k: v.detach() for k, v in p.step_params(1).items()}
    assert all(v.dtype == torch.float64 and v.shape == (3,) for v in q.values())
    e = [math.exp(v) for v in u]
    for j, uj in enumerate(u):
        assert float(q['r'][j]) == pytest.approx(sig(uj), abs=1e-15)
        assert float(q['c'][j]) == pytest.approx(1 + 0.05 * math.tanh(uj / 4), abs=1e-15)
        assert float(q['a'][j]) == pytest.approx(1 + 0.2 * math.tanh(uj / 4), abs=1e-15)
        # The reference writes the same map as 2 sigmoid(u / 2) s + 1 - s.
        assert float(q['c'][j]) == pytest.approx(2 * sig(uj / 2) * 0.05 + 1 - 0.05, abs=1e-15)
        assert float(q['w'][j]) == pytest.approx(e[j] / sum(e), abs=1e-15)
    # No 0.99 cap: a scale of 2 reaches a = 1 + 2 tanh(3 / 4) > 2.
    big = set_tables(EPDPredictor(2, num_points=1, scale_time=2.0), scale_time_params=[[3.0]])
    a = big.step_params(0)['a'].tolist()[0]
    assert a == pytest.approx(1 + 2 * math.tanh(0.75), abs=1e-15) and a > 2
    # A zero scale gives exactly 1 whatever the table; fcn sets c = 1 on the last step only.
    off = set_tables(EPDPredictor(3, num_points=3, scale_dir=0, scale_time=0, fcn=True), r_params=raw,
                     scale_dir_params=raw, scale_time_params=raw)
    assert off.step_params(0)['c'].tolist() == [1.0] * 3 and off.step_params(1)['a'].tolist() == [1.0] * 3
    p.fcn = True
    assert p.step_params(1)['c'].tolist() == [1.0] * 3 and p.step_params(0)['c'].tolist() != [1.0] * 3
    with pytest.raises(IndexError):
        p.step_params(2)


def test_initialisation_from_the_seed():
    p, q = EPDPredictor(5, num_points=4, seed=7), EPDPredictor(5, num_points=4, seed=7)
    other = EPDPredictor(5, num_points=4, seed=8)
    g = torch.Generator().manual_seed(7)
    for name in ('r_params', 'scale_dir_params', 'scale_time_params', 'weight_params'):  # drawn in this order
        table = getattr(p, name)
        assert table.shape == (4, 4) and table.dtype == torch.float32 and table.requires_grad
        assert torch.equal(table, torch.randn([4, 4], generator=g)) and torch.equal(table, getattr(q, name))
    assert not torch.equal(p.r_params, other.r_params)
    assert EPDPredictor(4).hyperparams() == dict(num_steps=4, num_points=2, base='epd', scale_dir=0.01,
                                                 scale_time=0.0, max_order=3, fcn=False)


@pytest.mark.parametrize('kwargs,message', [
    (dict(num_steps=1), 'num_steps >= 2'), (dict(num_steps=4, num_points=0), 'num_points >= 1'),
    (dict(num_steps=4, base='dpm'), "unknown EPD base 'dpm'"), (dict(num_steps=4, max_order=5), 'max_order must'),
    (dict(num_steps=4, scale_dir=-0.1), 'must be >= 0'), (dict(num_steps=4, scale_time=float('nan')), 'must be >= 0'),
])
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EPDPredictor(**kwargs)

#----------------------------------------------------------------------------
# Steps by hand.


@pytest.mark.parametrize('afs', [False, True])
def test_epd_step_by_hand(afs):
    p = set_tables(EPDPredictor(3, num_points=2, scale_dir=0.05, scale_time=0.2),
                   r_params=[[0.3, -1.2], [0, 0]], scale_dir_params=[[2.0, -0.7], [0, 0]],
                   scale_time_params=[[-1.5, 0.9], [0, 0]], weight_params=[[0.4, -0.1], [0, 0]])
    q = {k: v.tolist() for k, v in p.step_params(0).items()}
    x = torch.tensor([[[[2.0, -41.0]]], [[[60.0, 7.5]]]], dtype=torch.float64)
    for batched in (True, False):
        out, state = predictor_step(gaussian(), p, 0, x, [4.0, 1.5, 0.1], None, afs=afs, batched=batched)
        assert state is None
        for k, xv in enumerate(x.flatten().tolist()):
            d_hat = xv / math.sqrt(1 + 16.0) if afs else d(xv, 4.0)
            total = 0
            for r, c, a, w in zip(q['r'], q['c'], q['a'], q['w']):
                s = 1.5 ** r * 4.0 ** (1 - r)
                x_j = xv + (s - 4.0) * d_hat
                total += w * c * (x_j - D(x_j, a * s)) / s  # queried at a s, divided by s
            assert float(out.flatten()[k]) == pytest.approx(xv + (1.5 - 4.0) * total, rel=1e-13, abs=1e-13)


def test_ipndm_plugin_two_steps_by_hand():
    """K = 1, w = c = a = 1: step 0 is a midpoint step along d_hat, step 1 places its point along (3 d1 - d0) / 2."""
    p = set_tables(EPDPredictor(3, num_points=1, base='ipndm', scale_dir=0, scale_time=0, max_order=3),
                   r_params=[[0.4], [-0.8]])
    r0, r1 = sig(float(torch.tensor(0.4))), sig(float(torch.tensor(-0.8)))
    x = torch.tensor([[[[30.0, -55.0]]]], dtype=torch.float64)
    sigmas = [80.0, 3.0, 0.2]
    x1, state = predictor_step(gaussian(), p, 0, x, sigmas, None)
    x2, state2 = predictor_step(gaussian(), p, 1, x1, sigmas, state)
    out = solvers.get_solver('epd')(gaussian(), x, torch.tensor(sigmas, dtype=torch.float64), predictor=p)
    assert torch.equal(out, x2)
    for k, xv in enumerate(x.flatten().tolist()):
        d0 = d(xv, 80.0)
        s0 = 3.0 ** r0 * 80.0 ** (1 - r0)
        x_mid = xv + (s0 - 80.0) * d0
        x1_hand = xv + (3.0 - 80.0) * d(x_mid, s0)
        d1 = d(x1_hand, 3.0)
        s1 = 0.2 ** r1 * 3.0 ** (1 - r1)
        x_mid = x1_hand + (s1 - 3.0) * (3 * d1 - d0) / 2
        x2_hand = x1_hand + (0.2 - 3.0) * d(x_mid, s1)
        assert float(x1.flatten()[k]) == pytest.approx(x1_hand, rel=1e-13)
        assert float(x2.flatten()[k]) == pytest.approx(x2_hand, rel=1e-13)
        # The history holds the state derivatives d0, then (d0, d1), newest last.
        assert [float(h.flatten()[k]) for h in state] == pytest.approx([d0], rel=1e-13)
        assert [float(h.flatten()[k]) for h in state2] == pytest.approx([d0, d1], rel=1e-13)


def test_ipndm_history_orders_and_reset():
    """Order p = min(max_order, |H| + 1), at most max_order - 1 derivatives kept, reset at step 0."""
    net, sigmas = gaussian(), solvers.get_schedule(7, 0.002, 80, 'time_uniform', 1).tolist()
    x0 = start()
    for max_order in (1, 2, 3, 4):
        p = EPDPredictor(7, num_points=2, base='ipndm', scale_dir=0.05, scale_time=0.1, max_order=max_order, seed=1)
        x, state, d_hats = x0, None, []
        for i in range(6):
            t = sigmas[i]
            d_hats.append((x - net(x, torch.tensor(t, dtype=torch.float64).expand(3))) / t)
            # The point placement by hand: AB of order p on the newest derivatives.
            order = min(max_order, i + 1)
            ab = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
            g = sum(b * dd for b, dd in zip(ab[order], d_hats[::-1]))
            q = p.step_params(i)
            expected = x
            for r, c, a, w in zip(*(q[k].tolist() for k in 'rcaw')):
                s = sigmas[i + 1] ** r * t ** (1 - r)
                x_j = x + (s - t) * g
                D_j = net(x_j, torch.full([3], a * s, dtype=torch.float64))
                expected = expected + (sigmas[i + 1] - t) * w * c * (x_j - D_j) / s
            x, state = predictor_step(net, p, i, x, sigmas, state)
            assert torch.allclose(x, expected, rtol=1e-12, atol=1e-12), (max_order, i)
            assert len(state) == min(i + 1, max_order - 1) and not any(h.requires_grad for h in state)
            for h, want in zip(state[::-1], d_hats[::-1]):
                assert torch.allclose(h, want, rtol=1e-12, atol=1e-12)
        # Step 0 ignores whatever state it is handed.
        stale = [torch.full_like(x0, 1e6)] * 3
        assert torch.equal(predictor_step(net, p, 0, x0, sigmas, stale)[0], predictor_step(net, p, 0, x0, sigmas)[0])
    # max_order = 1: no history, exactly the epd base with the same tables.
    one = EPDPredictor(7, num_points=2, base='ipndm', max_order=1, scale_dir=0.05, seed=2)
    same = EPDPredictor(7, num_points=2, base='epd', scale_dir=0.05, seed=2)
    run = solvers.get_solver('epd')
    assert torch.equal(run(net, x0, torch.tensor(sigmas), predictor=one), run(net, x0, torch.tensor(sigmas),
                                                                                 predictor=same))


@pytest.mark.parametrize('afs', [False, True])
@pytest.mark.parametrize('scale', [0.0, 0.05])
def test_reduces_to_dpm_solver_2(afs, scale):
    """K = 1, r = 1/2, c = a = 1 (a zero scale, or a zero table under a positive one): the registry's 'dpm'."""
    net = gaussian()
    p = set_tables(EPDPredictor(6, num_points=1, scale_dir=scale, scale_time=scale), r_params=torch.zeros(5, 1),
                   scale_dir_params=torch.zeros(5, 1), scale_time_params=torch.zeros(5, 1))
    for schedule in [('time_uniform', 1), ('polynomial', 7)]:
        sigmas = solvers.get_schedule(6, 0.002, 80, *schedule)
        x = start(4)
        epd = solvers.get_solver('epd')(net, x, sigmas, afs=afs, predictor=p)
        dpm = solvers.get_solver('dpm')(net, x, sigmas, afs=afs)
        assert torch.allclose(epd, dpm, rtol=1e-13, atol=1e-13)

#----------------------------------------------------------------------------
# Batched evaluation: one call of K * B rows, per-row sigma, conditioning repeated.


def test_denoise_per_row_sigma_and_repeat_rows():
    net, x = gaussian(), start(4)
    sigma = torch.tensor([0.1, 2.0, 7.0, 80.0], dtype=torch.float64)
    rows = torch.cat([denoise(net, x[b:b + 1], float(sigma[b])) for b in range(4)])
    assert torch.equal(denoise(net, x, sigma), rows)
    afs = denoise(net, x, sigma, afs=True)
    assert torch.allclose(afs, x - sigma.reshape(-1, 1, 1, 1) * x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(),
                          rtol=0, atol=1e-14)
    two = torch.tensor(2.0, dtype=torch.float64)
    assert torch.equal(denoise(net, x, 2.0, afs=True), denoise(net, x, two, afs=True))
    with pytest.raises(ValueError, match=r'one level per row \(4\)'):
        denoise(net, x, sigma[:3])
    labels, shared, cond = torch.arange(6.0).reshape(3, 2), torch.ones(1, 2), torch.arange(3)
    out = repeat_rows(dict(class_labels=labels, shared=shared, cond=cond, flag=True, other=torch.zeros(5)), 2, 3)
    assert torch.equal(out['class_labels'], torch.cat([labels, labels])) and torch.equal(out['cond'], torch.tensor(
        [0, 1, 2, 0, 1, 2]))
    assert out['shared'] is shared and out['flag'] is True and out['other'].shape == (5,)
    assert repeat_rows(None, 3, 2) == {}


class Conditioned(torch.nn.Module):
    """The exact Gaussian denoiser shifted by per-row conditioning, and recording every call's shapes."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = gaussian(), []

    def forward(self, x, sigma, class_labels=None, condition=None, unconditional_condition=None):
        assert class_labels.shape[0] in (1, x.shape[0]) and condition.shape[0] == x.shape[0]
        self.calls.append((x.shape[0], tuple(sigma.shape), class_labels.shape[0]))
        shift = class_labels.double() @ torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
        shift = shift + condition.double().mean((1, 2)) - unconditional_condition.double().mean((1, 2))
        return self.net(x, sigma) + 0.01 * shift.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize('base', ['epd', 'ipndm'])
def test_batched_equals_sequential(base):
    net = Conditioned()
    g = torch.Generator().manual_seed(3)
    extra = dict(class_labels=torch.eye(3, dtype=torch.float64)[[2, 0, 1, 1]],
                 condition=torch.randn(4, 5, 6, generator=g), unconditional_condition=torch.randn(1, 5, 6,
                                                                                                   generator=g))
    sigmas = solvers.get_schedule(5, 0.002, 80, 'time_uniform', 1).tolist()
    p = EPDPredictor(5, num_points=3, base=base, scale_dir=0.05, scale_time=0.2, seed=4)
    xs = {True: start(4), False: start(4)}
    states = {True: None, False: None}
    for i in range(4):
        for batched in (True, False):
            net.calls.clear()
            xs[batched], states[batched] = predictor_step(net, p, i, xs[batched], sigmas, states[batched], extra,
                                                          afs=i == 0, batched=batched)
            if batched:  # the state call (none with AFS), then one call of 3 * 4 rows, one sigma per row
                assert net.calls == ([] if i == 0 else [(4, (4,), 4)]) + [(12, (12,), 12)]
            else:
                assert net.calls == [(4, (4,), 4)] * (3 if i == 0 else 4)
        assert torch.allclose(xs[True], xs[False], rtol=1e-12, atol=1e-12), i
    # Each sample is its own: sample 1 alone (its own labels and condition) gives the same trajectory.
    alone = {k: v[1:2] if v.shape[0] == 4 else v for k, v in extra.items()}
    x, state = start(4)[1:2], None
    for i in range(4):
        x, state = predictor_step(net, p, i, x, sigmas, state, alone, afs=i == 0)
    assert torch.allclose(x, xs[True][1:2], rtol=1e-12, atol=1e-12)
    # The labels reach the points: another label moves the step.
    first = predictor_step(net, p, 0, start(4)[1:2], sigmas, None, alone, afs=True)[0]
    other = dict(alone, class_labels=torch.eye(3, dtype=torch.float64)[[2]])
    assert (predictor_step(net, p, 0, start(4)[1:2], sigmas, None, other, afs=True)[0] - first).abs().min() > 1e-4


def test_batched_and_sequential_gradients_agree():
    net, sigmas = gaussian(), solvers.get_schedule(4, 0.002, 80, 'time_uniform', 1).tolist()
    grads = {}
    for batched in (True, False):
        p = EPDPredictor(4, num_points=2, base='ipndm', scale_dir=0.05, scale_time=0.2, seed=5)
        x, state = start(), None
        for i in range(3):
            x, state = predictor_step(net, p, i, x, sigmas, state, batched=batched)
        (x ** 2).sum().backward()
        grads[batched] = [t.grad.clone() for t in p.parameters()]
    for a, b in zip(grads[True], grads[False]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12) and a.abs().sum() > 0


def test_edm_network_takes_one_sigma_per_row():
    """The project's EDM network (class-conditional) evaluates rows at their own sigma, labels repeated."""
    torch.manual_seed(0)
    net = EDMPrecond(8, 1, label_dim=3, model_channels=16, channel_mult=(1, 2), num_blocks=1).eval()
    with torch.no_grad():
        for t in net.parameters():
            t.normal_(0, 0.1)
    x = torch.randn(2, 1, 8, 8) * 10
    sigma = torch.tensor([0.05, 9.0])
    labels = torch.eye(3)[[1, 2]]
    with torch.no_grad():
        rows = torch.cat([net(x[b:b + 1], sigma[b:b + 1], class_labels=labels[b:b + 1]) for b in range(2)])
        assert torch.allclose(net(x, sigma, class_labels=labels), rows, rtol=0, atol=1e-5)
        p = EPDPredictor(3, num_points=2, scale_dir=0.05, scale_time=0.2, seed=0)
        sigmas = solvers.get_schedule(3, 0.002, 80, 'time_uniform', 1).tolist()
        x = torch.randn(2, 1, 8, 8) * 80
        out = {b: predictor_step(net, p, 0, x, sigmas, None, dict(class_labels=labels), batched=b)[0]
               for b in (True, False)}
    assert torch.allclose(out[True], out[False], rtol=0, atol=1e-4)
    with pytest.raises(RuntimeError):  # un-repeated [B, L] labels beside a [K * B] batch, as the EPD code does
        net(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=labels)

#----------------------------------------------------------------------------
# NFE: real calls, reported ("parallel") NFE, network rounds.


def counter(net):
    calls = []

    def counting(x, sigma, **kwargs):
        calls.append(x.shape[0])
        return net(x, sigma, **kwargs)
    return counting, calls


@pytest.mark.parametrize('base', ['epd', 'ipndm'])
def test_nfe_equals_counted_calls(base):
    counting, calls = counter(gaussian())
    for K, num_steps, afs in itertools.product([1, 2, 3], [2, 3, 4, 6], [False, True]):
        p = EPDPredictor(num_steps, num_points=K, base=base, scale_dir=0.05, scale_time=0.1, seed=K)
        sigmas = solvers.get_schedule(num_steps, 0.002, 80, 'time_uniform', 1)
        for batched in (True, False):
            calls.clear()
            if batched:
                solvers.get_solver('epd')(counting, start(2), sigmas, afs=afs, predictor=p)
            else:
                x, state = start(2), None
                for i in range(num_steps - 1):
                    x, state = predictor_step(counting, p, i, x, sigmas.tolist(), state, afs=afs and i == 0,
                                              batched=False)
            real = (1 + K) * (num_steps - 1) - afs
            assert sum(calls) == 2 * real  # rows evaluated, two images per row
            assert real == p.nfe(num_steps) - afs == solvers.nfe('epd', num_steps, afs=afs, predictor=p)
            assert len(calls) == p.network_rounds(num_steps, batched=batched) - afs
        assert p.parallel_nfe(num_steps) - afs == 2 * (num_steps - 1) - afs == p.network_rounds(num_steps) - afs
    # Without a predictor, the registry counts the reference's default K = 2; its released runs (AFS) report
    # 3 / 5 / 7 / 9 NFE for 5 / 8 / 11 / 14 real calls.
    assert [solvers.nfe('epd', n, afs=True) for n in (3, 4, 5, 6)] == [5, 8, 11, 14]
    assert [EPDPredictor(n).parallel_nfe(n) - 1 for n in (3, 4, 5, 6)] == [3, 5, 7, 9]

#----------------------------------------------------------------------------
# Training policy: BPTT through the state, the plug-in's history detached.


def test_training_policy():
    """The gradient of the last state's loss with respect to step 0's r: autograd against central differences.
    'epd' (BPTT through the state): the total derivative. 'ipndm': the derivative with the history held at its
    unperturbed values, since the history is detached; the total derivative differs."""
    assert EPDPredictor.detach_state is False and EPDPredictor.teacher_forcing is False
    net, sigmas = gaussian(), solvers.get_schedule(4, 0.002, 80, 'time_uniform', 1).tolist()

    def run(p, frozen=None):
        x, state, inputs = start(), None, []
        for i in range(3):
            inputs.append(state)
            x, state = predictor_step(net, p, i, x, sigmas, frozen[i] if frozen else state, afs=i == 0)
            assert state is None or not any(h.requires_grad for h in state)
        return (x ** 2).sum(), inputs

    for base in ('epd', 'ipndm'):
        p = EPDPredictor(4, num_points=2, base=base, scale_dir=0.05, scale_time=0.2, seed=6)
        loss, inputs = run(p)
        grad = torch.autograd.grad(loss, p.r_params)[0]
        assert grad.abs().min() > 0  # every step, step 0 included (through the state)
        value = p.r_params[0, 0].item()
        losses = {}
        for sign in (1, -1):
            with torch.no_grad():
                p.r_params[0, 0] = value + sign * 2 ** -9
            with torch.no_grad():
                losses[sign] = float(run(p)[0]), float(run(p, inputs)[0])
        with torch.no_grad():
            p.r_params[0, 0] = value
        total, held = ((losses[1][k] - losses[-1][k]) / 2 ** -8 for k in (0, 1))
        if base == 'epd':
            assert total == held and float(grad[0, 0]) == pytest.approx(total, rel=1e-4)
        else:
            assert float(grad[0, 0]) == pytest.approx(held, rel=1e-4)
            assert abs(total - held) > 1e-2 * abs(held)

#----------------------------------------------------------------------------
# Sampler refusals and settings.


def test_refusals():
    run = solvers.get_solver('epd')
    with pytest.raises(ValueError, match=r"the 'epd' solver needs a trained predictor \(predictor=...\)"):
        run(gaussian(), start(), solvers.get_schedule(4, 0.002, 80))
    with pytest.raises(ValueError, match='this predictor was trained for num_steps=4, not 5'):
        run(gaussian(), start(), solvers.get_schedule(5, 0.002, 80), predictor=EPDPredictor(4))
    p = EPDPredictor(4, settings=dict(dataset_name='digits', afs=True))
    with pytest.raises(ValueError, match="trained for dataset_name='digits', not 'cifar10'"):
        p.check_compatible(dataset_name='cifar10')
    with pytest.raises(ValueError, match='trained for afs=True, not False'):
        p.check_compatible(afs=False)
    p.check_compatible(dataset_name='digits', afs=True, schedule_type='time_uniform', guidance_rate=None)
    info = solvers.solver_info('epd')
    assert info.schedule == ('time_uniform', 1) and info.stochastic(predictor=p) is False
    assert info.options == dict(predictor=None)

#----------------------------------------------------------------------------
# Files.


def test_save_load_round_trip(tmp_path):
    p = EPDPredictor(5, num_points=3, base='ipndm', scale_dir=0.05, scale_time=0.2, max_order=4, fcn=True, seed=3,
                     settings=dict(dataset_name='digits', schedule_type='time_uniform', schedule_rho=1.0, afs=True))
    p.save(tmp_path / 'p.safetensors')
    q = EPDPredictor.load(tmp_path / 'p.safetensors')
    assert q.hyperparams() == p.hyperparams() and q.settings == p.settings and not q.training
    assert not any(t.requires_grad for t in q.parameters())
    sigmas = solvers.get_schedule(5, 0.002, 80, 'time_uniform', 1)
    x = start(4)
    run = solvers.get_solver('epd')
    assert torch.equal(run(gaussian(), x, sigmas, afs=True, predictor=p), run(gaussian(), x, sigmas, afs=True,
                                                                              predictor=q))
    assert sorted(f.name for f in tmp_path.iterdir()) == ['p.safetensors']  # no temporary file left


def test_bad_files_are_refused(tmp_path):
    (tmp_path / 'junk').write_bytes(b'not a file')
    with pytest.raises(ValueError, match='cannot read EPD predictor'):
        EPDPredictor.load(tmp_path / 'junk')
    with pytest.raises(ValueError, match='cannot read EPD predictor'):
        EPDPredictor.load(tmp_path / 'missing.safetensors')
    from solvers.adasde import AdaSDEPredictor
    AdaSDEPredictor(4).save(tmp_path / 'adasde.safetensors')
    with pytest.raises(ValueError, match="is not an EPD predictor file \\(format 'adasde-predictor'\\)"):
        EPDPredictor.load(tmp_path / 'adasde.safetensors')
    import safetensors.torch
    p = EPDPredictor(4)
    tables = {k: v.detach() for k, v in p.named_parameters()}
    meta = dict(format='epd-predictor', version='2', hyperparams='{}', settings='{}')
    safetensors.torch.save_file(tables, tmp_path / 'v2', metadata=meta)
    with pytest.raises(ValueError, match='format version 2, this code reads version 1'):
        EPDPredictor.load(tmp_path / 'v2')
    meta = dict(meta, version='1', hyperparams='{"num_steps": 5, "num_points": 2}')
    safetensors.torch.save_file(tables, tmp_path / 'shape', metadata=meta)
    with pytest.raises(ValueError, match=r'tensor r_params has shape \(3, 2\), expected \(4, 2\)'):
        EPDPredictor.load(tmp_path / 'shape')
    (tmp_path / 'broken.pkl').write_bytes(b'\x80\x04junk')
    with pytest.raises(ValueError, match='cannot read an official EPD snapshot'):
        EPDPredictor.load(tmp_path / 'broken.pkl')

#----------------------------------------------------------------------------
# Official snapshots, built here with the reference's structure: module training/networks.py defines the
# persistent EPD_predictor (every hyperparameter an attribute, tables r_params, scale_dir_params,
# scale_time_params, weight_s), training/loss.py the persistent EPD_loss holding the student schedule t_steps
# on cuda:0 (and, for ipndm runs, the last batch's history in buffer_model).

# The raw tables of the released 00002-cifar10 run (N = 4, K = 2, scale_dir = scale_time = 0.05), as its snapshot
# stores them (float32, 7 digits), and the coefficients the research notes decoded from it.
RELEASED_00002 = dict(
    r_params=[[-3.367488, 1.358875], [-2.499792, 0.5426827], [-0.4599931, -2.261717]],
    scale_dir_params=[[-0.2124892, -1.137247], [-0.4820612, 0.5726137], [0.2397299, -0.0005854794]],
    scale_time_params=[[-6.278348, -6.484324], [5.902597, 5.271421], [-5.544894, 1.502941]],
    weight_s=[[0.358943, -1.536829], [0.7099318, 1.043356], [-0.7834405, 0.4584729]],
)
PUBLISHED_00002 = [  # step: r, c, a, w (points 1 and 2)
    dict(r=[.0333, .7956], c=[.9973, .9862], a=[.9542, .9538], w=[.8694, .1306]),
    dict(r=[.0759, .6324], c=[.9940, 1.0071], a=[1.0450, 1.0433], w=[.4174, .5826]),
    dict(r=[.3870, .0943], c=[1.0030, 1.0000], a=[.9559, 1.0179], w=[.2241, .7759]),
]

NETWORKS_SRC = '''
import torch
from torch_utils import persistence
EXECUTED = True
@persistence.persistent_class
class EPD_predictor(torch.nn.Module):
    def __init__(self, tables, num_points=2, num_steps=4, sampler_stu='epd', sampler_tea='heun', M=3,
                 scale_dir=0.05, scale_time=0.05, max_order=3, dataset_name='cifar10'):
        super().__init__()
        self.dataset_name, self.img_resolution, self.num_steps = dataset_name, 32, num_steps
        self.sampler_stu, self.sampler_tea, self.M = sampler_stu, sampler_tea, M
        self.guidance_type, self.guidance_rate = None, 0.0
        self.schedule_type, self.schedule_rho, self.afs = 'time_uniform', 1, True
        self.scale_dir, self.scale_time, self.max_order = scale_dir, scale_time, max_order
        self.predict_x0, self.lower_order_final = True, True
        self.num_points, self.fcn, self.alpha = num_points, False, 10.0
        for name in ['r_params', 'scale_dir_params', 'scale_time_params', 'weight_s']:
            setattr(self, name, torch.nn.Parameter(torch.tensor(tables[name])))
        self.sigmoid = torch.nn.Sigmoid()
        self.softmax = torch.nn.Softmax(dim=-1)
@persistence.persistent_class
class adasde_predictor(EPD_predictor):
    pass
'''

LOSS_SRC = '''
import torch
from torch_utils import persistence
EXECUTED = True
def epd_sampler():
    pass
@persistence.persistent_class
class EPD_loss:
    def __init__(self, num_steps=4, buffer_model=()):
        self.num_steps, self.solver_stu, self.M = num_steps, epd_sampler, 3
        self.t_steps = torch.tensor([80.0, 6.950235, 1.286669, 0.002])
        self.buffer_model, self.buffer_t, self.lpips = list(buffer_model), [], None
'''


@pytest.fixture
def snapshot_modules(reference_package):
    reference_package({'training/__init__.py': '', 'training/networks.py': NETWORKS_SRC,
                       'training/loss.py': LOSS_SRC})
    from training import loss, networks
    return networks, loss


def write_snapshot(path, model, loss_fn, monkeypatch):
    """pickle.dump as the reference's training loop, with loss_fn.t_steps tagged as a cuda:0 storage."""
    on_cuda = loss_fn.t_steps.untyped_storage().data_ptr()
    tag = (0, lambda storage: 'cuda:0' if storage.data_ptr() == on_cuda else None, None)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, '_package_registry', [tag] + torch.serialization._package_registry)
        with open(path, 'wb') as f:
            pickle.dump(dict(model=model.eval().requires_grad_(False), loss_fn=loss_fn), f)


def test_official_snapshot_import(tmp_path, snapshot_modules, monkeypatch):
    networks, loss = snapshot_modules
    official = networks.EPD_predictor(RELEASED_00002)
    path = tmp_path / 'network-snapshot-000010.pkl'
    write_snapshot(path, official, loss.EPD_loss(), monkeypatch)
    data = path.read_bytes()
    assert b'cuda:0' in data and b'EPD_predictor' in data and data[:1] == b'\x80'
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA'):  # a plain unpickler fails on the CUDA storage
            pickle.loads(data)
    for name in ('training.networks', 'training.loss', 'training'):  # from here on, only the embedded source
        sys.modules.pop(name)                                           # could define the classes
    monkeypatch.setattr(sys, 'path', [p for p in sys.path if not p.startswith(str(tmp_path))])

    p = EPDPredictor.load_official(path)
    assert p.hyperparams() == dict(num_steps=4, num_points=2, base='epd', scale_dir=0.05, scale_time=0.05,
                                   max_order=3, fcn=False)
    assert p.settings == dict(dataset_name='cifar10', schedule_type='time_uniform', schedule_rho=1.0, afs=True,
                              guidance_type=None, guidance_rate=0.0, M=3, sampler_tea='heun')
    assert torch.equal(p.weight_params, official.weight_s) and torch.equal(p.r_params, official.r_params)
    assert torch.equal(p.scale_time_params, official.scale_time_params)
    assert not any(getattr(m, 'EXECUTED', False) for n, m in list(sys.modules.items())
                   if n.startswith('_imported_module_'))
    # The maps give the published coefficients of the release.
    for i, want in enumerate(PUBLISHED_00002):
        got = p.step_params(i)
        for k in 'rcaw':
            assert got[k].tolist() == pytest.approx(want[k], abs=6e-5), (i, k)
    # By content, whatever the name; the safe copy samples identically.
    (tmp_path / 'renamed.bin').write_bytes(data)
    q = EPDPredictor.load(tmp_path / 'renamed.bin')
    q.save(tmp_path / 'same.safetensors')
    sigmas = solvers.get_schedule(4, 0.002, 80, 'time_uniform', 1)
    x = start(2)
    run = solvers.get_solver('epd')
    assert torch.equal(run(gaussian(), x, sigmas, afs=True, predictor=p),
                       run(gaussian(), x, sigmas, afs=True, predictor=EPDPredictor.load(tmp_path / 'same.safetensors')))


def test_official_ipndm_snapshot_and_wrong_class(tmp_path, snapshot_modules, monkeypatch):
    networks, loss = snapshot_modules
    tables = {k: (torch.tensor(v) * 0.5).tolist() for k, v in RELEASED_00002.items()}
    official = networks.EPD_predictor(tables, sampler_stu='ipndm', sampler_tea='dpm', scale_time=0.2, max_order=3)
    buffer = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    write_snapshot(tmp_path / 'ipndm.pkl', official, loss.EPD_loss(buffer_model=buffer), monkeypatch)
    p = EPDPredictor.load(tmp_path / 'ipndm.pkl')
    assert (p.base, p.max_order, p.scale_time, p.settings['sampler_tea']) == ('ipndm', 3, 0.2, 'dpm')
    assert torch.equal(p.scale_dir_params, official.scale_dir_params)
    # Another predictor class, or no persistent object at all, is refused in one line.
    write_snapshot(tmp_path / 'adasde.pkl', networks.adasde_predictor(RELEASED_00002), loss.EPD_loss(), monkeypatch)
    with pytest.raises(ValueError, match="holds a 'adasde_predictor' predictor, not an EPD_predictor"):
        EPDPredictor.load(tmp_path / 'adasde.pkl')
    with open(tmp_path / 'other.pkl', 'wb') as f:
        pickle.dump(dict(model=torch.nn.Module()), f)
    with pytest.raises(ValueError, match="not an EPD snapshot \\(its model is 'Module'\\)"):
        EPDPredictor.load(tmp_path / 'other.pkl')


def test_released_tables_on_the_gaussian_toy():
    """The released 00002 tables on N(0.3, 0.5^2) (AFS, its grid 80, 6.95, 1.29, 0.002): RMSE to the exact ODE
    solution over x_T = 80 z, z ~ N(0, 1), about 0.086 against 0.856 for DPM-Solver-2 on the same grid."""
    p = set_tables(EPDPredictor(4, num_points=2, scale_dir=0.05, scale_time=0.05),
                   **{('weight_params' if k == 'weight_s' else k): v for k, v in RELEASED_00002.items()})
    net = GaussianMixture(torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), 0.5)
    sigmas = solvers.get_schedule(4, 0.002, 80, 'time_uniform', 1)
    x = torch.tensor([0.0, 80.0], dtype=torch.float64).reshape(2, 1, 1, 1)  # z = 0 and z = 1
    exact = net.ode_solution(x, 80.0, 0.002)

    def rmse(out):  # the maps are affine in x: error e0 + (e1 - e0) z, so RMSE = sqrt(e0^2 + (e1 - e0)^2)
        e0, e1 = (out - exact).flatten().tolist()
        return math.hypot(e0, e1 - e0)
    assert rmse(solvers.get_solver('epd')(net, x, sigmas, afs=True, predictor=p)) == pytest.approx(0.086, abs=5e-4)
    assert rmse(solvers.get_solver('dpm')(net, x, sigmas, afs=True)) == pytest.approx(0.856, abs=5e-4)

#----------------------------------------------------------------------------

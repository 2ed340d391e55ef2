"""Rectified-flow models as denoisers (models/flow.py, docs/flow.md), proved on an exact flow: the rectified flow of
a Gaussian mixture, whose velocity is known in closed form (FlowGaussianMixture).

1. The mapping: the velocity is the closed form, D = x_t - t v is the mixture's denoiser, the time shift scales sigma.
2. diffusers' FlowMatchEuler: its grid is the 'flow' schedule, its steps are the project's `euler`.
3. Samples: a converged ODE solver reproduces the mixture's moments; the SDE solvers (ER-SDE, EDM's churn, AdaSDE
   with gamma > 0 in both forms) keep the marginals, since their noise is added in the EDM state.
4. The counter-test: the same solvers run in the flow state (sigma := t, x := x_t, as ComfyUI did before its #8744
   fix) are still right without noise, but their noise then changes the marginals by many standard errors.
5. Convergence orders on the flow model: every case of tests/test_singlestep.py and tests/test_multistep.py again.
"""

import math
import os

import numpy as np
import pytest
import torch
from test_multistep import ORDER_CASES, measured_order
from test_singlestep import CONVERGENCE, convergence_slope

import solvers
from models.analytic import GaussianMixture
from models.flow import FlowGaussianMixture, FlowStateView, sigma_to_t, t_to_sigma
from solvers.adasde import AdaSDEPredictor
from solvers.schedules import flow_sigmas, flow_time_shift

# A two-component mixture on a 1x1x2 image (means away from 0, unequal weights): a wrong noise scaling shows in
# both the mean and the variance.
MEANS = ((-0.6, 0.4), (0.5, -0.3))
STDS = (0.3, 0.2)
WEIGHTS = (0.3, 0.7)
NUM = 20000


def mixture():
    return GaussianMixture(torch.tensor(MEANS, dtype=torch.float64).reshape(2, 1, 1, 2), torch.tensor(STDS),
                           torch.tensor(WEIGHTS), sigma_min=0.002, sigma_max=80.0)


def flow_of(net):
    """The rectified flow of an analytic mixture, over the mixture's sigma range."""
    return FlowGaussianMixture(net, t_min=sigma_to_t(net.sigma_min), t_max=sigma_to_t(net.sigma_max))


def exact_moments():
    """Mean and variance per coordinate of the mixture, by hand."""
    mu, s, w = np.array(MEANS), np.array(STDS)[:, None], np.array(WEIGHTS)[:, None]
    mean = (w * mu).sum(0)
    return mean, (w * (s ** 2 + mu ** 2)).sum(0) - mean ** 2


def marginal_errors(samples):
    """max over coordinates of |mean - exact| and |variance - exact| in standard errors of the samples' own
    estimates (the variance's from the fourth central moment)."""
    x = samples.reshape(len(samples), -1).double().numpy()
    mean, var = exact_moments()
    se_mean = x.std(0) / math.sqrt(len(x))
    se_var = np.sqrt((((x - x.mean(0)) ** 4).mean(0) - x.var(0) ** 2) / len(x))
    return float(np.max(np.abs(x.mean(0) - mean) / se_mean)), float(np.max(np.abs(x.var(0) - var) / se_var))


def seeded_noise(seed):
    generator = torch.Generator().manual_seed(seed)
    return generator, lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype)


def sample(net, name, sigmas, seed=5, **options):
    """NUM samples of solver `name` from latents * sigmas[0] (sample.py's start), float64."""
    generator, randn_like = seeded_noise(seed)
    x = float(sigmas[0]) * torch.randn(NUM, 1, 1, 2, generator=generator, dtype=torch.float64)
    return solvers.get_solver(name)(net, x, torch.as_tensor(sigmas, dtype=torch.float64), randn_like=randn_like,
                                    **options)

#----------------------------------------------------------------------------
# 1. The mapping, against hand computations.


def test_velocity_is_the_closed_form_and_D_the_mixtures():
    # One Gaussian N(mu, s^2) per coordinate: x_t = (1 - t) x_0 + t n has E[x_0 | x_t] = mu + (1 - t) s^2 (x_t -
    # (1 - t) mu) / ((1 - t)^2 s^2 + t^2), and v = E[n - x_0 | x_t] = (x_t - E[x_0 | x_t]) / t.
    mu, s = 0.3, 0.5
    net = GaussianMixture(torch.full((1, 1, 1, 1), mu, dtype=torch.float64), torch.tensor([s]))
    flow = flow_of(net)
    x_t = torch.tensor([-1.3, 0.2, 0.9], dtype=torch.float64).reshape(3, 1, 1, 1)
    for t in (0.01, 0.3, 0.77, 0.98):
        x0 = mu + (1 - t) * s ** 2 * (x_t - (1 - t) * mu) / ((1 - t) ** 2 * s ** 2 + t ** 2)
        v = flow.velocity(x_t, torch.full([3], t, dtype=torch.float64))
        assert torch.allclose(v, (x_t - x0) / t, rtol=0, atol=1e-12)
    # The flow model's D(x; sigma) is the mixture's own, for every sigma of the range.
    net, x = mixture(), torch.tensor([[[[1.7, -2.9]]], [[[0.1, 0.4]]]], dtype=torch.float64)
    for sigma in (0.002, 0.4, 3.0, 80.0):
        assert torch.allclose(flow_of(net)(x * max(sigma, 1), sigma), net(x * max(sigma, 1), sigma), rtol=1e-12,
                              atol=1e-12)


def test_time_and_shift():
    t = torch.tensor([1e-3, 0.25, 0.5, 0.9, 0.999], dtype=torch.float64)
    assert torch.allclose(sigma_to_t(t_to_sigma(t)), t, rtol=1e-14, atol=0)
    assert torch.allclose(t_to_sigma(torch.tensor(0.5)), torch.tensor(1.0))
    for shift in (0.5, 3.0, math.exp(1.15)):  # SD3's 3; FLUX's exponential shift at mu = 1.15 is s = e^mu
        assert torch.allclose(t_to_sigma(flow_time_shift(t, shift)), shift * t_to_sigma(t), rtol=1e-12, atol=0)


def test_churn_in_the_edm_state_is_the_vp_churn_of_the_flow_state():
    # Noise added in the EDM state, x_hat = x + sqrt(sigma_hat^2 - sigma^2) n, is in the flow state
    # x_t_hat = (1 - t_hat)/(1 - t) x_t + sqrt(t_hat^2 - ((1 - t_hat) t / (1 - t))^2) n: the signal shrinks as
    # the noise grows. The flow-state "VE" churn x_t + sqrt(t_hat^2 - t^2) n keeps the signal: it is not this.
    x_t, n = torch.tensor([0.7, -0.4], dtype=torch.float64), torch.tensor([0.3, 1.1], dtype=torch.float64)
    sigma, gamma = 1.7, 0.3
    sigma_hat = (1 + gamma) * sigma
    t, t_hat = sigma_to_t(sigma), sigma_to_t(sigma_hat)
    x_hat = x_t * (1 + sigma) + math.sqrt(sigma_hat ** 2 - sigma ** 2) * n
    vp = (1 - t_hat) / (1 - t) * x_t + math.sqrt(t_hat ** 2 - ((1 - t_hat) * t / (1 - t)) ** 2) * n
    assert torch.allclose(x_hat / (1 + sigma_hat), vp, rtol=1e-14, atol=1e-15)
    assert not torch.allclose(x_t + math.sqrt(t_hat ** 2 - t ** 2) * n, vp, atol=1e-2)

#----------------------------------------------------------------------------
# 2. diffusers' FlowMatchEulerDiscreteScheduler: the grid and the steps.


def flowmatch_scheduler(t_grid, shift):
    """diffusers' FlowMatchEuler set to the unshifted flow times `t_grid` (it shifts them and appends 0)."""
    diffusers = pytest.importorskip('diffusers')
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=list(t_grid))
    return scheduler


@pytest.mark.parametrize('shift', [1.0, 3.0])
def test_flow_schedule_is_flowmatch_eulers_grid(shift):
    # diffusers: linspace of t, then the shift; ours: uniform in sigma / (s + sigma) between the shifted end points.
    t_grid = np.linspace(0.98, 0.02, 7)
    scheduler = flowmatch_scheduler(t_grid, shift)
    sigma_max, sigma_min = shift * t_to_sigma(t_grid[0]), shift * t_to_sigma(t_grid[-1])
    flow = flow_of(mixture())
    flow.flow_shift = shift
    ours = solvers.get_schedule(7, sigma_min, sigma_max, 'flow', net=flow)
    assert float(scheduler.sigmas[-1]) == 0 and len(scheduler.sigmas) == 8
    assert torch.allclose(sigma_to_t(ours), scheduler.sigmas[:-1].double(), rtol=0, atol=1e-6)
    assert torch.allclose(ours, torch.as_tensor(flow_sigmas(np.linspace(0, 1, 7), sigma_min, sigma_max, shift)),
                          rtol=1e-14, atol=0)
    # Without a net (or a net without flow_shift) the flow schedule is unshifted.
    assert torch.allclose(solvers.get_schedule(7, sigma_min / shift, sigma_max / shift, 'flow'), ours / shift,
                          rtol=1e-12, atol=0)


def test_euler_is_flowmatch_euler():
    # The project's euler in the EDM state and FlowMatchEuler's steps x_t + (t' - t) v in the flow state, on the same
    # grid and velocity: the same latents (FlowMatchEuler steps in float32); its last step, to t = 0, is D.
    flow = flow_of(mixture())
    scheduler = flowmatch_scheduler(np.linspace(0.98, 0.02, 6), 3.0)
    t_grid = scheduler.sigmas[:-1].double()
    x_t = torch.randn(4, 1, 1, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * t_grid[0]
    theirs = x_t.float()
    for i, t in enumerate(scheduler.timesteps):
        v = flow.velocity(theirs.double(), scheduler.sigmas[i].double().expand(4)).float()
        theirs = scheduler.step(v, t, theirs).prev_sample
        if i == len(t_grid) - 2:
            before_last = theirs
    sigmas = t_to_sigma(t_grid)
    ours = solvers.get_solver('euler')(flow, x_t * (1 + sigmas[0]), sigmas)
    assert torch.allclose((ours / (1 + sigmas[-1])).float(), before_last, rtol=0, atol=1e-5)
    assert torch.allclose(flow(ours, sigmas[-1]).float(), theirs, rtol=0, atol=1e-5)

#----------------------------------------------------------------------------
# 3. Moments of the samples. Tolerance: 4 standard errors of each estimate (NUM = 20000 samples).


@pytest.mark.parametrize('name,num_steps,options', [('heun', 41, {}), ('dpmpp', 41, {}), ('unipc', 41, {})])
def test_converged_solver_matches_the_mixture_moments(name, num_steps, options):
    out = sample(flow_of(mixture()), name, solvers.get_schedule(num_steps, 0.002, 80.0), **options)
    err_mean, err_var = marginal_errors(out)
    assert err_mean < 4 and err_var < 4, (err_mean, err_var)


def adasde_predictor(num_steps, base, gamma):
    """An AdaSDE predictor whose churn is gamma on every step but the first (the gamma table set to its top)."""
    predictor = AdaSDEPredictor(num_steps, base=base, gamma=gamma, scale_dir=0, scale_time=0, seed=0)
    with torch.no_grad():
        predictor.gamma_params.fill_(40.0)
        predictor.r_params.fill_(0.0)  # the paper's form: the midpoint in log sigma (DPM-Solver-2)
    assert float(predictor.step_params(1)['gamma'][0].detach()) == pytest.approx(gamma, rel=1e-6)
    return predictor


# Measured (standard errors of the mean / the variance, worst coordinate) in the EDM state and, for the
# counter-test below, in the flow state:
#   er_sde noise_fn 7, 40 levels: 0.4 / 0.8, flow state 0.5 / 3.5 (too little noise to see: phi_7(t) / t only goes
#     from 11 to 12.7 over t in [0, 1], so ER-SDE 5 is nearly its ODE on flow times; left out of the counter-test);
#   er_sde noise_fn 2: 0.3 / 0.6, flow state 11.4 / 44.5; noise_fn 5: 0.5 / 1.0, flow state 13.7 / 52.5;
#   edm S_churn 40, 80 levels: 0.5 / 1.9, flow state (churn below t = 0.6) 15.8 / 59.4;
#   adasde, the paper's form, gamma 0.2, 81 levels: 0.4 / 1.1, flow state 19.9 / 43.2;
#   adasde on deis, gamma 0.01, 81 levels: 0.9 / 2.7, flow state 9.0 / 3.9.
# The plug-in form's churn is not a consistent SDE step for larger gamma (its base coefficients extrapolate
# derivatives taken before the noise): the variance is off by 4.2 standard errors at gamma 0.02 (81 levels), 9 at
# 0.1 and hundreds at 0.5, on the flow and on the same Gaussians in EDM form alike (docs/flow.md).
SDE_CASES = [
    ('er_sde', 40, dict(noise_fn=7)),
    ('er_sde', 40, dict(noise_fn=2)),
    ('er_sde', 40, dict(noise_fn=5)),
    ('edm', 80, dict(S_churn=40)),              # gamma = min(40 / 80, sqrt(2) - 1): the largest churn EDM allows
    ('adasde', 81, dict(base='dpm', gamma=0.2)),
    ('adasde', 81, dict(base='deis', gamma=0.01)),
]
COUNTER_CASES = [case for case in SDE_CASES if case[2] != dict(noise_fn=7)]


def run_sde(net, name, num_steps, options, sigmas=None):
    sigmas = solvers.get_schedule(num_steps, 0.002, 80.0) if sigmas is None else sigmas
    if name == 'adasde':
        options = dict(predictor=adasde_predictor(num_steps, options['base'], options['gamma']))
    return sample(net, name, sigmas, **options)


@pytest.mark.parametrize('name,num_steps,options', SDE_CASES)
def test_sde_solvers_keep_the_marginals(name, num_steps, options):
    err_mean, err_var = marginal_errors(run_sde(flow_of(mixture()), name, num_steps, options))
    assert err_mean < 4 and err_var < 4, (err_mean, err_var)

#----------------------------------------------------------------------------
# 4. The counter-test. FlowStateView is the same flow run in its own state: x_t at "sigma" t, D = x_t - t v. The
# probability-flow ODE there is dx_t/dt = v = (x_t - D) / t, EDM's form with sigma := t, so every ODE solver stays
# right; but the solvers' noise, sqrt(sigma_next^2 - ...) n, then grows the noise without shrinking the signal
# (x_t = (1 - t) x_0 + t n, not x_0 + sigma n): the churn in the flow state instead of the EDM state.


def flow_state_grid(num_steps):
    """The flow times of the same EDM grid (t < 1 everywhere, also after EDM's churn below t = 0.6)."""
    return sigma_to_t(solvers.get_schedule(num_steps, 0.002, 80.0))


def test_flow_state_without_noise_is_right():
    out = sample(FlowStateView(flow_of(mixture())), 'heun', flow_state_grid(41))
    err_mean, err_var = marginal_errors(out / (1 - sigma_to_t(0.002)))  # x_t at t_min back to the EDM state
    assert err_mean < 4 and err_var < 4, (err_mean, err_var)


# Twice the tolerance of test_sde_solvers_keep_the_marginals: that test would fail with the churn in the flow state.
@pytest.mark.parametrize('name,num_steps,options', COUNTER_CASES)
def test_churn_in_the_flow_state_changes_the_marginals(name, num_steps, options):
    if name == 'edm':
        options = dict(options, S_max=0.6)  # t_hat = (1 + gamma) t must stay below 1
    net = FlowStateView(flow_of(mixture()))
    out = run_sde(net, name, num_steps, options, sigmas=flow_state_grid(num_steps)) / (1 - sigma_to_t(0.002))
    err_mean, err_var = marginal_errors(out)
    assert max(err_mean, err_var) > 8, (err_mean, err_var)

#----------------------------------------------------------------------------
# 5. Convergence orders on the flow model: the same Gaussians, the same grids and the same expected orders as the
# Gaussian tests, through the flow mapping.


@pytest.mark.parametrize('name,options,order', CONVERGENCE, ids=[f'{n}-{o}' for n, o, _ in CONVERGENCE])
def test_singlestep_orders_on_the_flow(name, options, order):
    slope = convergence_slope(name, options, [16, 32, 64], wrap=flow_of)
    assert abs(slope - order) < 0.3, slope


@pytest.mark.parametrize('name,options,order', ORDER_CASES, ids=[f'{n}-{o}' for n, o, _ in ORDER_CASES])
def test_multistep_orders_on_the_flow(name, options, order):
    slope = measured_order(name, options, wrap=flow_of)
    assert abs(slope - order) < 0.3, slope

#----------------------------------------------------------------------------
# 6. The embedded flow model end to end: sample.py on flow sigmas, and train.py distilling AdaSDE (both forms),
# EPD and AMED on it (tiny runs), each predictor then sampled through sample.py.


def run_cli(command, args):
    from click.testing import CliRunner
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def pngs(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files
                  if f.endswith('.png'))


def test_digits_flow_samples_with_flow_sigmas(tmp_path):
    import sample
    from models import load_model
    net = load_model('digits_flow')
    assert net.sigma_min == pytest.approx(1e-3 / (1 - 1e-3)) and net.sigma_max == pytest.approx(999)
    output = run_cli(sample.main, ['--dataset_name=digits_flow', '--solver=euler', '--schedule_type=flow',
                                   '--num_steps=4', '--seeds=0-2', f'--outdir={tmp_path}/s'])
    assert 'flow' in output
    assert pngs(tmp_path / 's') == [os.path.join('000000', f'{s:06d}.png') for s in range(3)]


@pytest.mark.parametrize('args', [
    ['--sampler_stu=adasde', '--num_steps=3', '--M=1', '--gamma=0.02'],                       # the paper's form
    ['--sampler_stu=adasde', '--base=deis', '--num_steps=4', '--M=1', '--gamma=0.02'],        # the plug-in form
    ['--sampler_stu=epd', '--num_steps=3', '--M=1'],
    ['--sampler_stu=amed', '--num_steps=3', '--M=1'],
], ids=['adasde', 'adasde-deis', 'epd', 'amed'])
def test_train_py_distils_on_the_flow_model(tmp_path, args):
    import sample
    import train
    from solvers.learned import load_predictor
    run_cli(train.main, ['--dataset_name=digits_flow', '--schedule_type=flow', *args, '--batch=4',
                         '--total_kimg=0.008', '--lr=0.05', f'--outdir={tmp_path}/exps', '--device=cpu'])
    run_dir, = (tmp_path / 'exps').iterdir()
    snapshot, = run_dir.glob('network-snapshot-*.safetensors')
    predictor = load_predictor(snapshot)
    assert predictor.settings['schedule_type'] == 'flow' and predictor.settings['model'] == 'digits_flow'
    run_cli(sample.main, [f'--predictor_path={snapshot}', '--dataset_name=digits_flow', '--seeds=0-1',
                          f'--outdir={tmp_path}/s'])
    assert len(pngs(tmp_path / 's')) == 2

#----------------------------------------------------------------------------

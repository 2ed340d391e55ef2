"""One contract over the whole solver registry (in the spirit of diffusers' SchedulerCommonTest).

Every configuration below runs through the same checks; no check knows which solver it is testing.
"""

import itertools

import pytest
import torch

import solvers
from models.analytic import EmpiricalDenoiser, GaussianMixture
from solvers.adasde import AdaSDEPredictor
from solvers.amed import AMEDPredictor
from solvers.epd import EPDPredictor
from torch_utils.misc import StackedRandomGenerator

#----------------------------------------------------------------------------
# Configurations: every solver, with the options that change its structure.


PREDICTORS = dict(adasde=AdaSDEPredictor, amed=AMEDPredictor, epd=EPDPredictor)  # options: their hyperparameters


def predictor(name, num_steps, **kwargs):
    return PREDICTORS[name](num_steps, seed=0, **kwargs)


CONFIGS = [
    ('euler', {}), ('heun', {}),
    ('dpm', {}), ('dpm', dict(r=0.3)), ('dpm', dict(substeps=2)), ('heun', dict(substeps=2)),
    *[('dpmpp', dict(max_order=o, predict_x0=p, lower_order_final=l))
      for o, p, l in itertools.product([1, 2, 3], [True, False], [True, False])],
    ('dpmpp', dict(thresholding=True)), ('dpmpp', dict(exact_third_order=True)),
    *[('ipndm', dict(max_order=o)) for o in [1, 2, 3, 4]],
    *[('ipndm_v', dict(max_order=o)) for o in [1, 2, 3, 4]],
    *[('unipc', dict(max_order=o, variant=v, predict_x0=p))
      for o, v, p in itertools.product([1, 2, 3], ['bh1', 'bh2'], [True, False])],
    ('unipc', dict(lower_order_final=False)),
    *[('deis', dict(max_order=o)) for o in [1, 2, 3, 4]],
    ('edm', {}), ('edm', dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)),
    *[('er_sde', dict(order=o, noise_fn=f)) for o in [1, 2, 3] for f in [1, 7]],
    *[('er_sde', dict(noise_fn=f)) for f in [2, 3, 4, 5, 6]],
    ('adasde', dict(gamma=0.02)), ('adasde', dict(gamma=0.0)), ('adasde', dict(gamma=0.02, num_points=2)),
    ('epd', {}), ('epd', dict(num_points=1, scale_time=0.05)), ('epd', dict(num_points=3, fcn=True)),
    ('epd', dict(base='ipndm', scale_dir=0.05, scale_time=0.2)), ('epd', dict(base='ipndm', num_points=1, max_order=4)),
    *[('amed', dict(base=b)) for b in ['amed', 'euler', 'dpm', 'ipndm', 'dpmpp']],
    ('amed', dict(base='ipndm', max_order=4, scale_time=0.2)), ('amed', dict(base='dpmpp', predict_x0=False)),
    ('amed', dict(base='dpmpp', max_order=2, lower_order_final=False, thresholding=True, scale_dir=0)),
]
IDS = [f'{name}-{"-".join(f"{k}={v}" for k, v in opts.items())}' for name, opts in CONFIGS]


def options_for(name, opts, num_steps):
    """Solver options; for a learned solver the predictor hyperparameters become a predictor for this num_steps."""
    return dict(predictor=predictor(name, num_steps, **opts)) if name in PREDICTORS else dict(opts)


def mixture(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 0.5
    return GaussianMixture(means, torch.tensor([0.05, 0.2, 0.4]), weights=[1, 2, 3])


def run(name, opts, net, seeds, num_steps, dtype=torch.float64, afs=False):
    rnd = StackedRandomGenerator('cpu', seeds)
    options = options_for(name, opts, num_steps)
    schedule_type, rho = solvers.solver_info(name).schedule
    sigmas = solvers.get_schedule(num_steps, net.sigma_min, net.sigma_max, schedule_type, rho)
    x = rnd.randn([len(seeds), *net.shape], dtype=dtype) * float(sigmas[0])
    return solvers.get_solver(name)(net, x, sigmas, randn_like=rnd.randn_like, afs=afs, **options)

#----------------------------------------------------------------------------


def test_registry_lists_every_solver_of_the_design():
    expected = {'euler', 'heun', 'dpm', 'dpmpp', 'ipndm', 'ipndm_v', 'unipc', 'deis', 'edm', 'er_sde', 'adasde',
                'amed', 'epd'}
    assert set(solvers.SOLVERS) == expected
    assert {name for name, _ in CONFIGS} == expected


@pytest.mark.parametrize('name,opts', CONFIGS, ids=IDS)
def test_shape_dtype_and_finite_over_step_counts(name, opts):
    net = mixture()
    for num_steps in [2, 3, 4, 5, 7, 10, 20, 50]:
        for dtype in [torch.float32, torch.float64]:
            out = run(name, opts, net, [0, 1], num_steps, dtype=dtype, afs=num_steps % 2 == 0)
            assert out.shape == (2, *net.shape) and out.dtype == dtype
            assert torch.isfinite(out).all(), (num_steps, dtype)
    empirical = EmpiricalDenoiser(mixture().sample(20, torch.Generator().manual_seed(1)))
    assert torch.isfinite(run(name, opts, empirical, [0, 1], 6)).all()


@pytest.mark.parametrize('name,opts', CONFIGS, ids=IDS)
def test_deterministic_and_independent_of_the_batch(name, opts):
    net = mixture()
    alone = run(name, opts, net, [7], 6)
    again = run(name, opts, net, [7], 6)
    in_batch = run(name, opts, net, [3, 7, 11, 12], 6)
    assert torch.equal(alone, again)
    assert torch.allclose(in_batch[1:2], alone, rtol=0, atol=1e-12)
    other = run(name, opts, net, [8], 6)
    assert not torch.allclose(other, alone)


@pytest.mark.parametrize('name,opts', CONFIGS, ids=IDS)
def test_network_calls_match_nfe(name, opts):
    net = mixture()
    calls = []

    def counting(x, sigma, **kwargs):
        calls.append(len(x))
        return net(x, sigma, **kwargs)
    counting.sigma_min, counting.sigma_max, counting.shape = net.sigma_min, net.sigma_max, net.shape
    counting.bottleneck, counting.get_submodule = net.bottleneck, net.get_submodule  # what AMED reads
    for num_steps, afs in itertools.product([2, 3, 4, 5, 6, 9], [False, True]):
        calls.clear()
        run(name, opts, counting, [0, 1, 2], num_steps, afs=afs)
        options = options_for(name, opts, num_steps)
        # Evaluations per image; a call may stack whole copies of the batch (EPD's parallel points).
        assert sum(calls) == 3 * solvers.nfe(name, num_steps, afs=afs, **options), (num_steps, afs)
        assert all(n % 3 == 0 for n in calls)


@pytest.mark.parametrize('name,opts', CONFIGS, ids=IDS)
def test_stochastic_flag_matches_behaviour(name, opts):
    """A solver flagged deterministic ignores randn_like; a stochastic one uses it."""
    net = mixture()
    sigmas = solvers.get_schedule(5, net.sigma_min, net.sigma_max, *solvers.solver_info(name).schedule)
    options = options_for(name, opts, 5)
    x = torch.randn(2, *net.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    zero = solvers.get_solver(name)(net, x, sigmas, randn_like=torch.zeros_like, **options)
    ones = solvers.get_solver(name)(net, x, sigmas, randn_like=torch.ones_like, **options)
    assert solvers.solver_info(name).stochastic(**options) == (not torch.equal(zero, ones))

#----------------------------------------------------------------------------


def test_unknown_solver_and_option_are_refused():
    with pytest.raises(ValueError, match="unknown solver 'nope'"):
        solvers.get_solver('nope')
    with pytest.raises(ValueError, match="solver 'euler' has no option max_order"):
        solvers.nfe('euler', 5, max_order=3)


def test_schedule_endpoints_and_errors():
    for schedule_type in ['polynomial', 'logsnr', 'time_uniform']:
        sigmas = solvers.get_schedule(9, 0.002, 80, schedule_type, 3)
        assert sigmas.dtype == torch.float64 and len(sigmas) == 9
        assert float(sigmas[0]) == 80 and float(sigmas[-1]) == 0.002 and bool((sigmas.diff() < 0).all())
    with pytest.raises(ValueError, match='unknown schedule_type'):
        solvers.get_schedule(5, 0.002, 80, 'cosine')
    with pytest.raises(ValueError, match='discrete-time model'):
        solvers.get_schedule(5, 0.002, 80, 'discrete')
    with pytest.raises(ValueError, match='at least 2'):
        solvers.get_schedule(1, 0.002, 80)

#----------------------------------------------------------------------------
# One option list: the registry's. Every option of every solver has a sample.py flag (except objects, which come
# from their own flag), is documented in OPTION_DOCS, and is named in README's solver table on its solver's row.


def test_every_solver_option_has_a_flag_and_a_readme_mention():
    import os
    import re

    import sample
    table = solvers.option_table()
    assert set(table) == {name for info in solvers.SOLVERS.values() for name in info.options}
    flags = {p.name: p for p in sample.main.params}
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')).read()
    rows = {m.group(1): m.group(0) for m in re.finditer(r'^\| `(\w+)` \|.*$', readme, re.M)}
    for name, (kind, doc, owners) in table.items():
        if kind is not None:
            assert name in flags and doc in flags[name].help, name
            assert flags[name].type.name == {int: 'integer', bool: 'boolean', float: 'float', str: 'text'}[kind]
        for solver in owners:
            assert solver in rows and f'`{name}`' in rows[solver], (solver, name)
    for solver in solvers.SOLVERS:
        assert solver in rows, f'README has no row for solver {solver}'


def test_option_docs_refuse_an_undocumented_option():
    from solvers.registry import SOLVERS, SolverInfo

    def fn(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False, *, warp=1.0):
        return x
    SOLVERS['_probe'] = SolverInfo('_probe', fn, lambda n, **o: n, ('polynomial', 7), lambda **o: False)
    try:
        with pytest.raises(KeyError, match="'_probe' has an option 'warp' that OPTION_DOCS does not describe"):
            solvers.option_table()
    finally:
        del SOLVERS['_probe']

#----------------------------------------------------------------------------
# One predictor registry and file format for every learned solver.


@pytest.mark.parametrize('kind', sorted(PREDICTORS))
def test_every_predictor_kind_round_trips_through_one_loader(kind, tmp_path):
    from solvers.learned import PREDICTORS as REGISTERED
    from solvers.learned import load_predictor
    assert set(REGISTERED) == set(PREDICTORS) and REGISTERED[kind] is PREDICTORS[kind]
    p = PREDICTORS[kind](4, seed=1, settings=dict(schedule_type='logsnr', afs=True))
    p.save(tmp_path / 'p.safetensors')
    q = load_predictor(tmp_path / 'p.safetensors')
    assert type(q) is type(p) and q.hyperparams() == p.hyperparams() and q.settings == p.settings
    assert all(torch.equal(a, b) for a, b in zip(p.state_dict().values(), q.state_dict().values()))
    assert not q.training and not any(t.requires_grad for t in q.parameters())
    with pytest.raises(ValueError, match='trained for schedule_type=.logsnr., not .polynomial.'):
        q.check_compatible(schedule_type='polynomial', afs=None)
    with pytest.raises(ValueError, match='trained for num_steps=4, not 5'):
        q.check_compatible(num_steps=5)
    other = next(k for k in sorted(PREDICTORS) if k != kind)
    with pytest.raises(ValueError, match=f'is not an? {PREDICTORS[other].title} predictor file'):
        PREDICTORS[other].load(tmp_path / 'p.safetensors')
    # The registered solver of that kind takes it, and its real NFE is the predictor's own count.
    assert solvers.nfe(kind, 4, afs=True, predictor=q) == q.nfe(4) - 1

#----------------------------------------------------------------------------

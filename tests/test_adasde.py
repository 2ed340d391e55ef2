"""AdaSDE predictor and step: the coefficient maps, one step by hand, the DPM-Solver-2 special case, files."""

import math
import pickle
import sys

import pytest
import torch

import solvers
from models.analytic import GaussianMixture
from solvers.adasde import AdaSDEPredictor, adasde_step

#----------------------------------------------------------------------------


def gaussian():
    return GaussianMixture(torch.full((1, 1, 1, 2), 0.3, dtype=torch.float64), 0.5)


def D(x, sigma):  # the exact denoiser of N(0.3, 0.5^2), by hand
    return 0.3 + 0.25 / (0.25 + sigma ** 2) * (x - 0.3)


def test_coefficient_maps_match_the_spec():
    p = AdaSDEPredictor(4, num_points=2, scale_dir=0.05, scale_time=0.2, gamma=0.02, seed=0)
    with torch.no_grad():
        for table in [p.r_params, p.scale_dir_params, p.scale_time_params, p.gamma_params, p.weight_params]:
            table.copy_(torch.tensor([[0.0, 1.0], [-2.0, 0.5], [3.0, -1.0]]))
    sig = lambda u: 1 / (1 + math.exp(-u))  # noqa: E731
    params = {k: v.detach() for k, v in p.step_params(1).items()}
    for j, u in enumerate([-2.0, 0.5]):
        assert float(params['r'][j]) == pytest.approx(sig(u), abs=1e-15)
        assert float(params['c'][j]) == pytest.approx(1 + 0.05 * math.tanh(u / 2), abs=1e-15)
        assert float(params['a'][j]) == pytest.approx(1 + 0.2 * math.tanh(u / 2), abs=1e-15)
        assert float(params['gamma'][j]) == pytest.approx(2e-4 + (0.02 - 2e-4) * sig((u + 2 * math.log(1.5)) / 2),
                                                          abs=1e-15)
    w = [math.exp(-2.0), math.exp(0.5)]
    assert params['w'].tolist() == pytest.approx([w[0] / sum(w), w[1] / sum(w)], abs=1e-15)
    # At u = 0, gamma sits at 60% of its range; on step 0 it is forced to 0.
    assert float(p.step_params(0)['gamma'][0].detach()) == 0
    with torch.no_grad():
        p.gamma_params.zero_()
    assert float(p.step_params(2)['gamma'][0].detach()) == pytest.approx(2e-4 + 0.6 * (0.02 - 2e-4), abs=1e-15)
    # fcn fixes c = 1 on the last step only.
    p.fcn = True
    assert p.step_params(2)['c'].tolist() == [1.0, 1.0] and p.step_params(1)['c'].tolist() != [1.0, 1.0]


def test_one_step_by_hand():
    net = gaussian()
    p = AdaSDEPredictor(3, scale_dir=0.05, scale_time=0.2, gamma=0.02, seed=0)
    params = p.step_params(1)
    r, c, a, g = (float(params[k][0].detach()) for k in ['r', 'c', 'a', 'gamma'])
    x = torch.tensor([[[[2.0, -1.0]]]], dtype=torch.float64)
    eps = torch.tensor([[[[0.5, -1.5]]]], dtype=torch.float64)
    out = adasde_step(net, x, torch.tensor(4.0, dtype=torch.float64), 1.5, params, randn_like=lambda v: eps)
    for k in range(2):
        xv, ev = float(x.flatten()[k]), float(eps.flatten()[k])
        t_hat = (1 + g) * 4.0
        x_hat = xv + math.sqrt(t_hat ** 2 - 16.0) * ev
        d_hat = (x_hat - D(x_hat, t_hat)) / t_hat
        s = 1.5 ** r * t_hat ** (1 - r)
        x_mid = x_hat + (s - t_hat) * d_hat
        d_mid = (x_mid - D(x_mid, a * s)) / s
        assert float(out.flatten()[k].detach()) == pytest.approx(x_hat + (1.5 - t_hat) * c * d_mid, abs=1e-12)


@pytest.mark.parametrize('afs', [False, True])
def test_reduces_to_dpm_solver_2(afs):
    """One point, gamma 0, no c_n / a_n, r = 1/2: exactly the 'dpm' solver (the official adasde_sampler)."""
    net = gaussian()
    p = AdaSDEPredictor(6, scale_dir=0, scale_time=0, gamma=0)
    with torch.no_grad():
        p.r_params.zero_()
    sigmas = solvers.get_schedule(6, 0.002, 80, 'time_uniform', 1)
    x = torch.randn(4, 1, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    ada = solvers.get_solver('adasde')(net, x, sigmas, afs=afs, predictor=p)
    dpm = solvers.get_solver('dpm')(net, x, sigmas, afs=afs)
    assert torch.allclose(ada, dpm, rtol=1e-13, atol=1e-13)


def test_wrong_step_count_is_refused():
    with pytest.raises(ValueError, match='trained for num_steps=4, not 5'):
        solvers.get_solver('adasde')(gaussian(), torch.zeros(1, 1, 1, 2), solvers.get_schedule(5, 0.002, 80),
                                     predictor=AdaSDEPredictor(4))
    with pytest.raises(ValueError, match='needs a trained predictor'):
        solvers.get_solver('adasde')(gaussian(), torch.zeros(1, 1, 1, 2), solvers.get_schedule(4, 0.002, 80))
    with pytest.raises(ValueError, match="trained for dataset_name='digits', not 'cifar10'"):
        AdaSDEPredictor(4, settings=dict(dataset_name='digits')).check_compatible(dataset_name='cifar10')

#----------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    p = AdaSDEPredictor(5, num_points=2, gamma=0.01, fcn=True, seed=3,
                        settings=dict(dataset_name='digits', schedule_type='time_uniform', schedule_rho=1.0, afs=True))
    p.save(tmp_path / 'p.safetensors')
    q = AdaSDEPredictor.load(tmp_path / 'p.safetensors')
    assert q.hyperparams() == p.hyperparams() and q.settings == p.settings
    for i in range(4):
        for k, v in p.step_params(i).items():
            assert torch.equal(v, q.step_params(i)[k])
    (tmp_path / 'bad.safetensors').write_bytes(b'not a file')
    with pytest.raises(ValueError, match='cannot read AdaSDE predictor'):
        AdaSDEPredictor.load(tmp_path / 'bad.safetensors')


def test_official_snapshot_import_runs_no_code(tmp_path, monkeypatch, reference_package):
    """An official snapshot is a pickle of persistence classes whose source must not execute on import."""
    reference_package({'training/__init__.py': '', 'training/networks.py': '''
        import torch
        from torch_utils import persistence
        @persistence.persistent_class
        class adasde_predictor(torch.nn.Module):
            def __init__(self, num_steps=4, num_points=1):
                super().__init__()
                self.num_steps, self.num_points, self.dataset_name = num_steps, num_points, 'digits'
                self.schedule_type, self.schedule_rho, self.afs = 'time_uniform', 1, True
                self.scale_dir, self.scale_time, self.gamma, self.gamma_min, self.fcn = 0.05, 0.2, 0.02, 1e-4, False
                self.guidance_type = self.guidance_rate = None
                self.M, self.sampler_tea = 3, 'dpm'
                for name in ['r_params', 'scale_dir_params', 'scale_time_params', 'weight_s', 'gamma_params']:
                    setattr(self, name, torch.nn.Parameter(torch.randn(num_steps - 1, num_points)))
                self.sigmoid = torch.nn.Sigmoid()
        raise_on_exec = True
    '''})
    from training.networks import adasde_predictor
    official = adasde_predictor(num_steps=4)
    with open(tmp_path / 'network-snapshot-000010.pkl', 'wb') as f:
        pickle.dump(dict(model=official, loss_fn=None), f)
    incomplete = adasde_predictor(num_steps=4)
    del incomplete.gamma  # e.g. a snapshot of a version without the churn
    with open(tmp_path / 'incomplete.pkl', 'wb') as f:
        pickle.dump(dict(model=incomplete, loss_fn=None), f)
    del sys.modules['training.networks'], sys.modules['training']  # the import must not need (or run) them
    p = AdaSDEPredictor.load_official(tmp_path / 'network-snapshot-000010.pkl')
    assert p.num_steps == 4 and p.gamma_min == 1e-4 and p.settings['dataset_name'] == 'digits'
    assert p.settings['schedule_rho'] == 1.0 and p.settings['afs'] is True
    assert torch.equal(p.weight_params, official.weight_s.detach())
    assert torch.equal(p.r_params, official.r_params.detach())
    assert not any(name.startswith('_imported_module_') and hasattr(m, 'raise_on_exec')
                   for name, m in sys.modules.items())
    # A missing attribute is one line, from the class and from the loader that tells the kind by content.
    for load in (AdaSDEPredictor.load_official, AdaSDEPredictor.load, solvers.learned.load_predictor):
        with pytest.raises(ValueError, match=r"incomplete\.pkl: incomplete AdaSDE snapshot \(missing or malformed: "
                                             r"'gamma'\)$"):
            load(tmp_path / 'incomplete.pkl')

    # sample.py takes the .pkl directly and samples exactly as with the same tables in our format.
    from click.testing import CliRunner

    import sample
    p.save(tmp_path / 'same.safetensors')
    for name in ('network-snapshot-000010.pkl', 'same.safetensors'):
        result = CliRunner().invoke(sample.main, [f'--predictor_path={tmp_path / name}', '--seeds=0-3',
                                                  f'--outdir={tmp_path / name}-out', '--no-subdirs'])
        assert result.exit_code == 0, result.output
    for seed in range(4):
        png = f'{seed:06d}.png'
        assert (tmp_path / 'network-snapshot-000010.pkl-out' / png).read_bytes() == \
            (tmp_path / 'same.safetensors-out' / png).read_bytes()

#----------------------------------------------------------------------------

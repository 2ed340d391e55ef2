"""integrations/k_diffusion_samplers.py through the k-diffusion package (PyPI `k-diffusion`) around the tiny random
Stable Diffusion UNet of tests/tiny_sd.py: every solver, and the AdaSDE, EPD and AMED predictors trained by
train.py on it, against sample.sample_batch for the same seeds.

The comparison. k-diffusion's `external.DiscreteEpsDDPMDenoiser` (what A1111 and Forge wrap SD with) computes
D = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)) like models/sd.py, but maps sigma to the UNet's time t by
interpolating log sigma linearly between the table's integer indices, while this project uses DPM-Solver's
continuous time (log alpha linear in t, models/discrete.py). The two maps agree at the table's own noise levels (t an
integer) and differ in between (by up to 0.086 index steps on SD's table), where multi-call solvers evaluate. So:
(1) on the table's own levels, with solvers that evaluate only at the time points, the unmodified k-diffusion
    wrapper gives sample.py's latents;
(2) for every solver and predictor, the same wrapper with only its sigma_to_t replaced by the project's map
    (everything else, scalings and eps -> D, k-diffusion's) gives sample.py's latents;
and the project's samplers agree with k-diffusion's own Euler, Heun and DPM++(2M) samplers on the same wrapper.
Agreement is to 1e-5 relative to the latents' size (float32 rounding of the two implementations' scalings).
k-diffusion's package __init__ imports its training stack (torchvision, CLIP, wandb, ...); the test loads only
`k_diffusion.external` and `k_diffusion.sampling` (which need torchdiffeq and torchsde; torchvision, imported for
image conversions they do not use, is stood in for when absent), from the installed package
(`pip install --no-deps k-diffusion`, see README).
"""

import importlib
import importlib.util
import sys
import types

import pytest
import torch

pytest.importorskip('diffusers')
pytest.importorskip('torchsde')
pytest.importorskip('torchdiffeq')

import sample  # noqa: E402
import solvers  # noqa: E402
from integrations import k_diffusion_samplers as ks  # noqa: E402
from models.sd import load_sd  # noqa: E402

PROMPTS = ['a photo of a cat', 'two dogs on a red sofa', 'a bowl of fruit', 'a red car']
GUIDANCE = 7.5


def import_k_diffusion():
    """(k_diffusion.external, k_diffusion.sampling) of the installed package, without its package __init__."""
    spec = importlib.util.find_spec('k_diffusion')
    if spec is None:
        pytest.skip('k-diffusion is not installed (pip install --no-deps k-diffusion)')
    if 'k_diffusion' not in sys.modules:
        package = types.ModuleType('k_diffusion')
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules['k_diffusion'] = package
    # k_diffusion.utils imports torchvision's image conversions (unused by external and sampling): without
    # torchvision, an empty stand-in is there during the import only.
    stubs = {}
    if importlib.util.find_spec('torchvision') is None:
        stubs = {name: types.ModuleType(name) for name in
                 ('torchvision', 'torchvision.transforms', 'torchvision.transforms.functional')}
        stubs['torchvision'].transforms = stubs['torchvision.transforms']
        stubs['torchvision.transforms'].functional = stubs['torchvision.transforms.functional']
    sys.modules.update(stubs)
    try:
        return importlib.import_module('k_diffusion.external'), importlib.import_module('k_diffusion.sampling')
    finally:
        for name in stubs:
            sys.modules.pop(name)


def close(a, b):
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


class GuidedEps(torch.nn.Module):
    """The tiny UNet's classifier-free guided noise prediction at (x_vp, t): what k-diffusion's wrappers call."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, cond=None, uncond=None):
        context = torch.cat([uncond, cond])
        out = self.unet(torch.cat([x] * 2), torch.cat([t] * 2).float(), encoder_hidden_states=context,
                        return_dict=False)[0]
        u, c = out.chunk(2)
        return u + GUIDANCE * (c - u)


@pytest.fixture(scope='module')
def setup(sd_dir):
    external, sampling = import_k_diffusion()
    net = load_sd(sd_dir, guidance_rate=GUIDANCE)
    acp = torch.exp(2 * net.log_alpha_array).float()
    plain = external.DiscreteEpsDDPMDenoiser(GuidedEps(net.unet), acp, quantize=False)

    class ContinuousTime(external.DiscreteEpsDDPMDenoiser):
        def sigma_to_t(self, sigma, quantize=None):
            return net.network_time(sigma)
    continuous = ContinuousTime(GuidedEps(net.unet), acp, quantize=False)
    return dict(net=net, plain=plain, continuous=continuous, sampling=sampling)


def run(setup, model, name, sigmas, seeds, prompts, **options):
    net = setup['net']
    args = net.prompt_args(prompts)
    noise, noise_sampler = ks.per_image_noise(seeds, [4, 8, 8])
    extra_args = dict(cond=args['condition'], uncond=args['unconditional_condition'])
    return ks.make_sampler(name)(model, noise * float(sigmas[0]), sigmas, extra_args=extra_args,
                                 noise_sampler=noise_sampler, **options)


def reference(setup, name, sigmas, seeds, prompts, afs=False, **options):
    net = setup['net']
    return sample.sample_batch(net, seeds, name, ks.positive_sigmas(sigmas), options, afs=afs,
                               extra_args=net.prompt_args(prompts), dtype=torch.float32)


def grid_sigmas(net, indices):
    """The table's own noise levels at these DDPM indices, then 0 (the k-diffusion convention)."""
    levels = net.sigma((torch.tensor(indices, dtype=torch.float64) + 1) / net.M)
    return torch.cat([levels, levels.new_zeros(1)])


@pytest.mark.parametrize('name,options', [('euler', {}), ('dpmpp', {}), ('unipc', {}), ('ipndm', {}), ('deis', {}),
                                          ('er_sde', {})])
def test_unmodified_wrapper_on_the_table_levels(setup, name, options):
    sigmas = grid_sigmas(setup['net'], [999, 749, 499, 249, 60])
    assert torch.allclose(setup['plain'].sigma_to_t(sigmas[:-1].float()).double(),
                          torch.tensor([999, 749, 499, 249, 60.], dtype=torch.float64), atol=2e-3)
    x = run(setup, setup['plain'], name, sigmas, [4, 5], PROMPTS[:2], **options)
    assert close(x, reference(setup, name, sigmas, [4, 5], PROMPTS[:2], **options))


CASES = [('euler', {}, False), ('heun', {}, False), ('dpm', {}, True), ('dpmpp', {}, False), ('unipc', {}, True),
         ('ipndm', {}, False), ('ipndm_v', {}, False), ('deis', {}, True), ('edm', {'S_churn': 10}, False),
         ('er_sde', {}, False)]


def test_every_training_free_solver_is_covered():
    assert {name for name, _, _ in CASES} == set(ks.TRAINING_FREE) == set(ks.SAMPLERS)


@pytest.mark.parametrize('name,options,afs', CASES)
def test_samplers_equal_sample_py(setup, name, options, afs):
    net = setup['net']
    info = solvers.solver_info(name)
    sigmas = ks.schedule_sigmas(net, 5, *info.schedule)
    x = run(setup, setup['continuous'], name, sigmas, [1, 2], PROMPTS[:2], afs=afs, **options)
    assert close(x, reference(setup, name, sigmas, [1, 2], PROMPTS[:2], afs=afs, **options))


@pytest.mark.parametrize('kind', ['adasde', 'epd', 'amed'])
def test_predictor_samplers_equal_sample_py(setup, sd_predictors, kind):
    import glob
    import os
    file, = glob.glob(os.path.join(sd_predictors[kind], '*.safetensors'))
    sampler, predictor = ks.predictor_sampler(file)
    net = setup['net']
    schedule = ks.TableSchedule(torch.sqrt(1 / torch.exp(2 * net.log_alpha_array) - 1))
    sigmas = ks.predictor_sigmas(predictor, schedule)
    assert torch.allclose(sigmas[:-1], solvers.get_schedule(3, net.sigma_min, net.sigma_max, 'discrete', 1, net=net))
    args = net.prompt_args(PROMPTS[:3])
    noise, noise_sampler = ks.per_image_noise([5, 6, 7], [4, 8, 8])
    model = setup['continuous']
    model.bottleneck, model.bottleneck_cond_half = 'inner_model.unet.mid_block', True  # where AMED reads
    x = sampler(model, noise * float(sigmas[0]), sigmas, extra_args=dict(cond=args['condition'],
                uncond=args['unconditional_condition']), noise_sampler=noise_sampler)
    expected = sample.sample_batch(net, [5, 6, 7], kind, sigmas[:-1], dict(predictor=predictor),
                                   afs=bool(predictor.settings['afs']), extra_args=args, dtype=torch.float32)
    assert close(x, expected)


def test_per_image_determinism_and_comfyui_seed(setup):
    net = setup['net']
    sigmas = ks.schedule_sigmas(net, 5, 'polynomial', 7)
    batch = run(setup, setup['continuous'], 'er_sde', sigmas, [10, 11, 12, 13], PROMPTS)
    alone = run(setup, setup['continuous'], 'er_sde', sigmas, [12], PROMPTS[2:3])
    assert close(batch[2:3], alone)
    # ComfyUI's convention: extra_args['seed'] seeds one generator for the batch's noise; the model gets it too.
    calls = []

    def model(x, sigma, seed=None):
        calls.append(seed)
        return x * 0.5
    x0 = torch.ones([2, 1, 2, 2]) * float(sigmas[0])
    first = ks.SAMPLERS['er_sde'](model, x0, sigmas, extra_args=dict(seed=3))
    again = ks.SAMPLERS['er_sde'](model, x0, sigmas, extra_args=dict(seed=3))
    other = ks.SAMPLERS['er_sde'](model, x0, sigmas, extra_args=dict(seed=4))
    assert torch.equal(first, again) and not torch.equal(first, other) and set(calls) == {3, 4}
    assert len(calls) == 3 * solvers.nfe('er_sde', 5)


def test_cross_check_with_k_diffusion_samplers(setup):
    """The project's Euler, Heun and DPM-Solver++(2M) against k-diffusion's own, on the same wrapper and levels."""
    net, sampling, model = setup['net'], setup['sampling'], setup['plain']
    sigmas = grid_sigmas(net, [999, 749, 499, 249, 60])[:-1]  # no final 0: both end at the last level
    args = net.prompt_args(PROMPTS[:2])
    extra = dict(cond=args['condition'], uncond=args['unconditional_condition'])
    x = torch.randn([2, 4, 8, 8], generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    for ours, theirs, options in [('euler', sampling.sample_euler, {}), ('heun', sampling.sample_heun, {}),
                                  ('dpmpp', sampling.sample_dpmpp_2m, {'max_order': 2, 'lower_order_final': False})]:
        mine = ks.make_sampler(ours)(model, x, sigmas, extra_args=extra, **options)
        assert close(mine, theirs(model, x, sigmas.float(), extra_args=extra, disable=True)), ours


def test_callback_and_errors(setup):
    seen = []
    model = lambda x, sigma: x * 0.5  # noqa: E731
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.0])
    ks.SAMPLERS['heun'](model, torch.ones(1, 1, 1, 1) * 10, sigmas, callback=seen.append)
    assert [d['i'] for d in seen] == [0, 1] and set(seen[0]) == {'x', 'i', 'sigma', 'sigma_hat', 'denoised'}
    with pytest.raises(ValueError, match='at least two positive decreasing noise levels'):
        ks.SAMPLERS['euler'](model, torch.ones(1), torch.tensor([1.0, 0.0, 0.5]))
    with pytest.raises(ValueError, match='needs a trained predictor'):
        ks.make_sampler('adasde')(model, torch.ones(1), sigmas)
    with pytest.raises(ValueError, match="unknown solver 'nope'"):
        ks.make_sampler('nope')
    with pytest.raises(ValueError, match="solver 'euler' has no option r"):
        ks.SAMPLERS['euler'](model, torch.ones(1), sigmas, r=0.5)

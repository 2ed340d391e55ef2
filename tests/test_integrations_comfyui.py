"""The ComfyUI custom-node folder integrations/comfyui/: it imports without ComfyUI, and with a minimal stand-in
for ComfyUI's modules it registers its samplers and builds SAMPLER / SIGMAS.

ComfyUI itself (GPL-3.0, not on PyPI) is not installed: the stand-in below holds only what the node file touches,
as ComfyUI defines it (comfy/samplers.py: KSAMPLER(sampler_function, extra_options), KSAMPLER_NAMES,
SAMPLER_NAMES; comfy/k_diffusion/sampling.py where a KSampler name <n> is looked up as sample_<n>; a MODEL whose
get_model_object('model_sampling') has the noise-level table `sigmas`). KSAMPLER.sample is reduced to the call
ComfyUI makes: sampler_function(model, noise * sigmas[0], sigmas, extra_args=..., callback=..., disable=...,
**extra_options), with the node's seed in extra_args.
"""

import glob
import importlib
import os
import sys
import types

import pytest
import torch

import solvers
from integrations import k_diffusion_samplers as ks


class KSAMPLER:
    def __init__(self, sampler_function, extra_options=None, inpaint_options=None):
        self.sampler_function = sampler_function
        self.extra_options = dict(extra_options or {})

    def sample(self, model, sigmas, extra_args, noise):
        return self.sampler_function(model, noise * sigmas[0], sigmas, extra_args=extra_args, callback=None,
                                     disable=True, **self.extra_options)


@pytest.fixture
def node(monkeypatch):
    """A fresh import of the node package with comfy.samplers / comfy.k_diffusion.sampling stand-ins present."""
    comfy, samplers, kd, sampling = (types.ModuleType(n) for n in ('comfy', 'comfy.samplers', 'comfy.k_diffusion',
                                                                   'comfy.k_diffusion.sampling'))
    samplers.KSAMPLER = KSAMPLER
    samplers.KSAMPLER_NAMES = ['euler', 'heun']
    samplers.SAMPLER_NAMES = samplers.KSAMPLER_NAMES + ['ddim']
    comfy.samplers, comfy.k_diffusion, kd.sampling = samplers, kd, sampling
    for name, module in [('comfy', comfy), ('comfy.samplers', samplers), ('comfy.k_diffusion', kd),
                         ('comfy.k_diffusion.sampling', sampling)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, 'integrations.comfyui', raising=False)
    module = importlib.import_module('integrations.comfyui')
    yield module, samplers, sampling
    sys.modules.pop('integrations.comfyui', None)


def test_imports_without_comfyui(monkeypatch):
    monkeypatch.delitem(sys.modules, 'integrations.comfyui', raising=False)
    monkeypatch.setitem(sys.modules, 'comfy', None)  # `import comfy` raises ImportError
    module = importlib.import_module('integrations.comfyui')
    assert set(module.NODE_CLASS_MAPPINGS) == {'AdaSDESolverSampler', 'AdaSDEPredictorSampler'}
    assert module.SolverSampler.INPUT_TYPES()['required']['solver'][0] == ks.TRAINING_FREE
    sys.modules.pop('integrations.comfyui', None)


def test_registers_and_builds_samplers(node):
    module, samplers, sampling = node
    names = [f'adasde_{n}' for n in ks.TRAINING_FREE]
    assert samplers.KSAMPLER_NAMES == ['euler', 'heun', *names]
    assert samplers.SAMPLER_NAMES == ['euler', 'heun', 'ddim', *names]
    assert all(getattr(sampling, f'sample_{n}') is ks.SAMPLERS[n.removeprefix('adasde_')] for n in names)
    # A SAMPLER node: ComfyUI's call with the node's seed in extra_args, equal to the sampler called directly.
    ksampler, = module.SolverSampler().get_sampler('er_sde', False, '{"order": 2}')
    assert ksampler.extra_options == {'order': 2, 'afs': False}
    seen = []

    def model(x, sigma, seed=None):
        seen.append(seed)
        return x * 0.5
    sigmas = torch.tensor([14.6, 3.0, 0.6, 0.03, 0.0])
    noise = torch.randn([2, 4, 3, 3], generator=torch.Generator().manual_seed(0))
    out = ksampler.sample(model, sigmas, dict(seed=7), noise)
    direct = ks.SAMPLERS['er_sde'](model, noise * sigmas[0], sigmas, extra_args=dict(seed=7), order=2)
    assert torch.equal(out, direct) and set(seen) == {7} and len(seen) == 2 * solvers.nfe('er_sde', 4)
    for bad, message in [('{"order": 5}', 'order must be 1, 2 or 3'), ('{"r": 1}', "solver 'er_sde' has no option r"),
                         ('[1]', 'options must be a JSON object'), ('{oops', 'options must be a JSON object')]:
        with pytest.raises(ValueError, match=message):
            module.SolverSampler().get_sampler('er_sde', False, bad)[0].sample(model, sigmas, {}, noise)


def test_predictor_node(node, sd_dir, sd_predictors):
    from models.sd import load_sd
    module = node[0]
    net = load_sd(sd_dir, guidance_rate=7.5)
    table = torch.sqrt(1 / torch.exp(2 * net.log_alpha_array) - 1).float()

    class Model:  # ComfyUI's ModelPatcher, as far as the node reads it
        def get_model_object(self, name):
            assert name == 'model_sampling'
            return types.SimpleNamespace(sigmas=table)
    file, = glob.glob(os.path.join(sd_predictors['adasde'], '*.safetensors'))
    ksampler, sigmas = module.PredictorSampler().get_sampler(Model(), file)
    expected = solvers.get_schedule(3, net.sigma_min, net.sigma_max, 'discrete', 1, net=net)
    assert torch.allclose(sigmas[:-1].double(), expected, rtol=1e-5) and sigmas[-1] == 0
    assert ksampler.sampler_function.__name__ == 'sample_adasde' and ksampler.extra_options == {}
    amed, = glob.glob(os.path.join(sd_predictors['amed'], '*.safetensors'))
    with pytest.raises(ValueError, match="AMED reads the UNet's bottleneck"):
        module.PredictorSampler().get_sampler(Model(), amed)
    with pytest.raises(ValueError, match='cannot read'):
        module.PredictorSampler().get_sampler(Model(), os.path.join(sd_dir, 'model_index.json'))

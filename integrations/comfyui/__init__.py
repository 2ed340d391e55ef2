"""ComfyUI custom nodes: this project's solvers as SAMPLERs for SamplerCustom / SamplerCustomAdvanced.

Install (docs/comfyui.md): `pip install -e <this repository>` into ComfyUI's Python, then copy or link this folder
to `ComfyUI/custom_nodes/adasde_solvers`. ComfyUI is GPL-3.0; this file only adapts the MIT-licensed project to
its node API (comfy.samplers.KSAMPLER) and imports ComfyUI only when a node runs or ComfyUI is present.

Nodes:
- "Solver sampler (adasde)": any training-free solver of the registry, its options as JSON, AFS.
- "Predictor sampler (adasde)": a learned AdaSDE or EPD predictor file (train.py's .safetensors, or an official
  snapshot) -> SAMPLER, and the SIGMAS it was trained for on the model's own noise-level table.
Besides, when ComfyUI is present, every training-free solver joins the plain KSampler's list as `adasde_<name>`.

What differs from sample.py: ComfyUI maps sigma to the UNet's time by interpolating log sigma over the table (the
project uses the continuous time of models/discrete.py; the two agree on the table's own levels), its noise comes
from one generator seeded by the node's seed for the whole batch, and CFG is ComfyUI's. AMED is refused: it reads
the UNet's bottleneck, which ComfyUI's model wrapper does not expose.
"""

import json

import solvers
from integrations import k_diffusion_samplers as ks

PREFIX = 'adasde_'
CATEGORY = 'sampling/custom_sampling/samplers'


def _ksampler(fn, options):
    import comfy.samplers
    return comfy.samplers.KSAMPLER(fn, extra_options=options)


class SolverSampler:
    """Any training-free solver of this project as a ComfyUI SAMPLER."""

    @classmethod
    def INPUT_TYPES(cls):
        return {'required': {
            'solver': (ks.TRAINING_FREE, {'default': 'dpmpp'}),
            'afs': ('BOOLEAN', {'default': False}),
            'options': ('STRING', {'default': '{}', 'multiline': False}),
        }}

    RETURN_TYPES = ('SAMPLER',)
    FUNCTION = 'get_sampler'
    CATEGORY = CATEGORY

    def get_sampler(self, solver, afs=False, options='{}'):
        try:
            given = json.loads(options or '{}')
        except json.JSONDecodeError as e:
            raise ValueError(f'options must be a JSON object such as {{"order": 2}}: {e.msg}') from None
        if not isinstance(given, dict):
            raise ValueError(f'options must be a JSON object such as {{"order": 2}}, got {options!r}')
        if solver not in ks.SAMPLERS:
            raise ValueError(f'unknown solver {solver!r}; choose from {", ".join(ks.TRAINING_FREE)}')
        solvers.check_options(solver, given)
        return (_ksampler(ks.SAMPLERS[solver], dict(given, afs=bool(afs))),)


class PredictorSampler:
    """A learned predictor file as a SAMPLER, with the SIGMAS it was trained for on the model's schedule."""

    @classmethod
    def INPUT_TYPES(cls):
        return {'required': {'model': ('MODEL',), 'predictor_path': ('STRING', {'default': ''})}}

    RETURN_TYPES = ('SAMPLER', 'SIGMAS')
    FUNCTION = 'get_sampler'
    CATEGORY = CATEGORY

    def get_sampler(self, model, predictor_path):
        sampler, predictor = ks.predictor_sampler(predictor_path)
        if predictor.kind == 'amed':
            raise ValueError('AMED reads the UNet\'s bottleneck, which ComfyUI\'s model wrapper does not expose: use '
                             'the diffusers scheduler or sample.py for AMED predictors')
        table = model.get_model_object('model_sampling').sigmas
        sigmas = ks.predictor_sigmas(predictor, ks.TableSchedule(table.detach().double().cpu()))
        return _ksampler(sampler, {}), sigmas.float()


NODE_CLASS_MAPPINGS = {'AdaSDESolverSampler': SolverSampler, 'AdaSDEPredictorSampler': PredictorSampler}
NODE_DISPLAY_NAME_MAPPINGS = {'AdaSDESolverSampler': 'Solver sampler (adasde)',
                              'AdaSDEPredictorSampler': 'Predictor sampler (adasde)'}


def register(samplers_module, sampling_module):
    """Put every training-free solver in the plain KSampler's list as adasde_<name>: ComfyUI looks a sampler name
    up as `sample_<name>` in comfy.k_diffusion.sampling and lists KSAMPLER_NAMES / SAMPLER_NAMES."""
    for name in ks.TRAINING_FREE:
        key = PREFIX + name
        setattr(sampling_module, f'sample_{key}', ks.SAMPLERS[name])
        for names in (samplers_module.KSAMPLER_NAMES, samplers_module.SAMPLER_NAMES):
            if key not in names:
                names.append(key)


try:
    import comfy.k_diffusion.sampling as _comfy_sampling
    import comfy.samplers as _comfy_samplers
except ImportError:  # imported outside ComfyUI: the nodes are defined, nothing is registered
    pass
else:
    register(_comfy_samplers, _comfy_sampling)

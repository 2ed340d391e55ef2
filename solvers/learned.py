"""The learned solvers' common ground: one base class for their predictors, one registry, one file format.

A predictor holds what a learned solver learns (AdaSDE's and EPD's per-step tables, AMED's small network) plus the
sampling settings it was trained for. Every kind saves to one `.safetensors` file (its `state_dict` as float32,
and JSON metadata `format='<kind>-predictor'`, `version`, `hyperparams`, `settings`) and reads, besides, the
official `network-snapshot-*.pkl` of its reference code without running it (solvers/snapshot.py).
`load_predictor(path)` tells which kind a file holds by its content, whatever its name.

The training loop reads two policy attributes: `detach_state` (the student's state is detached between steps:
AMED) and `teacher_forcing` (each step starts from the teacher's state: AMED's single-step bases). Each kind has
one differentiable step, `predictor.step(net, i, x, sigmas, state, extra_args, randn_like, afs) -> (x, state)`,
shared by its sampler and by training.
"""

import hashlib
import json

import torch

from torch_utils.cli import one_line

from . import snapshot
from .common import check_sigmas

PREDICTORS = {}  # kind -> class


def register_predictor(cls):
    """Class decorator: add a LearnedPredictor subclass to PREDICTORS under its `kind`."""
    PREDICTORS[cls.kind] = cls
    return cls


class LearnedPredictor(torch.nn.Module):
    kind = None                 # registry name, also the registered solver's name
    title = None                # for messages ('AdaSDE', 'AMED', 'EPD')
    official_class = None       # class name of the predictor in the reference's snapshots
    format_version = 1
    detach_state = False
    teacher_forcing = False

    def hyperparams(self):
        raise NotImplementedError

    def nfe(self, num_steps):
        """Real network evaluations per image over num_steps time points, without AFS."""
        raise NotImplementedError

    def parallel_nfe(self, num_steps):
        """What the reference code of this kind reports; the real count unless a kind says otherwise (EPD)."""
        return self.nfe(num_steps)

    def step(self, net, i, x, sigmas, state=None, extra_args=None, randn_like=None, afs=False):
        raise NotImplementedError

    @classmethod
    def load_official(cls, path):
        """The predictor in an official snapshot of this kind, read as data (its code never runs)."""
        if cls.official_class is None:
            raise ValueError(f'no official snapshot format is known for {cls.title} predictors')
        return _load_official(path, cls.kind)

    @classmethod
    def from_official(cls, state, path):
        """A predictor from the captured state (attributes, `_parameters`, `_modules`) of the official snapshot's
        model; each kind with an `official_class` maps its own. Missing keys are turned into one line by the caller."""
        raise NotImplementedError

    def check_compatible(self, **settings):
        """Refuse sampling settings that differ from those the predictor was trained for (None matches all)."""
        snapshot.check_settings(dict(self.settings, num_steps=self.num_steps), settings)

    def _file_args(self):
        return f'{self.kind}-predictor', self.format_version, self.hyperparams(), self.settings, self.state_dict()

    def save(self, path):
        snapshot.write_predictor_file(path, *self._file_args())

    def digest(self):
        """sha256 of what decides this predictor's samples (its kind, hyperparameters, settings and tensors): the
        hash of the file `save` writes, whatever file (or official snapshot) it was loaded from."""
        return hashlib.sha256(snapshot.predictor_file_bytes(*self._file_args())).hexdigest()

    @classmethod
    def load(cls, path):
        """A predictor of this kind from `path` (its own file or an official snapshot)."""
        return load_predictor(path, kind=cls.kind)

    def load_tensors(self, tensors, path):
        """Copy a saved state_dict in, refusing missing, extra or misshapen tensors in one line."""
        expected = self.state_dict()
        if set(tensors) != set(expected):
            raise ValueError(f'{path}: its tensors ({", ".join(sorted(tensors))}) are not those of a {self.title} '
                             f'predictor ({", ".join(sorted(expected))})')
        for name, value in expected.items():
            if tuple(tensors[name].shape) != tuple(value.shape):
                raise ValueError(f'{path}: tensor {name} has shape {tuple(tensors[name].shape)}, expected '
                                 f'{tuple(value.shape)} for its hyperparameters')
        with torch.no_grad():
            for name, value in expected.items():
                value.copy_(tensors[name])
        return self.requires_grad_(False).eval()

#----------------------------------------------------------------------------
# The sampler of every learned solver: num_steps - 1 steps of its predictor, on the grid it was trained for.


def learned_sampler(kind):
    """The registered sampling function of learned solver `kind` (its one option: the trained predictor)."""
    @torch.no_grad()
    def sample(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False, *, predictor=None):
        if predictor is None:
            raise ValueError(f"the '{kind}' solver needs a trained predictor (predictor=...)")
        sigmas = check_sigmas(sigmas)
        if len(sigmas) != predictor.num_steps:
            raise ValueError(f'this predictor was trained for num_steps={predictor.num_steps}, not {len(sigmas)}')
        state = None
        for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            x, state = predictor.step(net, i, x, sigmas, state, extra_args, randn_like, afs=afs and i == 0)
            if callback is not None:
                callback(dict(i=i, x=x, sigma=t_cur, sigma_next=t_next, denoised=None))
        return x
    sample.__name__ = sample.__qualname__ = f'sample_{kind}'
    sample.__doc__ = f'The {kind} solver: num_steps - 1 steps with the coefficients of `predictor`.'
    return sample


def predictor_class(kind):
    if kind not in PREDICTORS:
        raise ValueError(f'unknown learned solver {kind!r}; choose from {", ".join(sorted(PREDICTORS))}')
    return PREDICTORS[kind]


def make_predictor(kind, **kwargs):
    """A freshly initialised predictor of `kind` (kwargs: its hyperparameters, settings, seed)."""
    return predictor_class(kind)(**kwargs)


def load_predictor(path, kind=None):
    """The predictor in `path`: a file written by `save` (any kind) or an official snapshot pickle of AdaSDE, AMED
    or EPD. With `kind`, refuse a file of another kind."""
    what = predictor_class(kind).title if kind else 'learned-solver'
    content = snapshot.read_predictor_file(path, what)
    if content is None:
        return _load_official(path, kind)
    meta, tensors = content
    found = {f'{k}-predictor': cls for k, cls in PREDICTORS.items()}.get(meta.get('format'))
    if found is None or (kind is not None and found.kind != kind):
        raise ValueError(f'{path} is not {"an" if what[0] in "AEIO" else "a"} {what} predictor file (format '
                         f'{meta.get("format")!r})')
    if meta.get('version') != str(found.format_version):
        raise ValueError(f'{path}: {found.title} predictor format version {meta.get("version")}, this code reads '
                         f'version {found.format_version}')
    try:
        predictor = found(**json.loads(meta['hyperparams']), settings=json.loads(meta['settings']))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f'{path}: bad {found.title} predictor metadata ({one_line(e)})') from None
    return predictor.load_tensors(tensors, path)


def _load_official(path, kind):
    """Read an official snapshot once, find the predictor class of its model and let that class map the state."""
    what = predictor_class(kind).title if kind else 'learned-solver'
    article = 'an' if what[0] in 'AEIO' else 'a'
    try:
        model = snapshot.load_snapshot(path)['model']
    except snapshot.SNAPSHOT_ERRORS as e:
        raise ValueError(f'cannot read an official {what} snapshot from {path}: {one_line(e) or repr(e)}') from None
    class_name = getattr(model, 'class_name', None)
    found = {cls.official_class: cls for cls in PREDICTORS.values() if cls.official_class}.get(class_name)
    state = snapshot.module_state(model)
    if found is None or state is None:
        raise ValueError(f'{path}: not {article} {what} snapshot (its model is '
                         f'{class_name or type(model).__name__!r})')
    if kind is not None and found.kind != kind:
        raise ValueError(f'{path} holds a {class_name!r} predictor, not an {predictor_class(kind).official_class}')
    try:
        return found.from_official(state, path)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f'{path}: incomplete {found.title} snapshot (missing or malformed: {one_line(e)})') from None

#----------------------------------------------------------------------------

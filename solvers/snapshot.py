"""Reading the official learned-solver snapshots (`network-snapshot-*.pkl`) as data, without running their code,
and telling them from this project's own predictor files.

Such a snapshot is a plain pickle of objects of persistence-decorated classes (the EDM/StyleGAN format, version 6):
each one pickles as a call `torch_utils.persistence._reconstruct_persistent_obj(meta)` whose `meta` carries the
source text of the defining module, its class name and the instance's state. Loading it the ordinary way executes
that source. `SnapshotUnpickler` instead turns every persistent object into a `Captured` (class name + state) and
every plain `torch.nn` module (a `Linear`, a `Sigmoid`, ... pickled by reference to torch) into a `CapturedModule`
with its state, resolves only torch's own tensor-rebuilding functions, maps storages saved on a GPU to the CPU,
and replaces any other class or function the pickle names by an inert placeholder.
"""

import io
import json
import os
import pickle
import struct

import safetensors
import safetensors.torch
import torch

from torch_utils.cli import one_line
from torch_utils.misc import atomic_write, starts_a_pickle

#----------------------------------------------------------------------------
# What the unpickler builds.


class Captured:
    """A persistent object of the snapshot: its class name and its state (for an nn.Module: `_parameters`,
    `_buffers`, `_modules` and the plain attributes), as data."""

    def __init__(self, meta):
        self.class_name = meta.get('class_name')
        self.state = meta.get('state', {})


class CapturedModule:
    """A plain torch.nn module of the snapshot (pickled by reference to its torch class): its module path, class
    name and state. Subclassed per class by `SnapshotUnpickler.find_class`; never an nn.Module itself."""

    module = None
    class_name = None

    def __setstate__(self, state):
        self.state = state


class Placeholder:
    """Anything else the pickle names (solver functions, loss classes, ...): accepts and discards its state."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _load_storage_bytes(data):
    """A storage pickled as torch.save bytes, loaded onto the CPU whatever device it was saved from."""
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)

#----------------------------------------------------------------------------


class SnapshotUnpickler(pickle.Unpickler):
    _allowed = {
        ('torch._utils', '_rebuild_parameter'), ('torch._utils', '_rebuild_tensor_v2'),
        ('torch._utils', '_rebuild_parameter_with_state'), ('collections', 'OrderedDict'),
        ('torch', 'Size'), ('builtins', 'set'), ('builtins', 'frozenset'),
    }

    def find_class(self, module, name):
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            return Captured
        if (module, name) == ('torch.storage', '_load_from_bytes'):
            return _load_storage_bytes
        if (module, name) in self._allowed or (module == 'torch' and name.endswith('Storage')):
            return super().find_class(module, name)
        if module == 'torch.nn.modules' or module.startswith('torch.nn.modules.'):
            return type(name, (CapturedModule,), dict(module=module, class_name=name))
        return Placeholder


def load_snapshot(path):
    """The unpickled contents of a snapshot file (usually a dict with 'model' and 'loss_fn')."""
    with open(path, 'rb') as f:
        return SnapshotUnpickler(f).load()


def module_state(obj):
    """The state dict of a captured module (persistent or plain torch), or None for anything else."""
    return obj.state if isinstance(obj, (Captured, CapturedModule)) and isinstance(obj.state, dict) else None


def parameter(obj, name):
    """Parameter `name` of a captured module as a float32 CPU tensor; KeyError if it has none of that name."""
    state = module_state(obj)
    if state is None or state.get('_parameters', {}).get(name) is None:
        raise KeyError(name)
    return state['_parameters'][name].detach().float()


SNAPSHOT_ERRORS = (OSError, pickle.UnpicklingError, EOFError, KeyError, AttributeError, TypeError, IndexError,
                   RuntimeError)

#----------------------------------------------------------------------------
# The learned solvers' own files: one .safetensors of tensors plus JSON
# metadata. A predictor path may also name an official snapshot: the two are
# told apart by content (torch_utils.misc.starts_a_pickle).


def predictor_file_bytes(file_format, version, hyperparams, settings, tensors):
    """The bytes of a predictor file: a function of its arguments only. safetensors writes the metadata from a
    hash map whose order changes from process to process (the same training gave files with other sha256s), so the
    header is rewritten here with sorted keys, compact, padded with spaces to 8 bytes as the format requires; the
    tensor data (sorted by safetensors itself) and its offsets are kept as written."""
    meta = dict(format=file_format, version=str(version), hyperparams=json.dumps(hyperparams, sort_keys=True),
                settings=json.dumps(settings, sort_keys=True))
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
    data = safetensors.torch.save(tensors, metadata=meta)
    size = struct.unpack('<Q', data[:8])[0]
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(',', ':')).encode()
    header += b' ' * (-len(header) % 8)
    return struct.pack('<Q', len(header)) + header + data[8 + size:]


def write_predictor_file(path, file_format, version, hyperparams, settings, tensors):
    """Write `tensors` (float32, on the CPU) and the JSON metadata format / version / hyperparams / settings as one
    .safetensors file, atomically; the same arguments give the same bytes."""
    data = predictor_file_bytes(file_format, version, hyperparams, settings, tensors)

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)
    atomic_write(path, write)


def check_settings(trained, given):
    """Refuse sampling settings `given` that differ from the `trained` ones a predictor file records (a None on
    either side matches anything)."""
    for key, value in given.items():
        recorded = trained.get(key)
        if value is not None and recorded is not None and value != recorded:
            raise ValueError(f'this predictor was trained for {key}={recorded!r}, not {value!r}')


def read_predictor_file(path, what):
    """None if `path` is a pickle (an official snapshot), else (metadata, tensors) of its safetensors content.
    `what` names the predictor in the one-line ValueError of an unreadable file."""
    try:
        with open(path, 'rb') as f:
            if starts_a_pickle(f.read(9), os.path.getsize(path)):
                return None
    except OSError as e:
        raise ValueError(f'cannot read {what} predictor {path}: {e.strerror or e}') from None
    try:
        with safetensors.safe_open(str(path), framework='pt') as f:
            return f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, safetensors.SafetensorError) as e:
        raise ValueError(f'cannot read {what} predictor {path}: {one_line(e)}') from None

__all__ = ['Captured', 'CapturedModule', 'Placeholder', 'SnapshotUnpickler', 'load_snapshot', 'module_state',
           'parameter', 'SNAPSHOT_ERRORS', 'read_predictor_file', 'write_predictor_file',
           'predictor_file_bytes',
           'check_settings']

#----------------------------------------------------------------------------

"""Persistent classes: pickles that embed the source code of their classes (the EDM/StyleGAN format, version 6).

An instance of a class decorated with @persistent_class pickles as a call to `_reconstruct_persistent_obj(meta)`,
where `meta` carries the full source text of the defining module, so it loads without that module being importable.
"""

import copy
import inspect
import io
import os
import pickle
import sys
import types
import uuid

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------

_version = 6                    # Format version; pickles of any other version are rejected.
_decorators = set()             # Classes produced by persistent_class().
_import_hooks = []              # Functions meta -> meta run before each object is rebuilt.
_module_to_src_dict = dict()    # Module object -> its source text.
_src_to_module_dict = dict()    # Source text -> module object.

#----------------------------------------------------------------------------


def persistent_class(orig_class):
    """Class decorator: instances remember their constructor arguments and pickle together with their module source."""
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class
    assert orig_class.__module__ in sys.modules
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record_init_args = getattr(self, '_record_init_args', True)
            self._init_args = copy.deepcopy(args) if record_init_args else None
            self._init_kwargs = copy.deepcopy(kwargs) if record_init_args else None
            assert orig_class.__name__ in orig_module.__dict__
            _check_pickleable(self.__reduce__())

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                    class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    _decorators.add(Decorator)
    return Decorator

#----------------------------------------------------------------------------


def is_persistent(obj):
    """True for a class made by persistent_class() or an instance of one."""
    try:
        if obj in _decorators:
            return True
    except TypeError:
        pass # Unhashable object.
    return type(obj) in _decorators


def import_hook(hook):
    """Register `hook(meta) -> meta`, run on every persistent object before it is rebuilt (e.g. to patch its source)."""
    assert callable(hook)
    _import_hooks.append(hook)

#----------------------------------------------------------------------------


def _reconstruct_persistent_obj(meta):
    """Rebuild one persistent object from its pickled `meta` dict; the global that the pickles name."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    for hook in _import_hooks:
        meta = hook(meta)
        assert meta is not None

    assert meta.version == _version
    module = _src_to_module(meta.module_src)

    assert meta.type == 'class'
    orig_class = module.__dict__[meta.class_name]
    decorator_class = persistent_class(orig_class)
    obj = decorator_class.__new__(decorator_class)

    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj


def _module_to_src(module):
    """Source text of a module, cached so that modules made by _src_to_module() find theirs."""
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src


def _src_to_module(src):
    """Module executed from source text; the same text always gives the same module."""
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = '_imported_module_' + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        # Register before exec: the decorators that run inside the source look their module up in the caches.
        sys.modules[module_name] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__)
    return module

#----------------------------------------------------------------------------


def _check_pickleable(obj):
    """Raise if `obj` holds something that would not survive pickling (tensors and persistent objects are fine)."""
    def recurse(obj):
        if isinstance(obj, (list, tuple, set)):
            return [recurse(x) for x in obj]
        if isinstance(obj, dict):
            return [[recurse(x), recurse(y)] for x, y in obj.items()]
        if isinstance(obj, (str, int, float, bool, bytes, bytearray)):
            return None # Python primitive types are pickleable.
        if isinstance(obj, (np.ndarray, torch.Tensor)):
            return None # Tensors and parameters are pickleable.
        if is_persistent(obj):
            return None # Persistent objects are pickleable by construction.
        return obj
    with io.BytesIO() as f:
        pickle.dump(recurse(obj), f)

#----------------------------------------------------------------------------
# Loading network pickles. Non-Module objects in some snapshots (e.g. AdaSDE's loss_fn.t_steps) keep CUDA
# storages; without CUDA those are mapped to the CPU instead of failing.


def _load_storage_from_bytes(b):
    map_location = None if torch.cuda.is_available() else 'cpu'
    return torch.load(io.BytesIO(b), map_location=map_location, weights_only=False)


class _NetworkUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == 'torch.storage' and name == '_load_from_bytes':
            return _load_storage_from_bytes
        return super().find_class(module, name)


def load_network_pickle(f):
    """Unpickle an EDM-style network pickle from a binary file object, a path or a URL (cached by dnnlib)."""
    if isinstance(f, (str, os.PathLike)):
        with dnnlib.util.open_url(os.fspath(f)) as stream:
            return _NetworkUnpickler(stream).load()
    return _NetworkUnpickler(f).load()

#----------------------------------------------------------------------------

"""Miscellaneous PyTorch helpers (EDM names): cached constants, shape checks, parameter copies, per-seed RNG."""

import os
import re
import tempfile
import warnings

import numpy as np
import torch

#----------------------------------------------------------------------------
# Files are written whole or not at all: into a temporary file in the target's
# folder, then renamed over the target (atomic on POSIX and Windows).


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path) on a temporary file beside `path`, then move it onto `path` (mode 0644)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp_' + os.path.basename(path))
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


#----------------------------------------------------------------------------
# Pickles (official snapshots, EDM networks) and safetensors files are told apart by their first bytes.


def starts_a_pickle(head, size):
    """Whether `head`, the first 9 bytes of a file of `size` bytes, starts a pickle (protocol 2-5). A safetensors file
    begins with its header length (8 bytes, little-endian), whose first byte may be 0x80 too; its header is a JSON
    object ('{' at byte 8) that fits in the file, which a pickle's bytes never make."""
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    return not (len(head) >= 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') <= size - 8)

#----------------------------------------------------------------------------
# EDM's map from model images in [-1, 1] to pixel values: x * 127.5 + 128,
# clipped to [0, 255]; .to(torch.uint8) then truncates, i.e. rounds x * 127.5 +
# 127.5 to the nearest integer.


def to_pixels(x):
    """Pixel values (floats in [0, 255], same dtype) of images in [-1, 1]."""
    return (x * 127.5 + 128).clip(0, 255)

#----------------------------------------------------------------------------
# Cached construction of constant tensors. Avoids CPU=>GPU copies when the same constant is used repeatedly.

_constant_cache = dict()


def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """torch.as_tensor(value) broadcast to `shape`, cached per (value, shape, dtype, device, memory_format)."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format

    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor

#----------------------------------------------------------------------------


def nan_to_num(input, nan=0.0, posinf=None, neginf=None, *, out=None):
    """torch.nan_to_num with infinities mapped to the dtype's finite range by default."""
    return torch.nan_to_num(input, nan=nan, posinf=posinf, neginf=neginf, out=out)

#----------------------------------------------------------------------------


class suppress_tracer_warnings(warnings.catch_warnings):
    """Context manager that silences torch.jit.TracerWarning (as in EDM)."""

    def __enter__(self):
        super().__enter__()
        warnings.simplefilter('ignore', category=torch.jit.TracerWarning)
        return self


def assert_shape(tensor, ref_shape):
    """Assert that `tensor` has shape `ref_shape`; a None entry matches any size."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            continue
        if isinstance(ref_size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(torch.as_tensor(size), ref_size), f'Wrong size for dimension {idx}')
        elif isinstance(size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(size, torch.as_tensor(ref_size)),
                    f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size}')

#----------------------------------------------------------------------------
# Parameters and buffers of a module, and copying them by name between two modules.


def params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.parameters()) + list(module.buffers())


def named_params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy every parameter and buffer of `dst_module` that `src_module` has under the same name."""
    assert isinstance(src_module, torch.nn.Module)
    assert isinstance(dst_module, torch.nn.Module)
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        assert (name in src_tensors) or (not require_all), f'Missing tensor in source module: {name}'
        if name in src_tensors:
            tensor.copy_(src_tensors[name])

#----------------------------------------------------------------------------
# Per-seed random numbers (EDM generate.py): one generator per seed, so that a sample depends on its seed only,
# not on the batch it lands in or the process that renders it.


class StackedRandomGenerator:
    """Stack of torch.Generators, one per seed, drawing row i of every batch from generator i."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

#----------------------------------------------------------------------------


def parse_int_list(s, max_value=None):
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10] (ranges inclusive); a list passes through unchanged.
    With `max_value`, a larger number is an error (checked before a range is expanded)."""
    if isinstance(s, list):
        return s
    if not isinstance(s, str) or s.strip() == '':
        raise ValueError(f'Expected a list of non-negative integers such as "0-63" or "1,2,5-10", got {s!r}')
    values = []
    for part in s.split(','):
        part = part.strip()
        range_match = re.fullmatch(r'(\d+)-(\d+)', part)
        if range_match:
            lo, hi = int(range_match.group(1)), int(range_match.group(2))
            if hi < lo:
                raise ValueError(f'Invalid range "{part}" in {s!r}: the end is smaller than the start')
            if max_value is not None and hi > max_value:
                raise ValueError(f'{hi} in {s!r} is too large (at most {max_value})')
            values.extend(range(lo, hi + 1))
        elif re.fullmatch(r'\d+', part):
            if max_value is not None and int(part) > max_value:
                raise ValueError(f'{int(part)} in {s!r} is too large (at most {max_value})')
            values.append(int(part))
        else:
            raise ValueError(f'Invalid item "{part}" in {s!r}: expected a non-negative integer or a range "a-b"')
    return values

#----------------------------------------------------------------------------

"""Miscellaneous PyTorch helpers (EDM names): cached constants, shape checks, parameter copies, per-seed RNG."""

import bisect
import collections.abc
import contextlib
import itertools
import os
import re
import threading
import warnings

import numpy as np
import torch

#----------------------------------------------------------------------------
# Files are written whole or not at all: into a temporary file in the target's
# folder, then renamed over the target (atomic on POSIX and Windows).


def _temporary_name(path):
    """A temporary path in the folder of `path`, unique per process and thread, so no other writer uses it; one
    left by a killed run is overwritten."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f'.tmp_{name}.{os.getpid()}.{threading.get_ident()}')


@contextlib.contextmanager
def _temporary_beside(path, make_folder=True):
    """A temporary path in the folder of `path` (made first if missing, with `make_folder`), moved onto `path` when
    the body ends without an error, removed when it fails. The file keeps the mode it was made with (0666 less the
    umask for a plain open), as a plain write of `path` would give it."""
    tmp = _temporary_name(path)
    if make_folder:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path) on a temporary file beside `path`, then move it onto `path`."""
    with _temporary_beside(path) as tmp:
        write_fn(tmp)


_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, 'O_CLOEXEC', 0) | getattr(os, 'O_BINARY', 0)


def atomic_write_bytes(path, data):
    """Write `data` to `path` as atomic_write does, in as few system calls as a plain write plus the rename (the
    folder is made only when the first open finds it missing): sample.py writes one small PNG per seed this way,
    where every call on the file system counts."""
    with _temporary_beside(path, make_folder=False) as tmp:
        try:
            fd = os.open(tmp, _WRITE_FLAGS, 0o666)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            fd = os.open(tmp, _WRITE_FLAGS, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

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
        """Row i from generator i, drawn straight into its row of the result (the same numbers as a stack of
        per-generator draws, without the copy)."""
        assert size[0] == len(self.generators)
        out = torch.empty(size, **kwargs)
        for row, gen in zip(out, self.generators):
            torch.randn(size[1:], generator=gen, out=row)
        return out

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])


class NoiseAhead:
    """randn_like of a StackedRandomGenerator, with the noise a solver will ask for drawn beforehand (in a helper
    thread, while another batch is solved). `plan` lists (shape without the batch, dtype, device) of the calls to
    expect, in order: what the solver asked of the previous batch (`calls`). A call the plan did not foresee sends
    every generator back to where it stood before the draws ahead, draws again what was handed out, and goes on on
    demand; so the numbers are always those of drawing on demand."""

    def __init__(self, rnd, plan=()):
        self.rnd, self.calls, self.given = rnd, [], 0
        self.mark = [gen.get_state() for gen in rnd.generators] if plan else None
        self.ahead = [rnd.randn([len(rnd.generators), *shape], dtype=dtype, device=device)
                      for shape, dtype, device in plan]

    def randn_like(self, input):
        self.calls.append((tuple(input.shape[1:]), input.dtype, input.device))
        if self.given < len(self.ahead):
            noise = self.ahead[self.given]
            if (noise.shape, noise.dtype, noise.device) == (input.shape, input.dtype, input.device):
                self.given += 1
                return noise
            self._rewind()
        return self.rnd.randn_like(input)

    def _rewind(self):
        for gen, state in zip(self.rnd.generators, self.mark):
            gen.set_state(state)
        for noise in self.ahead[:self.given]:
            self.rnd.randn(noise.shape, dtype=noise.dtype, device=noise.device)
        del self.ahead[self.given:]

#----------------------------------------------------------------------------


class IntRanges(collections.abc.Sequence):
    """A sequence of non-negative ints held as ranges, in the given order: memory and time by the number of ranges,
    not of ints (`--seeds=0-99999999` is one range). Indexing, slicing (step 1), iteration and `len` as a list."""

    def __init__(self, ranges=()):
        merged = []
        for r in ranges:
            if len(r) == 0:
                continue
            if r.step != 1:
                raise ValueError('IntRanges holds ranges of step 1')
            if merged and merged[-1].stop == r.start:
                r = range(merged.pop().start, r.stop)
            merged.append(r)
        self.ranges = tuple(merged)
        self._ends = list(itertools.accumulate(len(r) for r in self.ranges))

    @classmethod
    def of(cls, values):
        """The ranges of an iterable of ints (or an IntRanges, returned as is)."""
        if isinstance(values, IntRanges):
            return values
        return cls(range(int(v), int(v) + 1) for v in values)

    def __len__(self):
        return self._ends[-1] if self._ends else 0

    def __iter__(self):
        return itertools.chain.from_iterable(self.ranges)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError('IntRanges slices have step 1')
            return self._slice(start, max(start, stop))
        index = range(len(self))[index]  # negative indices; IndexError out of range
        k = bisect.bisect_right(self._ends, index)
        return self.ranges[k][index - (self._ends[k - 1] if k else 0)]

    def _slice(self, start, stop):
        k = bisect.bisect_right(self._ends, start)
        pieces, offset = [], self._ends[k - 1] if k else 0
        for r in self.ranges[k:]:
            if offset >= stop:
                break
            pieces.append(r[max(start - offset, 0):stop - offset])
            offset += len(r)
        return IntRanges(pieces)

    def __eq__(self, other):
        return isinstance(other, IntRanges) and self.ranges == other.ranges

    def __hash__(self):
        return hash(self.ranges)

    def __repr__(self):
        return 'IntRanges(' + ','.join(f'{r.start}' if len(r) == 1 else f'{r.start}-{r.stop - 1}'
                                       for r in self.ranges) + ')'

    def max(self):
        return max(r.stop - 1 for r in self.ranges)

    def first_duplicate(self):
        """The smallest value that occurs twice, or None (sorting the ranges, not the values)."""
        ordered = sorted(self.ranges, key=lambda r: r.start)
        reach = None
        for r in ordered:
            if reach is not None and r.start < reach:
                return r.start
            reach = r.stop if reach is None else max(reach, r.stop)
        return None

    def without(self, other):
        """These values, in their order, minus those of `other` (an IntRanges)."""
        holes = []
        for h in sorted(other.ranges, key=lambda r: r.start):  # sorted and disjoint
            if holes and h.start <= holes[-1].stop:
                h = range(holes[-1].start, max(holes.pop().stop, h.stop))
            holes.append(h)
        starts = [h.start for h in holes]
        pieces = []
        for r in self.ranges:
            lo = r.start
            k = max(bisect.bisect_right(starts, lo) - 1, 0)
            for h in holes[k:]:
                if h.start >= r.stop:
                    break
                if h.stop <= lo:
                    continue
                if h.start > lo:
                    pieces.append(range(lo, h.start))
                lo = max(lo, h.stop)
            if lo < r.stop:
                pieces.append(range(lo, r.stop))
        return IntRanges(pieces)


def parse_int_list(s, max_value=None):
    """'1,2,5-10' -> IntRanges of [1, 2, 5, 6, 7, 8, 9, 10] (ranges inclusive, never expanded); a list or IntRanges
    passes through as IntRanges. With `max_value`, a larger number is an error."""
    if isinstance(s, (list, tuple, range, IntRanges)):
        return IntRanges.of(s) if not isinstance(s, range) else IntRanges([s])
    if not isinstance(s, str) or s.strip() == '':
        raise ValueError(f'Expected a list of non-negative integers such as "0-63" or "1,2,5-10", got {s!r}')
    ranges = []
    for part in s.split(','):
        part = part.strip()
        range_match = re.fullmatch(r'(\d+)-(\d+)', part)
        if range_match:
            lo, hi = int(range_match.group(1)), int(range_match.group(2))
            if hi < lo:
                raise ValueError(f'Invalid range "{part}" in {s!r}: the end is smaller than the start')
        elif re.fullmatch(r'\d+', part):
            lo = hi = int(part)
        else:
            raise ValueError(f'Invalid item "{part}" in {s!r}: expected a non-negative integer or a range "a-b"')
        if max_value is not None and hi > max_value:
            raise ValueError(f'{hi} in {s!r} is too large (at most {max_value})')
        ranges.append(range(lo, hi + 1))
    return IntRanges(ranges)

#----------------------------------------------------------------------------

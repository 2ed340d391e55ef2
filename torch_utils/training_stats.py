"""Training statistics across processes (EDM torch_utils/training_stats.py, compact).

report(name, value) adds count, sum and sum of squares of `value` to a per-name counter; a Collector
sums the counters over all processes when update() is called and exposes num / mean / std per name.
All processes must call Collector.update() together.
"""

import re

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------

_num_moments = 3                # [num_scalars, sum_of_scalars, sum_of_squares]
_counter_dtype = torch.float64  # Data type of the accumulated moments.
_rank = 0                       # Rank of the current process.
_sync_device = None             # Device used for all_reduce, None when there is only one process.
_sync_called = False            # Has _sync() been called yet?
_counters = dict()              # Running counters on each device, updated by report(): name => device => tensor
_cumulative = dict()            # Cumulative counters on the CPU, updated by _sync(): name => tensor

#----------------------------------------------------------------------------


def init_multiprocessing(rank, sync_device):
    """Set the rank and the all_reduce device (None for a single process); they cannot change after a sync."""
    global _rank, _sync_device
    assert not _sync_called or (rank, sync_device) == (_rank, _sync_device)
    _rank = rank
    _sync_device = sync_device


def report(name, value):
    """Accumulate the scalars of `value` (number, array or tensor) under `name`; returns `value` unchanged."""
    if name not in _counters:
        _counters[name] = dict()
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_counter_dtype)
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])
    if moments.device not in _counters[name]:
        _counters[name][moments.device] = torch.zeros_like(moments)
    _counters[name][moments.device].add_(moments)
    return value


def report0(name, value):
    """report() on rank 0; the other ranks register the name with no data so that all ranks sync the same names."""
    report(name, value if _rank == 0 else [])
    return value

#----------------------------------------------------------------------------


class Collector:
    """Collects the statistics reported since the previous update() whose names match `regex`."""

    def __init__(self, regex='.*', keep_previous=True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative = dict()
        self._moments = dict()
        self.update()
        self._moments.clear()

    def names(self):
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self):
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _get_delta(self, name):
        assert self._regex.fullmatch(name)
        if name not in self._moments:
            self._moments[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        return self._moments[name]

    def num(self, name):
        return int(self._get_delta(name)[0])

    def mean(self, name):
        delta = self._get_delta(name)
        if int(delta[0]) == 0:
            return float('nan')
        return float(delta[1] / delta[0])

    def std(self, name):
        delta = self._get_delta(name)
        if int(delta[0]) == 0 or not np.isfinite(float(delta[1])):
            return float('nan')
        if int(delta[0]) == 1:
            return 0.0
        mean = float(delta[1] / delta[0])
        raw_var = float(delta[2] / delta[0])
        return float(np.sqrt(max(raw_var - mean ** 2, 0)))

    def as_dict(self):
        stats = dnnlib.EasyDict()
        for name in self.names():
            stats[name] = dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
        return stats

    def __getitem__(self, name):
        return self.mean(name)

#----------------------------------------------------------------------------


def _sync(names):
    """Move the counters of `names` into the cumulative ones, summed over processes; returns (name, cumulative)."""
    global _sync_called
    if len(names) == 0:
        return []
    _sync_called = True

    # Collect the deltas of this process.
    device = _sync_device if _sync_device is not None else torch.device('cpu')
    deltas = []
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            delta.add_(counter.to(device))
            counter.zero_()
        deltas.append(delta)
    deltas = torch.stack(deltas)

    # Sum them over processes and add them to the cumulative counters.
    if _sync_device is not None:
        torch.distributed.all_reduce(deltas)
    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]

#----------------------------------------------------------------------------
# Convenience collector for all statistics.

default_collector = Collector()

#----------------------------------------------------------------------------

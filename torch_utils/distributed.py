"""Process setup for torchrun launches (EDM torch_utils/distributed.py), plus a plain single-process mode.

Under torchrun (WORLD_SIZE > 1) init() joins the process group (NCCL with CUDA, gloo without). A plain
`python script.py` run stays a single process and never opens a port, so two such runs cannot collide.
"""

import contextlib
import os
import sys

import torch

from . import training_stats

#----------------------------------------------------------------------------


def init():
    """Fill the torchrun environment defaults, join the process group when there is more than one process."""
    os.environ.setdefault('MASTER_ADDR', 'localhost')
    os.environ.setdefault('MASTER_PORT', '29500')
    os.environ.setdefault('RANK', '0')
    os.environ.setdefault('LOCAL_RANK', '0')
    os.environ.setdefault('WORLD_SIZE', '1')

    multi_process = int(os.environ['WORLD_SIZE']) > 1
    if multi_process and not torch.distributed.is_initialized():
        backend = 'nccl' if torch.cuda.is_available() and os.name != 'nt' else 'gloo'
        torch.distributed.init_process_group(backend=backend, init_method='env://')
        # Leave the group before the interpreter tears down: an undestroyed gloo group can abort the process at exit
        # ("terminate called without an active exception", seen on fid.py calc under torchrun).
        import atexit
        atexit.register(_leave)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))

    sync_device = device() if get_world_size() > 1 else None
    training_stats.init_multiprocessing(rank=get_rank(), sync_device=sync_device)


def _leave():
    """Leave together: a rank that tears its group down while a peer still works (rank 0 writing the result) can
    make the peer's gloo threads abort it. Wait for every rank (bounded, in case one died), then destroy."""
    if not torch.distributed.is_initialized():
        return
    try:
        if torch.distributed.get_backend() == 'gloo':
            import datetime
            torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            torch.distributed.barrier()
    except Exception:  # a peer is gone: nothing to wait for
        pass
    torch.distributed.destroy_process_group()

#----------------------------------------------------------------------------


def get_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def device():
    """The device of this process: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
    return torch.device('cpu')


def barrier():
    """torch.distributed.barrier() in a process group, a no-op in a single process."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextlib.contextmanager
def rank0_first():
    """Run the body on rank 0 first, then on the other ranks (downloads, caches written once)."""
    if get_rank() != 0:
        barrier()
    try:
        yield
    finally:  # also when rank 0 fails, so that the others do not wait for ever
        if get_rank() == 0:
            barrier()


def all_reduce(tensor, op=None):
    """In-place sum (or `op`) of `tensor` over all processes; returns the tensor. A no-op in a single process."""
    if torch.distributed.is_initialized() and get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM if op is None else op)
    return tensor

#----------------------------------------------------------------------------


_stop_requested = False
_stop_signal = None


def stop_on_signals():
    """Make SIGTERM (cluster preemption) and a first Ctrl-C ask the run to stop cleanly: should_stop() turns
    True, and the training loop saves its state and returns. A second Ctrl-C aborts at once."""
    import signal

    def handler(signum, frame):
        global _stop_requested, _stop_signal
        if _stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        _stop_requested = True
        _stop_signal = signum
        print(f'\n{signal.Signals(signum).name}: stopping after this iteration and saving the state '
              '(Ctrl-C again aborts)', file=sys.stderr, flush=True)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def should_stop():
    """True once any process was asked to stop (see stop_on_signals); every process gets the same answer, so
    call it on all of them at the same point."""
    flag = torch.tensor([float(_stop_requested)], device=device() if get_world_size() > 1 else 'cpu')
    all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def stop_exit_code():
    """The exit code of a run stopped by a signal: 128 + its number (130 Ctrl-C, 143 SIGTERM), as a shell reports a
    process killed by it; 143 on a process that was only told by another one."""
    import signal
    return 128 + int(_stop_signal or signal.SIGTERM)


def update_progress(cur, total):
    """Hook for cluster launchers that track progress."""


def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)

#----------------------------------------------------------------------------

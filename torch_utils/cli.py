"""What train.py, sample.py and fid.py check before any work, and how they end: the thread and memory policies,
the device, the output folder, the settings a run folder records, and one line (from rank 0 only) for every bad
input.

Import this module before torch: the thread policy only works when it is in the environment before OpenMP loads.
Nothing here imports torch at module level.
"""

import errno
import json
import math
import os
import shutil
import sys
import tempfile

import click

#----------------------------------------------------------------------------
# Thread policy. With torch's defaults (one OpenMP thread per core) a CPU run slows down 20-75x as soon as another
# CPU-bound process shares the cores (issue 14: training at 1.4 s/it went to 30-106 s/it on 2 cores): every
# parallel region waits for the thread that lost its core, and threads waiting actively burn the time that thread
# needs. On the shared 2-core development machine, 20 iterations of the demo's training took 37 s with 1 thread,
# 41 s with 2 threads waiting passively and 87 s with 2 threads waiting actively (OMP_WAIT_POLICY=ACTIVE), all
# without a competing process; with one, 1 thread took 34-58 s and 2 passive threads 46 s, while 2 active threads
# managed 5 iterations in 47 s (these machines also ran other jobs, so single runs vary by up to 2x).
# So by default: half the cores this process may use (at least 1, at most 8), and passive waiting.
# OMP_NUM_THREADS (and OMP_WAIT_POLICY) set in the environment win; torchrun sets OMP_NUM_THREADS=1 itself.


def default_num_threads():
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores // 2, 8))


def apply_thread_policy(environ=None):
    """Set OMP_NUM_THREADS / MKL_NUM_THREADS / OMP_WAIT_POLICY where the user has not; returns the thread count."""
    environ = os.environ if environ is None else environ
    threads = environ.setdefault('OMP_NUM_THREADS', str(default_num_threads()))
    environ.setdefault('MKL_NUM_THREADS', threads)
    environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    return threads

#----------------------------------------------------------------------------
# Memory policy. glibc's malloc returns a freed block of more than 128 KiB to the kernel (it serves such blocks with
# mmap, and trims the heap above 128 KiB free; its dynamic threshold still maps a block of the size it has just
# freed), so every temporary tensor of a solver step (1.5 MiB for a batch of 64 float64 images of 3x32x32) comes
# back from the kernel as fresh pages, each a page fault. On the 2-core development machine that was 5,000-6,000
# faults per batch and about three quarters of dpmpp's CPU time (`python bench/solver_memory.py`: 231-306 us per
# image, 60-63 us with the policy below, which changes no result). So blocks up to 32 MiB (glibc's largest
# threshold) come from the heap, and up to 1 GiB of free memory at its top stays in the process (with 64 MiB, a
# batch of 16 float64 images of 3x256x256, 25 MiB per temporary, still faulted 80,000 pages per batch): the
# process keeps the memory of its peak, which a sampler or a training run reaches in its first batch anyway.
# Blocks above 32 MiB are still mapped fresh each time. MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set in the
# environment win; other C libraries are left alone.

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def apply_memory_policy(environ=None):
    """Keep freed blocks of up to 32 MiB in the process (glibc's mallopt); returns whether the policy was set."""
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith('linux') or {'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_'} & set(environ):
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

#----------------------------------------------------------------------------
# One line per error. The scripts raise click exceptions; run() shows them on rank 0 only (under torchrun every
# rank meets the same bad input), and turns Ctrl-C into one line and exit code 130.


class Finite(click.FloatRange):
    """A float option that must be a finite number (click's FLOAT takes nan and inf, and a range check lets nan
    through), with optional bounds as click.FloatRange's."""
    name = 'float'

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f'{value!r} is not a finite number.', param, ctx)
        return rv

    def __repr__(self):
        return f'Finite({super().__repr__()})'


def is_rank0():
    return os.environ.get('RANK', '0') == '0'


def one_line(err):
    """The first line of an exception's message (its type name when it has none): errors here are one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def run(command):
    """Run a click command as a script: errors as one 'Error: ...' line on rank 0, exit code as click's."""
    try:
        rv = command.main(standalone_mode=False)
    except click.ClickException as err:
        if is_rank0():
            err.show()
        report_to_torchrun(f'Error: {err.format_message()}')
        sys.exit(err.exit_code)
    except (click.Abort, KeyboardInterrupt):  # click.Abort is a RuntimeError: before the clause below
        if is_rank0():
            print(f'{os.path.basename(sys.argv[0])}: stopped (Ctrl-C); files written so far are whole and kept. '
                  'Run the same command again to continue.', file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as err:
        import traceback
        report_to_torchrun(f'{type(err).__name__}: {err}', traceback.format_exc().rstrip())
        raise
    sys.exit(rv if isinstance(rv, int) else 0)

# Under torchrun a failing rank makes the launcher print its own report (about 45 lines: its traceback, then a
# "Root Cause" block per failed rank), after anything the script printed. The launcher names in that block a file
# (TORCHELASTIC_ERROR_FILE, set for each rank) and shows what the rank wrote there on the block's `traceback :`
# line, the last line before the closing rule: writing the error line there puts it at the end of what a user reads.


def report_to_torchrun(message, callstack=None):
    """Leave `message` (and `callstack`, shown instead of it when given) where torchrun's failure report shows it;
    nothing outside torchrun."""
    path = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if not path:
        return
    import time
    data = dict(message=dict(message=message, extraInfo=dict(py_callstack=callstack or message,
                                                             timestamp=str(int(time.time())))))
    try:
        with open(path, 'w') as f:
            json.dump(data, f)
    except OSError:
        pass  # the report then says less; the error itself was shown

#----------------------------------------------------------------------------
# Devices: one that this machine does not have is an error, not a silent CPU run.


def resolve_device(name, option='--device'):
    """torch.device(name) if this machine has it; else click.UsageError in one line."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise click.UsageError(f'{option}={name}: not a device ({one_line(err)})') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise click.UsageError(f'{option}={name}: CUDA is not available on this machine (torch '
                                   f'{torch.__version__}); use --device=cpu')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.UsageError(f'{option}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    elif device.type == 'mps':
        if not torch.backends.mps.is_available():
            raise click.UsageError(f'{option}={name}: MPS is not available on this machine; use --device=cpu')
    elif device.type != 'cpu':
        try:
            torch.empty(0, device=device)
        except Exception as err:
            raise click.UsageError(f'{option}={name}: not available on this machine ({one_line(err)})') from None
    return device

#----------------------------------------------------------------------------
# Output folders, checked before the work starts: a file in the way, no write permission or a read-only file
# system, too little free space. Nothing is created here.


def _existing_parent(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def bytes_on_disk(size, path):
    """What a file of `size` bytes takes on the disk of `path`: whole blocks of the file system (4 KiB on most)."""
    block = os.statvfs(_existing_parent(os.path.abspath(path))).f_bsize if hasattr(os, 'statvfs') else 4096
    return max(1, -(-size // block)) * block


def check_output_dir(path, option='--outdir', need_bytes=0, shown=None, need_files=0):
    """Raise click.UsageError (one line) unless files can be written under the folder `path` (made if missing):
    `need_bytes` free on its disk and, where the file system counts them, `need_files` free file entries (inodes).
    `shown`: the path the user gave, for the message (default: the folder). Returns `path` normalised, as it was
    checked: write there ('a/missing/../b' is b beside a, but writing through 'a/missing' fails)."""
    if not path:
        raise click.UsageError(f'{option} is empty: give a folder')
    given, path = path, os.path.abspath(path)
    shown = path if shown is None else shown
    if os.path.exists(path) and not os.path.isdir(path) and shown == path:
        raise click.UsageError(f'{option}={shown}: this is a file, not a folder')
    existing = _existing_parent(path)
    if not os.path.isdir(existing):
        raise click.UsageError(f'{option}={shown}: {existing} is a file, not a folder')
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix='.write-test-')
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        reason = 'read-only file system' if err.errno == errno.EROFS else (err.strerror or one_line(err)).lower()
        raise click.UsageError(f'{option}={shown}: cannot write in {existing} ({reason})') from None
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise click.UsageError(f'{option}={shown}: {free / 2**20:.0f} MiB free on that disk, this run needs about '
                               f'{need_bytes / 2**20:.0f} MiB')
    inodes = os.statvfs(existing).f_favail if hasattr(os, 'statvfs') else 0
    if 0 < inodes < need_files:  # 0: a file system without a fixed number of files
        raise click.UsageError(f'{option}={shown}: that disk has room for {inodes} more files, this run writes '
                               f'{need_files}')
    return os.path.normpath(given)


def available_memory(device):
    """Bytes that a new allocation on `device` can take: the free memory of a CUDA device, MemAvailable of
    /proc/meminfo for the CPU; None where unknown."""
    import torch
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    if device.type != 'cpu':
        return None
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def check_output_file(path, option='--dest', need_bytes=0):
    """As check_output_dir, for a file to be written: its folder must be writable, and it must not be a folder.
    Returns `path` normalised, as check_output_dir does."""
    if not path:
        raise click.UsageError(f'{option} is empty: give a file name')
    if os.path.isdir(path):
        raise click.UsageError(f'{option}={path}: this is a folder, not a file')
    check_output_dir(os.path.dirname(os.path.abspath(path)), option=option, need_bytes=need_bytes, shown=path)
    return os.path.normpath(path)

#----------------------------------------------------------------------------
# The settings a run folder records (written atomically). Adding to a folder made with other settings is an
# error that names the first differing setting.


def _normalized(settings):
    return json.loads(json.dumps(settings, sort_keys=True))


def differing(old, new):
    """Keys whose values differ between two settings dicts, in the order of `new` (then the keys only in `old`)."""
    old_n, new_n = _normalized(old), _normalized(new)
    keys = list(new) + [k for k in old if k not in new]
    return [k for k in keys if old_n.get(k) != new_n.get(k)]


def read_settings(path):
    """The settings recorded in `path` (a JSON object), None if there is no such file; one line if unreadable."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            settings = json.load(f)
    except (OSError, ValueError) as err:
        raise click.ClickException(f'cannot read {path}: {one_line(err)} (delete it, or give --overwrite)') from None
    if not isinstance(settings, dict):
        raise click.ClickException(f'cannot read {path}: not a JSON object (delete it, or give --overwrite)')
    return settings


def write_settings(path, settings):
    """Write `settings` as JSON through a temporary file and a rename."""
    from .misc import atomic_write  # here, not above: this module loads no torch

    def write(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(settings, f, indent=2)
            f.write('\n')
    atomic_write(path, write)


def mismatch_message(folder, old, new):
    keys = differing(old, new)
    key = keys[0]
    more = f' (and {len(keys) - 1} more setting(s): {", ".join(keys[1:])})' if len(keys) > 1 else ''
    return f'{folder} was made with {key}={_normalized(old).get(key)!r}, not {_normalized(new).get(key)!r}{more}'

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# Options that train.py and sample.py share: one declaration, one meaning. Only the default of --dataset_name
# differs (train.py: digits; sample.py: none, since a predictor may name the model).

# Classifier guidance, classifier-free guidance, none, a guidance scale embedded in a distilled model (FLUX): the
# zoo's names.
GUIDANCE_TYPES = ('cg', 'cfg', 'uncond', 'distilled')


def model_options(dataset_default=None):
    """click options that choose and configure the pretrained model."""
    options = [
        click.option('--dataset_name', help='Pretrained model from the zoo (e.g. digits, cifar10, ms_coco)',
                     metavar='STR', type=str, default=dataset_default, show_default=dataset_default is not None),
        click.option('--model_path', help='Or: a network pickle, URL or local model directory (overrides the zoo '
                     'path). Loading a pickle runs code stored in it: only load files you trust.', metavar='PATH|URL',
                     type=str),
        click.option('--model_kind', help='Family of a --model_path checkpoint (.pt, .ckpt or .zip): '
                     'consistency-models, guided-diffusion or latent-diffusion',
                     type=click.Choice(['cm', 'adm', 'ldm'])),
        click.option('--model_arch', help='Its architecture as JSON, in the original code\'s names (omitted keys: '
                     'the published model\'s)', metavar='JSON', type=str),
        click.option('--classifier_path', help='Guided-diffusion classifier checkpoint (adm guidance)', metavar='PATH',
                     type=str),
        click.option('--classifier_arch', help='Its architecture as JSON (create_classifier flags)', metavar='JSON',
                     type=str),
        click.option('--guidance_type', help='Guidance: cg (classifier), cfg (classifier-free), uncond, distilled '
                     '(FLUX\'s embedded scale)  [default: the model\'s]', type=click.Choice(GUIDANCE_TYPES)),
        click.option('--guidance_rate', help='Guidance strength  [default: the model\'s]', metavar='FLOAT',
                     type=Finite()),
        click.option('--resolution', help='Image side in pixels of SD3 and FLUX (FLUX\'s time shift follows it)  '
                     '[default: the model\'s, 1024]', metavar='INT', type=click.IntRange(min=1)),
    ]

    def decorator(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorator


def check_model_kind(model_kind, model_path):
    """--model_kind describes a --model_path checkpoint; without one it would be applied to a zoo name."""
    if model_kind is not None and model_path is None:
        raise click.UsageError(f'--model_kind={model_kind} is the family of a --model_path checkpoint: give '
                               '--model_path (a zoo model from --dataset_name knows its own kind)')

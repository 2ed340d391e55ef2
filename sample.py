"""Generate images with a few-step diffusion solver (AdaSDE or a baseline), one PNG per seed.

EDM generate.py style: click options -> a validated config -> generate_images(), which benchmarks call too.
Every random number of a sample (latent, label, the noise of each stochastic step) comes from its own seed's
generator, and the network sees fixed-size chunks, so a sample's bytes depend on its seed only: not on --batch,
the number of processes, or where an interrupted run was resumed.
"""

# ruff: noqa: E402 -- torch_utils.cli comes first: the thread policy must be set before torch loads OpenMP.
from torch_utils import cli

cli.apply_thread_policy()
cli.apply_memory_policy()

import bisect
import collections
import collections.abc
import concurrent.futures
import errno
import functools
import glob
import hashlib
import io
import itertools
import math
import os
import re
import threading

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
import models
import models.sd
import solvers
from torch_utils import distributed as dist
from torch_utils.misc import (
    IntRanges,
    NoiseAhead,
    StackedRandomGenerator,
    atomic_write_bytes,
    parse_int_list,
    to_pixels,
)

# Seeds are taken modulo 2^32 by the generators: a larger one would repeat a smaller one's image.
MAX_SEED = 2**32 - 1

# Sampling settings a predictor fixes; giving a different value on the command line is an error.
PREDICTOR_SETTINGS = ('num_steps', 'afs', 'schedule_type', 'schedule_rho', 'guidance_type', 'guidance_rate',
                      'resolution')

#----------------------------------------------------------------------------
# Batch-invariant network evaluation. On the CPU, matrix products and
# convolutions take different code paths for different batch sizes and thread
# counts (a batch of 1 runs a matrix-vector product; a 1x1 convolution of
# fewer than 16 images changes kernel with the thread count), so the same
# image can come out ~3e-8 apart in a batch of 1 and in a batch of 64: enough
# to flip a rounded pixel now and then. Feeding the network -- and the
# decoder of a latent model -- only chunks of exactly `size` images (the last
# one padded with copies of its final image) runs every image through the
# same kernels, whatever the batch around it. The decoder takes chunks of
# DECODER_CHUNK images: the fewest for which those CPU kernels no longer
# change with the thread count (measured: 1x1 convolutions, chunks of 1 to 15
# differ between 1 and 2 threads), and few enough that a 512-pixel decoder
# stays small in memory whatever --batch is.
DECODER_CHUNK = 16


def call_in_chunks(fn, size, batch, **args):
    """fn(**args) on chunks of exactly `size` rows (size <= 0: one call): every tensor argument whose first
    dimension is `batch` is cut (the last chunk padded with copies of its final row); the outputs are joined."""
    if size <= 0 or batch == size:
        return fn(**args)
    outputs = []
    for start in range(0, batch, size):
        chunk = {k: _chunk_rows(v, batch, start, size) for k, v in args.items()}
        outputs.append(fn(**chunk)[:min(size, batch - start)])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _chunk_rows(value, batch, start, size):
    if not torch.is_tensor(value) or value.ndim == 0 or value.shape[0] != batch:
        return value
    rows = value[start:start + size]
    pad = size - rows.shape[0]
    return torch.cat([rows, rows[-1:].expand(pad, *rows.shape[1:])]) if pad else rows


class FixedBatchDenoiser:
    """Call `net` on chunks of exactly `size` rows; tensors in the call whose first dimension is the batch follow."""

    def __init__(self, net, size):
        self.net = net
        self.size = int(size)

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, x, sigma, **kwargs):
        batch = x.shape[0]
        if self.size <= 0 or batch == self.size:
            return self.net(x, sigma, **kwargs)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.reshape(-1).expand(batch) if sigma.numel() in (1, batch) else sigma
        return call_in_chunks(self.net, self.size, batch, x=x, sigma=sigma, **kwargs)

#----------------------------------------------------------------------------
# Speed options of the network call, each off by default (the defaults call the network as loaded, so their
# images are those of earlier versions byte for byte): the network's precision, the channels_last memory layout,
# torch.compile. Each may change pixels, so a folder records them when they are on. Precision: models with their
# own mixed-precision switch (EDMPrecond's use_fp16/amp_dtype, the openai adapters' amp_dtype, active on CUDA only;
# by default float16 for the adapters, float32 for EDM) get it set; any other model runs under torch.autocast.

NET_DTYPES = {'auto': None, 'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def own_precision(net):
    """Whether the model switches its precision itself (attribute amp_dtype), which it does on CUDA only."""
    return hasattr(net, 'amp_dtype')


class NetCall:
    """`net` called under the speed options; every attribute is the network's."""

    def __init__(self, net, net_dtype='auto', channels_last=False, compile=False):
        self.net = net
        dtype = NET_DTYPES[net_dtype]
        self.autocast = None
        if dtype is not None and own_precision(net):
            if hasattr(net, 'use_fp16'):  # EDMPrecond: amp_dtype is a torch dtype
                net.use_fp16 = dtype != torch.float32
                net.amp_dtype = dtype if dtype != torch.float32 else net.amp_dtype
            else:  # the openai adapters: a name, None for float32
                net.amp_dtype = None if dtype == torch.float32 else net_dtype
        elif dtype not in (None, torch.float32):
            self.autocast = dtype
        self.channels_last = channels_last
        if channels_last and isinstance(net, torch.nn.Module):
            net.to(memory_format=torch.channels_last)
        self.fn = torch.compile(net) if compile else net

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, x, sigma, **kwargs):
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            return self.fn(x, sigma, **kwargs)
        with torch.autocast(x.device.type, dtype=self.autocast):
            return self.fn(x, sigma, **kwargs)


def speed_settings(net_dtype='auto', channels_last=False, compile=False):
    """The speed options that are on, for the folder's settings (none with the defaults)."""
    on = dict(net_dtype=net_dtype, channels_last=channels_last, compile=compile)
    return {k: v for k, v in on.items() if v not in ('auto', False)}

#----------------------------------------------------------------------------
# Files: <outdir>[/<seed - seed % 1000:06d>]/<seed:06d>.png, written to a
# temporary name in the same folder and renamed, so a PNG is whole or absent.


def image_path(outdir, seed, subdirs=True):
    name = f'{seed:06d}.png'
    return os.path.join(outdir, f'{seed - seed % 1000:06d}', name) if subdirs else os.path.join(outdir, name)


def to_uint8(images):
    """[-1, 1] NCHW floats -> NHWC uint8 (x * 127.5 + 128, clipped, truncated: round to nearest)."""
    return to_pixels(images).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def encode_png(array):
    """One HWC uint8 image as PNG bytes ('L' for 1 channel, 'RGB' for 3), encoded in memory."""
    image = PIL.Image.fromarray(array[:, :, 0], 'L') if array.shape[2] == 1 else PIL.Image.fromarray(array, 'RGB')
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def save_image(array, path):
    """Write one HWC uint8 image as PNG: encoded in memory, then written to a temporary file and renamed."""
    atomic_write_bytes(path, encode_png(array))


class ImageWriter:
    """A bounded pool of threads that encode and write the PNGs of a batch while the next batch is generated (PNG
    encoding and file writes release the GIL). The threads encode at the same time but make their files one at a
    time: files made at once in one folder contend for the folder's lock, which costs CPU time on the file systems
    where making a file is slow (docs/bench-speed.md). At most `pending` batches wait; the first error of a write is
    raised in the caller, at its next submit or at the end of the `with` block. `written` counts the images on
    disk."""

    def __init__(self, threads=2, pending=None):
        self.pool = concurrent.futures.ThreadPoolExecutor(max(int(threads), 1), thread_name_prefix='png-writer')
        self.max_pending = pending or 2 * max(int(threads), 1)
        self.pending = collections.deque()
        self.written = 0
        self._lock = threading.Lock()

    def _save(self, arrays, paths):
        for array, path in zip(arrays, paths):
            data = encode_png(array)
            with self._lock:
                atomic_write_bytes(path, data)
                self.written += 1

    def submit(self, arrays, paths):
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._save, arrays, paths))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            while self.pending and exc_type is None:
                self.pending.popleft().result()
        finally:
            # After an error, the batches not started are dropped; those being written finish (files stay whole).
            self.pool.shutdown(wait=True, cancel_futures=True)


def grid_path_for(outdir):
    """Where --grid writes: next to the image folder (<outdir>-grid.png), so that fid.py on it never sees the grid."""
    return os.path.normpath(outdir) + '-grid.png'


def save_grid(paths, grid_path, min_tile=64, background=128):
    """Tile the given PNGs (all the same size) into one image, int(sqrt(n)) per row, each image upscaled (nearest
    neighbour, an integer factor) to at least `min_tile` pixels, with gray gaps between them."""
    images = [np.asarray(PIL.Image.open(p)) for p in paths]
    images = [image if image.ndim == 3 else image[:, :, None] for image in images]
    scale = max(1, math.ceil(min_tile / max(images[0].shape[:2])))
    images = [image.repeat(scale, axis=0).repeat(scale, axis=1) for image in images]
    per_row = max(int(math.sqrt(len(images))), 1)
    num_rows = (len(images) - 1) // per_row + 1
    h, w, channels = images[0].shape
    gap = max(2, h // 16)
    grid = np.full([num_rows * (h + gap) + gap, per_row * (w + gap) + gap, channels], background, dtype=np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, per_row)
        top, left = gap + row * (h + gap), gap + col * (w + gap)
        grid[top:top + h, left:left + w] = image
    save_image(grid, grid_path)

#----------------------------------------------------------------------------
# Work split: EDM generate.py's batches, num_batches = ceil(n / (batch * world)) * world near-equal pieces of the
# seeds, but each rank takes a contiguous run of them (EDM: every world-th), so that the ranks write into different
# folders at any one time (docs/deviations.md). Images depend on their seeds only, never on the split.


class RankBatches(collections.abc.Sequence):
    """The batches of one rank, computed on demand: item i is batch rank * len + i of the split (an IntRanges of
    seeds), len = num_batches / world_size. The first n % num_batches batches hold one seed more, as
    torch.tensor_split makes them."""

    def __init__(self, seeds, num_batches, rank, world_size):
        self.seeds, self.num_batches, self.rank, self.world_size = seeds, num_batches, rank, world_size

    def __len__(self):
        return self.num_batches // self.world_size

    def __getitem__(self, i):
        j = range(self.rank * len(self), (self.rank + 1) * len(self))[i]
        size, extra = divmod(len(self.seeds), self.num_batches)
        start = j * size + min(j, extra)
        return self.seeds[start:start + size + (j < extra)]


def split_seeds(seeds, max_batch_size, world_size=1):
    """All batches, one lazy sequence per rank: result[r][i] is batch i of rank r (an IntRanges of seeds). Memory
    and time do not grow with the number of seeds."""
    seeds = IntRanges.of(seeds)
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size if len(seeds) else 0
    return [RankBatches(seeds, num_batches, r, world_size) for r in range(world_size)]

#----------------------------------------------------------------------------
# One batch. Draw order per seed: latent, then (class-conditional models) the
# label, then every noise of the stochastic solver -- all from that seed's
# generator, so a sample depends on its seed only.


def draw_inputs(net, seeds, class_idx=None, device=None, plan=()):
    """The draws that start a batch, from each seed's own generator: (noise, latents, class labels or None).
    `noise.randn_like` then draws the solver's noise (NoiseAhead: drawn here already where `plan` foresees it), so a
    sample depends on its seed only."""
    device = torch.device('cpu') if device is None else torch.device(device)
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)], device=device)]
        if class_idx is not None:
            labels = torch.zeros_like(labels)
            labels[:, class_idx] = 1
    return NoiseAhead(rnd, plan), latents, labels


# The noise of a batch is drawn ahead only up to this size (an SDE solver asks for one state-sized tensor per step).
NOISE_AHEAD_BYTES = 256 << 20


def _affordable(plan, batch):
    size = sum(math.prod(shape) * dtype.itemsize for shape, dtype, _ in plan) * batch
    return plan if size <= NOISE_AHEAD_BYTES else ()


def sample_batch(net, seeds, solver, sigmas, options=None, *, afs=False, class_idx=None, extra_args=None,
                 dtype=torch.float32, device=None, inputs=None):
    """Run `solver` from the latents of `seeds` down the schedule `sigmas`; returns the final state [B, C, R, R].
    `inputs`: draw_inputs(net, seeds, class_idx, device), when drawn ahead."""
    noise, latents, labels = inputs or draw_inputs(net, seeds, class_idx, device)
    extra_args = dict(extra_args or {})
    if labels is not None:
        extra_args['class_labels'] = labels
    x = latents.to(dtype) * float(sigmas[0])
    return solvers.get_solver(solver)(net, x, sigmas, extra_args=extra_args, randn_like=noise.randn_like, afs=afs,
                                      **(options or {}))


def generate_images(net, seeds, solver='dpmpp', options=None, *, num_steps=6, afs=False, schedule_type=None,
                    schedule_rho=None, max_batch_size=64, net_batch=64, class_idx=None, condition_fn=None,
                    dtype=torch.float32, device=None, rank=0, world_size=1, **speed):
    """Yield (batch_seeds, images) for the batches of `seeds` that fall to `rank`; images are NCHW floats in
    about [-1, 1] (decoded when the model is latent). condition_fn(batch_seeds) -> extra_args (text prompts)."""
    info = solvers.solver_info(solver)
    schedule_type = schedule_type or info.schedule[0]
    schedule_rho = info.schedule[1] if schedule_rho is None else schedule_rho
    sigmas = solvers.get_schedule(num_steps, net.sigma_min, net.sigma_max, schedule_type, schedule_rho, net=net)
    yield from generate_batches(net, split_seeds(seeds, max_batch_size, world_size)[rank], solver, options,
                                sigmas, afs=afs, net_batch=net_batch, class_idx=class_idx, condition_fn=condition_fn,
                                dtype=dtype, device=device, **speed)


def generate_batches(net, batches, solver, options, sigmas, *, afs=False, net_batch=64, class_idx=None,
                     condition_fn=None, dtype=torch.float32, device=None, **speed):
    """Yield (batch_seeds, images) for each non-empty batch of seeds in `batches`, down the schedule `sigmas`.
    `speed`: net_dtype, channels_last, compile (NetCall). The per-seed draws of the next batch (a generator per seed,
    the latents, the labels, and the noise the solver asked for in the batch before) are made in a helper thread
    while the current batch is solved."""
    evaluator = FixedBatchDenoiser(NetCall(net, **speed) if speed_settings(**speed) else net, net_batch)
    batches = (list(b) for b in batches if b)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='seed-draws') as ahead:
        draw = functools.partial(draw_inputs, net, class_idx=class_idx, device=device)
        batch_seeds, plan = next(batches, None), ()
        inputs = ahead.submit(draw, batch_seeds) if batch_seeds is not None else None
        while batch_seeds is not None:
            next_seeds, next_inputs = next(batches, None), None
            if next_seeds is not None:
                next_inputs = ahead.submit(draw, next_seeds, plan=_affordable(plan, len(next_seeds)))
            extra_args = condition_fn(batch_seeds) if condition_fn is not None else None
            drawn = inputs.result()
            x = sample_batch(evaluator, batch_seeds, solver, sigmas, options, afs=afs, extra_args=extra_args,
                             dtype=dtype, device=device, inputs=drawn)
            plan = drawn[0].calls
            yield batch_seeds, (call_in_chunks(net.decode, DECODER_CHUNK, x.shape[0], latents=x)
                                if hasattr(net, 'decode') else x)
            batch_seeds, inputs = next_seeds, next_inputs


#----------------------------------------------------------------------------
# Predictors: a file, a folder of snapshots, or an experiment number looked up
# as ./exps/<num:05d>-*/ (runs of train.py) and ./exp/<num:05d>-*/ (shipped).


def _snapshot_key(path):
    numbers = re.findall(r'\d+', os.path.basename(path))
    return (int(numbers[-1]) if numbers else -1, os.path.basename(path))


def newest_snapshot(folder):
    files = [p for p in glob.glob(os.path.join(folder, '*')) if p.endswith(('.safetensors', '.pkl'))]
    snapshots = [p for p in files if 'snapshot' in os.path.basename(p)] or files
    return max(snapshots, key=_snapshot_key) if snapshots else None


def resolve_predictor_path(path):
    """The predictor file that --predictor_path names; raises click.UsageError when there is none."""
    if re.fullmatch(r'\d+', path):
        repo_exp = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'exp')
        for root in ('exps', 'exp', repo_exp):
            for folder in sorted(glob.glob(os.path.join(root, f'{int(path):05d}-*')), reverse=True):
                snapshot = newest_snapshot(folder)
                if snapshot is not None:
                    return snapshot
        raise click.UsageError(f'--predictor_path={path}: no experiment {int(path):05d}-* with a snapshot '
                               'under ./exps or ./exp')
    if os.path.isdir(path):
        snapshot = newest_snapshot(path)
        if snapshot is None:
            raise click.UsageError(f'--predictor_path={path}: no predictor snapshot in this folder')
        return snapshot
    if not os.path.isfile(path):
        raise click.UsageError(f'--predictor_path={path}: no such file')
    return path


def predictor_config(c, given):
    """Fill the sampling settings of `c` from its predictor (any learned solver); refuse explicit options that
    contradict it (predictor.check_compatible, the one check)."""
    c.predictor_file = resolve_predictor_path(c.predictor_path)
    try:
        predictor = solvers.learned.load_predictor(c.predictor_file)
    except ValueError as e:
        raise click.UsageError(f'--predictor_path: {e}') from None
    settings = dict(predictor.settings, num_steps=predictor.num_steps)
    trained = [m for m in (settings.get('model'), settings.get('dataset_name')) if m]
    requested_model = c.dataset_name or c.model_path
    if requested_model and trained and not any(_same_model(requested_model, m) for m in trained):
        raise click.UsageError(f'this predictor was trained for model {trained[0]!r}, not {requested_model!r}')
    try:
        predictor.check_compatible(**{key: c[key] for key in PREDICTOR_SETTINGS if key in given})
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    for key in PREDICTOR_SETTINGS:
        if settings.get(key) is not None:
            c[key] = settings[key]
    if c.solver not in (None, predictor.kind):
        raise click.UsageError(f'--predictor_path runs the {predictor.kind} solver, not --solver={c.solver}')
    if not requested_model:
        if not trained:
            raise click.UsageError('the predictor does not name its model; give --dataset_name or --model_path')
        c.model_path = trained[0]
    c.solver = predictor.kind
    c.options = dict(predictor=predictor)


def _model_file(name):
    """What a model name or path loads, for comparing models: a zoo name's file where it is stored (its folder's
    model.json for the embedded models), a model folder's model.json, else the name itself."""
    entry = models.zoo.ZOO.get(name)
    if entry is not None and entry.file:
        path = models.zoo.local_path(entry)
        return path if os.path.exists(path) or not entry.url else (models.zoo.cached_path(entry.url) or path)
    return os.path.join(name, 'model.json') if os.path.isdir(name) else name


def _same_model(a, b):
    """Whether two model names or paths load the same model (by the file they resolve to, not the string)."""
    a, b = _model_file(a), _model_file(b)
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))

#----------------------------------------------------------------------------
# Validation of the solver options before any image is made: the chosen
# solver must have every option given, and must accept their values (one run
# of it on a 1-pixel dummy denoiser, which raises what the real run would).


def solver_config(c, given):
    try:
        solvers.solver_info(c.solver)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    explicit = {k: c[k] for k in solvers.option_table() if k in given and k in c}
    if c.solver in solvers.learned.PREDICTORS and 'predictor' not in c.options:
        raise click.UsageError(f'the {c.solver} solver needs a trained predictor: give --predictor_path')
    try:
        c.options = {k: v for k, v in solvers.check_options(c.solver, {**c.options, **explicit}).items()
                     if k in explicit or k in c.options}
    except ValueError as e:
        raise click.UsageError(str(e)) from None


class _ZeroDenoiser(torch.nn.Module):
    """D = 0 on a 1-pixel image: what check_solver_runs runs a solver on."""
    bottleneck = ''  # AMED reads the output of this module itself

    def forward(self, x, sigma, **kwargs):
        return x * 0


def check_solver_runs(c, sigmas):
    x = torch.ones([1, 1, 1, 1], dtype=torch.float64) * float(sigmas[0])
    try:
        solvers.get_solver(c.solver)(_ZeroDenoiser(), x, sigmas, afs=c.afs, **c.options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None

#----------------------------------------------------------------------------
# The model: a zoo dataset name or a path/URL, loaded by rank 0 first so that
# only rank 0 downloads into the cache.


def load_net(c, device):
    kwargs = {k: c[k] for k in ('guidance_type', 'guidance_rate', 'classifier_path', 'classifier_arch', 'resolution')
              if c[k] is not None}
    kwargs.update({k: v for k, v in (('kind', c.model_kind), ('arch', c.model_arch)) if v is not None})
    try:
        with dist.rank0_first():  # only rank 0 downloads
            return models.load_model(c.model_path or c.dataset_name, device=device, **kwargs)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f'cannot load model {c.model_path or c.dataset_name!r}: {e}') from None


def condition_fn_for(net, prompt, seeds):
    """extra_args per batch for text-conditioned models: one prompt for all, or a CSV of prompts (index = seed)."""
    if not hasattr(net, 'prompt_args'):
        if prompt is not None:
            raise click.UsageError('--prompt is only for text-conditioned models')
        return None
    if prompt is None:
        raise click.UsageError('this model is text-conditioned: give --prompt (a text, or a .csv with a "text" column)')
    if prompt.endswith('.csv') and os.path.isfile(prompt):
        try:
            prompts = models.sd.load_prompts(prompt)
            # The first seed, in order, past the last prompt (from the ranges, not from every seed).
            beyond = next((max(r.start, len(prompts)) for r in seeds.ranges if r.stop > len(prompts)), None)
            models.sd.prompts_for_seeds(prompts, [] if beyond is None else [beyond])
        except ValueError as e:
            raise click.UsageError(f'--prompt: {e}') from None
        return lambda seeds: net.prompt_args(models.sd.prompts_for_seeds(prompts, seeds))
    return lambda seeds: net.prompt_args([prompt] * len(seeds))

#----------------------------------------------------------------------------


#----------------------------------------------------------------------------
# The settings of an image folder: <outdir>/sample_options.json. Resuming (skipping the seeds whose PNG exists)
# is only right when the existing images were made with the same settings.

SETTINGS_FILE = 'sample_options.json'


def _file_digest(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def folder_settings(c, shown, schedule_type, schedule_rho, dtype):
    """Everything that decides the bytes of a seed's PNG (and where it goes); not --batch, --net_batch, --device."""
    model = c.model_path or c.dataset_name
    prompt = c.prompt
    if prompt is not None and os.path.isfile(prompt):
        prompt = dict(file=os.path.abspath(prompt), sha256=_file_digest(prompt))
    return dict(
        model=model if model in models.ZOO or not os.path.exists(model) else os.path.abspath(model), solver=c.solver,
        options=dict(shown), num_steps=c.num_steps, afs=c.afs, schedule_type=schedule_type,
        schedule_rho=schedule_rho, class_idx=c.class_idx, guidance_type=c.guidance_type,
        guidance_rate=c.guidance_rate, prompt=prompt, dtype=str(dtype).removeprefix('torch.'), subdirs=c.subdirs,
        predictor=dict(kind=c.solver, content_sha256=c.options['predictor'].digest()) if c.predictor_path else None,
        **({} if c.resolution is None else dict(resolution=c.resolution)),  # SD3/FLUX only: older folders resume
        **speed_settings(c.net_dtype, c.channels_last, c.compile))


def existing_images(outdir):
    """The PNGs of the sample layout under outdir (<seed>.png, at the top or in <nnnnnn>/)."""
    found = glob.glob(os.path.join(glob.escape(outdir), '[0-9][0-9][0-9][0-9][0-9][0-9]*.png'))
    found += glob.glob(os.path.join(glob.escape(outdir), '[0-9]' * 6, '[0-9][0-9][0-9][0-9][0-9][0-9]*.png'))
    return sorted(p for p in found if re.fullmatch(r'\d{6,}\.png', os.path.basename(p)))


def _seeds_in(folder, first=None):
    """IntRanges of the seeds whose PNG <seed>.png is in `folder` (one listing); with `first`, only those of the
    sample layout's subfolder for seeds first..first+999."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return IntRanges()
    found = np.array(sorted(int(e.name[:-4]) for e in entries if re.fullmatch(r'\d{6,}\.png', e.name) and e.is_file()),
                     dtype=np.int64)
    if first is not None:
        found = found[(found >= first) & (found < first + 1000)]
    if len(found) == 0:
        return IntRanges()
    breaks = np.flatnonzero(np.diff(found) != 1) + 1
    starts, ends = found[np.r_[0, breaks]], found[np.r_[breaks - 1, len(found) - 1]]
    return IntRanges(range(int(a), int(b) + 1) for a, b in zip(starts, ends))


def done_seeds(outdir, seeds, subdirs=True):
    """The seeds whose PNG exists in a folder that can hold one of `seeds` (IntRanges), sorted, as IntRanges: one
    listing of outdir, and one of each existing subfolder that can hold a requested seed, so the time goes with
    what is on disk, not with len(seeds). seeds.without(done_seeds(...)) are the seeds still to do."""
    if not subdirs:
        return _seeds_in(outdir)
    try:
        names = [e.name for e in os.scandir(outdir) if re.fullmatch(r'\d{6,}', e.name) and e.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return IntRanges()
    requested = sorted(seeds.ranges, key=lambda r: r.start)
    starts = [r.start for r in requested]
    reach = list(itertools.accumulate((r.stop for r in requested), max))  # largest stop among ranges so far

    def holds_requested(first):  # does some requested range meet first..first+999?
        k = bisect.bisect_left(starts, first + 1000)
        return k > 0 and reach[k - 1] > first
    pieces = []
    for name in names:
        first = int(name)
        if first % 1000 == 0 and holds_requested(first):
            pieces.extend(_seeds_in(os.path.join(outdir, name), first).ranges)
    return IntRanges(sorted(pieces, key=lambda r: r.start))


def check_folder_settings(outdir, settings, overwrite):
    """Refuse to add to a folder made with other settings (or of unknown origin) unless `overwrite`."""
    if overwrite:
        return
    old = cli.read_settings(os.path.join(outdir, SETTINGS_FILE))
    if old is None:
        if existing_images(outdir):
            raise click.UsageError(f'{outdir} holds images but no {SETTINGS_FILE} saying how they were made; give '
                                   '--overwrite to replace them, or another --outdir')
        return
    if cli.differing(old, settings):
        raise click.UsageError(cli.mismatch_message(outdir, old, settings) + '; give --overwrite to replace its '
                               'images, or another --outdir')


def build_config(kwargs):
    """The run's configuration from the command-line options: the predictor's settings, the solver and its options,
    seeds, device, dtype, schedule, NFE and output folder, each checked (one-line errors) before any model loads."""
    given = {k for k, v in kwargs.items() if v is not None}
    c = dnnlib.EasyDict(kwargs)
    c.options = {}
    if c.predictor_path is not None:
        predictor_config(c, given)
    elif c.dataset_name is None and c.model_path is None:
        raise click.UsageError('give --dataset_name, --model_path or --predictor_path')
    if c.dataset_name is not None and c.model_path is not None and c.predictor_path is None:
        raise click.UsageError('give --dataset_name or --model_path, not both')
    cli.check_model_kind(c.model_kind, c.model_path)
    c.solver = 'dpmpp' if c.solver is None else c.solver
    c.num_steps = c.num_steps or 6
    c.afs = bool(c.afs)
    solver_config(c, given)
    try:
        c.seed_list = parse_int_list(c.seeds, max_value=MAX_SEED)
    except ValueError as e:
        raise click.UsageError(f'--seeds: {e}') from None
    duplicate = c.seed_list.first_duplicate()
    if duplicate is not None:
        raise click.UsageError(f'--seeds: seed {duplicate} appears twice')
    device = cli.resolve_device(c.device) if c.device else dist.device()
    if device.type == 'cuda' and device.index is None:
        device = dist.device()  # cuda:LOCAL_RANK under torchrun
    c.device = device
    c.dtype = getattr(torch, c.dtype) if c.dtype else (torch.float64 if device.type == 'cpu' else torch.float32)
    info = solvers.solver_info(c.solver)
    c.schedule_type = c.schedule_type or info.schedule[0]
    c.schedule_rho = info.schedule[1] if c.schedule_rho is None else c.schedule_rho
    try:
        solvers.check_schedule(c.schedule_type, c.schedule_rho)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--schedule_rho') from None
    c.nfe = solvers.nfe(c.solver, c.num_steps, afs=c.afs, **c.options)
    c.outdir = cli.check_output_dir(c.outdir or os.path.join('samples', _dataset_label(c), f'{c.solver}_nfe{c.nfe}'))
    return c


def plan_run(c, net):
    """What the loaded model decides: the schedule (once, for every batch), the conditioning, a dry run of the
    solver, the folder settings, the seeds still to do and their split into batches per rank."""
    if c.class_idx is not None and not 0 <= c.class_idx < net.label_dim:
        raise click.UsageError(f'--class={c.class_idx}: the model has {net.label_dim} classes')
    run = dnnlib.EasyDict(condition_fn=condition_fn_for(net, c.prompt, c.seed_list))
    try:
        run.sigmas = solvers.get_schedule(c.num_steps, net.sigma_min, net.sigma_max, c.schedule_type, c.schedule_rho,
                                          net=net)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    check_solver_runs(c, run.sigmas)
    run.shown = {k: v for k, v in solvers.check_options(c.solver, c.options).items() if k != 'predictor'}
    run.settings = folder_settings(c, run.shown, c.schedule_type, c.schedule_rho, c.dtype)
    check_folder_settings(c.outdir, run.settings, c.overwrite)
    check_memory(c, net)
    if c.net_dtype not in ('auto', 'float32') and own_precision(net) and c.device.type != 'cuda':
        raise click.UsageError(f'--net_dtype={c.net_dtype}: this model switches its precision on CUDA only; on '
                               f'{c.device.type} it runs in float32')
    skip = c.resume and not c.overwrite
    run.todo = c.seed_list.without(done_seeds(c.outdir, c.seed_list, c.subdirs)) if skip else c.seed_list
    pixels = 3 * net.decoded_resolution ** 2 if hasattr(net, 'decode') else net.img_channels * net.img_resolution ** 2
    cli.check_output_dir(c.outdir, need_bytes=len(run.todo) * cli.bytes_on_disk(pixels + PNG_OVERHEAD, c.outdir),
                         need_files=len(run.todo))
    run.per_rank = split_seeds(run.todo, c.max_batch_size, dist.get_world_size())
    return run


# What a PNG adds to its pixels at most (signature, IHDR, IEND, zlib's stored-block headers): 1 KiB is ample.
PNG_OVERHEAD = 1024


def check_memory(c, net):
    """One line before any work when a batch cannot fit: the solver state of --batch images, and the input of one
    network call of --net_batch images (the network's activations come on top)."""
    image = net.img_channels * net.img_resolution ** 2
    available = cli.available_memory(c.device)
    chunk = c.net_batch or c.max_batch_size
    for option, value, need in (('--batch', c.max_batch_size, c.max_batch_size * image * c.dtype.itemsize),
                                ('--net_batch', chunk, chunk * image * 4)):
        if available is not None and need > available:
            raise click.UsageError(f'{option}={value}: {value} images of {net.img_channels}x{net.img_resolution}x'
                                   f'{net.img_resolution} need {need / 2**30:.1f} GiB for the input alone, and '
                                   f'{c.device} has {available / 2**30:.1f} GiB available; give a smaller {option}')


def print_summary(c, net, run):
    guidance = models.sd.cfg_nfe_factor(net)
    dist.print0(f'Model:    {c.model_path or c.dataset_name} ({net.img_channels}x{net.img_resolution}x'
                f'{net.img_resolution}, {net.label_dim} classes, sigma {net.sigma_min:g}-{net.sigma_max:g})')
    predictor = c.options.get('predictor')
    form = f' ({predictor.base} base)' if predictor is not None else ''
    dist.print0(f'Solver:   {c.solver}{form} {run.shown}' + (f' predictor={c.predictor_file}' if c.predictor_path
                                                             else '') + f' afs={c.afs}')
    levels = [f'{float(s):.4g}' for s in run.sigmas]
    levels = levels if len(levels) <= SHOWN_LEVELS else [*levels[:SHOWN_LEVELS // 2], '...',
                                                         *levels[-SHOWN_LEVELS // 2:]]
    dist.print0(f'Schedule: {c.schedule_type} rho={c.schedule_rho:g}, {c.num_steps} points: ' + ' '.join(levels))
    parallel = predictor.parallel_nfe(c.num_steps) - int(c.afs) if predictor is not None else c.nfe
    dist.print0(f'NFE:      {c.nfe} real network calls per image'
                + (f' ({parallel} "parallel NFE" as the EPD code counts them)' if parallel != c.nfe else '')
                + (f' ({c.nfe * guidance} model evaluations with guidance)' if guidance > 1 else ''))
    speed = speed_settings(c.net_dtype, c.channels_last, c.compile)
    dist.print0(f'Seeds:    {len(c.seed_list)} ({len(c.seed_list) - len(run.todo)} already done) -> {c.outdir}, '
                f'{dist.get_world_size()} process(es), {c.device}, {str(c.dtype).removeprefix("torch.")}, '
                f'{c.writers} writer thread(s)' + ''.join(f', {k}={v}' for k, v in speed.items()))


SHOWN_LEVELS = 20  # noise levels printed in full; a longer schedule shows its first and last ten


def solver_option_flags(fn):
    """One click option per solver option of the registry (solvers.registry.OPTION_DOCS), naming its solvers."""
    metavars = {int: 'INT', bool: 'BOOL', str: 'STR', float: 'FLOAT'}
    for name, (kind, doc, owners) in reversed(solvers.option_table().items()):
        if kind is None:  # an object (a predictor), given through its own flag
            continue
        decls = [f'--{name}', name]
        if name == 'r':  # torchrun takes --r for its own options
            decls, doc = ['--r', '--dpm_r', 'r'], f'{doc}; under torchrun write --dpm_r'
        fn = click.option(*decls, help=f'{doc} ({", ".join(owners)})', metavar=metavars[kind],
                         type=cli.Finite() if kind is float else kind)(fn)
    return fn


def _dataset_label(c):
    name = c.dataset_name or c.model_path
    return os.path.splitext(os.path.basename(os.path.normpath(name)))[0] or 'model'


@click.command(context_settings=dict(max_content_width=120))
# Model and solver.
@cli.model_options()
@click.option('--predictor_path', help='Predictor of a learned solver: adasde, amed or epd (file, folder, experiment '
              'number; an official snapshot pickle too); sets the solver and every sampling setting',
              metavar='PATH|INT', type=str)
@click.option('--solver', help=f'Solver: {", ".join(sorted(solvers.SOLVERS))}  [default: dpmpp]', metavar='NAME',
              type=str)
@click.option('--num_steps', help='Time points  [default: 6]', metavar='INT', type=click.IntRange(min=2))
@click.option('--afs', help='Analytical first step  [default: False]', metavar='BOOL', type=bool)
@click.option('--schedule_type', help="Time schedule  [default: the solver's]", type=click.Choice(solvers.SCHEDULES))
@click.option('--schedule_rho', help="Schedule exponent  [default: the solver's]", metavar='FLOAT', type=cli.Finite())
@solver_option_flags  # each only for the solvers that have it
# Conditioning.
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0))
@click.option('--prompt', help='Text, or a .csv of prompts (row = seed)', metavar='STR|PATH', type=str)
# Output and runtime.
@click.option('--seeds', help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', type=str, default='0-63',
              show_default=True)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1),
              default=64, show_default=True)
@click.option('--net_batch', help='Fixed network chunk size, 0 = the whole batch', metavar='INT',
              type=click.IntRange(min=0), default=64, show_default=True)
@click.option('--outdir', help='Where to save the images  [default: samples/<dataset>/<solver>_nfe<NFE>]',
              metavar='DIR', type=str)
@click.option('--subdirs/--no-subdirs', help='One folder per 1000 seeds', default=True, show_default=True)
@click.option('--grid', help='Also write <outdir>-grid.png: the first 64 seeds, upscaled, with gaps', is_flag=True)
@click.option('--resume/--no-resume', help='Skip seeds whose PNG exists (in a folder made with the same settings)',
              default=True, show_default=True)
@click.option('--overwrite', help='Replace the images of a folder made with other settings', is_flag=True)
@click.option('--writers', help='Threads per process that encode PNGs (and make their files, one at a time) while '
              'the next batch is made',
              metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str)
@click.option('--dtype', help='Solver state  [default: float64 on cpu, float32 on cuda]',
              type=click.Choice(['float32', 'float64']))
@click.option('--net_dtype', help="Precision of the network; the solver state keeps --dtype  [default: auto, the "
              "model's own: float32, float16 on CUDA for the openai families]", type=click.Choice(list(NET_DTYPES)),
              default='auto')
@click.option('--channels_last', help='Run the network in the channels_last memory layout', is_flag=True)
@click.option('--compile', help='torch.compile the network (the first batch compiles it)', is_flag=True)
def main(**kwargs):
    """Generate images with AdaSDE or a baseline solver, one PNG per seed.

    \b
    # 64 digits with DPM-Solver++(3M), 5 NFE
    python sample.py --dataset_name=digits --solver=dpmpp --num_steps=6
    \b
    # AdaSDE from a trained predictor (experiment 0 under ./exps), 50k images on 2 GPUs
    torchrun --standalone --nproc_per_node=2 sample.py --predictor_path=0 --seeds=0-49999
    """
    dist.init()
    c = build_config(kwargs)
    net = load_net(c, c.device)
    run = plan_run(c, net)

    # Every rank looks for existing images before any rank writes.
    dist.barrier()
    if dist.get_rank() == 0:
        if c.overwrite:
            removed = existing_images(c.outdir)
            for path in removed:
                os.remove(path)
            if removed:
                print(f'--overwrite: removed the {len(removed)} images of the earlier run in {c.outdir}')
        cli.write_settings(os.path.join(c.outdir, SETTINGS_FILE), run.settings)
    dist.barrier()
    print_summary(c, net, run)

    # Generate; the PNGs of a batch are encoded and written by the writer threads while the next batch is made.
    # The ranks do not wait for each other until the end (rank 0's bar counts its own batches times the ranks).
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batches = generate_batches(net, run.per_rank[rank], c.solver, c.options, run.sigmas, afs=c.afs,
                               net_batch=c.net_batch, class_idx=c.class_idx, condition_fn=run.condition_fn,
                               dtype=c.dtype, device=c.device, net_dtype=c.net_dtype,
                               channels_last=c.channels_last, compile=c.compile)
    writer = ImageWriter(c.writers)
    try:
        with writer, tqdm.tqdm(total=len(run.todo), unit='img', disable=rank != 0 or not run.todo) as bar:
            for batch_seeds, images in batches:
                writer.submit(to_uint8(images), [image_path(c.outdir, seed, c.subdirs) for seed in batch_seeds])
                bar.update(min(len(batch_seeds) * world_size, bar.total - bar.n))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise click.ClickException(f'{c.outdir}: no space left on the disk after {writer.written} new image(s) of '
                                   f'this process, all whole; free some space and run the same command again: the '
                                   'images already written are skipped') from None
    dist.barrier()
    if c.grid and rank == 0 and c.seed_list:
        save_grid([image_path(c.outdir, s, c.subdirs) for s in c.seed_list[:64]], grid_path_for(c.outdir))
        print(f'Grid:     {grid_path_for(c.outdir)}')
    dist.barrier()
    dist.print0('Done.')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cli.run(main)

#----------------------------------------------------------------------------

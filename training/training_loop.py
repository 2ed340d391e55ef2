"""The distillation loop (EDM's training/training_loop.py): one configuration flows from train.py into
training_loop, whose signature is the schema written to training_options.json. Here live the run management
(model loading, the batch split over processes and accumulation rounds, logging, snapshots, resume, stopping on
signals) and the per-iteration procedure; the math (grids, teacher, the student's step) is in solvers/.
"""

import json
import math
import os
import sys
import time

import torch
import tqdm

import solvers
from solvers.distill import TEACHERS, student_and_teacher_sigmas, teacher_options, teacher_targets
from solvers.learned import make_predictor
from torch_utils import distributed as dist
from torch_utils import training_stats
from torch_utils.misc import StackedRandomGenerator, atomic_write, to_pixels

#----------------------------------------------------------------------------
# Conditioning drawn per sample: class labels for class-conditional models,
# or whatever a model adapter provides (text prompts for Stable Diffusion).


def training_conditioning(net, rnd, batch_size, device):
    if hasattr(net, 'training_conditioning'):
        return net.training_conditioning(rnd, batch_size)
    if getattr(net, 'label_dim', 0):
        labels = rnd.randint(net.label_dim, size=[batch_size], device=device)
        return dict(class_labels=torch.eye(net.label_dim, device=device)[labels])
    return {}

#----------------------------------------------------------------------------
# Per-step loss of the last step: the official AdaSDE code replaces the L2 loss
# there by alpha * (feature MSE) broadcast over the C*H*W elements of the state,
# i.e. per sample alpha * C*H*W * d(P(x), P(y)) with d the loss network's
# distance (mean squared feature difference; LPIPS for 'lpips'), see
# docs/distillation.md. P(x) = clip(127.5 x + 128, 0, 255) maps to pixels;
# latent models decode first.


class FeatureLoss:
    def __init__(self, net, feature_net, alpha):
        self.net = net
        self.feature_net = feature_net
        self.alpha = alpha

    def to_pixels(self, x):
        return to_pixels(self.net.decode(x) if hasattr(self.net, 'decode') else x)

    def __call__(self, x, y):
        elements = x[0].numel()
        with torch.no_grad():
            p_y = self.to_pixels(y)
        return self.alpha * elements * self.feature_net.distance(self.to_pixels(x), p_y).to(x.dtype)

#----------------------------------------------------------------------------
# One distillation iteration over a global batch. Each rank owns a contiguous
# slice of the global batch; sample b of iteration `it` draws its latent and
# noise from its own generator, seeded by TRAIN_SEEDS + (seed << 24) + it *
# batch + b (mod 2^32), so the latents of training never coincide with those of
# sampling seeds below 2^31, the seeds every evaluation here uses.
# Gradients of sum(loss) / global_batch are summed over ranks and rounds, so
# the update does not depend on the number of processes or rounds.


TRAIN_SEEDS = 1 << 31


def training_seeds(seed, first, count):
    """Generator seeds of the training samples first .. first + count - 1 of run seed `seed`."""
    return [TRAIN_SEEDS + ((seed << 24) + b) % TRAIN_SEEDS for b in range(first, first + count)]


def distill_iteration(net, predictor, optimizer, student_sigmas, teacher_sigmas, M, afs, it, seed,
                      batch, batch_gpu, feature_loss=None, substeps=2, device='cpu', dtype=torch.float32,
                      loss_steps='all', teacher='dpm', teacher_opts=None):
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = batch // world
    first = it * batch + rank * per_rank  # index of this rank's first sample in the run
    rounds = []
    for start in range(first, first + per_rank, batch_gpu):
        rnd = StackedRandomGenerator(device, training_seeds(seed, start, batch_gpu))
        latents = rnd.randn([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        extra_args = training_conditioning(net, rnd, batch_gpu, device)
        x = latents.to(dtype) * float(student_sigmas[0])
        targets = teacher_targets(net, x, teacher_sigmas, M, extra_args, substeps, teacher, teacher_opts)
        rounds.append(dict(rnd=rnd, x=x, targets=targets, extra_args=extra_args))

    num_steps = len(student_sigmas)
    grid = [float(t) for t in student_sigmas]
    losses = []
    for s in range(num_steps - 1):
        trained = loss_steps == 'all' or s == num_steps - 2  # 'last': the earlier steps only carry the state
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for r in rounds:
            # Teacher forcing (AMED's single-step bases): step s starts from the teacher's state at sigma_s.
            start = r['targets'][s - 1] if predictor.teacher_forcing and s > 0 else r['x']
            x, r['state'] = predictor.step(net, s, start, grid, r.get('state'), r['extra_args'], r['rnd'].randn_like,
                                           afs=afs and s == 0)
            y = r['targets'][s]
            if s == num_steps - 2 and feature_loss is not None and feature_loss.alpha > 0:
                per_sample = feature_loss(x, y)
            else:
                per_sample = ((x - y) ** 2).flatten(1).sum(1)
            loss = per_sample.sum() / batch
            if trained:  # a carried (not detached) state backpropagates through the earlier steps too: BPTT
                loss.backward(retain_graph=not predictor.detach_state)
            step_loss += float(loss.detach())
            r['x'] = x.detach() if predictor.detach_state else x
        if trained:
            grads = [p.grad for p in predictor.parameters() if p.grad is not None]
            for g in grads:
                dist.all_reduce(g)
                torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5, out=g)
            optimizer.step()
        losses.append(float(dist.all_reduce(torch.tensor(step_loss, dtype=torch.float64))))
    return losses


def total_iterations(total_kimg, batch):
    return math.ceil(total_kimg * 1000 / batch)


def snapshot_path(run_dir, cur_iter, batch):
    """The predictor file of iteration cur_iter (named by its kimg, as EDM names snapshots)."""
    return os.path.join(run_dir, f'network-snapshot-{int(round(cur_iter * batch / 1000)):06d}.safetensors')


def memory_of(device):
    """Bytes of memory of a device (the machine's RAM for the CPU); None where unknown."""
    device = torch.device(device)
    if device.type == 'cpu':
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).total_memory
    return None


def check_batch_fits(batch, world, image_shape, num_steps, device):
    """ValueError (one line) for a batch whose states cannot fit the device. One iteration keeps, for each of its
    batch / world trajectories per process, the latent, the starting state and the teacher's num_steps - 1 target
    states at once (all accumulation rounds together: the student's steps run over every round), at least float32;
    activations and the student's graph come on top, so this is a lower bound that refuses only what cannot fit."""
    have = memory_of(device)
    need = (batch // world) * math.prod(image_shape) * 4 * (num_steps + 1)
    if have is not None and need > have:
        shape = 'x'.join(str(n) for n in image_shape)
        raise ValueError(f'--batch={batch}: one iteration holds at least {need / 2**30:.1f} GiB per process '
                         f'({batch // world} trajectories x {num_steps + 1} states of {shape} float32), more than the '
                         f'{have / 2**30:.1f} GiB of {device}; lower --batch (or spread it over more processes)')


def model_dtype(net):
    """float64 for a model computing in float64 (its parameters, or an exact denoiser without any), else float32."""
    params = list(net.parameters()) if isinstance(net, torch.nn.Module) else []
    if params:
        return torch.float64 if params[0].dtype == torch.float64 else torch.float32
    return torch.float64 if getattr(net, 'dtype', torch.float64) == torch.float64 else torch.float32

#----------------------------------------------------------------------------
# The training loop: its signature is the configuration schema, written to
# training_options.json by train.py. Resumable: the state (tables, Adam, LR
# schedule, iteration) is written atomically every tick; latents are a pure
# function of (seed, iteration, sample), so a resumed run repeats exactly
# what the uninterrupted run would have done.


def rounds_batch(batch, batch_gpu, world):
    """The per-process batch of one round (batch_gpu, default: the whole per-process batch); ValueError unless the
    processes split `batch` evenly and the rounds split each process's share."""
    if batch % world:
        raise ValueError(f'--batch={batch} is not divisible by the {world} processes')
    batch_gpu = batch_gpu or batch // world
    if (batch // world) % batch_gpu:
        raise ValueError(f'--batch-gpu={batch_gpu} does not divide the per-process batch {batch // world}')
    return batch_gpu


def training_loop(
    run_dir             = '.',          # Output directory.
    dataset_name        = None,         # Name of the model recorded in the predictor (default: `model` if a name).
    model               = 'digits',     # Zoo name, pickle or local model directory of the net (or the net).
    model_kwargs        = None,         # Extra arguments of models.load_model (guidance, ...).
    sampler_stu         = 'adasde',     # Learned solver: adasde, amed or epd (solvers.learned.PREDICTORS).
    predictor_kwargs    = None,         # Its predictor's hyperparameters (base, num_steps, ...).
    sampler_tea         = 'dpm',        # Teacher solver (solvers.distill.TEACHERS).
    M                   = 3,            # Teacher intervals inserted per student interval, minus one.
    substeps            = 2,            # Sub-steps per teacher interval of a dpm or heun teacher.
    afs                 = True,         # Analytical first step (saves one NFE).
    schedule_type       = 'time_uniform',
    schedule_rho        = 1.0,
    alpha               = 20.0,         # Weight of the feature loss on the last step (0: plain L2 there).
    feature_net         = None,         # Loss network of that loss (models.detectors.FEATURE_NETS name, or one).
    prompts             = None,         # Captions file of text-to-image models (one drawn per trajectory).
    lr                  = 0.2,          # Adam learning rate.
    coslr               = False,        # Cosine annealing to the official AdaSDE code's floor 0.01.
    batch               = 32,           # Total batch size per iteration.
    batch_gpu           = None,         # Per-process batch per round (gradient accumulation); None = all.
    total_kimg          = 10,           # Training length in thousands of trajectories.
    kimg_per_tick       = 1,            # Status line and state dump interval.
    seed                = 0,            # Seed of the predictor initialisation and of every latent.
    device              = None,         # torch device; default: this process's device.
    dtype               = None,         # Solver state; default: float64 for a float64 model, else float32.
    loss_steps          = 'all',        # 'all': a loss and Adam step per student step (official); 'last': final only.
    resume_state        = None,         # Path of a training-state.pt to continue from.
):
    if predictor_kwargs is None:
        predictor_kwargs = {}
    if model_kwargs is None:
        model_kwargs = {}
    if sampler_tea not in TEACHERS:
        raise ValueError(f'unknown teacher {sampler_tea!r}; choose from {", ".join(TEACHERS)}')
    device = torch.device(device) if device is not None else dist.device()
    rank, world = dist.get_rank(), dist.get_world_size()
    batch_gpu = rounds_batch(batch, batch_gpu, world)

    # Model, grids, teacher and loss.
    if isinstance(model, torch.nn.Module):
        net = model
    else:
        from models import load_model
        with dist.rank0_first():  # only rank 0 downloads
            net = load_model(model, device=device, **model_kwargs)
    net.requires_grad_(False).eval()
    if prompts is not None:
        from models.sd import load_prompts
        net.prompts = load_prompts(prompts)
    num_steps = predictor_kwargs['num_steps']
    check_batch_fits(batch, world, (net.img_channels, net.img_resolution, net.img_resolution), num_steps, device)
    student_sigmas, teacher_sigmas = student_and_teacher_sigmas(net, num_steps, M, schedule_type, schedule_rho)
    if alpha > 0 and feature_net is not None:
        from models.detectors import get_feature_net
        loss_net = get_feature_net(feature_net, device) if isinstance(feature_net, str) else feature_net
        feature_loss = FeatureLoss(net, loss_net, alpha)
    else:
        feature_loss = None
    if dtype is None:
        dtype = model_dtype(net)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    # Predictor, optimizer, LR schedule (stepped once per iteration, as the official AdaSDE code does).
    predictor = make_predictor(sampler_stu, **predictor_kwargs, seed=seed).to(device).train()
    teacher_opts = teacher_options(sampler_tea, substeps, max_order=getattr(predictor, 'max_order', None),
                                   predict_x0=getattr(predictor, 'predict_x0', None),
                                   lower_order_final=getattr(predictor, 'lower_order_final', None))
    # The sampling settings it is trained for, recorded in its file; sample.py refuses others.
    name = model if isinstance(model, str) else None
    predictor.settings = dict(
        dataset_name=dataset_name or name, model=name, schedule_type=schedule_type, schedule_rho=schedule_rho,
        afs=afs, guidance_type=model_kwargs.get('guidance_type'), guidance_rate=model_kwargs.get('guidance_rate'),
        resolution=model_kwargs.get('resolution'),
        M=M, sampler_tea=sampler_tea, nfe=solvers.nfe(sampler_stu, num_steps, afs=afs, predictor=predictor))
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    total_iters = total_iterations(total_kimg, batch)
    scheduler = None
    if coslr:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total_kimg * 1000 // batch) + 1,
                                                               eta_min=0.01)
    cur_iter = 0
    if resume_state is not None:
        state = torch.load(resume_state, map_location=device, weights_only=True)
        predictor.load_state_dict(state['predictor'])
        optimizer.load_state_dict(state['optimizer'])
        if scheduler is not None:
            scheduler.load_state_dict(state['scheduler'])
        cur_iter = int(state['cur_iter'])
        dist.print0(f'Resuming from {resume_state} at iteration {cur_iter}.')

    def save_state():
        if rank != 0:
            return
        state = dict(predictor=predictor.state_dict(), optimizer=optimizer.state_dict(), cur_iter=cur_iter,
                     scheduler=scheduler.state_dict() if scheduler is not None else {})
        atomic_write(os.path.join(run_dir, 'training-state.pt'), lambda tmp: torch.save(state, tmp))

    def save_snapshot():
        if rank == 0:
            predictor.save(snapshot_path(run_dir, cur_iter, batch))

    # Main loop.
    iters_per_tick = max(1, math.ceil(kimg_per_tick * 1000 / batch))
    start_time = time.time()
    # The bar goes to the terminal only: log.txt (dnnlib.util.Logger) gets the tick lines, not carriage returns.
    console = getattr(sys.stderr, 'stderr', sys.stderr)
    bar = tqdm.tqdm(total=total_iters, initial=cur_iter, disable=rank != 0, unit='it', dynamic_ncols=True,
                    file=console)
    while cur_iter < total_iters:
        losses = distill_iteration(net, predictor, optimizer, student_sigmas, teacher_sigmas, M, afs, cur_iter, seed,
                                   batch, batch_gpu, feature_loss, substeps, device, dtype, loss_steps,
                                   sampler_tea, teacher_opts)
        if scheduler is not None:
            scheduler.step()
        cur_iter += 1
        for s, loss in enumerate(losses):
            training_stats.report0(f'Loss/step{s}', loss)
        bar.set_postfix(loss=f'{sum(losses):.4g}', lr=f'{optimizer.param_groups[0]["lr"]:.3g}')
        bar.update(1)
        if cur_iter % iters_per_tick == 0 or cur_iter == total_iters:
            save_state()
            training_stats.default_collector.update()
            if rank == 0:
                fields = [f'iter {cur_iter}/{total_iters}', f'kimg {cur_iter * batch / 1000:.3f}',
                          f'time {time.time() - start_time:.1f}s', f'loss {sum(losses):.5g}',
                          f'lr {optimizer.param_groups[0]["lr"]:.4g}']
                with tqdm.tqdm.external_write_mode(file=console):  # clear the bar, print (terminal + log), redraw
                    print(' '.join(fields), flush=True)
                with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as f:
                    stats = training_stats.default_collector.as_dict()
                    f.write(json.dumps(dict(stats, iter=cur_iter, timestamp=time.time())) + '\n')
        if cur_iter < total_iters and dist.should_stop():  # preemption or Ctrl-C: keep the state, stop cleanly
            save_state()
            bar.close()
            dist.print0(f'Stopped at iteration {cur_iter}/{total_iters}; the state is in {run_dir}. Run the same '
                        'command with --resume to continue.')
            return predictor.requires_grad_(False).eval()
    bar.close()
    save_snapshot()
    save_state()
    dist.barrier()
    return predictor.requires_grad_(False).eval()

#----------------------------------------------------------------------------

"""Every solver of the registry, and the learned AdaSDE / AMED / EPD predictors, as k-diffusion-convention samplers.

    sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options) -> x

is what k-diffusion's `sample_*` functions take and what ComfyUI's KSAMPLER, Forge and AUTOMATIC1111 call: `model(x,
sigma, **extra_args)` is the denoiser D(x; sigma) of the EDM "VE" state (guidance applied by the caller), `sigmas`
the decreasing noise levels, usually ending with 0, `x` the initial state (noise * sigmas[0]). That is the
project's own solver convention, so the samplers only adapt the edges and re-implement nothing:

- trailing zeros of `sigmas` are dropped: the run ends at the last positive level, as sample.py's does (er_sde and
  edm take their own final step to 0, as in sample.py);
- noise: `noise_sampler(sigma, sigma_next)` (k-diffusion's convention) when given; else a generator seeded with
  `extra_args['seed']` (ComfyUI's convention: one generator for the batch); else torch's global generator.
  `per_image_noise(seeds, ...)` gives sample.py's per-image seeding (row i from seed i's generator);
- `callback` gets k-diffusion's dict (x, i, sigma, sigma_hat, denoised) after every step;
- options: the solver's own (solvers.check_options), `afs`, and `predictor` for a learned solver.

Real network calls are the solver's NFE (solvers.nfe): here the solver makes every call itself, so AFS saves its
call and EPD's K points share one batched call.
"""

import torch

import solvers
from models.discrete import DiscreteVPSchedule
from torch_utils.misc import StackedRandomGenerator


def positive_sigmas(sigmas):
    """The levels before the trailing zeros, as a float64 tensor (the solvers' time points)."""
    sigmas = torch.as_tensor(sigmas).detach().reshape(-1).double().cpu()
    points = sigmas[:int((sigmas > 0).sum())]
    if len(points) < 2 or bool((sigmas[len(points):] != 0).any()):
        raise ValueError(f'sigmas must be at least two positive decreasing noise levels, optionally followed by '
                         f'zeros; got {sigmas.tolist()}')
    return points


def _randn_like_for(noise_sampler, seed, step_sigmas):
    if noise_sampler is not None:
        return lambda x: noise_sampler(*step_sigmas())
    if seed is not None:
        generators = {}

        def seeded(x):
            if x.device not in generators:
                generators[x.device] = torch.Generator(device=x.device).manual_seed(int(seed))
            return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device,
                               generator=generators[x.device])
        return seeded
    return torch.randn_like


def make_sampler(name, **defaults):
    """The k-diffusion-convention sampler of registry solver `name`; `defaults` (its options, `afs`, `predictor`)
    can be overridden per call."""
    solvers.solver_info(name)  # an unknown name fails here, in one line

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options):
        options = {**defaults, **options}
        afs = bool(options.pop('afs', False))
        if name in solvers.learned.PREDICTORS and options.get('predictor') is None:
            raise ValueError(f'the {name} sampler needs a trained predictor (predictor=...)')
        options = solvers.check_options(name, options)
        extra_args = dict(extra_args or {})
        levels = torch.as_tensor(sigmas).detach().reshape(-1).double().cpu()
        points = positive_sigmas(levels)
        done = [0]  # steps finished: the running step goes from levels[done] to levels[done + 1]

        def step_sigmas():
            i = min(done[0], len(levels) - 2)
            return levels[i], levels[i + 1]

        def on_step(info):
            done[0] += 1
            if callback is not None:
                callback(dict(x=info['x'], i=info['i'], sigma=info['sigma'],
                              sigma_hat=info.get('sigma_hat', info['sigma']), denoised=info['denoised']))

        randn_like = _randn_like_for(noise_sampler, extra_args.get('seed'), step_sigmas)
        return solvers.get_solver(name)(model, x, points, extra_args=extra_args, callback=on_step,
                                        randn_like=randn_like, afs=afs, **options)
    sampler.__name__ = sampler.__qualname__ = f'sample_{name}'
    sampler.__doc__ = f'The {name} solver of this project in the k-diffusion sampler convention.'
    return sampler


TRAINING_FREE = sorted(set(solvers.SOLVERS) - set(solvers.learned.PREDICTORS))
SAMPLERS = {name: make_sampler(name) for name in TRAINING_FREE}  # default options; override per call


def predictor_sampler(path_or_predictor):
    """(sampler, predictor) of a learned solver's file (train.py's .safetensors, or an official snapshot)."""
    predictor = path_or_predictor
    if not isinstance(predictor, solvers.learned.LearnedPredictor):
        predictor = solvers.learned.load_predictor(str(path_or_predictor))
    return make_sampler(predictor.kind, predictor=predictor, afs=bool(predictor.settings.get('afs'))), predictor

#----------------------------------------------------------------------------
# Time points. A discrete VP model (SD) is known to these tools by its table of noise levels; the project's
# continuous time of that table (models/discrete.py) gives the schedules of sample.py, and a predictor's own.


class TableSchedule(DiscreteVPSchedule):
    """The continuous-time schedule of a DDPM table given by its noise levels sqrt((1 - acp) / acp)."""

    def __init__(self, table_sigmas, epsilon_t=1e-3):
        table_sigmas = torch.as_tensor(table_sigmas, dtype=torch.float64).cpu()
        self._init_schedule(1 / (1 + table_sigmas ** 2), epsilon_t)


def schedule_sigmas(schedule, num_steps, schedule_type, schedule_rho, final_zero=True):
    """sample.py's time points on `schedule` (a TableSchedule or a denoiser with sigma_min/max), with a final 0."""
    points = solvers.get_schedule(num_steps, schedule.sigma_min, schedule.sigma_max, schedule_type, schedule_rho,
                                  net=schedule)
    return torch.cat([points, points.new_zeros(1)]) if final_zero else points


def predictor_sigmas(predictor, schedule, final_zero=True):
    """The time points a predictor was trained for (its num_steps, schedule type and rho) on `schedule`."""
    s, recommended = predictor.settings, solvers.solver_info(predictor.kind).schedule
    return schedule_sigmas(schedule, predictor.num_steps, s.get('schedule_type') or recommended[0],
                           recommended[1] if s.get('schedule_rho') is None else s['schedule_rho'], final_zero)


def per_image_noise(seeds, shape, device='cpu', dtype=torch.float32):
    """(initial noise [len(seeds), *shape], noise_sampler): row i of both drawn from seed i's generator, the initial
    noise first, as sample.py draws them, so that an image depends on its seed only."""
    rnd = StackedRandomGenerator(torch.device(device), seeds)
    noise = rnd.randn([len(seeds), *shape], device=device).to(dtype)
    return noise, lambda sigma, sigma_next: rnd.randn([len(seeds), *shape], dtype=dtype, device=device)

__all__ = ['make_sampler', 'predictor_sampler', 'SAMPLERS', 'TRAINING_FREE', 'TableSchedule', 'schedule_sigmas',
           'predictor_sigmas', 'per_image_noise', 'positive_sigmas']

"""Every solver of the registry, and the learned AdaSDE / AMED / EPD predictors, as one diffusers scheduler.

    pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver='er_sde')
    pipe.scheduler = SolverScheduler.from_predictor('exp/00000-...', pipe.scheduler.config, unet=pipe.unet)

The scheduler adapts the project's solvers (solvers.get_solver) to diffusers' loop and re-implements none of
them. A diffusers pipeline calls the UNet once per entry of `timesteps` and hands the output to `step`; the solver
runs in a worker thread (integrations/handoff.py) whose denoiser calls are answered by those UNet outputs. So
`timesteps` lists the network time of every real network call of the solver, in order (as diffusers' own Heun and
KDPM2 schedulers repeat entries): the intermediate points of Heun, DPM-Solver-2, AdaSDE, AMED, EPD and EDM's
churned points included. `step` returns the point where the solver wants the next call (or its result after the
last one) as `prev_sample`.

The model is seen as this project sees Stable Diffusion (docs/sd.md, models/discrete.py): the state is the EDM
"VE" x = x0 + sigma n, the UNet sees x / sqrt(1 + sigma^2) at the continuous DDPM index M t(sigma) - 1 (DPM-Solver's
continuous time of the discrete table), and its output (eps or v, classifier-free guidance applied by the pipeline)
gives D = x - sigma eps. With the same seeds (one generator per image) the latents equal sample.py's.

Real UNet calls (each a batched call on 2B rows with guidance) = len(scheduler.timesteps) = `real_calls`: the
solver's NFE (solvers.nfe), plus one when the solver's first evaluation is not at the initial latents: with AFS
(the stock pipeline always evaluates its first timestep; the scheduler discards that output) and with EDM's churn
on the first step. EPD's K parallel points are K sequential calls here (same count, K times the latency of its one
batched call). `project_loop` runs a pipeline's components with the project's own loop instead: AFS saves its
call and EPD batches its points.
"""

import math

import click
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

import solvers
from models.discrete import DiscreteVPSchedule
from models.sd import SDDenoiser, denoised_from_output, input_scale
from torch_utils.cli import one_line

from .handoff import SolverThread, randn_like_for

STATE_DTYPE = torch.float32  # the solver's state, whatever the pipeline's dtype (diffusers' schedulers upcast too)

#----------------------------------------------------------------------------
# The model's schedule: diffusers' own alphas_cumprod for the config's betas, seen through models/discrete.py.


class _Schedule(DiscreteVPSchedule):
    def __init__(self, alphas_cumprod, epsilon_t):
        self._init_schedule(alphas_cumprod, epsilon_t)


def alphas_cumprod_for(config):
    """alphas_cumprod of a VP pipeline's scheduler config, computed by diffusers itself (DDPMScheduler)."""
    from diffusers import DDPMScheduler
    keys = ('num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule', 'trained_betas')
    return DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None}).alphas_cumprod


class _Recorder(torch.nn.Module):
    """D = 0 on a 1-pixel image, recording the noise level of every row of every call (the dry run)."""
    bottleneck = ''  # AMED reads this module's own output

    def __init__(self):
        super().__init__()
        self.sigmas = []

    def forward(self, x, sigma, **kwargs):
        self.sigmas += torch.as_tensor(sigma).reshape(-1).expand(x.shape[0]).tolist()
        return x * 0

#----------------------------------------------------------------------------


class SolverScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running the project's solver `solver` (or the learned predictor `predictor_path`).

    Config: the pipeline's own keys (num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
    prediction_type 'epsilon' or 'v_prediction'; timestep_spacing and steps_offset are kept but unused: the time
    points come from `schedule_type`), and the project's: `solver` (a registry name), `solver_options` (its options,
    a JSON dict), `afs`, `schedule_type` / `schedule_rho` (default: the solver's recommended schedule, as sample.py),
    `predictor_path` (a learned solver's file: solver, AFS and schedule then come from it), `epsilon_t`.

    `num_inference_steps` counts solver steps: the run visits num_inference_steps + 1 time points (sample.py's
    --num_steps). Real UNet calls: `real_calls` (see the module docstring).
    """
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                 trained_betas=None, prediction_type='epsilon', timestep_spacing='leading', steps_offset=0,
                 solver=None, solver_options=None, afs=False, schedule_type=None, schedule_rho=None,
                 predictor_path=None, epsilon_t=1e-3):
        if prediction_type not in ('epsilon', 'v_prediction'):
            raise ValueError(f"SolverScheduler takes prediction_type 'epsilon' or 'v_prediction', not "
                             f"{prediction_type!r}")
        self.predictor = None
        options = dict(solver_options or {})
        if predictor_path is not None:
            self.predictor = solvers.learned.load_predictor(predictor_path)
            if solver not in (None, self.predictor.kind):
                raise ValueError(f'{predictor_path} holds a {self.predictor.kind} predictor, not solver={solver}')
            trained = self.predictor.settings
            self.predictor.check_compatible(afs=afs or None, schedule_type=schedule_type, schedule_rho=schedule_rho)
            solver, afs = self.predictor.kind, bool(trained.get('afs', afs))
            schedule_type = trained.get('schedule_type') or schedule_type
            schedule_rho = trained.get('schedule_rho') if trained.get('schedule_rho') is not None else schedule_rho
            options['predictor'] = self.predictor
        solver = solver or 'dpmpp'
        if solver in solvers.learned.PREDICTORS and self.predictor is None:
            raise ValueError(f'the {solver} solver needs a trained predictor: use SolverScheduler.from_predictor')
        info = solvers.solver_info(solver)
        self.options = solvers.check_options(solver, options)
        schedule_type = schedule_type or info.schedule[0]
        schedule_rho = info.schedule[1] if schedule_rho is None else float(schedule_rho)
        self.register_to_config(solver=solver, afs=bool(afs), schedule_type=schedule_type, schedule_rho=schedule_rho)
        self.schedule = _Schedule(alphas_cumprod_for(self.config), epsilon_t)
        if not math.isfinite(self.schedule.sigma_max):
            raise ValueError('SolverScheduler needs a finite sigma_max: a zero-terminal-SNR schedule is not supported')
        self.solver_sigmas = None  # the time points of the run (float64)
        self.sigmas = None         # the noise level of each real network call, one per timestep
        self.timesteps = None
        self.num_inference_steps = None
        self.real_calls = None
        self._unet_hooks = []
        self._features = None
        self._bottleneck = torch.nn.Identity()
        self._reset()

    #------------------------------------------------------------------------
    # Learned solvers.

    @classmethod
    def from_predictor(cls, path, config, unet=None, model=None, guidance_scale=None, **kwargs):
        """The scheduler of a predictor trained by train.py: `path` is its file, run folder or experiment number.
        `unet` (pipe.unet) is needed by AMED (it reads the UNet's bottleneck and gives each image its own time).
        `model` (the pipeline's name or path) and `guidance_scale`, when given, must be those it was trained for."""
        import sample
        try:
            path = sample.resolve_predictor_path(str(path))
        except click.UsageError as e:
            raise ValueError(e.message.removeprefix(f'--predictor_path={path}: ')) from None
        scheduler = cls.from_config(config, predictor_path=path, **kwargs)
        settings = scheduler.predictor.settings
        trained = [m for m in (settings.get('model'), settings.get('dataset_name')) if m]
        if model is not None and trained and not any(sample._same_model(str(model), m) for m in trained):
            raise ValueError(f'this predictor was trained for model {trained[0]!r}, not {str(model)!r}')
        if settings.get('guidance_type') not in (None, 'cfg'):
            raise ValueError(f'this predictor was trained for {trained[0] if trained else "a model"!r} with '
                             f'{settings["guidance_type"]} guidance, not for a classifier-free guided pipeline')
        if model is None and settings.get('guidance_type') is None and trained:
            raise ValueError(f'this predictor was trained for model {trained[0]!r}, not for a diffusers pipeline')
        scheduler.predictor.check_compatible(guidance_rate=guidance_scale)
        if unet is not None:
            scheduler.attach(unet)
        return scheduler

    @property
    def guidance_scale(self):
        """The guidance scale a predictor was trained for (pass it to the pipeline), else None."""
        return None if self.predictor is None else self.predictor.settings.get('guidance_rate')

    def attach(self, unet):
        """Hook the UNet: record its bottleneck output (AMED's features) and give it each image's own network time
        when a solver's noise levels differ between images (AMED's midpoints)."""
        self.detach()
        module = unet.get_submodule(SDDenoiser.bottleneck.removeprefix('unet.'))
        self._unet_hooks = [module.register_forward_hook(self._record_features),
                            unet.register_forward_pre_hook(self._per_image_time, with_kwargs=True)]
        return self

    def detach(self):
        for handle in self._unet_hooks:
            handle.remove()
        self._unet_hooks = []

    def _record_features(self, module, inputs, output):
        self._features = (output[0] if isinstance(output, (tuple, list)) else output).detach()

    def _per_image_time(self, module, args, kwargs):
        sigma = self._pending_sigma()
        if sigma is None:
            return None
        rows = (args[0] if args else kwargs['sample']).shape[0]
        t = self._rows(self.schedule.network_time(sigma).float(), rows)
        if len(args) > 1:
            return (args[0], t, *args[2:]), kwargs
        return args, dict(kwargs, timestep=t)

    #------------------------------------------------------------------------
    # The run.

    def _reset(self):
        thread = getattr(self, '_thread', None)
        if thread is not None:
            thread.stop()
        self._thread = None
        self._finished = False
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index=0):
        self._begin_index = int(begin_index)

    @property
    def init_noise_sigma(self):
        return float(self.solver_sigmas[0]) if self.solver_sigmas is not None else self.schedule.sigma_max

    def __len__(self):
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
        """Time points: `num_inference_steps` + 1 of the configured schedule, or given `sigmas` (decreasing, a
        trailing 0 dropped) or `timesteps` (DDPM indices, e.g. 999 ... 0; sigma = the table's noise level there).
        A learned solver runs on the points it was trained for only."""
        self._reset()
        c = self.config
        if sigmas is not None and timesteps is not None:
            raise ValueError('give sigmas or timesteps, not both')
        custom = sigmas is not None or timesteps is not None
        if self.predictor is not None and custom:
            raise ValueError(f'a {self.predictor.title} predictor runs on the schedule it was trained for '
                             f'({c.schedule_type}, rho {c.schedule_rho:g}); custom sigmas or timesteps are refused')
        if sigmas is not None:
            points = torch.as_tensor(sigmas, dtype=torch.float64).cpu().reshape(-1)
            points = points[:int((points > 0).sum())]
        elif timesteps is not None:
            t = torch.as_tensor(timesteps, dtype=torch.float64).cpu().reshape(-1)
            points = self.schedule.sigma((t + 1) / self.schedule.M)
        else:
            num_steps = None if num_inference_steps is None else int(num_inference_steps) + 1
            if self.predictor is not None:
                if num_steps not in (None, self.predictor.num_steps):
                    raise ValueError(f'this predictor was trained for {self.predictor.num_steps} time points: run '
                                     f'the pipeline with num_inference_steps={self.predictor.num_steps - 1}')
                num_steps = self.predictor.num_steps
            if num_steps is None:
                raise ValueError('give num_inference_steps, sigmas or timesteps')
            points = solvers.get_schedule(num_steps, self.schedule.sigma_min, self.schedule.sigma_max,
                                          c.schedule_type, c.schedule_rho, net=self.schedule)
        if self.config.solver == 'amed' and not self._unet_hooks:
            raise ValueError('the AMED solver reads the UNet\'s bottleneck and gives each image its own midpoint '
                             'time: attach the UNet (from_predictor(..., unet=pipe.unet) or scheduler.attach(unet))')
        calls = self._dry_run(points)
        self.solver_sigmas = points
        self.num_inference_steps = len(points) - 1
        self._wasted_first = bool(c.afs) or calls[0] != float(points[0].to(STATE_DTYPE))
        if self._wasted_first:
            calls = [float(points[0].to(STATE_DTYPE))] + calls
        self.sigmas = torch.tensor(calls, dtype=STATE_DTYPE, device=device)
        self.timesteps = self.schedule.network_time(self.sigmas.cpu()).float().to(device)
        self.real_calls = len(calls)

    def _dry_run(self, points):
        """The noise level of every network call of the solver on these points (a 1-pixel zero denoiser)."""
        recorder = _Recorder()
        x = torch.ones([1, 1, 1, 1], dtype=STATE_DTYPE) * float(points[0])
        try:
            self._solve(recorder, x, points, torch.zeros_like)
        except ValueError as e:
            raise ValueError(f'{self.config.solver}: {one_line(e)}') from None
        if not recorder.sigmas:
            raise ValueError(f'{self.config.solver} makes no network call on these {len(points)} time points')
        return recorder.sigmas

    def _solve(self, net, x, points, randn_like):
        fn = solvers.get_solver(self.config.solver)
        return fn(net, x, points, randn_like=randn_like, afs=self.config.afs, **self.options)

    def _pending_sigma(self):
        """The noise level (one per image) of the call the pipeline makes next; None before the run starts."""
        if self._thread is None or self._thread.pending is None or self._thread.pending[0] != 'call':
            return None
        return self._thread.pending[2]

    @staticmethod
    def _rows(per_image, rows):
        """Per-image values for a call on `rows` rows: the batch, or [unconditional; conditional] copies of it."""
        return per_image.repeat(rows // per_image.shape[0]) if rows != per_image.shape[0] else per_image

    def scale_model_input(self, sample, timestep=None):
        """x / sqrt(1 + sigma^2) at the noise level of the coming call (each image's own with AMED)."""
        sigma = self._pending_sigma()
        if sigma is None:
            sigma = torch.full([sample.shape[0]], float(self.sigmas[0]), dtype=STATE_DTYPE, device=sample.device)
        return sample * input_scale(self._rows(sigma.to(sample.device), sample.shape[0]), sample)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """Hand the UNet's output at the pending point to the solver; return where it wants the next call (or its
        result after the last call) as prev_sample, in the pipeline's dtype. `generator`: the pipeline's
        generator(s), one per image for per-image noise."""
        if self.timesteps is None:
            raise ValueError('call set_timesteps before step')
        if self._begin_index:
            raise ValueError('SolverScheduler starts at the first time point: img2img (a begin index) is not '
                             'supported')
        if self._finished:
            raise ValueError(f'the solver has finished: step called more than {self.real_calls} times')
        if self._thread is None:
            request = self._start(model_output, sample, generator)
        else:
            request = self._answer(model_output, self._thread.pending)
        self._step_index = 1 if self._step_index is None else self._step_index + 1
        if request[0] == 'done':
            self._finished = True
            self._thread = None
        elif not self._unet_hooks and self._step_index < self.real_calls:
            expected = float(self.sigmas[self._step_index])
            if not bool((request[2] == expected).all()):
                raise RuntimeError(f'{self.config.solver}: the solver asked for noise level '
                                   f'{request[2].tolist()} where timesteps lists {expected}: attach(unet)')
        prev_sample = request[1].to(sample.dtype)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _start(self, model_output, sample, generator):
        x = sample.to(STATE_DTYPE)
        randn_like = randn_like_for(generator)
        self._thread = SolverThread(lambda net: self._solve(net, x, self.solver_sigmas, randn_like), x.shape[0],
                                    bottleneck=self._bottleneck if self._unet_hooks else None)
        request = self._thread.start()
        if self._wasted_first:
            return request
        if request[0] != 'call' or not torch.equal(request[1], x):
            raise RuntimeError(f'{self.config.solver}: the first network call is not at the initial latents')
        return self._answer(model_output, request)

    def _answer(self, model_output, request):
        _, x, sigma = request
        if model_output.shape[0] != x.shape[0]:
            raise ValueError(f'model_output has {model_output.shape[0]} rows for a batch of {x.shape[0]}')
        denoised = denoised_from_output(x, sigma, model_output.to(x.dtype), self.config.prediction_type)
        features = None
        if self._unet_hooks:
            if self._features is None:
                raise RuntimeError('the attached UNet did not run its bottleneck for this call')
            features, self._features = self._features[-x.shape[0]:], None  # the conditional half with guidance
        return self._thread.answer(denoised, features)

#----------------------------------------------------------------------------
# The project's own loop on a pipeline's components: every call of the solver as sample.py makes it (AFS saves
# its call, EPD's K points share one batched call), the settings of `pipe.scheduler` (a SolverScheduler).


@torch.no_grad()
def project_loop(pipe, prompt, seeds, guidance_scale=7.5, num_inference_steps=None, dtype=torch.float32):
    """Latents (the state at the last time point, as sample.py) of `prompt` (a text or one per seed) for `seeds`,
    made by sample.sample_batch on the pipeline's UNet, text encoder and tokenizer with the solver, options and
    schedule of pipe.scheduler. Decode them with pipe.vae.decode(latents / pipe.vae.config.scaling_factor)."""
    import sample
    scheduler = pipe.scheduler
    if not isinstance(scheduler, SolverScheduler):
        raise ValueError('project_loop runs the solver of a SolverScheduler: set pipe.scheduler to one first')
    if scheduler.predictor is not None:
        scheduler.predictor.check_compatible(guidance_rate=guidance_scale)
    scheduler.set_timesteps(num_inference_steps)
    seeds = [int(s) for s in seeds]
    prompts = [prompt] * len(seeds) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(seeds):
        raise ValueError(f'{len(prompts)} prompts for {len(seeds)} seeds')
    net = SDDenoiser(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, alphas_cumprod_for(scheduler.config),
                     guidance_rate=guidance_scale, epsilon_t=scheduler.config.epsilon_t,
                     prediction_type=scheduler.config.prediction_type)
    return sample.sample_batch(net, seeds, scheduler.config.solver, scheduler.solver_sigmas, scheduler.options,
                               afs=scheduler.config.afs, extra_args=net.prompt_args(prompts), dtype=dtype,
                               device=net.device)

__all__ = ['SolverScheduler', 'project_loop', 'alphas_cumprod_for']

#----------------------------------------------------------------------------

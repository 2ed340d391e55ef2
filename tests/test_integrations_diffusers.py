"""integrations/diffusers_scheduler.py on a tiny random Stable Diffusion pipeline built offline (tests/tiny_sd.py):
the scheduler's latents against sample.sample_batch (the project's own loop) for every solver of the registry and
for AdaSDE, EPD and AMED predictors trained by train.py on that pipeline, real UNet calls counted by a hook,
per-image determinism, diffusers' own schedulers of the same math as a cross-check, the config contract and the
one-line refusals."""

import os

import pytest
import torch

pytest.importorskip('diffusers')
pytest.importorskip('transformers')

import sample  # noqa: E402
import solvers  # noqa: E402
from integrations.diffusers_scheduler import SolverScheduler, alphas_cumprod_for, project_loop  # noqa: E402
from models.sd import SDDenoiser, load_sd  # noqa: E402

PROMPTS = ['a photo of a cat', 'two dogs on a red sofa', 'a bowl of fruit', 'a red car']
GUIDANCE = 7.5
TOL = 1e-5


@pytest.fixture(scope='module')
def pipe(sd_dir):
    """The tiny pipeline, with a hook counting its UNet's forward calls (pipe.unet_calls)."""
    from diffusers import StableDiffusionPipeline
    p = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    p.unet_calls = 0

    def count(module, args):
        p.unet_calls += 1
    p.unet.register_forward_pre_hook(count)
    p.original_config = dict(p.scheduler.config)
    return p


@pytest.fixture(scope='module')
def net(sd_dir):
    return load_sd(sd_dir, guidance_rate=GUIDANCE)


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def run_pipeline(pipe, scheduler, seeds, prompts, num_inference_steps, guidance=GUIDANCE):
    """(latents, real UNet calls) of the stock pipeline with `scheduler`, one generator per image."""
    pipe.scheduler = scheduler
    pipe.unet_calls = 0
    latents = pipe(prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance,
                   generator=generators(seeds), output_type='latent').images
    return latents, pipe.unet_calls


def reference(net, scheduler, seeds, prompts):
    """sample.py's latents for the same seeds, solver, options, AFS and time points (float32)."""
    return sample.sample_batch(net, seeds, scheduler.config.solver, scheduler.solver_sigmas, scheduler.options,
                               afs=scheduler.config.afs, extra_args=net.prompt_args(prompts), dtype=torch.float32)

def close_per_image(a, b):
    """Equal to 1e-5 relative to the largest latent value (see test_per_image_determinism)."""
    return (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item())

#----------------------------------------------------------------------------
# Every training-free solver of the registry. Real calls as docs/diffusers.md states them: the solver's NFE, plus
# one when its first evaluation is not at the initial latents (AFS; EDM's churn on the first step).

CASES = [
    ('euler', {}, False), ('euler', {}, True), ('heun', {}, False), ('dpm', {}, False), ('dpm', {'substeps': 2}, True),
    ('dpmpp', {}, False), ('dpmpp', {'max_order': 2}, True), ('unipc', {}, False), ('unipc', {'variant': 'bh1'}, True),
    ('ipndm', {}, False), ('ipndm_v', {}, True), ('deis', {}, False), ('edm', {}, False),
    ('edm', {'S_churn': 10}, False), ('edm', {'S_churn': 40, 'S_min': 0.05, 'S_max': 5}, False),
    ('er_sde', {}, False), ('er_sde', {'order': 2, 'noise_fn': 1}, True),
]


def documented_real_calls(name, num_steps, afs, **options):
    first_churn = name == 'edm' and options.get('S_churn', 0) > 0 and \
        options.get('S_min', 0) <= 14.6146 <= options.get('S_max', float('inf'))
    return solvers.nfe(name, num_steps, afs=afs, **options) + int(afs or first_churn)


def test_every_training_free_solver_is_covered():
    covered = {name for name, _, _ in CASES}
    assert covered == set(solvers.SOLVERS) - set(solvers.learned.PREDICTORS)


@pytest.mark.parametrize('name,options,afs', CASES)
def test_scheduler_equals_sample_py(pipe, net, name, options, afs):
    scheduler = SolverScheduler.from_config(pipe.original_config, solver=name, solver_options=options, afs=afs)
    seeds, prompts = [3, 7], PROMPTS[:2]
    latents, calls = run_pipeline(pipe, scheduler, seeds, prompts, num_inference_steps=4)
    assert len(scheduler.solver_sigmas) == 5
    assert calls == scheduler.real_calls == len(scheduler.timesteps) == documented_real_calls(name, 5, afs, **options)
    expected = reference(net, scheduler, seeds, prompts)
    assert (latents - expected).abs().max().item() <= TOL
    # The timesteps are the network times of the calls: M t(sigma) - 1 (models/discrete.py).
    assert torch.allclose(scheduler.timesteps.double(), net.network_time(scheduler.sigmas.double()), atol=1e-4)


@pytest.mark.parametrize('name,options', [('er_sde', {}), ('edm', {'S_churn': 10}), ('dpmpp', {})])
def test_per_image_determinism(pipe, name, options):
    """An image of a batch of 4 equals the same image (its seed, its prompt) made alone; the noise of the stochastic
    steps comes from each image's own generator. Equal to 1e-5 relative to the latents' size (up to ~30 with this
    random UNet at guidance 7.5): the CPU's matrix kernels differ with the batch size by a few float32 ulps, which
    the stock pipeline cannot avoid (sample.py feeds its network fixed-size chunks for that, FixedBatchDenoiser)."""
    scheduler = SolverScheduler.from_config(pipe.original_config, solver=name, solver_options=options)
    batch, _ = run_pipeline(pipe, scheduler, [10, 11, 12, 13], PROMPTS, num_inference_steps=4)
    alone, _ = run_pipeline(pipe, scheduler, [12], PROMPTS[2:3], num_inference_steps=4)
    assert close_per_image(batch[2:3], alone)
    other, _ = run_pipeline(pipe, scheduler, [14], PROMPTS[2:3], num_inference_steps=4)
    assert (other - alone).abs().max().item() > 1e-2


def test_v_prediction(pipe):
    """prediction_type='v_prediction': the same UNet output read as v, as models/sd.py reads it."""
    scheduler = SolverScheduler.from_config(pipe.original_config, solver='dpmpp', prediction_type='v_prediction')
    latents, _ = run_pipeline(pipe, scheduler, [1, 2], PROMPTS[:2], num_inference_steps=3)
    v_net = SDDenoiser(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, alphas_cumprod_for(pipe.original_config),
                       guidance_rate=GUIDANCE, prediction_type='v_prediction')
    assert (latents - reference(v_net, scheduler, [1, 2], PROMPTS[:2])).abs().max().item() <= TOL


def test_custom_sigmas_and_timesteps(pipe, net):
    scheduler = SolverScheduler.from_config(pipe.original_config, solver='heun')
    scheduler.set_timesteps(timesteps=[999, 749, 499, 249, 0])
    # DDPM index n sits at the table's own noise level, where the network time is n exactly.
    indices = torch.tensor([999, 749, 499, 249, 0], dtype=torch.float64)
    assert torch.allclose(scheduler.solver_sigmas, net.sigma((indices + 1) / 1000))
    assert scheduler.timesteps.tolist() == pytest.approx([999, 749, 749, 499, 499, 249, 249, 0], abs=1e-3)
    scheduler.set_timesteps(sigmas=[14.0, 3.0, 0.5, 0.0])  # a trailing 0 is dropped
    assert scheduler.solver_sigmas.tolist() == [14.0, 3.0, 0.5] and scheduler.init_noise_sigma == 14.0
    assert scheduler.sigmas.tolist() == pytest.approx([14.0, 3.0, 3.0, 0.5])

#----------------------------------------------------------------------------
# The config contract of diffusers.


def test_config_contract(pipe, net, tmp_path):
    scheduler = SolverScheduler.from_config(pipe.original_config, solver='er_sde', solver_options={'order': 2})
    c = scheduler.config
    assert (c.beta_schedule, c.beta_start, c.beta_end, c.num_train_timesteps) == ('scaled_linear', 0.00085, 0.012,
                                                                                  1000)
    assert (c.solver, c.schedule_type, c.schedule_rho, c.afs) == ('er_sde', 'polynomial', 7.0, False)
    assert scheduler.schedule.sigma_max == pytest.approx(net.sigma_max, rel=1e-12)
    assert scheduler.init_noise_sigma == pytest.approx(net.sigma_max)
    assert len(scheduler) == 1000 and scheduler.order == 1
    scheduler.save_pretrained(str(tmp_path))
    again = SolverScheduler.from_pretrained(str(tmp_path))
    assert again.config.solver == 'er_sde' and again.options == scheduler.options
    scheduler.set_begin_index(0)
    assert scheduler.begin_index == 0
    for bad, message in [(dict(solver='nope'), "unknown solver 'nope'"),
                         (dict(solver='adasde'), 'needs a trained predictor'),
                         (dict(solver='euler', solver_options={'r': 0.5}), "solver 'euler' has no option r"),
                         (dict(prediction_type='sample'), "prediction_type 'epsilon' or 'v_prediction'")]:
        with pytest.raises(ValueError, match=message):
            SolverScheduler.from_config(pipe.original_config, **bad)
    with pytest.raises(ValueError, match='dpm: r must be in'):
        SolverScheduler.from_config(pipe.original_config, solver='dpm', solver_options={'r': 2}).set_timesteps(3)
    with pytest.raises(ValueError, match='call set_timesteps before step'):
        SolverScheduler().step(torch.zeros(1, 4, 8, 8), 0, torch.zeros(1, 4, 8, 8))

#----------------------------------------------------------------------------
# Cross-check against diffusers' own schedulers of the same math, on the same sigmas. Both loops below are the
# pipeline's (scale_model_input, UNet with guidance, step) on the table's own noise levels (integer DDPM indices,
# where diffusers' log-sigma interpolation and the project's continuous time agree). diffusers' multistep
# schedulers (DPM-Solver++, UniPC, DEIS) keep the VP state x / sqrt(1 + sigma^2), Euler and Heun the VE state;
# diffusers' runs end with one more step (to sigma 0), so they are compared at the project's last point.
# They agree to 1e-5 relative to the latents' size (float32 rounding of the two state scalings and of diffusers'
# float32 noise-level table). DEIS: diffusers implements DEIS-rhoAB (eps interpolated in log rho), the project
# DEIS-tAB (in VP time): only their first order (DDIM) is the same math.


def _guided_eps(pipe, x, t, context):
    out = pipe.unet(torch.cat([x] * 2), t, encoder_hidden_states=context, return_dict=False)[0]
    u, c = out.chunk(2)
    return u + GUIDANCE * (c - u)


def _loop(pipe, scheduler, x, context, num_calls):
    for t in scheduler.timesteps[:num_calls]:
        eps = _guided_eps(pipe, scheduler.scale_model_input(x, t), t, context)
        x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize('theirs,ours,options,vp', [
    ('EulerDiscreteScheduler', 'euler', {}, False),
    ('HeunDiscreteScheduler', 'heun', {}, False),
    ('DPMSolverMultistepScheduler', 'dpmpp', {'max_order': 2, 'lower_order_final': False}, True),
    ('UniPCMultistepScheduler', 'unipc', {'max_order': 2, 'lower_order_final': False}, True),
    ('DEISMultistepScheduler', 'deis', {'max_order': 1}, True),
])
def test_cross_check_with_diffusers(pipe, theirs, ours, options, vp):
    import diffusers
    config = dict(pipe.original_config, solver_order=options.get('max_order', 2))
    reference_scheduler = getattr(diffusers, theirs).from_config(config)
    reference_scheduler.set_timesteps(5)
    grid = reference_scheduler.timesteps.unique_consecutive()  # Heun repeats its entries
    scheduler = SolverScheduler.from_config(pipe.original_config, solver=ours, solver_options=options)
    scheduler.set_timesteps(timesteps=grid)
    cond, uncond = pipe.encode_prompt(PROMPTS[:2], 'cpu', 1, True)
    context = torch.cat([uncond, cond])
    x = torch.randn([2, 4, 8, 8], generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    with torch.no_grad():
        x_ours = _loop(pipe, scheduler, x, context, scheduler.real_calls)
        s0, s_last = (float(v) for v in scheduler.solver_sigmas[[0, -1]])
        vp_scale = lambda s: (1 + s ** 2) ** 0.5  # noqa: E731
        x_theirs = _loop(pipe, reference_scheduler, x / vp_scale(s0) if vp else x, context, scheduler.real_calls)
    assert scheduler.real_calls == len(reference_scheduler.timesteps) - 1
    x_theirs = x_theirs * vp_scale(s_last) if vp else x_theirs
    assert close_per_image(x_ours, x_theirs)

#----------------------------------------------------------------------------
# Learned solvers: AdaSDE, EPD (K = 2) and AMED predictors trained by train.py on the tiny pipeline (the
# sd_predictors fixture of conftest.py), run by the stock pipeline through from_predictor.

@pytest.mark.parametrize('kind', ['adasde', 'epd', 'amed'])
def test_learned_scheduler_equals_sample_py(pipe, net, sd_predictors, kind, sd_dir):
    scheduler = SolverScheduler.from_predictor(sd_predictors[kind], pipe.original_config, unet=pipe.unet, model=sd_dir,
                                               guidance_scale=GUIDANCE)
    try:
        p = scheduler.predictor
        assert (p.kind, scheduler.config.solver, scheduler.guidance_scale) == (kind, kind, GUIDANCE)
        afs = scheduler.config.afs
        assert afs == (kind != 'amed') and scheduler.config.schedule_type == 'discrete'
        seeds, prompts = [5, 6, 7], PROMPTS[:3]
        latents, calls = run_pipeline(pipe, scheduler, seeds, prompts, num_inference_steps=p.num_steps - 1)
        nfe = solvers.nfe(kind, p.num_steps, afs=afs, predictor=p)
        assert calls == scheduler.real_calls == nfe + int(afs)
        expected = reference(net, scheduler, seeds, prompts)
        # EPD: the stock pipeline runs its K points as K calls on 3 rows, sample.py as one call on 3K rows; with
        # more than one thread the CPU kernels differ with the batch size (6.6e-5 on latents up to 32 measured with
        # 2 threads, 0 with 1), so EPD is compared as test_per_image_determinism compares batch sizes.
        assert (close_per_image(latents, expected) if kind == 'epd'
                else (latents - expected).abs().max().item() <= TOL)
        # Per-image determinism: the last image alone.
        alone, _ = run_pipeline(pipe, scheduler, seeds[2:], prompts[2:], num_inference_steps=p.num_steps - 1)
        assert close_per_image(latents[2:], alone)
        # The project's own loop on the pipeline's components: the same latents; AFS saves its call, EPD's K points
        # share one batched call (its "parallel NFE").
        pipe.unet_calls = 0
        own = project_loop(pipe, prompts, seeds, guidance_scale=GUIDANCE)
        assert (own - expected).abs().max().item() <= TOL
        assert pipe.unet_calls == p.parallel_nfe(p.num_steps) - int(afs)
    finally:
        scheduler.detach()


def test_learned_refusals(pipe, sd_predictors, sd_dir, tmp_path):
    config = pipe.original_config
    scheduler = SolverScheduler.from_predictor(sd_predictors['adasde'], config)
    with pytest.raises(ValueError, match='trained for 3 time points: run the pipeline with num_inference_steps=2'):
        scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match='custom sigmas or timesteps are refused'):
        scheduler.set_timesteps(sigmas=[14.0, 1.0, 0.1])
    with pytest.raises(ValueError, match='trained for guidance_rate=7.5, not 3.0'):
        SolverScheduler.from_predictor(sd_predictors['adasde'], config, guidance_scale=3.0)
    with pytest.raises(ValueError, match="trained for model '.*tiny-sd', not 'other/model'"):
        SolverScheduler.from_predictor(sd_predictors['adasde'], config, model='other/model')
    with pytest.raises(ValueError, match="trained for model 'digits', not for a diffusers pipeline"):
        SolverScheduler.from_predictor(os.path.join(os.path.dirname(sample.__file__), 'exp',
                                                    '00000-digits-3-3-adasde-dpm-3-uni1.0-afs'), config)
    with pytest.raises(ValueError, match='no such file'):
        SolverScheduler.from_predictor(str(tmp_path / 'missing'), config)
    amed = SolverScheduler.from_predictor(sd_predictors['amed'], config)  # no unet: AMED cannot see its bottleneck
    with pytest.raises(ValueError, match='AMED.*attach'):
        run_pipeline(pipe, amed, [0], PROMPTS[:1], num_inference_steps=2)
    from diffusers import PNDMScheduler
    pipe.scheduler = PNDMScheduler.from_config(config)
    with pytest.raises(ValueError, match='project_loop runs the solver of a SolverScheduler'):
        project_loop(pipe, 'a cat', [0])


def test_abandoned_run_is_unwound(pipe):
    """A run left half-way (the pipeline interrupted) ends its worker thread at the next set_timesteps; an error
    inside the solver reaches step's caller."""
    scheduler = SolverScheduler.from_config(pipe.original_config, solver='heun')
    scheduler.set_timesteps(3)
    x = torch.randn([2, 4, 8, 8], generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    x = scheduler.step(torch.zeros_like(x), scheduler.timesteps[0], x).prev_sample
    thread = scheduler._thread._thread
    assert thread.is_alive() and scheduler.step_index == 1
    scheduler.set_timesteps(3)
    thread.join(timeout=10)
    assert not thread.is_alive() and scheduler.step_index is None
    with pytest.raises(ValueError, match='model_output has 1 rows for a batch of 2'):
        scheduler.step(torch.zeros([1, 4, 8, 8]), scheduler.timesteps[0], x)

"""SDXL through diffusers (models/sd.py SDXLDenoiser) on a tiny random pipeline built offline: the conditioning
against the pipeline's own encode_prompt, our Euler against the pipeline's own loop, sample.py with every solver,
train.py for AdaSDE, EPD and AMED, one process against two."""

import dataclasses
import json
import os
import subprocess
import sys

import PIL.Image
import pytest
import torch

pytest.importorskip('diffusers')
pytest.importorskip('transformers')

from test_sd import PROMPTS  # noqa: E402
from tiny_sd import make_tokenizer, text_config  # noqa: E402 (the tiny byte-level CLIP tokenizer)

import solvers  # noqa: E402
from models.sd import SDXLDenoiser, cfg_nfe_factor, load_sdxl, pipeline_family  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = 'text\na photo of a cat\ntwo dogs on a red sofa\na bowl of fruit\na red car\n'

#----------------------------------------------------------------------------
# A tiny random StableDiffusionXLPipeline: SDXL's UNet structure (text_time added conditioning, linear attention
# projections), two CLIP text encoders of width 32 (the second with a 32-wide projection), so the cross-attention
# context is 64 wide and the added embedding 8 * 6 + 32 = 80; SDXL's VAE scaling factor 0.13025 and its scheduler
# (EulerDiscrete, leading spacing, SD's scaled_linear betas). Latents 4x8x8, images 16x16.


def make_sdxl_pipeline(root):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = make_tokenizer(str(root / 'tok')), make_tokenizer(str(root / 'tok2'))
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                                up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), cross_attention_dim=64,
                                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type='text_time',
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
                        scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(len(tokenizer))))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config(len(tokenizer_2)), projection_dim=32))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                                       steps_offset=1, timestep_spacing='leading')
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


@pytest.fixture(scope='module')
def sdxl_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('sdxl')
    make_sdxl_pipeline(root).save_pretrained(str(root / 'tiny-sdxl'))
    return str(root / 'tiny-sdxl')


@pytest.fixture(scope='module')
def net(sdxl_dir):
    return load_sdxl(sdxl_dir)


@pytest.fixture(scope='module')
def net64(sdxl_dir):
    return load_sdxl(sdxl_dir, dtype=torch.float64)


def pipeline_of(net, **scheduler_config):
    """The diffusers pipeline around the denoiser's own modules (so both run the same weights)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                                       steps_offset=1, **scheduler_config)
    pipe = StableDiffusionXLPipeline(vae=net.vae, text_encoder=net.text_encoder, text_encoder_2=net.text_encoder_2,
                                     tokenizer=net.tokenizer, tokenizer_2=net.tokenizer_2, unet=net.unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

#----------------------------------------------------------------------------
# Loading and attributes.


def test_attributes_and_dispatch(net, sdxl_dir, tmp_path, monkeypatch):
    import models
    from models import zoo
    assert isinstance(net, SDXLDenoiser) and net.family == 'SDXL'
    assert (net.img_channels, net.img_resolution, net.decoded_resolution, net.label_dim) == (4, 8, 16, 0)
    assert (net.guidance_type, net.guidance_rate, cfg_nfe_factor(net), net.M) == ('cfg', 5.0, 2, 1000)
    assert net.force_zeros_for_empty_prompt and net.vae.config.scaling_factor == 0.13025
    assert (net.original_size, net.crops_coords_top_left, net.target_size) == ((16, 16), (0, 0), (16, 16))
    assert net.bottleneck == 'unet.mid_block' and net.bottleneck_cond_half
    assert not any(p.requires_grad for p in net.parameters())
    # A local folder is SDXL by model_index.json's class name; load_model dispatches on it.
    assert pipeline_family(sdxl_dir) == 'sdxl' and pipeline_family(os.path.dirname(sdxl_dir)) is None
    assert isinstance(models.load_model(sdxl_dir), SDXLDenoiser)
    # The zoo row is what loads (the tiny pipeline standing in for the hub's): SD's DDPM schedule, so ms_coco's range.
    e = zoo.ZOO['sdxl']
    assert (e.kind, e.channels, e.resolution, e.label_kind, e.guidance_type, e.guidance_rate) == \
        ('sdxl', 4, 128, 'text', 'cfg', net.guidance_rate)
    assert (net.sigma_min, net.sigma_max) == (pytest.approx(e.sigma_min, rel=1e-5), pytest.approx(e.sigma_max,
                                                                                                  rel=1e-5))
    monkeypatch.setenv('ADASDE_SRC_DIR', str(tmp_path / 'src'))
    monkeypatch.setattr(models.sd, 'SDXL_DEFAULT', sdxl_dir)
    monkeypatch.setitem(zoo.ZOO, 'sdxl', dataclasses.replace(e, guidance_rate=3.0))
    loaded = models.load_model('sdxl')
    assert isinstance(loaded, SDXLDenoiser) and loaded.guidance_rate == 3.0


def test_zoo_row_offline(tmp_path):
    """Offline and uncached, the zoo name (the hub's diffusers pipeline) fails with one line."""
    script = ('from models import load_model, ModelError\ntry:\n    load_model("sdxl")\n'
              'except ModelError as err:\n    print("ERROR", err)\n')
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'),
               ADASDE_SRC_DIR=str(tmp_path / 'src'), DNNLIB_CACHE_DIR=str(tmp_path / 'cache'), OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith('ERROR')]
    assert len(lines) == 1 and 'cannot load SDXL from stabilityai/stable-diffusion-xl-base-1.0' in lines[0], \
        result.stdout


def test_single_file_dispatch(sdxl_dir, tmp_path, monkeypatch):
    """A single .safetensors checkpoint is SDXL when it holds the second text encoder (conditioner.embedders.1.*),
    and goes to StableDiffusionXLPipeline.from_single_file (here a stand-in that reads the tiny folder); SD 1.x
    files go to the SD loader."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    import models
    from models import sd
    calls = []

    def from_single_file(cls, path, **kwargs):
        calls.append(('from_single_file', path, kwargs))
        return cls.from_pretrained(sdxl_dir, **kwargs)
    monkeypatch.setattr(StableDiffusionXLPipeline, 'from_single_file', classmethod(from_single_file))
    monkeypatch.setattr(sd, 'load_sd', lambda path, **kw: calls.append(('load_sd', path)) or torch.nn.Identity())
    weights = {'model.diffusion_model.out.0.weight': torch.zeros(1)}
    save_file(weights, str(tmp_path / 'sd15.safetensors'))
    save_file({**weights, 'conditioner.embedders.1.model.text_projection': torch.zeros(1)},
              str(tmp_path / 'sdxl.safetensors'))
    assert models.sniff_model_file(str(tmp_path / 'sdxl.safetensors')) == 'sdxl-safetensors'
    assert pipeline_family(str(tmp_path / 'sdxl.safetensors')) == 'sdxl'
    assert pipeline_family(str(tmp_path / 'sd15.safetensors')) == 'sd'
    net = models.load_model(str(tmp_path / 'sdxl.safetensors'))
    assert isinstance(net, SDXLDenoiser) and net.guidance_rate == 5.0
    models.load_model(str(tmp_path / 'sd15.safetensors'))
    assert calls == [('from_single_file', str(tmp_path / 'sdxl.safetensors'), dict(add_watermarker=False)),
                     ('load_sd', str(tmp_path / 'sd15.safetensors'))]


def test_precision_and_vae_in_float32(sdxl_dir, net):
    """The UNet and both text encoders take the dtype; SDXL's VAE stays float32 (it overflows in float16)."""
    half = load_sdxl(sdxl_dir, dtype='bfloat16')
    assert half.dtype == torch.bfloat16 and half.text_encoder_2.dtype == torch.bfloat16
    assert next(half.vae.parameters()).dtype == torch.float32
    assert (half.sigma_min, half.sigma_max) == (net.sigma_min, net.sigma_max)
    args = half.prompt_args(PROMPTS)
    assert all(v.dtype == torch.bfloat16 for v in args.values())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 3
    with torch.no_grad():
        denoised = half(x, torch.tensor([3.0, 0.4]), **args)
        reference = net(x, torch.tensor([3.0, 0.4]), **net.prompt_args(PROMPTS))
    assert denoised.dtype == torch.float32
    assert 0 < float((denoised - reference).abs().max()) < 0.1 * float(reference.abs().max())
    images = half.decode(x)
    with torch.no_grad():
        raw = half.vae.decode(x / 0.13025).sample
    assert images.dtype == torch.float32 and torch.equal(images, raw.clamp(-1, 1))


def test_errors(net, tmp_path):
    from diffusers import UNet2DConditionModel
    x = torch.zeros(2, 4, 8, 8)
    args = net.prompt_args(PROMPTS)
    with pytest.raises(ValueError, match='SDXL takes text conditioning .condition=...., not class_labels'):
        net(x, 1.0, class_labels=torch.zeros(2), **args)
    with pytest.raises(ValueError, match='SDXL needs pooled=...: pass net.prompt_args'):
        net(x, 1.0, condition=args['condition'])
    with pytest.raises(ValueError, match='SDXL takes no conditioning size .it takes condition, pooled, '):
        net(x, 1.0, size=torch.zeros(2), **args)
    with pytest.raises(ValueError, match='batch size 2, expected 1 or 3'):
        net(torch.zeros(3, 4, 8, 8), 1.0, **args)
    sd_unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                   cross_attention_dim=64, norm_num_groups=8,
                                   down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                                   up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'))
    with pytest.raises(ValueError, match="not an SDXL UNet: its addition_embed_type is None, SDXL's is 'text_time'"):
        SDXLDenoiser(sd_unet, net.vae, net.text_encoder, net.text_encoder_2, net.tokenizer, net.tokenizer_2,
                     torch.linspace(0.999, 0.01, 1000))
    with pytest.raises(ValueError, match='no SDXL model at'):
        load_sdxl(str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match="SDXL uses classifier-free guidance .guidance_type 'cfg'., not 'cg'"):
        load_sdxl(str(tmp_path), guidance_type='cg')

#----------------------------------------------------------------------------
# The conditioning is the pipeline's: encode_prompt (both encoders' penultimate states concatenated, the second's
# pooled projection, zeros for the unconditional half under force_zeros_for_empty_prompt) and _get_add_time_ids.


def test_conditioning_matches_pipeline(net):
    pipe = pipeline_of(net)
    with torch.no_grad():
        c, uc, pooled, upooled = pipe.encode_prompt(PROMPTS, device='cpu', num_images_per_prompt=1,
                                                    do_classifier_free_guidance=True)
    args = net.prompt_args(PROMPTS)
    assert set(args) == {'condition', 'pooled', 'unconditional_condition', 'unconditional_pooled', 'time_ids'}
    assert args['condition'].shape == (2, 77, 64) and args['pooled'].shape == (2, 32)
    torch.testing.assert_close(args['condition'], c, rtol=0, atol=0)
    torch.testing.assert_close(args['pooled'], pooled, rtol=0, atol=0)
    assert float(uc.abs().max()) == float(upooled.abs().max()) == 0
    torch.testing.assert_close(args['unconditional_condition'], uc, rtol=0, atol=0)
    torch.testing.assert_close(args['unconditional_pooled'], upooled, rtol=0, atol=0)
    # Each half of the concatenation is its own encoder's penultimate layer.
    ids = net.tokenizer(PROMPTS, padding='max_length', max_length=77, truncation=True, return_tensors='pt').input_ids
    with torch.no_grad():
        first = net.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(args['condition'][..., :32], first, rtol=0, atol=0)
    # Size and crop conditioning: (original h, w, crop top, left, target h, w), settable.
    expected = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(args['time_ids'], expected.expand(2, 6), rtol=0, atol=0)
    try:
        net.original_size, net.crops_coords_top_left = (1024, 768), (64, 32)
        moved = net.prompt_args(PROMPTS[:1])['time_ids']
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 2
        with torch.no_grad():
            out_moved = net(x, 2.0, **net.prompt_args(PROMPTS[:1]))
    finally:
        net.original_size, net.crops_coords_top_left = (16, 16), (0, 0)
    assert moved.tolist() == [[1024, 768, 64, 32, 16, 16]]
    with torch.no_grad():
        out = net(x, 2.0, **net.prompt_args(PROMPTS[:1]))
        # time_ids left out take the attributes' values.
        args = net.prompt_args(PROMPTS[:1])
        del args['time_ids']
        torch.testing.assert_close(net(x, 2.0, **args), out, rtol=0, atol=0)
    assert float((out_moved - out).abs().max()) > 1e-4


@pytest.mark.parametrize('guidance_rate', [1.0, 5.0])
def test_denoiser_is_the_guided_unet(net, guidance_rate):
    """D = x - sigma eps, eps the UNet's (guided) output at the DDPM index of sigma on x / sqrt(1 + sigma^2), as one
    UNet call (on the doubled batch [uc; c] when guided)."""
    index = torch.tensor([0, 411, 999])
    acp = torch.exp(2 * net.log_alpha_array)
    sigma = torch.sqrt((1 - acp) / acp)[index]
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * sigma.float().reshape(-1, 1, 1, 1)
    prompts = PROMPTS + ['']
    c, pooled = net.encode_prompts(prompts)
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]]).expand(3, 6)
    x_vp = x / torch.sqrt(1 + sigma.float() ** 2).reshape(-1, 1, 1, 1)
    calls = []
    handle = net.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        net.guidance_rate = guidance_rate
        with torch.no_grad():
            unet = lambda c, p: net.unet(x_vp, index.float(), encoder_hidden_states=c,  # noqa: E731
                                         added_cond_kwargs=dict(text_embeds=p, time_ids=time_ids)).sample
            eps_c, eps_u = unet(c, pooled), unet(torch.zeros_like(c), torch.zeros_like(pooled))
            calls.clear()
            denoised = net(x, sigma.float(), **net.prompt_args(prompts))
    finally:
        handle.remove()
        net.guidance_rate = 5.0
    eps = eps_u + guidance_rate * (eps_c - eps_u)
    # Separate calls against one call on the doubled batch: float32 rounding, times sigma up to 14.6.
    torch.testing.assert_close(denoised, x - sigma.float().reshape(-1, 1, 1, 1) * eps, rtol=1e-4, atol=1e-4)
    assert calls == [3 if guidance_rate == 1 else 6]

#----------------------------------------------------------------------------
# The pipeline's own first steps: StableDiffusionXLPipeline with EulerDiscreteScheduler, CFG on, output_type
# 'latent', against our `euler` on the same noise levels.


EULER_CASES = {  # scheduler config, pipeline arguments, the DDPM timesteps diffusers then uses
    'leading': (dict(timestep_spacing='leading'), dict(num_inference_steps=4), [751, 501, 251, 1]),
    'trailing': (dict(timestep_spacing='trailing'), dict(num_inference_steps=4), [999, 749, 499, 249]),
    'karras': (dict(use_karras_sigmas=True), dict(num_inference_steps=4), [999, 687.1533, 145.9391, 0]),
    'sigmas': (dict(timestep_spacing='trailing'), dict(sigmas=[999, 700, 400, 100]), [999, 700, 400]),
}


@pytest.mark.parametrize('case', sorted(EULER_CASES))
def test_euler_matches_pipeline(net64, case):
    """The noise levels: diffusers' own choice with leading and trailing spacing (integer DDPM timesteps, the table's
    sigma_n = sqrt((1 - acp_n) / acp_n) there), Karras sigmas (off the table), and sigmas given to the pipeline (the
    table's at 999, 700, 400, 100; the pipeline then steps to the last one and not to 0).

    Time: on the table's knots our UNet time, the continuous index M t(sigma) - 1, is exactly n, as diffusers' is.
    Between knots the two mappings differ (diffusers interpolates the index linearly in log sigma, we interpolate
    log alpha linearly in t, DPM-Solver's): by at most 0.0015 in index above index 100, 0.011 between 10 and 100,
    0.086 below 10 (SD's table, measured on a dense grid). Karras' levels here fall at indices 999, 687.15, 145.94
    and on the last knot, so the differences there are below 0.0015 and the latents still agree to 1e-5; a
    schedule with levels between the lowest knots would not. For the knots we take the table
    in float64 (the scheduler's float32 copies would move our index off the integer by ~1e-5).

    The pipeline scales its initial noise by init_noise_sigma (sqrt(sigma_0^2 + 1) for leading spacing, else
    sigma_0): that scaled tensor is the state both start from. When its last step goes to sigma = 0 it returns
    D(x; sigma_last): we make that call ourselves. Every intermediate state is compared, to 1e-5, with float64
    weights on both sides: in float32 the UNet's own rounding (a batch of 4 rows there, of 2 + 2 here) times sigma
    leaves 1.2e-5 on latents of size 13 at the first step already; in float64 what is left is the scheduler's float32
    step arithmetic, at most 5e-6 here after four steps."""
    net = net64
    scheduler_config, call, expected_timesteps = EULER_CASES[case]
    acp = torch.exp(2 * net.log_alpha_array)
    table = torch.sqrt((1 - acp) / acp)
    if 'sigmas' in call:
        call = dict(sigmas=table[call['sigmas']].tolist())
    pipe = pipeline_of(net, **scheduler_config)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    states = []

    def record(pipe, i, t, kwargs):
        states.append(kwargs['latents'].clone())
        return kwargs
    with torch.no_grad():
        final = pipe(prompt=PROMPTS, height=16, width=16, guidance_scale=5.0, latents=noise, output_type='latent',
                     callback_on_step_end=record, **call).images
    timesteps = pipe.scheduler.timesteps.double()
    torch.testing.assert_close(timesteps, torch.tensor(expected_timesteps, dtype=torch.float64), rtol=0, atol=1e-3)
    if case == 'karras':
        sigmas = pipe.scheduler.sigmas[:-1].double()
    else:
        sigmas = table[timesteps.long()] if 'sigmas' not in call else torch.tensor(call['sigmas'], dtype=torch.float64)
        torch.testing.assert_close(net.network_time(sigmas[:len(timesteps)]), timesteps, rtol=0, atol=1e-3)
    to_zero = float(pipe.scheduler.sigmas[-1]) == 0
    torch.testing.assert_close(sigmas.float(), pipe.scheduler.sigmas[:-1] if to_zero else pipe.scheduler.sigmas,
                               rtol=1e-6, atol=0)
    x = noise * pipe.scheduler.init_noise_sigma
    ours = []
    with torch.no_grad():
        args = net.prompt_args(PROMPTS)
        x = solvers.get_solver('euler')(net, x, sigmas, extra_args=args, callback=lambda d: ours.append(d['x']))
        if to_zero:
            ours.append(net(x, float(sigmas[-1]), **args))
    assert len(states) == len(ours) == len(timesteps)
    for a, b in zip(ours, states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[-1], final, rtol=1e-5, atol=1e-5)
    assert float((final - noise).abs().max()) > 1  # the loop did move the latents

#----------------------------------------------------------------------------
# sample.py with every solver; train.py for AdaSDE, EPD and AMED, then sample.py with each predictor; torchrun.


def _sample(*args):
    from click.testing import CliRunner

    import sample
    result = CliRunner().invoke(sample.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _pngs(outdir):
    return {os.path.relpath(os.path.join(root, n), outdir): open(os.path.join(root, n), 'rb').read()
            for root, _, names in os.walk(outdir) for n in names if n.endswith('.png')}


TRAINING_FREE = sorted(name for name in solvers.SOLVERS if name not in ('adasde', 'amed', 'epd'))


@pytest.mark.parametrize('solver', TRAINING_FREE)
def test_sample_py_every_solver(sdxl_dir, tmp_path, solver):
    (tmp_path / 'captions.csv').write_text(CAPTIONS)
    result = _sample(f'--model_path={sdxl_dir}', f'--solver={solver}', '--num_steps=4', '--schedule_type=discrete',
                     '--schedule_rho=1', f'--prompt={tmp_path / "captions.csv"}', '--seeds=0-1', '--batch=2',
                     '--device=cpu', f'--outdir={tmp_path / "out"}')
    nfe = solvers.nfe(solver, 4)
    assert f'NFE:      {nfe} real network calls per image ({2 * nfe} model evaluations with guidance)' in result.output
    images = _pngs(tmp_path / 'out')
    assert sorted(images) == [os.path.join('000000', f'{s:06d}.png') for s in range(2)]
    assert len(set(images.values())) == 2
    with PIL.Image.open(tmp_path / 'out' / '000000' / '000000.png') as image:
        assert image.size == (16, 16) and image.mode == 'RGB'


class TinyDetector(torch.nn.Module):  # the Inception loss network is not available offline
    name, feature_dim = 'tiny', 8

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)[:, :8]


STUDENTS = {
    'adasde': ['--num_steps=3', '--M=1', '--gamma=0.001', '--lr=0.01'],
    'epd': ['--num_steps=3', '--num_points=2', '--M=1', '--lr=0.01'],
    'amed': ['--num_steps=3', '--M=1', '--lr=0.01'],
}


@pytest.mark.parametrize('student', sorted(STUDENTS))
def test_train_py_then_sample(sdxl_dir, tmp_path, monkeypatch, student):
    from click.testing import CliRunner

    import train
    from models import detectors
    from solvers.learned import load_predictor
    monkeypatch.setattr(detectors, 'get_detector', lambda name, device: TinyDetector())
    (tmp_path / 'captions.csv').write_text(CAPTIONS)
    result = CliRunner().invoke(train.main, [
        '--dataset_name=sdxl', f'--model_path={sdxl_dir}', f'--prompts={tmp_path / "captions.csv"}',
        f'--outdir={tmp_path / "exps"}', f'--sampler_stu={student}', *STUDENTS[student], '--schedule_type=discrete',
        '--schedule_rho=1', '--batch=2', '--total_kimg=0.004', '--device=cpu'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run_dir, = (tmp_path / 'exps').iterdir()
    assert run_dir.name.startswith('00000-sdxl-3-')
    snapshot, = run_dir.glob('network-snapshot-*.safetensors')
    p = load_predictor(str(snapshot))
    assert p.kind == student and p.settings['schedule_type'] == 'discrete' and p.settings['dataset_name'] == 'sdxl'
    with open(run_dir / 'training_options.json') as f:
        assert json.load(f)['feature_net'] == ('inception' if student != 'amed' else None)
    assert any(not torch.equal(a, b) for a, b in zip(p.state_dict().values(),
                                                      type(p)(**p.hyperparams(), seed=0).state_dict().values()))
    common = [f'--predictor_path={snapshot}', f'--prompt={tmp_path / "captions.csv"}', '--seeds=0-3', '--batch=2',
              '--device=cpu']
    _sample(*common, f'--outdir={tmp_path / "one"}')
    one = _pngs(tmp_path / 'one')
    assert sorted(one) == [os.path.join('000000', f'{s:06d}.png') for s in range(4)] and len(set(one.values())) == 4
    if student != 'adasde':
        return
    # One process and two (torchrun) write the same PNGs: AdaSDE with gamma > 0 draws its noise per seed.
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'sample.py'), *common, f'--outdir={tmp_path / "two"}']
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '2 process(es)' in proc.stdout and _pngs(tmp_path / 'two') == one

"""SD3 and FLUX (models/flow_pipes.py) on tiny random diffusers pipelines built offline: the text encoding, the time
input and shift, agreement with the pipelines' own FlowMatchEuler loop, and sample.py / train.py end to end."""

import io
import math
import os
import string
import subprocess
import sys

import PIL.Image
import pytest
import torch

pytest.importorskip('diffusers')
pytest.importorskip('transformers')

from tiny_sd import make_tokenizer, text_config  # noqa: E402

import sample  # noqa: E402
import solvers  # noqa: E402
from models.flow_pipes import FluxDenoiser, SD3Denoiser, load_flow_pipeline, pipeline_family, time_shift  # noqa: E402
from models.sd import cfg_nfe_factor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ['a photo of a cat', 'two dogs on a red sofa']

#----------------------------------------------------------------------------
# Tiny pipelines: the CLIP tokenizer of test_sd (bytes, no merges), a T5 tokenizer of single characters built in
# memory (a Unigram vocabulary), 2-block VAEs (factor 2) of 16x16 images, 8x8 latents.


def t5_tokenizer():
    from transformers import T5TokenizerFast
    pieces = ['<pad>', '</s>', '<unk>', '▁'] + list(string.ascii_letters + string.digits + string.punctuation)
    return T5TokenizerFast(vocab=[(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], extra_ids=0)


def t5_encoder(vocab_size, width):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8))


def tiny_vae(scaling_factor, shift_factor):
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         norm_num_groups=8, down_block_types=('DownEncoderBlock2D',) * 2,
                         up_block_types=('UpDecoderBlock2D',) * 2, sample_size=16, scaling_factor=scaling_factor,
                         shift_factor=shift_factor)


@pytest.fixture(scope='module')
def sd3_dir(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    root = tmp_path_factory.mktemp('sd3')
    tokenizer = make_tokenizer(str(root / 'tok'))
    torch.manual_seed(0)
    # CLIP widths 32 + 16 side by side, zero-padded to T5's 64 (SD3: 768 + 1280 -> 4096); projections 32 + 32.
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=8)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**text_config(len(tokenizer)), projection_dim=32))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**dict(text_config(len(tokenizer)), hidden_size=16,
                                                               intermediate_size=20), projection_dim=32))
    t5_tok = t5_tokenizer()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(1.5305, 0.0609), text_encoder=clip_l, tokenizer=tokenizer,
                                    text_encoder_2=clip_g, tokenizer_2=tokenizer,
                                    text_encoder_3=t5_encoder(len(t5_tok), 64), tokenizer_3=t5_tok)
    pipe.save_pretrained(str(root / 'tiny-sd3'))
    return str(root / 'tiny-sd3')


@pytest.fixture(scope='module')
def flux_dir(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel
    root = tmp_path_factory.mktemp('flux')
    tokenizer = make_tokenizer(str(root / 'tok'))
    torch.manual_seed(1)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    # FLUX.1-dev's scheduler: the shift from the token count.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    t5_tok = t5_tokenizer()
    pipe = FluxPipeline(scheduler=scheduler, vae=tiny_vae(0.3611, 0.1159), text_encoder=CLIPTextModel(
        CLIPTextConfig(**text_config(len(tokenizer)))), tokenizer=tokenizer,
        text_encoder_2=t5_encoder(len(t5_tok), 32), tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(str(root / 'tiny-flux'))
    return str(root / 'tiny-flux')


@pytest.fixture(scope='module')
def sd3(sd3_dir):
    return load_flow_pipeline(sd3_dir)


@pytest.fixture(scope='module')
def flux(flux_dir):
    return load_flow_pipeline(flux_dir)


def pipeline(path):
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe = getattr(diffusers, dict(sd3='StableDiffusion3Pipeline', flux='FluxPipeline')[pipeline_family(path)])
    pipe = pipe.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    # Unshifted: the sigmas given are the ones it steps on.
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0,
                                                                 use_dynamic_shifting=False)
    return pipe

#----------------------------------------------------------------------------
# Loading and attributes.


def test_attributes(sd3, flux, sd3_dir, flux_dir):
    assert (pipeline_family(sd3_dir), pipeline_family(flux_dir), pipeline_family(ROOT)) == ('sd3', 'flux', None)
    assert isinstance(sd3, SD3Denoiser) and isinstance(flux, FluxDenoiser)
    for net in (sd3, flux):
        assert (net.img_channels, net.img_resolution, net.decoded_resolution, net.label_dim) == (4, 8, 16, 0)
        assert not any(p.requires_grad for p in net.parameters()) and not net.training
    assert (sd3.guidance_type, sd3.guidance_rate, flux.guidance_type, flux.guidance_rate) == ('cfg', 7.0,
                                                                                              'distilled', 3.5)
    # SD3: the fixed shift 3. FLUX: 16 tokens (8x8 latents in 2x2 patches), mu on the line through (256, 0.5) and
    # (4096, 1.15), s = exp(mu).
    assert sd3.shift == 3.0
    assert flux.shift == pytest.approx(math.exp(0.5 + 0.65 * (16 - 256) / 3840), rel=1e-12)
    for net in (sd3, flux):
        assert net.sigma_min == pytest.approx(net.shift * 1e-3 / 0.999, rel=1e-12)
        assert net.sigma_max == pytest.approx(net.shift * 999, rel=1e-9)
        u = torch.tensor([0.001, 0.3, 0.999], dtype=torch.float64)
        torch.testing.assert_close(net.sigma_inv(net.sigma(u)), u, rtol=1e-12, atol=0)
    # The FLUX resolution sets the token count, hence the shift: 32x32 images, 16x16 latents, 64 tokens.
    big = load_flow_pipeline(flux_dir, resolution=32)
    assert (big.img_resolution, big.decoded_resolution) == (16, 32)
    assert big.shift == pytest.approx(math.exp(0.5 + 0.65 * (64 - 256) / 3840), rel=1e-12)


def test_time_shift_is_the_schedulers(sd3, flux, sd3_dir, flux_dir):
    """The discrete schedule with rho 1 (uniform in the unshifted time u) is what the pipelines' scheduler makes of
    the same u: diffusers' shift, static (SD3) or from calculate_shift (FLUX)."""
    import diffusers
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    for net, path in ((sd3, sd3_dir), (flux, flux_dir)):
        sigmas = solvers.get_schedule(7, net.sigma_min, net.sigma_max, 'discrete', 1, net=net)
        u = net.sigma_inv(sigmas)
        torch.testing.assert_close(u, torch.linspace(0.999, 0.001, 7, dtype=torch.float64), rtol=0, atol=1e-12)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder='scheduler')
        c = scheduler.config
        mu = calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        scheduler.set_timesteps(sigmas=u.tolist(), mu=mu)
        torch.testing.assert_close(scheduler.sigmas[:-1].double(), sigmas / (1 + sigmas), rtol=1e-6, atol=0)
        assert float(scheduler.sigmas[-1]) == 0
    assert time_shift(dict(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                           max_shift=1.15, time_shift_type='linear'), 4096) == pytest.approx(1.15)


def test_load_errors(tmp_path, sd3_dir):
    with pytest.raises(ValueError, match='not a StableDiffusion3Pipeline or FluxPipeline folder'):
        load_flow_pipeline(str(tmp_path))
    with pytest.raises(ValueError, match="Stable Diffusion 3 takes guidance_type 'cfg', not 'distilled'"):
        load_flow_pipeline(sd3_dir, guidance_type='distilled')
    with pytest.raises(ValueError, match='no FLUX pipeline folder at'):
        load_flow_pipeline(str(tmp_path / 'missing'), family='flux')
    with pytest.raises(ValueError, match='the image side must be a multiple of 4'):
        load_flow_pipeline(sd3_dir, resolution=18)
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'model_index.json').write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ValueError, match='cannot load FLUX from'):
        load_flow_pipeline(str(broken))

#----------------------------------------------------------------------------
# Text: the pipelines' own encode_prompt, each prompt on its own.


def test_text_encoding_is_the_pipelines(sd3, flux, sd3_dir, flux_dir):
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipeline(sd3_dir).encode_prompt(PROMPTS, None, None)
        sequence, ours_pooled = sd3.encode_prompts(PROMPTS)
        assert sequence.shape == (2, 77 + 256, 64) and ours_pooled.shape == (2, 64)
        torch.testing.assert_close(sequence, embeds, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_pooled, pooled, rtol=1e-5, atol=1e-6)
        args = sd3.prompt_args(PROMPTS)
        assert set(args) == {'condition', 'pooled', 'unconditional_condition', 'unconditional_pooled'}
        torch.testing.assert_close(args['unconditional_condition'], negative, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(args['unconditional_pooled'], negative_pooled, rtol=1e-5, atol=1e-6)
        embeds, pooled, _ = pipeline(flux_dir).encode_prompt(PROMPTS, None)
        sequence, ours_pooled = flux.encode_prompts(PROMPTS)
        assert sequence.shape == (2, 512, 32) and ours_pooled.shape == (2, 32)
        torch.testing.assert_close(sequence, embeds, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_pooled, pooled, rtol=1e-5, atol=1e-6)
        assert set(flux.prompt_args(PROMPTS)) == {'condition', 'pooled'}  # distilled guidance: no unconditional
        # Batch invariance: a prompt encodes alone as it does beside others.
        assert torch.equal(flux.encode_prompts(PROMPTS[1:])[0], sequence[1:])


def test_guidance_and_nfe(sd3, flux):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    assert cfg_nfe_factor(sd3) == 2 and cfg_nfe_factor(flux) == 1
    with torch.no_grad():
        d_sd3 = sd3(x, torch.tensor([2.0, 0.5]), **sd3.prompt_args(PROMPTS))
        d_flux = flux(x, torch.tensor([2.0, 0.5]), **flux.prompt_args(PROMPTS))
        for net, guided in ((sd3, d_sd3), (flux, d_flux)):
            net.guidance_rate = 1.0
            try:
                other = net(x, torch.tensor([2.0, 0.5]), **net.prompt_args(PROMPTS))
                if net is sd3:
                    assert cfg_nfe_factor(sd3) == 1 and set(sd3.prompt_args(PROMPTS)) == {'condition', 'pooled'}
            finally:
                net.guidance_rate = 7.0 if net is sd3 else 3.5
            assert other.dtype == torch.float64 and 0 < float((other - guided).abs().max())
    with pytest.raises(ValueError, match='FLUX takes text conditioning'):
        flux(x, 1.0, class_labels=torch.zeros(2, 10), **flux.prompt_args(PROMPTS))
    with pytest.raises(ValueError, match='Stable Diffusion 3 needs the text conditioning'):
        sd3(x, 1.0)


def test_decode(sd3, flux):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    for net, scale, shift in ((sd3, 1.5305, 0.0609), (flux, 0.3611, 0.1159)):
        images = net.decode(latents)
        assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
        with torch.no_grad():
            raw = net.vae.decode(latents / scale + shift).sample
        torch.testing.assert_close(images, raw.clamp(-1, 1))


def test_bottleneck_features(sd3, flux):
    """AMED reads the middle block's image tokens on their grid; with CFG the conditional half."""
    from solvers.amed import BottleneckCapture
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for net in (sd3, flux):
        with torch.no_grad(), BottleneckCapture(net) as capture:
            net(x, 3.0, **net.prompt_args(PROMPTS))
        (features,) = capture.maps
        assert features.shape == (2, 4, 4)  # 8x8 latents in 2x2 patches, averaged over the block's width
        assert capture.features(2, 8).shape == (2, 8, 8)
        assert capture.cond_half == (net is sd3)

#----------------------------------------------------------------------------
# The pipelines' own Euler loop (FlowMatchEulerDiscreteScheduler, output_type='latent') and the project's `euler`
# on the same times give the same states: the pipeline starts from latents t_0 n, the solver from x = sigma_0 n
# (the same state, x_t = x / (1 + sigma)), and after step i the pipeline's x_t is (1 - t) times the solver's x.


@pytest.mark.parametrize('family', ['sd3', 'flux'])
def test_euler_matches_the_pipeline(family, request):
    path = request.getfixturevalue(f'{family}_dir')
    net = request.getfixturevalue(family)
    sigmas = solvers.get_schedule(5, net.sigma_min, 40.0, 'discrete', 1, net=net)
    t = sigmas / (1 + sigmas)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    pipe = pipeline(path)
    states = []

    def record(pipe, i, timestep, tensors):
        states.append(tensors['latents'])
        return {}
    latents = noise * float(t[0])
    if family == 'flux':
        latents = pipe._pack_latents(latents, 1, 4, 8, 8)
    with torch.no_grad():
        pipe(prompt='a photo of a cat', latents=latents, sigmas=t.tolist(), output_type='latent', height=16, width=16,
             guidance_scale=net.guidance_rate, callback_on_step_end=record)
    if family == 'flux':
        states = [pipe._unpack_latents(s, 16, 16, 2) for s in states]
    ours = []
    x = noise.double() * sigmas[0]
    solvers.get_solver('euler')(net, x, sigmas, extra_args=net.prompt_args(['a photo of a cat']),
                                callback=lambda d: ours.append(d['x']))
    assert len(ours) == 4 and len(states) == 5  # the pipeline's last step goes on to t = 0
    for i, state in enumerate(ours):
        expected = states[i].double()
        assert float(expected.abs().max()) > 0.1
        torch.testing.assert_close(state * (1 - t[i + 1]), expected, rtol=0, atol=1e-5)

#----------------------------------------------------------------------------
# Every training-free solver of the registry samples both (library), finite and deterministic.


@pytest.mark.parametrize('family', ['sd3', 'flux'])
def test_every_solver_samples(family, request):
    net = request.getfixturevalue(family)
    names = sorted(n for n in solvers.SOLVERS if n not in solvers.learned.PREDICTORS)
    assert {'euler', 'heun', 'dpm', 'dpmpp', 'unipc', 'ipndm', 'deis', 'er_sde', 'edm'} <= set(names)
    condition = lambda seeds: net.prompt_args([PROMPTS[s % 2] for s in seeds])  # noqa: E731
    for name in names:
        (seeds, images), = sample.generate_images(net, [0, 1], name, num_steps=4, condition_fn=condition,
                                                 dtype=torch.float64, net_batch=2)
        assert images.shape == (2, 3, 16, 16) and bool(torch.isfinite(images).all()), name
        assert float(images.std()) > 0, name

#----------------------------------------------------------------------------
# sample.py end to end: one process and two (torchrun, gloo) write the same PNGs.


def _sample(*args):
    from click.testing import CliRunner
    result = CliRunner().invoke(sample.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _pngs(outdir):
    return {os.path.relpath(os.path.join(root, n), outdir): open(os.path.join(root, n), 'rb').read()
            for root, _, names in os.walk(outdir) for n in names if n.endswith('.png')}


@pytest.mark.parametrize('family', ['sd3', 'flux'])
def test_sample_py_one_and_two_processes(family, request, tmp_path):
    path = request.getfixturevalue(f'{family}_dir')
    captions = tmp_path / 'captions.csv'
    captions.write_text('text\na photo of a cat\ntwo dogs on a red sofa\na bowl of fruit\n')
    common = [f'--model_path={path}', '--solver=dpmpp', '--num_steps=4', '--schedule_type=discrete',
              '--schedule_rho=1', f'--prompt={captions}', '--seeds=0-2', '--batch=2', '--device=cpu']
    result = _sample(*common, f'--outdir={tmp_path / "one"}')
    guided = ' (6 model evaluations with guidance)' if family == 'sd3' else '\n'
    assert 'NFE:      3 real network calls per image' + guided in result.output
    one = _pngs(tmp_path / 'one')
    assert sorted(one) == [os.path.join('000000', f'{s:06d}.png') for s in range(3)] and len(set(one.values())) == 3
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'sample.py'), *common, f'--outdir={tmp_path / "two"}']
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '2 process(es)' in proc.stdout and _pngs(tmp_path / 'two') == one

def test_sample_py_resolution(flux_dir, tmp_path):
    """--resolution sets the image size of SD3 and FLUX (and so FLUX's time shift); other models refuse it."""
    from click.testing import CliRunner
    result = _sample(f'--model_path={flux_dir}', '--resolution=32', '--prompt=a cat', '--solver=euler', '--num_steps=3',
                     '--seeds=0', f'--outdir={tmp_path / "a"}')
    shift = math.exp(0.5 + 0.65 * (64 - 256) / 3840)
    assert f'(4x16x16, 0 classes, sigma {shift * 1e-3 / 0.999:g}-{shift * 999:g})' in result.output
    with PIL.Image.open(tmp_path / 'a' / '000000' / '000000.png') as image:
        assert image.size == (32, 32)
    result = CliRunner().invoke(sample.main, ['--dataset_name=digits', '--resolution=32', f'--outdir={tmp_path / "b"}'])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        'Error: resolution: only SD3 and FLUX pipelines take an image size, not digits']

#----------------------------------------------------------------------------
# train.py: AdaSDE, EPD and AMED distilled on each pipeline (captions drawn per trajectory), then sampled.


@pytest.mark.parametrize('family', ['sd3', 'flux'])
def test_train_py_then_sample(family, request, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import train
    from models import detectors
    from solvers.learned import load_predictor

    class TinyDetector(torch.nn.Module):  # the Inception download is not available offline
        name, feature_dim = 'tiny', 8

        def forward(self, images):
            return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)[:, :8]
    monkeypatch.setattr(detectors, 'get_detector', lambda name, device: TinyDetector())
    path = request.getfixturevalue(f'{family}_dir')
    captions = tmp_path / 'captions.csv'
    captions.write_text('text\na photo of a cat\ntwo dogs on a red sofa\na bowl of fruit\na red car\n')
    # AdaSDE at 32x32 images (16x16 latents): the predictor records the size and sample.py takes it from there.
    runs = dict(adasde=['--gamma=0.001', '--lr=0.01', '--M=1', '--resolution=32'], epd=['--num_points=2', '--M=1'],
                amed=['--M=1', '--schedule_type=polynomial', '--schedule_rho=7'])
    for student, flags in runs.items():
        result = CliRunner().invoke(train.main, [
            f'--dataset_name={family}', f'--model_path={path}', f'--prompts={captions}', f'--outdir={tmp_path}/exps',
            f'--sampler_stu={student}', '--num_steps=3', '--batch=2', '--total_kimg=0.002', '--device=cpu',
            *(['--schedule_type=discrete', '--schedule_rho=1'] if student != 'amed' else []), *flags])
        assert result.exit_code == 0, result.output + repr(result.exception)
        run_dir, = (tmp_path / 'exps').glob(f'*-{family}-3-*-{student}-*')
        snapshot, = run_dir.glob('network-snapshot-*.safetensors')
        predictor = load_predictor(snapshot)
        assert predictor.kind == student and predictor.settings['dataset_name'] == family
        size = 32 if student == 'adasde' else 16
        assert predictor.settings['resolution'] == (32 if student == 'adasde' else None)
        _sample(f'--predictor_path={snapshot}', f'--model_path={path}', '--prompt=a cat', '--seeds=0-1',
                '--device=cpu', f'--outdir={tmp_path}/samples-{student}')
        pngs = _pngs(tmp_path / f'samples-{student}')
        assert len(pngs) == 2
        with PIL.Image.open(io.BytesIO(next(iter(pngs.values())))) as image:
            assert image.size == (size, size)

#----------------------------------------------------------------------------
# The zoo rows are what loads (the tiny folders standing in for the hub's).


@pytest.mark.parametrize('family', ['sd3', 'flux'])
def test_zoo_row(family, request, tmp_path, monkeypatch):
    import shutil

    import models
    from models import zoo
    path = request.getfixturevalue(f'{family}_dir')
    entry = zoo.ZOO[family]
    assert (entry.kind, entry.label_kind, entry.channels, entry.resolution) == (family, 'text', 16, 128)
    # The published range: shift 3 (SD3), exp(1.15) at 4096 tokens (FLUX at 1024x1024).
    shift = 3.0 if family == 'sd3' else math.exp(1.15)
    assert (entry.sigma_min, entry.sigma_max) == (pytest.approx(shift * 1e-3 / 0.999, rel=1e-5),
                                                  pytest.approx(shift * 999, rel=1e-5))
    monkeypatch.setenv('ADASDE_SRC_DIR', str(tmp_path / 'src'))
    shutil.copytree(path, tmp_path / 'src' / family)
    net = models.load_model(family)
    assert (net.guidance_type, net.guidance_rate) == (entry.guidance_type, entry.guidance_rate)
    assert models.load_model(family, guidance_rate=2.0).guidance_rate == 2.0
    with pytest.raises(ValueError, match='takes guidance_type'):
        models.load_model(family, guidance_type='cg')
    # By folder, through load_model's detection of model_index.json.
    assert type(models.load_model(path)) is type(net)


def test_zoo_rows_offline(tmp_path):
    """Without the folder under src/ and without network, one line that says where the folder goes."""
    script = '''
from models import load_model, ModelError
for family in ('sd3', 'flux'):
    try:
        load_model(family)
    except ModelError as err:
        print('ERROR', err)
'''
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'),
               ADASDE_SRC_DIR=str(tmp_path / 'src'), OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith('ERROR')]
    assert len(lines) == 2, result.stdout
    for line, family, name in zip(lines, ('sd3', 'flux'), ('Stable Diffusion 3', 'FLUX')):
        assert line.startswith(f'ERROR cannot load {name} from ') and line.endswith(
            f'(without network: put its diffusers folder at {tmp_path / "src" / family})'), line

#----------------------------------------------------------------------------
# Reduced precision (bfloat16, the default on CUDA): every module cast, the flow mapping and D in x's dtype.


def test_bfloat16(sd3, flux, sd3_dir, flux_dir):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 3
    sigma = torch.tensor([3.0, 0.4])
    for net, path in ((sd3, sd3_dir), (flux, flux_dir)):
        half = load_flow_pipeline(path, dtype='bfloat16')
        assert half.dtype == torch.bfloat16 and half.text_encoder_2.dtype == torch.bfloat16
        assert (half.sigma_min, half.sigma_max) == (net.sigma_min, net.sigma_max)
        with torch.no_grad():
            denoised = half(x, sigma, **half.prompt_args(PROMPTS))
            reference = net(x, sigma, **net.prompt_args(PROMPTS))
        assert denoised.dtype == torch.float32 and half.decode(x).dtype == torch.float32
        assert 0 < float((denoised - reference).abs().max()) < 0.1 * float(reference.abs().max())

#----------------------------------------------------------------------------
# Gradients to x and sigma (AdaSDE's learned time scaling backpropagates through sigma -> t -> the time input), on a
# float64 copy; diffusers computes the sinusoidal time embedding in float32, hence the looser bound on sigma (without
# the path through the time input the sigma gradient is 3 to 5 times smaller on these pipelines).


@pytest.mark.parametrize('family', ['sd3', 'flux'])
def test_gradients(family, request):
    net = load_flow_pipeline(request.getfixturevalue(f'{family}_dir'), dtype='float64')
    args = net.prompt_args(PROMPTS[:1])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    f = lambda x, sigma: (net(x, sigma, **args) * v).sum()  # noqa: E731
    sigma = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    grad_x, grad_sigma = torch.autograd.grad(f(x.requires_grad_(), sigma), [x, sigma])
    with torch.no_grad():
        # h = 1e-3: the central difference's truncation error is about 4e-8 of the value there, while below 1e-4
        # the rounding of the pipelines' float32 parts takes over (tiny FLUX on an AVX-512 host: 2e-6 at h = 1e-5,
        # 5e-5 at 1e-7, which failed this test on such a machine)
        fd_x = (f(x + 1e-3 * v, sigma) - f(x - 1e-3 * v, sigma)) / 2e-3
        fd_sigma = (f(x, sigma + 1e-4) - f(x, sigma - 1e-4)) / 2e-4
    assert float((grad_x * v).sum()) == pytest.approx(float(fd_x), rel=1e-6)
    assert float(grad_sigma) == pytest.approx(float(fd_sigma), rel=1e-2)

#----------------------------------------------------------------------------

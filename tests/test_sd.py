"""Stable Diffusion adapter (models/sd.py) and CLIP score on tiny random diffusers models built offline."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip('diffusers')
pytest.importorskip('transformers')

from tiny_sd import make_tokenizer, text_config  # noqa: E402  (tests/tiny_sd.py; sd_dir: conftest.py)

import solvers  # noqa: E402
from models.sd import cfg_nfe_factor, is_sd_path, load_prompts, load_sd, prompts_for_seeds  # noqa: E402

PROMPTS = ['a photo of a cat', 'two dogs on a red sofa']

@pytest.fixture(scope='module')
def net(sd_dir):
    return load_sd(sd_dir, guidance_rate=7.5)


@pytest.fixture(scope='module')
def scheduler_config(sd_dir):
    with open(os.path.join(sd_dir, 'scheduler', 'scheduler_config.json')) as f:
        return json.load(f)


def table_sigmas(net):
    """The DDPM table's own noise levels sqrt((1 - acp) / acp), float64."""
    acp = torch.exp(2 * net.log_alpha_array)
    return torch.sqrt((1 - acp) / acp)

#----------------------------------------------------------------------------
# Loading and attributes.


def test_attributes(net, sd_dir):
    assert is_sd_path(sd_dir) and not is_sd_path(os.path.dirname(sd_dir))
    assert (net.img_channels, net.img_resolution, net.decoded_resolution, net.label_dim) == (4, 8, 16, 0)
    assert net.guidance_type == 'cfg' and net.guidance_rate == 7.5 and net.M == 1000
    assert net.dtype == torch.float32 and net.prediction_type == 'epsilon'
    # SD v1's schedule range (the official AdaSDE code's CFGPrecond; docs/references.md): sigma(1e-3) and sigma(1).
    assert net.sigma_min == pytest.approx(0.029168, abs=2e-6)
    assert net.sigma_max == pytest.approx(14.6146, abs=2e-4)
    assert not any(p.requires_grad for p in net.parameters())


def test_zoo_row_is_what_loads(net, sd_dir, tmp_path, monkeypatch):
    import dataclasses

    import models
    from models import zoo
    e = zoo.ZOO['ms_coco']
    assert (net.img_channels, net.label_dim, net.guidance_type) == (e.channels, e.label_dim, e.guidance_type) \
        and e.guidance_type == 'cfg'
    assert (net.sigma_min, net.sigma_max) == (pytest.approx(e.sigma_min, rel=1e-5), pytest.approx(e.sigma_max,
                                                                                                  rel=1e-5))
    assert load_sd(sd_dir).guidance_rate == e.guidance_rate
    # The zoo name loads with the row's guidance (the tiny pipeline standing in for the hub's).
    monkeypatch.setenv('ADASDE_SRC_DIR', str(tmp_path / 'src'))
    monkeypatch.setattr(models.sd, 'SD_DEFAULT', sd_dir)
    monkeypatch.setitem(zoo.ZOO, 'ms_coco', dataclasses.replace(e, guidance_rate=3.0))
    loaded = models.load_model('ms_coco')
    assert (loaded.guidance_type, loaded.guidance_rate) == ('cfg', 3.0) and cfg_nfe_factor(loaded) == 2
    # One spelling of guidance types: the zoo's.
    with pytest.raises(ValueError, match="guidance .guidance_type 'cfg'., not 'classifier-free'"):
        load_sd(sd_dir, guidance_type='classifier-free')


def test_load_errors(tmp_path, sd_dir):
    with pytest.raises(ValueError, match='no Stable Diffusion model at'):
        load_sd(str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match='no Stable Diffusion model at'):
        load_sd(str(tmp_path / 'missing.ckpt'))
    (tmp_path / 'notes.txt').write_text('x')
    with pytest.raises(ValueError, match='expected a diffusers directory'):
        load_sd(str(tmp_path / 'notes.txt'))
    with pytest.raises(ValueError, match='cannot load Stable Diffusion'):
        load_sd(str(tmp_path))
    with pytest.raises(ValueError, match='cannot load Stable Diffusion from no-such/model'):
        load_sd('no-such/model', local_files_only=True)
    with pytest.raises(ValueError, match="classifier-free guidance .guidance_type 'cfg'., not 'cg'"):
        load_sd(sd_dir, guidance_type='cg')


def test_call_errors(net):
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match='needs condition'):
        net(x, 1.0)
    c = net.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match='not class_labels'):
        net(x, 1.0, condition=c, class_labels=torch.zeros(2))
    with pytest.raises(ValueError, match='batch size 2, expected 1 or 3'):
        net(torch.zeros(3, 4, 8, 8), 1.0, condition=c)

#----------------------------------------------------------------------------
# (a) D(x; sigma) = x - sigma * eps, eps the guided UNet output at the DDPM
# index of sigma and input x / sqrt(1 + sigma^2); one UNet call per evaluation.


def _count_unet_calls(net):
    calls = []
    handle = net.unet.register_forward_hook(lambda module, args, kwargs_out: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize('guidance_rate', [1.0, 7.5])
def test_denoiser_matches_hand_computation(net, guidance_rate):
    # Batch 8 == latent width: a [B]-shaped c_in would broadcast silently along the width (the bug of the official
    # AdaSDE CFGPrecond).
    batch = 8
    index = torch.tensor([0, 13, 140, 333, 500, 720, 901, 999])
    sigma = table_sigmas(net)[index]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=gen) * sigma.float().reshape(-1, 1, 1, 1)
    prompts = [PROMPTS[i % 2] for i in range(batch)]
    c, uc = net.encode_prompts(prompts), net.encode_prompts([''] * batch)
    with torch.no_grad():
        x_vp = torch.stack([x[i] / float(np.sqrt(1 + float(sigma[i]) ** 2)) for i in range(batch)])
        eps_c = net.unet(x_vp, index.float(), encoder_hidden_states=c).sample
        eps_u = net.unet(x_vp, index.float(), encoder_hidden_states=uc).sample
        eps = eps_u + guidance_rate * (eps_c - eps_u)
        expected = torch.stack([x[i] - float(sigma[i]) * eps[i] for i in range(batch)])
        net.guidance_rate = guidance_rate
        calls, handle = _count_unet_calls(net)
        try:
            denoised = net(x, sigma.float(), condition=c, unconditional_condition=uc)
            denoised_default_uc = net(x, sigma.float(), condition=c)
        finally:
            handle.remove()
            net.guidance_rate = 7.5
    assert denoised.shape == x.shape and denoised.dtype == x.dtype
    torch.testing.assert_close(denoised, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(denoised_default_uc, denoised, rtol=0, atol=0)  # uc defaults to the empty prompt
    assert calls == ([batch] * 2 if guidance_rate == 1 else [2 * batch] * 2)


def test_epd_points_in_one_call(net):
    """EPD's K points in one call of K * B rows (one sigma per row, the text conditions repeated) give the
    K separate calls' result; with guidance each call runs the UNet once on the doubled batch."""
    from solvers.epd import EPDPredictor, predictor_step
    p = EPDPredictor(3, num_points=2, scale_dir=0.05, scale_time=0.2, seed=0)
    sigmas = solvers.get_schedule(3, net.sigma_min, net.sigma_max, 'discrete', 1, net=net).tolist()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * sigmas[1]
    args = net.prompt_args(PROMPTS)
    out = {}
    with torch.no_grad():
        for batched in (True, False):
            calls, handle = _count_unet_calls(net)
            try:
                out[batched] = predictor_step(net, p, 1, x, sigmas, None, args, batched=batched)[0]
            finally:
                handle.remove()
            assert calls == ([4, 8] if batched else [4, 4, 4])
        # Each point uses its own sample's prompt: swapping the prompts changes both samples.
        swapped = predictor_step(net, p, 1, x, sigmas, None, net.prompt_args(PROMPTS[::-1]))[0]
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-4)
    assert (swapped - out[True]).flatten(1).abs().amax(1).min() > 1e-3


def test_v_prediction(net):
    # SD 2.x-style v-prediction: x0 = alpha x_vp - sqrt(1 - alpha^2) v in VP terms.
    sigma = torch.tensor([0.5, 3.0])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 2
    c = net.encode_prompts(PROMPTS)
    try:
        net.guidance_rate, net.prediction_type = 1.0, 'v_prediction'
        with torch.no_grad():
            denoised = net(x, sigma, condition=c)
            alpha = 1 / torch.sqrt(1 + sigma ** 2).reshape(-1, 1, 1, 1)
            t = 1000 * net.sigma_inv(sigma.double()) - 1
            v = net.unet(x * alpha, t.float(), encoder_hidden_states=c).sample
    finally:
        net.guidance_rate, net.prediction_type = 7.5, 'epsilon'
    expected = alpha * (x * alpha) - torch.sqrt(1 - alpha ** 2) * v
    torch.testing.assert_close(denoised, expected, rtol=1e-5, atol=1e-5)

#----------------------------------------------------------------------------
# (b) sigma(t) at the DDPM knots t_n = (n + 1) / 1000 is the scheduler's sigma_n;
# sigma_inv inverts sigma, also outside the table (linear extrapolation).


def test_sigma_matches_scheduler(net, scheduler_config):
    from diffusers import EulerDiscreteScheduler
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    acp = scheduler.alphas_cumprod.double()
    n = torch.arange(1000, dtype=torch.float64)
    sigma = net.sigma((n + 1) / 1000)
    assert sigma.dtype == torch.float64
    torch.testing.assert_close(sigma, ((1 - acp) / acp) ** 0.5, rtol=1e-12, atol=0)
    # EulerDiscreteScheduler keeps its (ascending-index) table in float32.
    torch.testing.assert_close(sigma.flip(0).float(), scheduler.sigmas[:-1], rtol=2e-6, atol=0)
    torch.testing.assert_close(1000 * net.sigma_inv(sigma) - 1, n, rtol=0, atol=1e-9)
    t = torch.linspace(2e-4, 1.2, 997, dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t, rtol=0, atol=1e-10)
    # Between knots log(alpha) is linear in t.
    log_alpha = lambda t: -0.5 * torch.log1p(net.sigma(t) ** 2)  # noqa: E731
    mid = log_alpha(torch.tensor(0.1005, dtype=torch.float64))
    ends = log_alpha(torch.tensor([0.100, 0.101], dtype=torch.float64))
    assert float(mid) == pytest.approx(float(ends.mean()), rel=1e-12)
    # float32 in, float32 out; Python floats are float64.
    assert net.sigma(torch.tensor([0.5])).dtype == torch.float32 and net.sigma(0.5).dtype == torch.float64

#----------------------------------------------------------------------------
# (c) Our Euler solver on the adapter reproduces diffusers' Euler loop.


def _diffusers_euler(net, scheduler, latents, c, uc, num_steps):
    """The StableDiffusionPipeline loop around EulerDiscreteScheduler, with classifier-free guidance; also
    returns the state at the last non-zero sigma, before the final step to sigma = 0."""
    scheduler.set_timesteps(num_steps)
    x, before_last = latents.clone(), None
    for i, t in enumerate(scheduler.timesteps):
        if i == len(scheduler.timesteps) - 1:
            before_last = x.clone()
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        eps_u, eps_c = net.unet(x_in, t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
        x = scheduler.step(eps_u + net.guidance_rate * (eps_c - eps_u), t, x).prev_sample
    return before_last, x


@pytest.mark.parametrize('spacing', ['trailing', 'leading'])
def test_euler_matches_diffusers(net, scheduler_config, spacing):
    from diffusers import EulerDiscreteScheduler
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config, timestep_spacing=spacing)
    num_steps = 6
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas[:-1].double()  # drop the final 0: our schedules end at sigma_min > 0
    assert scheduler.sigmas[-1] == 0 and len(sigmas) == num_steps
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=gen) * float(sigmas[0])
    args = net.prompt_args(PROMPTS)
    with torch.no_grad():
        before_last, final = _diffusers_euler(net, scheduler, latents, args['condition'],
                                              args['unconditional_condition'], num_steps)
        ours = solvers.get_solver('euler')(net, latents, sigmas, extra_args=args)
        # diffusers' last step goes to sigma = 0, i.e. it returns D(x; sigma_last): do the same on our side.
        ours_final = net(ours, float(sigmas[-1]), **args)
    torch.testing.assert_close(ours, before_last, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_final, final, rtol=1e-4, atol=1e-4)
    assert float((final - latents).abs().max()) > 1  # the loop did move the latents

#----------------------------------------------------------------------------
# (d) The discrete schedule with rho = 1 is uniform in DDPM index.


def test_discrete_schedule_uniform_in_ddpm_index(net):
    sigmas = solvers.get_schedule(10, net.sigma_min, net.sigma_max, 'discrete', 1, net=net)
    index = 1000 * net.sigma_inv(sigmas) - 1
    torch.testing.assert_close(index, torch.arange(999, -1, -111, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(sigmas, table_sigmas(net)[torch.arange(999, -1, -111)], rtol=1e-12, atol=0)

#----------------------------------------------------------------------------
# AdaSDE distillation backpropagates through the denoiser to x and sigma
# (float64 networks here, so central differences are accurate).


def test_gradients_through_x_and_sigma(sd_dir):
    net = load_sd(sd_dir, dtype=torch.float64)
    args = net.prompt_args(PROMPTS)
    gen = torch.Generator().manual_seed(7)
    x, w, v = (torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=gen) for _ in range(3))
    f = lambda x, sigma: (net(x, sigma, **args) * w).sum()  # noqa: E731
    x, sigma = (2 * x).requires_grad_(), torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    grad_x, grad_sigma = torch.autograd.grad(f(x, sigma), [x, sigma])
    with torch.no_grad():
        fd_x = (f(x + 1e-5 * v, sigma) - f(x - 1e-5 * v, sigma)) / 2e-5
        fd_sigma = (f(x, sigma + 1e-3) - f(x, sigma - 1e-3)) / 2e-3
    assert float((grad_x * v).sum()) == pytest.approx(float(fd_x), rel=1e-6)
    # The UNet's time embedding is float32, hence the looser bound; without the path through the DDPM index
    # (sigma -> t) the gradient would be off by an order of magnitude.
    assert float(grad_sigma) == pytest.approx(float(fd_sigma), rel=1e-2)

#----------------------------------------------------------------------------
# Conditioning, decoding, NFE.


def test_encode_decode(net):
    c = net.encode_prompts(PROMPTS)
    assert c.shape == (2, 77, 32)
    torch.testing.assert_close(net.encode_prompts(PROMPTS[1]), c[1:])
    args = net.prompt_args(PROMPTS)
    assert set(args) == {'condition', 'unconditional_condition'}
    torch.testing.assert_close(args['unconditional_condition'], net.encode_prompts(['', '']))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    images = net.decode(latents)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    with torch.no_grad():
        raw = net.vae.decode(latents / 0.18215).sample
    torch.testing.assert_close(images, raw.clamp(-1, 1))


def test_nfe_factor(net):
    assert cfg_nfe_factor(net) == 2
    net.guidance_rate = 1.0
    try:
        assert cfg_nfe_factor(net) == 1 and set(net.prompt_args(PROMPTS)) == {'condition'}
    finally:
        net.guidance_rate = 7.5
    assert cfg_nfe_factor(torch.nn.Identity()) == 1
    assert solvers.nfe('euler', 6) * cfg_nfe_factor(net) == 10

#----------------------------------------------------------------------------
# Distillation: prompts drawn per sample from its own generator; the decoder
# passes gradients (the final-step feature loss backpropagates through it).


def test_training_conditioning(net):
    from torch_utils.misc import StackedRandomGenerator
    from training.training_loop import training_conditioning
    captions = [f'caption number {i}' for i in range(50)]
    with pytest.raises(ValueError, match='set it to models.sd.load_prompts'):
        training_conditioning(net, StackedRandomGenerator('cpu', [0]), 1, 'cpu')
    net.prompts = captions
    try:
        both = training_conditioning(net, StackedRandomGenerator('cpu', [11, 12]), 2, 'cpu')
        alone = training_conditioning(net, StackedRandomGenerator('cpu', [12]), 1, 'cpu')
    finally:
        net.prompts = None
    index = int(torch.randint(50, size=[], generator=torch.Generator().manual_seed(12)))
    torch.testing.assert_close(alone['condition'], net.encode_prompts([captions[index]]))
    torch.testing.assert_close(both['condition'][1:], alone['condition'])
    assert set(both) == {'condition', 'unconditional_condition'}


def test_decode_is_differentiable(net):
    latents = (0.3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))).requires_grad_()
    (grad,) = torch.autograd.grad(net.decode(latents).sum(), [latents])
    assert grad.shape == latents.shape and float(grad.abs().sum()) > 0

#----------------------------------------------------------------------------
# Prompts: caption index = seed.


def test_prompts(tmp_path):
    path = tmp_path / 'captions.csv'
    path.write_text('image_id,id,text\n9,1,"A cat, sitting."\n25,2,a dog\n30,3,"two ""quoted"" birds"\n')
    prompts = load_prompts(str(path))
    assert prompts == ['A cat, sitting.', 'a dog', 'two "quoted" birds']
    assert prompts_for_seeds(prompts, [2, 0]) == ['two "quoted" birds', 'A cat, sitting.']
    with pytest.raises(ValueError, match='seed 3 has no prompt: 3 prompts cover seeds 0-2'):
        prompts_for_seeds(prompts, [1, 3])
    (tmp_path / 'bad.csv').write_text('caption\nx\n')
    with pytest.raises(ValueError, match='expected a CSV with a "text" column'):
        load_prompts(str(tmp_path / 'bad.csv'))
    with pytest.raises(ValueError, match='prompt file not found'):
        load_prompts(str(tmp_path / 'none.csv'))
    with pytest.raises(ValueError, match=f'prompt file {tmp_path} is a folder'):
        load_prompts(str(tmp_path))
    (tmp_path / 'binary.csv').write_bytes(b'\xff\xfetext\n')
    with pytest.raises(ValueError, match=r'binary\.csv: not a UTF-8 text file \(invalid start byte at byte 0\)'):
        load_prompts(str(tmp_path / 'binary.csv'))

#----------------------------------------------------------------------------
# (e) CLIP score on a tiny random CLIPModel: the formula, determinism, the CLI.


@pytest.fixture(scope='module')
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    root = tmp_path_factory.mktemp('clip')
    tokenizer = make_tokenizer(str(root / 'tok'))
    torch.manual_seed(1)
    vision = dict(hidden_size=32, image_size=16, patch_size=4, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37)
    model = CLIPModel(CLIPConfig(text_config=text_config(len(tokenizer)), vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={'shortest_edge': 16},
                                                                 crop_size={'height': 16, 'width': 16}),
                              tokenizer=tokenizer)
    model.save_pretrained(str(root / 'clip'))
    processor.save_pretrained(str(root / 'clip'))
    return str(root / 'clip')


def _images(n):
    """Noise images, then black and white ones, of a size the processor must resize and crop."""
    rng = np.random.RandomState(5)
    images = [PIL.Image.fromarray(rng.randint(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(max(n - 2, 1))]
    return (images + [PIL.Image.new('RGB', (24, 20), color) for color in ('black', 'white')])[:n]


def test_clip_score(clip_dir):
    from clip_score import clip_score, clip_scores, load_clip
    model, processor = load_clip(clip_dir)
    images, prompts = _images(4), ['a cat', 'a dog on a mat', 'x' * 300, '']
    scores = clip_scores(model, processor, images, prompts, batch_size=3)
    # By hand: cosine of the projected CLIP embeddings, times 100, clamped at 0.
    inputs = processor(text=prompts, images=images, return_tensors='pt', padding=True, truncation=True, max_length=77)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=inputs['pixel_values']).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=inputs['input_ids'],
                                                     attention_mask=inputs['attention_mask']).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img.double(), txt.double()).numpy()
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), rtol=1e-5, atol=1e-5)
    # Flipping the image projection flips every cosine: the clamp keeps the positive side only.
    with torch.no_grad():
        model.visual_projection.weight.neg_()
        flipped = clip_scores(model, processor, images, prompts)
        model.visual_projection.weight.neg_()
    np.testing.assert_allclose(scores + flipped, 100 * np.abs(cos), rtol=1e-5, atol=1e-5)
    assert (scores * flipped == 0).all() and (scores + flipped > 0).all()
    # Deterministic, batch-size independent.
    again = clip_score(model, processor, images, prompts, batch_size=1)
    assert again == pytest.approx(float(scores.mean()), rel=1e-5)
    assert clip_score(model, processor, images, prompts, batch_size=1) == again
    with pytest.raises(ValueError, match='4 images but 3 prompts'):
        clip_scores(model, processor, images, prompts[:3])


def test_clip_score_cli(clip_dir, tmp_path):
    from click.testing import CliRunner

    from clip_score import clip_score, load_clip, main
    outdir = tmp_path / 'out' / '000000'
    outdir.mkdir(parents=True)
    images = _images(3)
    for seed, image in zip([0, 2, 1], images):
        image.save(outdir / f'{seed:06d}.png')
    (tmp_path / 'captions.csv').write_text('text\na cat\na dog\na bird\n')
    result = CliRunner().invoke(main, [f'--images={tmp_path / "out"}', f'--prompts={tmp_path / "captions.csv"}',
                                       f'--clip={clip_dir}', '--device=cpu'])
    assert result.exit_code == 0, result.output
    model, processor = load_clip(clip_dir)
    expected = clip_score(model, processor, [images[0], images[2], images[1]], ['a cat', 'a dog', 'a bird'])
    assert f'CLIP score: {expected:.4f}' in result.output and '3 images' in result.output
    # Bad input: one clear line.
    result = CliRunner().invoke(main, [f'--images={tmp_path / "none"}', '--prompt=x', f'--clip={clip_dir}'])
    assert result.exit_code == 1 and 'image folder not found' in result.output
    result = CliRunner().invoke(main, [f'--images={tmp_path / "out"}', f'--clip={clip_dir}'])
    assert result.exit_code == 2 and 'exactly one of --prompts and --prompt' in result.output
    (outdir / '000007.png').write_bytes((outdir / '000000.png').read_bytes())
    result = CliRunner().invoke(main, [f'--images={tmp_path / "out"}', f'--prompts={tmp_path / "captions.csv"}',
                                       f'--clip={clip_dir}'])
    assert result.exit_code == 1 and 'seed 7 has no prompt' in result.output

#----------------------------------------------------------------------------
# Reduced precision: the UNet, VAE and text encoder are cast; the float64 schedule is not.


def test_reduced_precision(sd_dir, net):
    half = load_sd(sd_dir, dtype='bfloat16', guidance_rate=7.5, guidance_type='cfg')
    assert half.dtype == torch.bfloat16 and half.encode_prompts(PROMPTS).dtype == torch.bfloat16
    assert (half.sigma_min, half.sigma_max) == (net.sigma_min, net.sigma_max)
    half.half()  # casting the module again keeps the float64 tables exact
    assert half.log_alpha_array.dtype == torch.float64 and half.sigma(1.0) == net.sigma(1.0)
    half.to(torch.bfloat16)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 3
    sigma = torch.tensor([3.0, 0.4])
    with torch.no_grad():
        denoised = half(x, sigma, **half.prompt_args(PROMPTS))
        reference = net(x, sigma, **net.prompt_args(PROMPTS))
    assert denoised.dtype == torch.float32
    assert 0 < float((denoised - reference).abs().max()) < 0.1 * float(reference.abs().max())
    assert half.decode(x).dtype == torch.float32

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# End to end: sample.py on the tiny pipeline folder, with text prompts and guidance.


def _sample(*args):
    from click.testing import CliRunner

    import sample
    result = CliRunner().invoke(sample.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _png_files(outdir):
    return sorted(os.path.relpath(os.path.join(root, name), outdir) for root, _, names in os.walk(outdir)
                  for name in names if name.endswith('.png'))


def test_sample_py_end_to_end(sd_dir, tmp_path):
    common = [f'--model_path={sd_dir}', '--solver=dpmpp', '--num_steps=4', '--device=cpu', '--batch=2']
    captions = tmp_path / 'captions.csv'
    captions.write_text('text\na photo of a cat\ntwo dogs on a red sofa\na bowl of fruit\n')
    result = _sample(*common, f'--prompt={captions}', '--guidance_rate=7.5', '--seeds=0-2', f'--outdir={tmp_path}/a')
    assert 'NFE:      3 real network calls per image (6 model evaluations with guidance)' in result.output
    assert _png_files(tmp_path / 'a') == [os.path.join('000000', f'{s:06d}.png') for s in range(3)]
    for name in _png_files(tmp_path / 'a'):
        with PIL.Image.open(tmp_path / 'a' / name) as image:
            assert image.size == (16, 16) and image.mode == 'RGB'
    # Seed 1 with its caption given as --prompt: the same bytes (caption index = seed).
    one = os.path.join('000000', '000001.png')
    _sample(*common, '--prompt=two dogs on a red sofa', '--guidance_rate=7.5', '--seeds=1', f'--outdir={tmp_path}/b')
    assert (tmp_path / 'b' / one).read_bytes() == (tmp_path / 'a' / one).read_bytes()
    # Guidance is applied: the unguided image differs, and the NFE is not doubled.
    result = _sample(*common, '--prompt=two dogs on a red sofa', '--guidance_rate=1', '--seeds=1',
                     f'--outdir={tmp_path}/c')
    assert 'NFE:      3 real network calls per image\n' in result.output
    assert (tmp_path / 'c' / one).read_bytes() != (tmp_path / 'a' / one).read_bytes()
    # AdaSDE's SD schedule: uniform in DDPM index (999, 666, 333, 0: SD v1's sigmas there).
    result = _sample(*common, '--prompt=a cat', '--schedule_type=discrete', '--schedule_rho=1', '--seeds=0',
                     f'--outdir={tmp_path}/d')
    assert 'Schedule: discrete rho=1, 4 points: 14.61 2.918 0.9324 0.02917' in result.output
    assert _png_files(tmp_path / 'd') == [os.path.join('000000', '000000.png')]
    # A seed past the last caption, found from the ranges (a hundred million seeds are never expanded).
    from click.testing import CliRunner

    import sample
    result = CliRunner().invoke(sample.main, [*common, f'--prompt={captions}', '--seeds=1,5-99999999',
                                              f'--outdir={tmp_path}/e'])
    assert result.exit_code == 2
    assert 'Error: --prompt: seed 5 has no prompt: 3 prompts cover seeds 0-2' in result.output

#----------------------------------------------------------------------------
# train.py on Stable Diffusion: distill against the discrete schedule with CFG, captions drawn per trajectory,
# the feature loss through the differentiable VAE decoder; then sample with the predictor.


def test_train_py_end_to_end(sd_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import train
    from models import detectors
    from solvers.adasde import AdaSDEPredictor

    class TinyDetector(torch.nn.Module):  # the Inception download is not available offline
        name, feature_dim = 'tiny', 8

        def forward(self, images):
            return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)[:, :8]
    monkeypatch.setattr(detectors, 'get_detector', lambda name, device: TinyDetector())
    captions = tmp_path / 'captions.csv'
    captions.write_text('text\na photo of a cat\ntwo dogs on a red sofa\na bowl of fruit\na red car\n')
    result = CliRunner().invoke(train.main, [
        '--dataset_name=ms_coco', f'--model_path={sd_dir}', f'--prompts={captions}', f'--outdir={tmp_path}/exps',
        '--num_steps=3', '--M=1', '--schedule_type=discrete', '--schedule_rho=1', '--guidance_type=cfg',
        '--guidance_rate=7.5', '--gamma=0.001', '--lr=0.01', '--batch=2', '--total_kimg=0.004', '--device=cpu'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run_dir, = (tmp_path / 'exps').iterdir()
    assert run_dir.name == '00000-ms_coco-3-3-adasde-dpm-1-discrete-afs'
    snapshot, = run_dir.glob('network-snapshot-*.safetensors')
    p = AdaSDEPredictor.load(snapshot)
    assert p.settings['schedule_type'] == 'discrete' and p.settings['guidance_rate'] == 7.5
    assert not torch.equal(p.r_params, AdaSDEPredictor(3, seed=0).r_params.detach())  # it trained
    _sample(f'--predictor_path={snapshot}', '--prompt=a cat', '--seeds=0-1', '--device=cpu',
            f'--outdir={tmp_path}/samples')
    assert _png_files(tmp_path / 'samples') == [os.path.join('000000', f'{s:06d}.png') for s in range(2)]

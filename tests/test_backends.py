"""The openai-UNet families (lsun_bedroom: CM, imagenet256: ADM + classifier, lsun_bedroom_ldm: LDM + VQ-f4) on
tiny random networks saved in the original file formats: the denoisers against their closed forms, the qkv
layouts, EMA selection, quantised decode, guidance, the loading errors, and a cross-check against diffusers."""

import json
import math
import os
import zipfile

import pytest
import torch

import models
from models import adapters, openai_unet, zoo
from models.zoo import ModelError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny architectures in the original code's names (several heads of 16 channels; attention on two levels).
CM_ARCH = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult='1,1,2,2',
               attention_resolutions='8,4', num_head_channels=16, use_scale_shift_norm=False, resblock_updown=True,
               dropout=0.0)
ADM_ARCH = dict(CM_ARCH, use_scale_shift_norm=True, class_cond=True, learn_sigma=True, num_classes=10)
CLS_ARCH = dict(image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions='8,4',
                num_head_channels=16, num_classes=10)
LDM_ARCH = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
                num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, embed_dim=3, n_embed=64,
                ddconfig=dict(ch=32, ch_mult=[1, 2, 4], num_res_blocks=1, resolution=32, attn_resolutions=[]),
                linear_start=0.0015, linear_end=0.0195, timesteps=1000)


def randomize(module, seed):
    """Every parameter random (the originals zero-initialise output layers, which would hide layout errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = 'norm' in name or name.endswith(('in_layers.0.weight', 'out_layers.0.weight', 'out.0.weight'))
            if p.ndim == 1 and is_norm and name.endswith('weight'):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim >= 2 and 'embedding' not in name and 'label_emb' not in name:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.3 * noise)
    return module


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Tiny checkpoints in the original formats, and the modules they were made from."""
    d = tmp_path_factory.mktemp('backends')
    cm = randomize(adapters.build_cm(CM_ARCH), 1)
    torch.save(cm.state_dict(), d / 'cm.pt')
    adm = randomize(adapters.build_adm(ADM_ARCH), 2)
    torch.save(adm.state_dict(), d / 'adm.pt')
    cls = randomize(adapters.build_classifier(CLS_ARCH), 3)
    torch.save(cls.state_dict(), d / 'cls.pt')
    unet, vq, alphas_cumprod, _ = adapters.ldm_parts(dict(zoo.ZOO['lsun_bedroom_ldm'].arch['model'], **LDM_ARCH))
    live, ema = randomize(unet, 4).state_dict(), randomize(adapters.ldm_parts(
        dict(zoo.ZOO['lsun_bedroom_ldm'].arch['model'], **LDM_ARCH))[0], 5).state_dict()
    randomize(vq, 6)
    state = {f'model.diffusion_model.{k}': v for k, v in live.items()}
    state.update({adapters.ema_key(k): v for k, v in ema.items()})
    state.update({'model_ema.decay': torch.tensor(0.9999), 'model_ema.num_updates': torch.tensor(1000)})
    state.update({f'first_stage_model.{k}': v for k, v in vq.state_dict().items()})
    state['alphas_cumprod'] = alphas_cumprod
    torch.save({'state_dict': state, 'global_step': 1000, 'epoch': 3}, d / 'model.ckpt')
    with zipfile.ZipFile(d / 'ldm.zip', 'w') as zf:
        zf.write(d / 'model.ckpt', 'model.ckpt')
    modules = dict(cm=cm, adm=adm, cls=cls, ema=ema, live=live, vq=vq)
    return d, modules


def arch_json(arch):
    return json.dumps(arch)


def load(d, kind, **kwargs):
    path = dict(cm=d / 'cm.pt', adm=d / 'adm.pt', ldm=d / 'ldm.zip')[kind]
    arch = dict(cm=CM_ARCH, adm=ADM_ARCH, ldm=LDM_ARCH)[kind]
    if kind == 'adm' and kwargs.get('guidance_rate', 1) != 0:
        kwargs = dict(dict(classifier_path=str(d / 'cls.pt'), classifier_arch=arch_json(CLS_ARCH)), **kwargs)
    return models.load_model(str(path), kind=kind, arch=arch_json(arch), **kwargs)


SIGMAS = [0.002, 0.05, 0.7, 3.0, 80.0]


def inputs(net, seed=0, batch=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], generator=g,
                    dtype=torch.float64)
    sigma = torch.tensor(SIGMAS[:batch], dtype=torch.float64)
    return x * sigma.reshape(-1, 1, 1, 1) + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64), sigma

#----------------------------------------------------------------------------
# Published architectures: the exact parameter and tensor counts of the published files.


def test_published_sizes():
    counts = {}
    with torch.device('meta'):
        counts['cm'] = adapters.build_cm(zoo.ZOO['lsun_bedroom'].arch['model'])
        counts['adm'] = adapters.build_adm(zoo.ZOO['imagenet256'].arch['model'])
        counts['cls'] = adapters.build_classifier(zoo.ZOO['imagenet256'].arch['classifier'])
        counts['ldm'], counts['vq'], alphas_cumprod, _ = adapters.ldm_parts(zoo.ZOO['lsun_bedroom_ldm'].arch['model'])
    sizes = {k: (sum(p.numel() for p in m.parameters()), len(m.state_dict())) for k, m in counts.items()}
    assert sizes == dict(cm=(526304771, 566), adm=(553838086, 567), cls=(54096360, 249), ldm=(274056163, 368),
                         vq=(55322782, 205))
    assert counts['adm'].out[2].out_channels == 6 and counts['adm'].label_emb.weight.shape == (1000, 1024)
    assert counts['cls'].out[2].positional_embedding.shape == (512, 65)
    assert counts['cm'].input_blocks[1][0].in_layers[2].weight.shape == (256, 256, 3, 3)
    # Attention heads: 64 channels each (CM/ADM), 32 (LDM: 14, 21, 28 heads).
    assert counts['cm'].middle_block[1].num_heads == 16 and counts['ldm'].middle_block[1].num_heads == 28
    assert alphas_cumprod.dtype == torch.float32


def test_zoo_rows_are_what_their_adapters_run():
    """The rows of the openai-UNet families state what their adapters run with the published architectures
    (networks on the meta device; LDM's sigma range from the published schedule on tiny networks)."""
    rows = {kind: zoo.ZOO[models._KIND_ENTRY[kind]] for kind in adapters.KINDS}
    with torch.device('meta'):
        cm = adapters.build_cm(rows['cm'].arch['model'])
        adm = adapters.build_adm(rows['adm'].arch['model'])
        unet, vq, _, scale = adapters.ldm_parts(rows['ldm'].arch['model'])
    schedule = {k: rows['ldm'].arch['model'][k] for k in ('linear_start', 'linear_end', 'timesteps')}
    alphas_cumprod = adapters.ldm_parts(dict(LDM_ARCH, **schedule))[2]
    nets = dict(cm=adapters.CMDenoiser(cm), adm=adapters.ADMGuidedDenoiser(adm, guidance_rate=0),
                ldm=adapters.LDMDenoiser(unet, vq, alphas_cumprod, scale_factor=scale))
    for kind, net in nets.items():
        e = rows[kind]
        assert (net.img_channels, net.img_resolution, net.label_dim) == (e.channels, e.resolution, e.label_dim), kind
        assert (net.sigma_min, net.sigma_max) == (pytest.approx(e.sigma_min, rel=1e-5),
                                                  pytest.approx(e.sigma_max, rel=1e-5)), kind
        assert getattr(net, 'guidance_type', None) == e.guidance_type, kind
    assert nets['ldm'].guidance_rate == rows['ldm'].guidance_rate

#----------------------------------------------------------------------------
# D(x; sigma) against the closed forms, evaluated here on the saved network itself.


def test_cm_closed_form(files):
    d, m = files
    net = load(d, 'cm')
    assert isinstance(net, adapters.CMDenoiser)
    assert (net.sigma_min, net.sigma_max, net.img_resolution, net.img_channels, net.label_dim) == (0.002, 80.0, 32, 3,
                                                                                                    0)
    x, sigma = inputs(net)
    D = net(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        F = m['cm']((x / (s ** 2 + 0.25).sqrt()).float(), (250 * torch.log(sigma)).float()).double()
    expected = 0.25 / (s ** 2 + 0.25) * x + 0.5 * s / (s ** 2 + 0.25).sqrt() * F
    assert D.dtype == torch.float64 and torch.allclose(D, expected, atol=1e-6, rtol=0)
    assert (D - x).abs().max() > 0.1  # the network contributes


def test_adm_closed_form_and_guidance(files):
    d, m = files
    x, sigma = None, None
    for rate in (0.0, 4.0):
        net = load(d, 'adm', guidance_rate=rate)
        assert (net.label_dim, net.img_resolution, net.guidance_rate) == (10, 32, rate)
        if x is None:
            x, sigma = inputs(net)
            x = x * 0.2  # keep part of D inside [-1, 1], so the clamp is not all there is
            y = torch.tensor([3, 1, 4, 1, 5])
            s = sigma.reshape(-1, 1, 1, 1)
            c_in = 1 / (1 + s ** 2).sqrt()
            t = ((0.01 + 2 * 19.9 * torch.log1p(sigma ** 2)).sqrt() - 0.1) / 19.9
            with torch.no_grad():
                eps = m['adm']((c_in * x).float(), (999 * t).float(), y)[:, :3].double()
            x_in = (c_in * x).float().requires_grad_(True)
            log_p = torch.log_softmax(m['cls'](x_in, (999 * t).float()), -1)[torch.arange(5), y].sum()
            grad = torch.autograd.grad(log_p, x_in)[0].double()
        D = net(x, sigma, class_labels=y)
        # Score-shift form: D = clamp(x - sigma eps + s sigma^2 grad_x log p(y | c_in x)), grad_x = c_in grad_x_in.
        expected = (x - s * eps + rate * s ** 2 * c_in * grad).clamp(-1, 1)
        assert torch.allclose(D, expected, atol=1e-5, rtol=0), (D - expected).abs().max()
        if rate == 0:
            unguided = D
            inside = ((x - s * eps).abs() < 1)
            assert inside.float().mean() > 0.2 and ((x - s * eps).abs() > 1).any()  # both sides of the clamp
    assert (D - unguided).abs().max() > 1e-3  # guidance at 4 moves D
    unclamped = load(d, 'adm', guidance_rate=0.0, clamp=False)(x, sigma, class_labels=y)
    assert torch.allclose(unclamped, x - s * eps, atol=1e-5, rtol=0) and unclamped.abs().max() > 1.5
    # One-hot labels (how the samplers draw them) are the same as indices.
    assert torch.equal(net(x, sigma, class_labels=torch.eye(10, dtype=torch.float64)[y]), D)
    with pytest.raises(ValueError, match='class-conditional'):
        net(x, sigma)
    # Network time 999 t(sigma) at the published sigmas, and the float32 sigma_min of the official wrapper.
    assert net.network_time(torch.tensor([net.sigma_min, 0.1, 1.0, 10.0, net.sigma_max], dtype=torch.float64)) \
        .sub(torch.tensor([0.99865, 26.968, 258.70, 675.37, 999.0], dtype=torch.float64)).abs().max() < 0.01
    assert net.sigma_min == pytest.approx(0.010483843, abs=1e-9) and net.sigma_max == pytest.approx(152.16698, rel=1e-7)


def test_ldm_closed_form_ema_and_sigma_range(files):
    d, m = files
    net = load(d, 'ldm')
    assert isinstance(net, adapters.LDMDenoiser)
    assert (net.img_resolution, net.decoded_resolution, net.img_channels) == (8, 32, 3)
    # sigma range of the float32 alphas_cumprod table of the published schedule.
    assert net.sigma_min == pytest.approx(0.0387590, abs=2e-7) and net.sigma_max == pytest.approx(83.82248, rel=1e-6)
    x, sigma = inputs(net)
    sigma = torch.tensor([0.04, 0.3, 1.0, 9.0, 80.0], dtype=torch.float64)
    D = net(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    t_net = 1000 * net.sigma_inv(sigma) - 1
    assert abs(float(1000 * net.sigma_inv(torch.tensor(1.0, dtype=torch.float64)) - 1) - 254.04) < 0.01
    assert abs(float(1000 * net.sigma_inv(torch.tensor(net.sigma_max, dtype=torch.float64)) - 1) - 999) < 1e-6
    ema = adapters.ldm_parts(dict(zoo.ZOO['lsun_bedroom_ldm'].arch['model'], **LDM_ARCH))[0]
    ema.load_state_dict(m['ema'])
    live = adapters.ldm_parts(dict(zoo.ZOO['lsun_bedroom_ldm'].arch['model'], **LDM_ARCH))[0]
    live.load_state_dict(m['live'])
    with torch.no_grad():
        eps_ema = ema((x / (1 + s ** 2).sqrt()).float(), t_net.float()).double()
        eps_live = live((x / (1 + s ** 2).sqrt()).float(), t_net.float()).double()
    assert torch.allclose(D, x - s * eps_ema, atol=1e-5, rtol=0)
    assert not torch.allclose(D, x - s * eps_live, atol=1e-2, rtol=0)  # the EMA weights, not the live ones
    live_net = load(d, 'ldm', use_ema=False)
    assert torch.allclose(live_net(x, sigma), x - s * eps_live, atol=1e-5, rtol=0)
    # The discrete schedule: sigma(t) inverts sigma_inv, through the same helpers as Stable Diffusion.
    from models.discrete import DiscreteVPSchedule
    from models.sd import SDDenoiser
    assert SDDenoiser.sigma is DiscreteVPSchedule.sigma is adapters.LDMDenoiser.sigma
    assert torch.allclose(net.sigma(net.sigma_inv(sigma)), sigma, rtol=1e-9)


def test_ldm_decode_quantises(files):
    d, m = files
    net = load(d, 'ldm')
    z = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(7))
    images = net.decode(z)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    codes = m['vq'].quantize.embedding.weight
    idx = net.first_stage.quantize.indices(z)
    expected = m['vq'].decoder(m['vq'].post_quant_conv(codes[idx].permute(0, 3, 1, 2)))
    assert torch.allclose(images, expected, atol=1e-5, rtol=0)
    # A nudge smaller than the gap to the second nearest code changes nothing; unquantised decode differs.
    with torch.no_grad():
        dist = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 3), codes).sort(1).values
    gap = float((dist[:, 1] - dist[:, 0]).min().detach())
    nudge = torch.randn(z.shape, generator=torch.Generator().manual_seed(8))
    nudge = nudge / nudge.norm(dim=1, keepdim=True) * gap / 4
    # (equal codes; the straight-through z + (z_q - z) rounds within float32 precision, as in the original)
    assert torch.equal(net.first_stage.quantize.indices(z + nudge), idx)
    assert torch.allclose(net.decode(z + nudge), images, atol=1e-5, rtol=0)
    assert not torch.allclose(net.first_stage.decode(z, quantize=False), images, atol=1e-3)
    # Straight-through: the decode is differentiable in the latents (the feature loss of distillation).
    z = z.requires_grad_(True)
    net.decode(z).square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize('kind', ['cm', 'adm', 'ldm'])
def test_gradients_flow_to_x_and_sigma(files, kind):
    d, _ = files
    net = load(d, kind, guidance_rate=4.0) if kind == 'adm' else load(d, kind)
    x, sigma = inputs(net, batch=3)
    x = (x * (0.2 if kind == 'adm' else 1)).requires_grad_(True)
    sigma = sigma.clone().requires_grad_(True)
    labels = dict(class_labels=torch.tensor([1, 2, 3])) if kind == 'adm' else {}
    net(x, sigma, **labels).sum().backward()
    assert x.grad.abs().sum() > 0 and sigma.grad.abs().sum() > 0 and torch.isfinite(sigma.grad).all()
    assert not any(p.requires_grad for p in net.parameters())

#----------------------------------------------------------------------------
# qkv layouts: each family's attention split, checked against per-head attention written out here; a net
# built with the other layout gives another result on the same weights.


def _reference_attention(block, x, layout):
    b, c, hh, ww = x.shape
    heads, d = block.num_heads, c // block.num_heads
    W, bias = block.qkv.weight[:, :, 0], block.qkv.bias
    h = block.norm(x.reshape(b, c, -1))
    out = []
    for i in range(heads):
        if layout == 'three':
            rows = [slice(j * c + i * d, j * c + (i + 1) * d) for j in range(3)]
        else:
            rows = [slice(i * 3 * d + j * d, i * 3 * d + (j + 1) * d) for j in range(3)]
        q, k, v = (torch.einsum('oc,bct->bot', W[r], h) + bias[r][None, :, None] for r in rows)
        a = torch.softmax(torch.einsum('bdt,bds->bts', q, k) / math.sqrt(d), -1)
        out.append(torch.einsum('bts,bds->bdt', a, v))
    return x + block.proj_out(torch.cat(out, 1)).reshape(x.shape)


@pytest.mark.parametrize('kind,layout', [('cm', 'three'), ('adm', 'legacy'), ('ldm', 'legacy')])
def test_qkv_layout(files, kind, layout):
    d, _ = files
    net = load(d, kind, guidance_rate=0.0) if kind == 'adm' else load(d, kind)
    blocks = [mod for mod in net.unet.modules() if isinstance(mod, openai_unet.AttentionBlock)]
    assert len(blocks) >= 3 and {blk.qkv_layout for blk in blocks} == {layout}
    block = blocks[-1]
    assert block.num_heads >= 2
    x = torch.randn([2, block.norm.num_channels, 4, 4], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(block(x), _reference_attention(block, x, layout), atol=1e-5)
        other = 'legacy' if layout == 'three' else 'three'
        assert (block(x) - _reference_attention(block, x, other)).abs().max() > 1e-2
        x_net, sigma = inputs(net, batch=2)
        labels = dict(class_labels=torch.tensor([0, 1])) if kind == 'adm' else {}
        before = net(x_net * 0.2, sigma, **labels)
        for blk in blocks:
            blk.qkv_layout = other
        after = net(x_net * 0.2, sigma, **labels)
    assert (before - after).abs().max() > 1e-4  # the layout matters for the whole denoiser


#----------------------------------------------------------------------------
# The Consistency Models file layout, written out from that code's description (not from this project's
# modules): a guided-diffusion UNet whose attention qkv and proj_out are 1x1 Conv2d, weights [out, in, 1, 1].
PUBLISHED_CM_ARCH = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult='1,2',
                         attention_resolutions='8', num_head_channels=16, use_scale_shift_norm=False,
                         resblock_updown=True, dropout=0.0)


def _published_res(prefix, c_in, c_out, emb=128):
    """ResBlock: in_layers.{0 GroupNorm, 2 conv3x3}, emb_layers.1 (Linear to C), out_layers.{0 GroupNorm,
    3 conv3x3}, skip_connection (1x1 conv) only when the width changes."""
    shapes = {'in_layers.0.weight': [c_in], 'in_layers.0.bias': [c_in],
              'in_layers.2.weight': [c_out, c_in, 3, 3], 'in_layers.2.bias': [c_out],
              'emb_layers.1.weight': [c_out, emb], 'emb_layers.1.bias': [c_out],
              'out_layers.0.weight': [c_out], 'out_layers.0.bias': [c_out],
              'out_layers.3.weight': [c_out, c_out, 3, 3], 'out_layers.3.bias': [c_out]}
    if c_in != c_out:
        shapes.update({'skip_connection.weight': [c_out, c_in, 1, 1], 'skip_connection.bias': [c_out]})
    return {f'{prefix}.{k}': v for k, v in shapes.items()}


def _published_attn(prefix, c):
    return {f'{prefix}.norm.weight': [c], f'{prefix}.norm.bias': [c], f'{prefix}.qkv.weight': [3 * c, c, 1, 1],
            f'{prefix}.qkv.bias': [3 * c], f'{prefix}.proj_out.weight': [c, c, 1, 1], f'{prefix}.proj_out.bias': [c]}


def published_cm_state_dict(seed=0):
    """PUBLISHED_CM_ARCH's tensors as the Consistency Models code names and shapes them: widths 32 (level 0) and
    64 (level 1, 8x8, attention, 4 heads of 16), time embedding 128, downsample and upsample by ResBlocks."""
    shapes = {'time_embed.0.weight': [128, 32], 'time_embed.0.bias': [128],
              'time_embed.2.weight': [128, 128], 'time_embed.2.bias': [128],
              'input_blocks.0.0.weight': [32, 3, 3, 3], 'input_blocks.0.0.bias': [32]}
    shapes.update(_published_res('input_blocks.1.0', 32, 32))
    shapes.update(_published_res('input_blocks.2.0', 32, 32))  # down=True
    shapes.update(_published_res('input_blocks.3.0', 32, 64))
    shapes.update(_published_attn('input_blocks.3.1', 64))
    shapes.update(_published_res('middle_block.0', 64, 64))
    shapes.update(_published_attn('middle_block.1', 64))
    shapes.update(_published_res('middle_block.2', 64, 64))
    # Output blocks take the skip of input blocks 3, 2, 1, 0 (widths 64, 32, 32, 32) concatenated.
    shapes.update(_published_res('output_blocks.0.0', 128, 64))
    shapes.update(_published_attn('output_blocks.0.1', 64))
    shapes.update(_published_res('output_blocks.1.0', 96, 64))
    shapes.update(_published_attn('output_blocks.1.1', 64))
    shapes.update(_published_res('output_blocks.1.2', 64, 64))  # up=True
    shapes.update(_published_res('output_blocks.2.0', 96, 32))
    shapes.update(_published_res('output_blocks.3.0', 64, 32))
    shapes.update({'out.0.weight': [32], 'out.0.bias': [32], 'out.2.weight': [3, 32, 3, 3], 'out.2.bias': [3]})
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if len(shape) > 1:
            sd[name] = noise / math.sqrt(noise[0].numel())
        else:
            sd[name] = 1 + 0.1 * noise if name.endswith('weight') else 0.3 * noise
    return sd


def test_cm_published_layout_loads(tmp_path):
    """A file in the Consistency Models layout (1x1 Conv2d attention) loads, and gives the same denoiser as the
    project's own layout (Conv1d) of the same weights; the attention is the published one, written out here."""
    published = published_cm_state_dict()
    assert published['middle_block.1.qkv.weight'].shape == (192, 64, 1, 1)
    torch.save(published, tmp_path / 'edm_bedroom256_ema.pt')
    own = {k: v[..., 0] if k.endswith(('qkv.weight', 'proj_out.weight')) else v for k, v in published.items()}
    torch.save(own, tmp_path / 'own.pt')
    nets = [models.load_model(str(tmp_path / name), kind='cm', arch=arch_json(PUBLISHED_CM_ARCH))
            for name in ('edm_bedroom256_ema.pt', 'own.pt')]
    x = torch.randn([2, 3, 16, 16], generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        a, b = (net(x, torch.tensor([0.5, 3.0])) for net in nets)
        assert torch.equal(a, b) and a.abs().max() > 0.1
        # The middle attention by hand with the file's 4-d weights: 1x1 Conv2d, three-major split (flash).
        h = torch.randn([2, 64, 4, 4], generator=torch.Generator().manual_seed(2))
        W = published
        qkv = torch.nn.functional.conv2d(torch.nn.functional.group_norm(
            h, 32, W['middle_block.1.norm.weight'], W['middle_block.1.norm.bias']),
            W['middle_block.1.qkv.weight'], W['middle_block.1.qkv.bias']).reshape(2, 3, 4, 16, 16)
        q, k, v = qkv.unbind(1)
        attn = torch.softmax(torch.einsum('bhdt,bhds->bhts', q, k) / 4.0, -1)
        mixed = torch.einsum('bhts,bhds->bhdt', attn, v).reshape(2, 64, 4, 4)
        expected = h + torch.nn.functional.conv2d(mixed, W['middle_block.1.proj_out.weight'],
                                                  W['middle_block.1.proj_out.bias'])
        assert torch.allclose(nets[0].unet.middle_block[1](h), expected, atol=1e-5)
    bad = dict(published, **{'middle_block.1.qkv.weight': torch.zeros(192, 64, 1, 2)})
    torch.save(bad, tmp_path / 'bad.pt')
    with pytest.raises(ModelError, match=r'1 of another shape \(e.g. middle_block.1.qkv.weight: \[192, 64, 1, 2\]'):
        models.load_model(str(tmp_path / 'bad.pt'), kind='cm', arch=arch_json(PUBLISHED_CM_ARCH))


def test_classifier_layouts(files):
    d, m = files
    net = load(d, 'adm', guidance_rate=4.0)
    cls = net.classifier
    assert {blk.qkv_layout for blk in cls.modules() if isinstance(blk, openai_unet.AttentionBlock)} == {'legacy'}
    pool = cls.out[2]
    h = torch.randn([2, pool.qkv_proj.in_channels, 4, 4], generator=torch.Generator().manual_seed(1))
    # The pooling head, written out: mean token first, learned positions, three-major qkv, token 0 out.
    t = h.reshape(2, h.shape[1], -1)
    t = torch.cat([t.mean(-1, keepdim=True), t], -1) + pool.positional_embedding[None]
    qkv = pool.qkv_proj(t)
    c, heads = t.shape[1], pool.num_heads
    dh = c // heads
    q, k, v = (z.reshape(2 * heads, dh, -1) for z in qkv.chunk(3, 1))
    a = torch.softmax(torch.einsum('bdt,bds->bts', q, k) / math.sqrt(dh), -1)
    expected = pool.c_proj(torch.einsum('bts,bds->bdt', a, v).reshape(2, c, -1))[:, :, 0]
    with torch.no_grad():
        assert torch.allclose(pool(h), expected, atol=1e-5)
        assert pool(h).shape == (2, 10)

#----------------------------------------------------------------------------
# The zoo: files at <src>/<name>/ (the LDM archive unzipped on download), the published architecture updated by
# arch for tiny nets; every failure is one line.




def _one_line(err):
    message = str(err.value)
    assert '\n' not in message and 'Traceback' not in message
    return message


@pytest.mark.parametrize('name', ['lsun_bedroom', 'imagenet256', 'lsun_bedroom_ldm'])
def test_zoo_without_network(offline, name):
    tmp_path, calls = offline
    with pytest.raises(ModelError, match='cannot download') as err:
        models.load_model(name)
    message = _one_line(err)
    assert zoo.ZOO[name].url in message and str(tmp_path / 'src' / name) in message and calls


def test_zoo_with_local_files(offline, files, monkeypatch):
    tmp_path, calls = offline
    d, _ = files
    src = tmp_path / 'src'
    for name, source, target in (('lsun_bedroom', 'cm.pt', 'edm_bedroom256_ema.pt'),
                                 ('imagenet256', 'adm.pt', '256x256_diffusion.pt')):
        os.makedirs(src / name, exist_ok=True)
        (src / name / target).write_bytes((d / source).read_bytes())
    unguided = models.load_model('imagenet256', arch=ADM_ARCH, guidance_rate=0)  # needs no classifier file
    assert unguided.classifier is None and calls == []
    with pytest.raises(ModelError, match='cannot download .*256x256_classifier.pt'):
        models.load_model('imagenet256', arch=ADM_ARCH)
    (src / 'imagenet256' / '256x256_classifier.pt').write_bytes((d / 'cls.pt').read_bytes())
    cm = models.load_model('lsun_bedroom', arch=CM_ARCH)
    x, sigma = inputs(cm, batch=2)
    assert torch.equal(cm(x, sigma), load(d, 'cm')(x, sigma))
    adm = models.load_model('imagenet256', arch=ADM_ARCH, classifier_arch=CLS_ARCH, guidance_rate=4.0)
    assert adm.classifier is not None and adm.guidance_rate == 4.0
    default = models.load_model('imagenet256', arch=ADM_ARCH, classifier_arch=CLS_ARCH)
    assert default.guidance_rate == zoo.ZOO['imagenet256'].guidance_rate and default.classifier is not None
    # The LDM download is a zip: fetch stores model.ckpt extracted from it.
    archive = (d / 'ldm.zip').read_bytes()

    class Response:
        def __init__(self, data):
            self.data = data

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def read(self):
            return self.data
    import dnnlib
    monkeypatch.setattr(dnnlib.util, 'open_url', lambda url, **kwargs: Response(archive))
    ldm = models.load_model('lsun_bedroom_ldm', arch=LDM_ARCH)
    assert (src / 'lsun_bedroom_ldm' / 'model.ckpt').read_bytes() == (d / 'model.ckpt').read_bytes()
    x, sigma = inputs(ldm, batch=2)
    assert torch.equal(ldm(x, sigma), load(d, 'ldm')(x, sigma))
    # Published architectures by default: the tiny files do not fit them, said in one line.
    with pytest.raises(ModelError, match='does not fit the cm') as err:
        models.load_model('lsun_bedroom')
    assert 'the file looks like an unconditional openai UNet' in _one_line(err)


def test_load_errors(files, tmp_path):
    d, _ = files
    cases = []

    def fails(match, path, kind, **kwargs):
        with pytest.raises(ModelError, match=match) as err:
            models.load_model(str(path), kind=kind, **kwargs)
        cases.append(_one_line(err))
    fails('cm checkpoint not found: .*nope.pt', tmp_path / 'nope.pt', 'cm', arch=CM_ARCH)
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes((d / 'cm.pt').read_bytes()[:5000])
    fails('truncated.pt: not a readable PyTorch checkpoint', truncated, 'cm', arch=CM_ARCH)
    text = tmp_path / 'notes.ckpt'
    text.write_text('not a checkpoint')
    fails(r'notes.ckpt: not a PyTorch checkpoint \(the safe loader stopped: ', text, 'ldm', arch=LDM_ARCH)
    assert 'weights_only' not in cases[-1]  # never the advice to unpickle a file that is not known to be safe

    import argparse
    torch.save({'state_dict': {}, 'hparams': argparse.Namespace(lr=1)}, tmp_path / 'objects.ckpt')  # as old Lightning
    fails('refused by the safe loader', tmp_path / 'objects.ckpt', 'ldm', arch=LDM_ARCH)
    # Checkpoints of another family.
    fails('does not fit the cm .*looks like a class-conditional openai UNet \\(10 classes, adm\\)', d / 'adm.pt', 'cm',
          arch=CM_ARCH)
    fails('does not fit the adm .*looks like an unconditional openai UNet', d / 'cm.pt', 'adm', arch=ADM_ARCH,
          guidance_rate=0)
    fails('no latent-diffusion UNet .*looks like an unconditional openai UNet', d / 'cm.pt', 'ldm', arch=LDM_ARCH)
    fails('does not fit the guided-diffusion classifier .*looks like a class-conditional', d / 'adm.pt', 'adm',
          arch=ADM_ARCH, classifier_path=str(d / 'adm.pt'), classifier_arch=CLS_ARCH)
    fails('does not fit the adm .*looks like a guided-diffusion classifier', d / 'cls.pt', 'adm', arch=ADM_ARCH,
          guidance_rate=0)
    # Architecture keys: unknown ones listed with the valid ones; bad JSON; guidance without a classifier.
    fails('unknown model_arch key\\(s\\) num_chanels; valid keys: attention_resolutions, channel_mult, class_cond',
          d / 'cm.pt', 'cm', arch='{"num_chanels": 32}')
    fails('unknown model_arch key\\(s\\) model_chanels; valid keys: attention_resolutions', d / 'ldm.zip', 'ldm',
          arch='{"model_chanels": 32}')
    fails('unknown classifier_arch key\\(s\\) depth; valid keys: classifier_attention_resolutions', d / 'adm.pt',
          'adm', arch=ADM_ARCH, classifier_path=str(d / 'cls.pt'), classifier_arch={'depth': 1})
    fails('model_arch is not valid JSON', d / 'cm.pt', 'cm', arch='{image_size: 32}')
    fails('needs a classifier', d / 'adm.pt', 'adm', arch=ADM_ARCH, guidance_rate=2.0)
    fails('takes no option guidance_rate', d / 'cm.pt', 'cm', arch=CM_ARCH, guidance_rate=2.0)
    fails("unknown model kind 'dit'; choose from cm, adm, ldm", d / 'cm.pt', 'dit')
    fails('amp_dtype must be float16, bfloat16 or None', d / 'cm.pt', 'cm', arch=CM_ARCH, amp_dtype='float8')
    empty = tmp_path / 'empty.zip'
    with zipfile.ZipFile(empty, 'w') as zf:
        zf.writestr('readme.txt', 'nothing')
    fails('a zip archive without a .ckpt', empty, 'ldm', arch=LDM_ARCH)
    assert len(cases) == 18


def test_incomplete_ema_and_separate_first_stage(files, tmp_path):
    d, m = files
    state = torch.load(d / 'model.ckpt', weights_only=True)['state_dict']
    # Without first_stage_model.*, the VQ weights come from a taming checkpoint (its loss.* weights ignored).
    vq_state = {k[len('first_stage_model.'):]: v for k, v in state.items() if k.startswith('first_stage_model.')}
    torch.save({'state_dict': dict(vq_state, **{'loss.logvar': torch.zeros(())})}, tmp_path / 'vq.ckpt')
    torch.save({'state_dict': {k: v for k, v in state.items() if not k.startswith('first_stage_model.')}},
               tmp_path / 'nostage.ckpt')
    with pytest.raises(ModelError, match='no first stage'):
        adapters.load_ldm(tmp_path / 'nostage.ckpt', LDM_ARCH, published=zoo.ZOO['lsun_bedroom_ldm'].arch['model'])
    net = adapters.load_ldm(tmp_path / 'nostage.ckpt', LDM_ARCH, published=zoo.ZOO['lsun_bedroom_ldm'].arch['model'],
                            first_stage_path=tmp_path / 'vq.ckpt')
    z = torch.randn([1, 3, 8, 8])
    assert torch.equal(net.decode(z), load(d, 'ldm').decode(z))
    broken = {k: v for k, v in state.items() if k != adapters.ema_key('out.2.weight')}
    torch.save({'state_dict': broken}, tmp_path / 'broken.ckpt')
    with pytest.raises(ModelError, match='incomplete EMA weights .*model_ema.diffusion_modelout2weight'):
        models.load_model(str(tmp_path / 'broken.ckpt'), kind='ldm', arch=LDM_ARCH)

#----------------------------------------------------------------------------
# Cross-check: the same weights mapped into diffusers' UNet2DModel / VQModel agree to 1e-5.


def _attn_to_diffusers(prefix, src_prefix, sd, out, layout, heads=None, conv2d=False):
    if conv2d:  # taming AttnBlock: q, k, v, proj_out as 1x1 Conv2d
        for a, b in (('q', 'to_q'), ('k', 'to_k'), ('v', 'to_v'), ('proj_out', 'to_out.0')):
            out[f'{prefix}.{b}.weight'] = sd[f'{src_prefix}.{a}.weight'][:, :, 0, 0]
            out[f'{prefix}.{b}.bias'] = sd[f'{src_prefix}.{a}.bias']
    else:
        W, bias = sd[f'{src_prefix}.qkv.weight'][:, :, 0], sd[f'{src_prefix}.qkv.bias']
        c = W.shape[1]
        if layout == 'three':
            parts = list(zip(W.chunk(3, 0), bias.chunk(3, 0)))
        else:
            d = c // heads
            parts = [(W.reshape(heads, 3, d, c)[:, j].reshape(c, c), bias.reshape(heads, 3, d)[:, j].reshape(c))
                     for j in range(3)]
        for (w, b_), name in zip(parts, ('to_q', 'to_k', 'to_v')):
            out[f'{prefix}.{name}.weight'], out[f'{prefix}.{name}.bias'] = w, b_
        out[f'{prefix}.to_out.0.weight'] = sd[f'{src_prefix}.proj_out.weight'][:, :, 0]
        out[f'{prefix}.to_out.0.bias'] = sd[f'{src_prefix}.proj_out.bias']
    for p in ('weight', 'bias'):
        out[f'{prefix}.group_norm.{p}'] = sd[f'{src_prefix}.norm.{p}']


RES = dict([('in_layers.0', 'norm1'), ('in_layers.2', 'conv1'), ('emb_layers.1', 'time_emb_proj'),
            ('out_layers.0', 'norm2'), ('out_layers.3', 'conv2'), ('skip_connection', 'conv_shortcut')])


def _res_to_diffusers(prefix, src_prefix, sd, out, taming=False):
    names = dict(norm1='norm1', conv1='conv1', norm2='norm2', conv2='conv2', nin_shortcut='conv_shortcut') \
        if taming else RES
    for a, b in names.items():
        for p in ('weight', 'bias'):
            if f'{src_prefix}.{a}.{p}' in sd:
                out[f'{prefix}.{b}.{p}'] = sd[f'{src_prefix}.{a}.{p}']


def unet_to_diffusers(unet, layout):
    """(UNet2DModel, its state dict) for an openai UNetModel, by the key rules of the two layouts."""
    from diffusers import UNet2DModel
    sd = unet.state_dict()
    levels = unet._levels
    attn_levels = unet._attn_levels
    updown = unet._resblock_updown
    heads = {}
    out = {'conv_in.weight': sd['input_blocks.0.0.weight'], 'conv_in.bias': sd['input_blocks.0.0.bias'],
           'time_embedding.linear_1.weight': sd['time_embed.0.weight'],
           'time_embedding.linear_1.bias': sd['time_embed.0.bias'],
           'time_embedding.linear_2.weight': sd['time_embed.2.weight'],
           'time_embedding.linear_2.bias': sd['time_embed.2.bias'],
           'conv_norm_out.weight': sd['out.0.weight'], 'conv_norm_out.bias': sd['out.0.bias'],
           'conv_out.weight': sd['out.2.weight'], 'conv_out.bias': sd['out.2.bias']}
    if 'label_emb.weight' in sd:
        out['class_embedding.weight'] = sd['label_emb.weight']
    for name, mod in unet.named_modules():
        if isinstance(mod, openai_unet.AttentionBlock):
            heads[name] = mod.num_heads
    nrb = unet._num_res_blocks
    k = 1
    for i in range(levels):
        for j in range(nrb):
            _res_to_diffusers(f'down_blocks.{i}.resnets.{j}', f'input_blocks.{k}.0', sd, out)
            if i in attn_levels:
                _attn_to_diffusers(f'down_blocks.{i}.attentions.{j}', f'input_blocks.{k}.1', sd, out, layout,
                                   heads[f'input_blocks.{k}.1'])
            k += 1
        if i != levels - 1:
            if updown:
                _res_to_diffusers(f'down_blocks.{i}.downsamplers.0', f'input_blocks.{k}.0', sd, out)
            else:
                for p in ('weight', 'bias'):
                    out[f'down_blocks.{i}.downsamplers.0.conv.{p}'] = sd[f'input_blocks.{k}.0.op.{p}']
            k += 1
    _res_to_diffusers('mid_block.resnets.0', 'middle_block.0', sd, out)
    _attn_to_diffusers('mid_block.attentions.0', 'middle_block.1', sd, out, layout, heads['middle_block.1'])
    _res_to_diffusers('mid_block.resnets.1', 'middle_block.2', sd, out)
    k = 0
    for u in range(levels):
        level = levels - 1 - u
        for j in range(nrb + 1):
            _res_to_diffusers(f'up_blocks.{u}.resnets.{j}', f'output_blocks.{k}.0', sd, out)
            nxt = 1
            if level in attn_levels:
                _attn_to_diffusers(f'up_blocks.{u}.attentions.{j}', f'output_blocks.{k}.1', sd, out, layout,
                                   heads[f'output_blocks.{k}.1'])
                nxt = 2
            if level and j == nrb:
                if updown:
                    _res_to_diffusers(f'up_blocks.{u}.upsamplers.0', f'output_blocks.{k}.{nxt}', sd, out)
                else:
                    for p in ('weight', 'bias'):
                        out[f'up_blocks.{u}.upsamplers.0.conv.{p}'] = sd[f'output_blocks.{k}.{nxt}.conv.{p}']
            k += 1
    down = [('AttnDownBlock2D' if i in attn_levels else 'ResnetDownsampleBlock2D' if updown else 'DownBlock2D')
            for i in range(levels)]
    up = [('AttnUpBlock2D' if lv in attn_levels else 'ResnetUpsampleBlock2D' if updown else 'UpBlock2D')
          for lv in reversed(range(levels))]
    model = UNet2DModel(
        sample_size=unet.image_size, in_channels=unet.in_channels, out_channels=unet.out_channels,
        block_out_channels=unet._widths, layers_per_block=nrb, down_block_types=down, up_block_types=up,
        downsample_type='resnet' if updown else 'conv', upsample_type='resnet' if updown else 'conv',
        downsample_padding=1, attention_head_dim=unet._head_channels, norm_num_groups=32, norm_eps=1e-5,
        attn_norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, num_class_embeds=unet.num_classes,
        resnet_time_scale_shift='scale_shift' if unet._scale_shift else 'default')
    return model, out


def _describe(unet, arch, kind):
    """Architecture facts the mapping needs, attached to the module for the converter above."""
    if kind == 'ldm':
        mult, ds, nrb, mc = arch['channel_mult'], set(arch['attention_resolutions']), arch['num_res_blocks'], \
            arch['model_channels']
        updown, scale_shift, head = False, False, arch['num_head_channels']
    else:
        mult = [int(v) for v in arch['channel_mult'].split(',')]
        ds = {arch['image_size'] // int(r) for r in arch['attention_resolutions'].split(',')}
        nrb, mc, updown, scale_shift = arch['num_res_blocks'], arch['num_channels'], arch['resblock_updown'], \
            arch['use_scale_shift_norm']
        head = arch['num_head_channels']
    unet._levels, unet._num_res_blocks, unet._resblock_updown, unet._scale_shift = len(mult), nrb, updown, scale_shift
    unet._attn_levels = {i for i in range(len(mult)) if 2 ** i in ds}
    unet._widths, unet._head_channels = [m * mc for m in mult], head


@pytest.mark.parametrize('kind', ['cm', 'adm', 'ldm'])
def test_unet_matches_diffusers(files, kind):
    pytest.importorskip('diffusers')
    d, _ = files
    net = load(d, kind, guidance_rate=0.0) if kind == 'adm' else load(d, kind)
    unet = net.unet
    _describe(unet, dict(cm=CM_ARCH, adm=ADM_ARCH, ldm=LDM_ARCH)[kind], kind)
    layout = dict(cm='three', adm='legacy', ldm='legacy')[kind]
    model, state = unet_to_diffusers(unet, layout)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    g = torch.Generator().manual_seed(3)
    x = torch.randn([2, unet.in_channels, unet.image_size, unet.image_size], generator=g)
    t = torch.tensor([3.7, 612.5])
    y = torch.tensor([2, 7]) if kind == 'adm' else None
    with torch.no_grad():
        ours = unet(x, t, y)
        theirs = model(x, t, class_labels=y).sample
        assert (ours - theirs).abs().max() <= 1e-5, (ours - theirs).abs().max()
        assert ours.abs().max() > 0.1
        # The other split rule does not agree: the cross-check sees a wrong layout.
        model.load_state_dict(unet_to_diffusers(unet, 'legacy' if layout == 'three' else 'three')[1])
        assert (unet(x, t, y) - model(x, t, class_labels=y).sample).abs().max() > 1e-3


def test_vq_matches_diffusers(files):
    pytest.importorskip('diffusers')
    from diffusers import VQModel
    d, _ = files
    vq = load(d, 'ldm').first_stage
    sd = vq.state_dict()
    n = len(vq.ddconfig['ch_mult'])
    out = {k: sd[k] for k in ('quant_conv.weight', 'quant_conv.bias', 'post_quant_conv.weight',
                              'post_quant_conv.bias', 'quantize.embedding.weight')}
    for part in ('encoder', 'decoder'):
        for a, b in (('conv_in', 'conv_in'), ('norm_out', 'conv_norm_out'), ('conv_out', 'conv_out')):
            for p in ('weight', 'bias'):
                out[f'{part}.{b}.{p}'] = sd[f'{part}.{a}.{p}']
        _res_to_diffusers(f'{part}.mid_block.resnets.0', f'{part}.mid.block_1', sd, out, taming=True)
        _res_to_diffusers(f'{part}.mid_block.resnets.1', f'{part}.mid.block_2', sd, out, taming=True)
        _attn_to_diffusers(f'{part}.mid_block.attentions.0', f'{part}.mid.attn_1', sd, out, None, conv2d=True)
    for i in range(n):
        for j in range(vq.ddconfig['num_res_blocks']):
            _res_to_diffusers(f'encoder.down_blocks.{i}.resnets.{j}', f'encoder.down.{i}.block.{j}', sd, out,
                              taming=True)
        for j in range(vq.ddconfig['num_res_blocks'] + 1):
            _res_to_diffusers(f'decoder.up_blocks.{n - 1 - i}.resnets.{j}', f'decoder.up.{i}.block.{j}', sd, out,
                              taming=True)
        for p in ('weight', 'bias'):
            if i != n - 1:
                out[f'encoder.down_blocks.{i}.downsamplers.0.conv.{p}'] = sd[f'encoder.down.{i}.downsample.conv.{p}']
            if i != 0:
                out[f'decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv.{p}'] = sd[f'decoder.up.{i}.upsample.conv.{p}']
    model = VQModel(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * n,
                    up_block_types=('UpDecoderBlock2D',) * n,
                    block_out_channels=[vq.ddconfig['ch'] * m for m in vq.ddconfig['ch_mult']],
                    layers_per_block=vq.ddconfig['num_res_blocks'], latent_channels=3, num_vq_embeddings=64,
                    vq_embed_dim=3, norm_num_groups=32, sample_size=32)
    missing, unexpected = model.load_state_dict(out, strict=False)
    assert not missing and not unexpected
    x = torch.randn([2, 3, 32, 32], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        z = vq.encode(x)
        assert (z - model.encode(x).latents).abs().max() <= 1e-5
        ours, theirs = vq.decode(z), model.decode(z, force_not_quantize=False).sample
        assert torch.equal(vq.quantize.indices(z), vq.quantize.indices(model.quantize(z)[0]))
        assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, float(ours.abs().max()))
        assert (vq.decode(z, quantize=False) - model.decode(z, force_not_quantize=True).sample).abs().max() <= 1e-5 \
            * max(1.0, float(ours.abs().max()))

#----------------------------------------------------------------------------
# End to end: sample.py and train.py on each tiny model, given by path, kind and arch JSON on the command line;
# one process and torchrun with two write the same PNGs.


def cli_model(d, kind):
    args = [f'--model_path={dict(cm=d / "cm.pt", adm=d / "adm.pt", ldm=d / "ldm.zip")[kind]}', f'--model_kind={kind}',
            f'--model_arch={arch_json(dict(cm=CM_ARCH, adm=ADM_ARCH, ldm=LDM_ARCH)[kind])}']
    if kind == 'adm':
        args += [f'--classifier_path={d / "cls.pt"}', f'--classifier_arch={arch_json(CLS_ARCH)}',
                 '--guidance_type=cg', '--guidance_rate=4']
    return args


def _pngs(outdir):
    return {os.path.relpath(os.path.join(root, n), outdir): open(os.path.join(root, n), 'rb').read()
            for root, _, names in os.walk(outdir) for n in names if n.endswith('.png')}


def _sample(*args):
    from click.testing import CliRunner

    import sample
    result = CliRunner().invoke(sample.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.mark.parametrize('kind', ['cm', 'adm', 'ldm'])
def test_sample_py_one_and_two_processes(files, tmp_path, kind):
    import subprocess
    import sys

    import PIL.Image
    d, _ = files
    common = cli_model(d, kind) + ['--solver=dpmpp', '--num_steps=3', '--seeds=0-3', '--batch=2', '--device=cpu']
    result = _sample(*common, f'--outdir={tmp_path / "one"}')
    assert f'{dict(cm=0, adm=10, ldm=0)[kind]} classes' in result.output
    one = _pngs(tmp_path / 'one')
    assert sorted(one) == [os.path.join('000000', f'{s:06d}.png') for s in range(4)] and len(set(one.values())) == 4
    with PIL.Image.open(tmp_path / 'one' / '000000' / '000000.png') as image:
        assert image.size == (32, 32) and image.mode == 'RGB'  # LDM: decoded from 8x8 latents
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'sample.py'), *common, f'--outdir={tmp_path / "two"}']
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '2 process(es)' in proc.stdout and _pngs(tmp_path / 'two') == one


def test_ldm_images_depend_on_the_seed_only(files):
    """A batch of several gives the same decoded images, and so the same PNG bytes, as each image alone, under 1 and
    2 threads: the VQ decoder sees fixed-size chunks as the UNet does (a 1x1 convolution of fewer than 16 images
    takes another kernel with 2 threads than with 1, and the decoded pixels moved by up to 6e-6)."""
    import sample
    net = load(files[0], 'ldm')
    seeds = [0, 1, 2, 3, 4]
    threads = torch.get_num_threads()
    runs = []
    try:
        for num_threads, batch in ((1, 5), (2, 5), (1, 1), (2, 1), (2, 2)):
            torch.set_num_threads(num_threads)
            with torch.no_grad():
                images = torch.cat([x for _, x in sample.generate_images(net, seeds, 'dpmpp', num_steps=3,
                                                                         max_batch_size=batch, net_batch=16)])
            runs.append(images)
    finally:
        torch.set_num_threads(threads)
    assert runs[0].shape == (5, 3, 32, 32)
    for images in runs[1:]:
        assert torch.equal(images, runs[0])
        assert sample.to_uint8(images).tobytes() == sample.to_uint8(runs[0]).tobytes()


def test_sample_py_bad_arch_is_one_line(files, tmp_path):
    from click.testing import CliRunner

    import sample
    d, _ = files
    for args, message in (
            ([f'--model_path={d / "cm.pt"}', '--model_kind=cm', '--model_arch={"num_chanels": 32}'],
             'Error: unknown model_arch key(s) num_chanels; valid keys: attention_resolutions, channel_mult'),
            ([f'--model_path={d / "adm.pt"}', '--model_kind=cm', f'--model_arch={arch_json(CM_ARCH)}'],
             'looks like a class-conditional openai UNet (10 classes, adm)'),
            ([f'--model_path={d / "nope.pt"}', '--model_kind=adm'], 'Error: adm checkpoint not found:')):
        result = CliRunner().invoke(sample.main, args + [f'--outdir={tmp_path}'])
        assert result.exit_code == 1 and message in result.output and 'Traceback' not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize('kind', ['cm', 'adm', 'ldm'])
def test_train_py_then_sample(files, tmp_path, monkeypatch, kind):
    from click.testing import CliRunner

    import train
    from models import detectors
    from solvers.adasde import AdaSDEPredictor

    class TinyDetector(torch.nn.Module):  # the Inception download is not available offline
        name, feature_dim = 'tiny', 8

        def forward(self, images):
            assert images.shape[-1] == 32  # pixels (LDM: decoded through the VQ decoder)
            return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)[:, :8]
    monkeypatch.setattr(detectors, 'get_detector', lambda name, device: TinyDetector())
    d, _ = files
    result = CliRunner().invoke(train.main, [
        f'--dataset_name={dict(cm="lsun_bedroom", adm="imagenet256", ldm="lsun_bedroom_ldm")[kind]}',
        *cli_model(d, kind), f'--outdir={tmp_path}/exps', '--num_steps=3', '--M=1', '--gamma=0.001', '--lr=0.01',
        '--batch=2', '--total_kimg=0.004', '--device=cpu'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run_dir, = (tmp_path / 'exps').iterdir()
    snapshot, = run_dir.glob('network-snapshot-*.safetensors')
    assert not torch.equal(AdaSDEPredictor.load(snapshot).r_params, AdaSDEPredictor(3, seed=0).r_params.detach())
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['model_kwargs']['kind'] == kind and json.loads(options['model_kwargs']['arch'])
    model = [a for a in cli_model(d, kind) if not a.startswith('--guidance')]
    _sample(f'--predictor_path={snapshot}', *model, '--seeds=0-1', '--device=cpu', f'--outdir={tmp_path}/samples')
    assert sorted(_pngs(tmp_path / 'samples')) == [os.path.join('000000', f'{s:06d}.png') for s in range(2)]


def test_train_py_bad_arch_is_one_line(files, tmp_path):
    from click.testing import CliRunner

    import train
    d, _ = files
    result = CliRunner().invoke(train.main, [f'--model_path={d / "cm.pt"}', '--model_kind=cm', '--model_arch=[1,',
                                             f'--outdir={tmp_path}'])
    assert result.exit_code == 2 and 'model_arch is not valid JSON' in result.output and not os.listdir(tmp_path)
    # Without --dataset_name the run is named after the checkpoint, and the feature loss is Inception's (not the
    # digits detector of the default dataset).
    result = CliRunner().invoke(train.main, [f'--model_path={d / "adm.pt"}', '--model_kind=adm',
                                             f'--model_arch={arch_json(ADM_ARCH)}', f'--outdir={tmp_path}', '-n'])
    assert result.exit_code == 0 and '"feature_net": "inception"' in result.output, result.output
    assert f'Output directory: {tmp_path / "00000-adm-4-5-adasde-dpm-3-uni1.0-afs"}' in result.output

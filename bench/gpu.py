"""End-to-end speed of sample.py on the published architectures, against the network alone: one command for a lent GPU.

For each network, built from its published configuration with random weights (the weights do not change the
cost), and each solver at 5 NFE, this runs sample.py's own command (`sample.main`, the model replaced by the built
network) at the batch size users run, and prints

    e2e img/s    images written per second by sample.py (PNG encoding and writing included, start-up excluded)
    net img/s    the limit: batch / (NFE x one network call on that batch)
    ratio        e2e / net (1.0: nothing but the network costs time)
    peak MiB     peak memory of the device (CUDA: max_memory_allocated; CPU: peak resident memory of the process)
    options      the sample.py options of the run

Networks (`--nets`): edm_cifar10 (EDM's DDPM++ CIFAR-10 size, in this project's EDM UNet), adm_imagenet64 (ADM
ImageNet-64, as Consistency Models publish it; unconditional here), adm_lsun256 (the LSUN/ADM 256 UNet of the
zoo's lsun_bedroom row), sd15_unet (the Stable Diffusion 1.5 UNet, on 4x64x64 latents with random 77x768 text
embeddings and classifier-free guidance: two evaluations per call; the VAE decoder is not run, so its images are
the latents' first three channels). `--tiny`: small configurations of the same architectures, for a CPU check in
seconds (tests/test_bench_gpu.py).

    python bench/gpu.py                       # on the GPU, < 5 minutes
    python bench/gpu.py --device=cpu --tiny   # seconds
    python bench/gpu.py --net_dtype=bfloat16 --channels_last --compile
"""

import resource
import shutil
import tempfile
import time

import click
import torch

import sample
import solvers
from models import adapters
from models.edm import EDMPrecond

#----------------------------------------------------------------------------
# The networks: (build(device) -> Denoiser, batch size users run), full and tiny.


class SDUNetDenoiser(torch.nn.Module):
    """A diffusers UNet2DConditionModel as an EDM-scaled Denoiser (eps prediction on VP-scaled latents, t from the
    VP time of sigma), with fixed random text embeddings and classifier-free guidance (both halves in one call)."""
    label_dim = 0
    sigma_min, sigma_max = 0.0291675, 14.6146
    img_channels = 4
    bottleneck = 'unet.mid_block'

    def __init__(self, unet, context_dim, guidance_rate=7.5):
        super().__init__()
        self.unet = unet
        self.img_resolution = unet.config.sample_size
        self.guidance_rate = guidance_rate
        self.register_buffer('context', torch.randn(2, 77, context_dim))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    @property
    def decoded_resolution(self):
        return self.img_resolution

    def decode(self, latents):  # no VAE: the first three latent channels stand for the image
        return latents[:, :3]

    def forward(self, x, sigma, **kwargs):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        t = (sigma / (1 + sigma)) * 999
        x_in = (x / (1 + sigma ** 2).sqrt().reshape(-1, 1, 1, 1)).to(torch.float32)
        context = self.context[:, None].expand(-1, x.shape[0], -1, -1).reshape(-1, *self.context.shape[1:])
        eps = self.unet(x_in.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=context).sample
        uncond, cond = eps.chunk(2)
        eps = uncond + self.guidance_rate * (cond - uncond)
        return x - sigma.reshape(-1, 1, 1, 1) * eps.to(x.dtype)


def _edm(tiny):
    if tiny:
        return EDMPrecond(8, 3, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
    return EDMPrecond(32, 3, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,))


def _adm(arch, tiny, resolution):
    if tiny:
        arch = dict(image_size=resolution, num_channels=32, num_res_blocks=1, channel_mult='1,2',
                    attention_resolutions=str(resolution // 2), num_head_channels=16, use_scale_shift_norm=True,
                    resblock_updown=True, class_cond=False, learn_sigma=False)
    return adapters.CMDenoiser(adapters.build_cm(arch))


ADM64 = dict(image_size=64, num_channels=192, num_res_blocks=3, channel_mult='1,2,3,4', attention_resolutions='32,16,8',
             num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True, dropout=0.0, class_cond=False,
             learn_sigma=False)


def _lsun256():
    from models.zoo import ZOO
    return dict(ZOO['lsun_bedroom'].arch['model'], use_fp16=False)


def _sd15(tiny):
    from diffusers import UNet2DConditionModel
    if tiny:
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
                                    norm_num_groups=8, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                                    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'))
        return SDUNetDenoiser(unet, 32)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8)
    return SDUNetDenoiser(unet, 768)


NETS = {  # name: (build(tiny), batch, tiny batch)
    'edm_cifar10': (_edm, 512, 8),
    'adm_imagenet64': (lambda tiny: _adm(ADM64, tiny, 16), 256, 8),
    'adm_lsun256': (lambda tiny: _adm(None if tiny else _lsun256(), tiny, 32), 32, 4),
    'sd15_unet': (_sd15, 16, 4),
}

#----------------------------------------------------------------------------


def num_steps_for(solver, nfe):
    """The num_steps that gives `solver` exactly `nfe` network calls."""
    for num_steps in range(2, 4 * nfe):
        if solvers.nfe(solver, num_steps) == nfe:
            return num_steps
    raise click.UsageError(f'{solver}: no num_steps gives {nfe} NFE')


def peak_mib(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def network_rate(net, batch, nfe, device, options, repeat=3):
    """batch / (NFE x one network call), the best of `repeat` runs of NFE calls."""
    call = sample.NetCall(net, **options)
    x = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    sigma = torch.full([batch], 1.0, device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with torch.no_grad():
        call(x, sigma)  # warm-up (cudnn autotuning, compilation)
        sync()
        best = float('inf')
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(nfe):
                call(x, sigma)
            sync()
            best = min(best, time.perf_counter() - start)
    return batch / best


def e2e_rate(net, batch, batches, solver, nfe, device, args):
    """Images per second of sample.py's command (the model replaced by `net`), its first batch excluded."""
    outdir = tempfile.mkdtemp(prefix='bench-gpu-')
    sample.load_net = lambda c, dev: net
    common = ['--dataset_name=digits', f'--solver={solver}', f'--num_steps={num_steps_for(solver, nfe)}',
              f'--batch={batch}', f'--net_batch={batch}', f'--device={device}', '--dtype=float32', *args]
    try:
        sample.main.main([*common, f'--seeds=0-{batch - 1}', f'--outdir={outdir}/warm'], standalone_mode=False)
        start = time.perf_counter()
        sample.main.main([*common, f'--seeds=0-{batch * batches - 1}', f'--outdir={outdir}/run'],
                         standalone_mode=False)
        return batch * batches / (time.perf_counter() - start)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def pixel_difference(net, batch, solver, nfe, device, net_dtype):
    """uint8 images of seeds 0..batch-1 with --net_dtype=net_dtype against float32: (max, mean) absolute difference
    in pixel levels, and the fraction of pixel values that differ."""
    images = []
    for dtype in ('float32', net_dtype):
        kwargs = dict(num_steps=num_steps_for(solver, nfe), max_batch_size=batch, net_batch=batch, device=device,
                      net_dtype=dtype)
        images.append(torch.cat([torch.as_tensor(sample.to_uint8(x)) for _, x in
                                 sample.generate_images(net, range(batch), solver, **kwargs)]).int())
    diff = (images[0] - images[1]).abs()
    return diff.max().item(), diff.float().mean().item(), (diff > 0).float().mean().item()


@click.command()
@click.option('--device', help='Device', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--tiny', is_flag=True, help='Small configurations (a CPU check in seconds)')
@click.option('--nets', help='Networks, comma-separated', default=','.join(NETS), show_default=True)
@click.option('--solvers', 'solver_names', help='Solvers, comma-separated', default='dpmpp,er_sde', show_default=True)
@click.option('--nfe', help='Network calls per image', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--batches', help='Batches timed end to end (after one warm-up batch)', type=click.IntRange(min=1),
              default=4, show_default=True)
@click.option('--net_dtype', type=click.Choice(list(sample.NET_DTYPES)), default='auto', show_default=True)
@click.option('--channels_last', is_flag=True)
@click.option('--compile', is_flag=True)
@click.option('--diff', is_flag=True, help='Instead: pixel difference of --net_dtype against float32 per network')
@torch.no_grad()  # not torch.set_grad_enabled(False): the tests call main in-process
def main(device, tiny, nets, solver_names, nfe, batches, net_dtype, channels_last, compile, diff):
    device = torch.device(device)
    options = dict(net_dtype=net_dtype, channels_last=channels_last, compile=compile)
    args = [f'--net_dtype={net_dtype}'] + ['--channels_last'] * channels_last + ['--compile'] * compile
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu, {torch.get_num_threads()} threads'
    print(f'{name}; torch {torch.__version__}; {nfe} NFE; net_dtype={net_dtype} channels_last={channels_last} '
          f'compile={compile}{" (tiny configurations)" if tiny else ""}', flush=True)
    print(f'{"network":15s} {"solver":7s} {"batch":>5s} {"params":>7s} {"e2e img/s":>10s} {"net img/s":>10s} '
          f'{"ratio":>6s} {"peak MiB":>9s}  options', flush=True)
    for net_name in nets.split(','):
        if net_name not in NETS:
            raise click.UsageError(f'--nets: unknown network {net_name!r}; choose from {", ".join(NETS)}')
        build, batch, tiny_batch = NETS[net_name]
        batch = tiny_batch if tiny else batch
        torch.manual_seed(0)
        with torch.device(device):
            net = build(tiny).eval().requires_grad_(False)
        params = sum(p.numel() for p in net.parameters()) / 1e6
        if diff:
            for solver in solver_names.split(','):
                if sample.own_precision(net) and device.type != 'cuda':
                    print(f'{net_name:15s} {solver:7s} its own precision switch works on CUDA only', flush=True)
                    continue
                high, mean, share = pixel_difference(net, batch, solver, nfe, device, net_dtype)
                print(f'{net_name:15s} {solver:7s} {net_dtype} vs float32: max {high} levels, mean {mean:.3f} '
                      f'levels, {share:.1%} of values differ ({batch} images)', flush=True)
            continue
        for solver in solver_names.split(','):
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            limit = network_rate(net, batch, nfe, device, options)
            rate = e2e_rate(net, batch, batches, solver, nfe, device, args)
            print(f'{net_name:15s} {solver:7s} {batch:5d} {params:6.1f}M {rate:10.1f} {limit:10.1f} '
                  f'{rate / limit:6.3f} {peak_mib(device):9.0f}  {" ".join(args)} --writers=2', flush=True)
        del net
        if device.type == 'cuda':
            torch.cuda.empty_cache()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

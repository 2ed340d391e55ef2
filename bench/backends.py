"""Cost of one denoiser call of the openai-UNet families at their published size, on random weights.

For each family (lsun_bedroom: CM UNet; imagenet256: ADM UNet, and with classifier guidance the classifier's
forward and backward on top; lsun_bedroom_ldm: LDM UNet on 64x64 latents, and the VQ-f4 decode to 256x256), prints
the wall time of one call at each batch size and the peak resident memory of the process that ran it (each
measurement in a fresh process, so the peak belongs to that call: weights + activations + the Python/torch base).

    OMP_NUM_THREADS=1 python bench/backends.py [--batch 1,8] [--repeat 2] [--device cpu]

On CUDA (--device cuda) it also reports images per second of a 5-NFE sample (dpmpp, num_steps 6) in float32 and
under float16/bfloat16 autocast, and the peak CUDA memory. Figures are of this machine and its load at the time;
docs/bench-backends.md records the ones measured for the docs.
"""

import json
import os
import resource
import subprocess
import sys
import time

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = ('cm', 'adm', 'adm+cg', 'ldm', 'ldm-decode')

#----------------------------------------------------------------------------


def build(case, amp_dtype):
    from models import adapters, zoo
    if case == 'cm':
        return adapters.CMDenoiser(adapters.build_cm(zoo.ZOO['lsun_bedroom'].arch['model']), amp_dtype=amp_dtype)
    if case.startswith('adm'):
        arch = zoo.ZOO['imagenet256'].arch
        classifier = adapters.build_classifier(dict(arch['classifier'])) if case == 'adm+cg' else None
        return adapters.ADMGuidedDenoiser(adapters.build_adm(arch['model']), classifier,
                                          guidance_rate=1.0 if classifier else 0.0, amp_dtype=amp_dtype)
    unet, vq, alphas_cumprod, scale = adapters.ldm_parts(zoo.ZOO['lsun_bedroom_ldm'].arch['model'])
    return adapters.LDMDenoiser(unet, vq, alphas_cumprod, scale_factor=scale, amp_dtype=amp_dtype)


def one(case, batch, repeat, device, warmup=1):
    """Time one call (best of `repeat`, after `warmup` untimed calls) in this process; returns a dict of figures."""
    torch.manual_seed(0)
    net = build(case, 'float16').eval().requires_grad_(False).to(device)
    shape = [batch, net.img_channels, net.img_resolution, net.img_resolution]
    x = torch.randn(shape, device=device)
    sigma = torch.full([batch], 2.0, device=device)
    labels = dict(class_labels=torch.arange(batch, device=device)) if net.label_dim else {}
    net.amp_dtype = None  # float32 for the call timing
    call = (lambda: net.decode(x)) if case == 'ldm-decode' else (lambda: net(x, sigma, **labels))
    best = float('inf')
    with torch.no_grad():
        for i in range(warmup + repeat):
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device.type == 'cuda':
                torch.cuda.synchronize()
            if i >= warmup:
                best = min(best, time.perf_counter() - start)
    out = dict(case=case, batch=batch, seconds=best, params=sum(p.numel() for p in net.parameters()),
               peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    if device.type == 'cuda' and case != 'ldm-decode':
        out.update(cuda_sampling(net, batch, labels))
    return out


def cuda_sampling(net, batch, labels):
    """Images per second of a 5-NFE dpmpp sample (num_steps 6) in float32 and under fp16/bf16 autocast."""
    import solvers
    sigmas = solvers.get_schedule(6, net.sigma_min, net.sigma_max, 'polynomial', 7)
    figures = {}
    for amp in (None, 'float16', 'bfloat16'):
        net.amp_dtype = amp
        x = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device='cuda')
        def run(x=x):
            return solvers.get_solver('dpmpp')(net, x * float(sigmas[0]), sigmas, extra_args=labels)
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = run()
        if hasattr(net, 'decode'):
            net.decode(out)
        torch.cuda.synchronize()
        figures[f'img_per_s_5nfe_{amp or "float32"}'] = batch / (time.perf_counter() - start)
        figures[f'peak_cuda_gib_{amp or "float32"}'] = torch.cuda.max_memory_allocated() / 2 ** 30
    return figures

#----------------------------------------------------------------------------


@click.command()
@click.option('--batch', help='Batch sizes', type=str, default='1,8', show_default=True)
@click.option('--cases', help=f'Which of {", ".join(CASES)}', type=str, default=','.join(CASES), show_default=True)
@click.option('--repeat', help='Timed calls (best is reported)', type=click.IntRange(min=1), default=2,
              show_default=True)
@click.option('--warmup', help='Untimed calls first', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--device', help='cpu or cuda', type=str, default='cpu', show_default=True)
@click.option('--worker', hidden=True, type=str, default=None)
def main(batch, cases, repeat, warmup, device, worker):
    if worker is not None:
        case, b = worker.split(':')
        print(json.dumps(one(case, int(b), repeat, torch.device(device), warmup)))
        return
    threads = os.environ.get('OMP_NUM_THREADS', str(torch.get_num_threads()))
    print(f'device {device}, {threads} thread(s), torch {torch.__version__}, float32 calls, best of {repeat} '
          f'after {warmup} warm-up')
    print(f'{"case":12s} {"params":>9s} {"batch":>5s} {"s/call":>8s} {"s/img":>7s} {"peak RSS":>9s}')
    for case in cases.split(','):
        for b in (int(v) for v in batch.split(',')):
            proc = subprocess.run([sys.executable, __file__, f'--worker={case}:{b}', f'--repeat={repeat}',
                                   f'--warmup={warmup}', f'--device={device}'], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f'{case:12s} batch {b}: failed ({proc.stderr.strip().splitlines()[-1]})')
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f'{case:12s} {r["params"] / 1e6:8.1f}M {b:5d} {r["seconds"]:8.2f} {r["seconds"] / b:7.2f} '
                  f'{r["peak_rss_gib"]:7.2f}GiB' + ''.join(f' {k}={v:.3g}' for k, v in r.items()
                                                            if k.startswith(('img_per_s', 'peak_cuda'))),
                  flush=True)


if __name__ == '__main__':
    main()

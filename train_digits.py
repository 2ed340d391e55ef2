"""Train the embedded default models of the project on the 8x8 digits: the EDM-preconditioned denoiser
(EDM loss, Karras et al. 2022), the rectified-flow model `digits_flow` (docs/flow.md), and the small CNN
classifiers whose features are the digits FID detector and the distillation's loss network.

    python train_digits.py denoiser --outdir=src/digits     # ~40 min on 2 CPU cores
    python train_digits.py flow --outdir=src/digits         # the rectified-flow model (digits_flow), ~9 min
    python train_digits.py detector --outdir=src/digits     # ~1 min
    python train_digits.py feature_net --outdir=src/digits  # ~1 min (the distillation's loss network)

All read the shipped dataset src/digits/digits-8x8.zip (written by dataset_tool.py) and write atomically.
"""

import copy
import json
import os
import time

import click
import numpy as np
import torch
import tqdm

import dataset_tool
from models import detectors
from models.edm import MODEL_NAME, EDMPrecond, count_params, save_model
from models.flow import FLOW_NAME, DigitsFlow
from torch_utils import cli

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'src', 'digits', 'digits-8x8.zip')

#----------------------------------------------------------------------------


def parse_int_list(s):
    if isinstance(s, (list, tuple)):
        return [int(v) for v in s]
    return [int(v) for v in s.split(',') if v.strip()]


def load_data(path):
    images, labels = dataset_tool.read_dataset(path)
    if labels is None:
        raise click.ClickException(f'{path}: the dataset has no labels')
    return torch.as_tensor(images), torch.as_tensor(labels)


@click.group()
def main():
    """Train the embedded digits denoiser, the digits flow model and the digits FID detector."""

#----------------------------------------------------------------------------
# EDM training loss: sigma ~ exp(N(P_mean, P_std^2)), weight
# lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.


def edm_loss(net, images, labels, generator, P_mean=-1.2, P_std=1.2):
    rnd_normal = torch.randn([images.shape[0], 1, 1, 1], generator=generator, device=images.device)
    sigma = (rnd_normal * P_std + P_mean).exp()
    weight = (sigma ** 2 + net.sigma_data ** 2) / (sigma * net.sigma_data) ** 2
    n = torch.randn(images.shape, generator=generator, device=images.device) * sigma
    D_yn = net(images + n, sigma.flatten(), class_labels=labels)
    return weight * (D_yn - images) ** 2


def network_options(fn):
    """The options of the two generative digits models (the EDM denoiser and the flow model): data, schedule of
    the training, network."""
    options = [
        click.option('--data', help='Dataset zip or folder', metavar='PATH', default=DEFAULT_DATA, show_default=True),
        click.option('--outdir', help='Where to write the model (.safetensors + .json)', metavar='DIR', required=True),
        click.option('--seed', help='Random seed', type=int, default=0, show_default=True),
        click.option('--batch', help='Batch size', type=click.IntRange(min=1), default=128, show_default=True),
        click.option('--lr', help='Adam learning rate', type=cli.Finite(min=0, min_open=True), default=2e-3,
                     show_default=True),
        click.option('--lr_rampup_kimg', help='Linear learning-rate warm-up', type=cli.Finite(min=0),
                     default=20, show_default=True),
        click.option('--lr_decay_frac', help='Final fraction of training with linear decay to 0',
                     type=cli.Finite(min=0, max=1), default=0.3, show_default=True),
        click.option('--ema_halflife_kimg', help='EMA half-life', type=cli.Finite(min=0), default=20,
                     show_default=True),
        click.option('--ema_rampup', help='EMA ramp-up ratio', type=cli.Finite(min=0), default=0.1,
                     show_default=True),
        click.option('--channels', help='U-Net base channels', type=click.IntRange(min=8), default=32,
                     show_default=True),
        click.option('--channel_mult', help='Channel multipliers per resolution', default='1,2,2', show_default=True),
        click.option('--num_blocks', help='Residual blocks per resolution', type=click.IntRange(min=1), default=1,
                     show_default=True),
        click.option('--attn', help='Resolutions with self-attention', default='4', show_default=True),
        click.option('--dropout', help='Dropout probability', type=cli.Finite(min=0, max=1), default=0.0,
                     show_default=True),
        click.option('--cond', help='Train class-conditional', is_flag=True),
        click.option('--threads', help='torch CPU threads (1 is fastest on a shared machine)',
                     type=click.IntRange(min=1), default=1, show_default=True),
        click.option('--snap_kimg', help='Save the EMA network every this many kimg', type=cli.Finite(min=0),
                     default=50, show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def train_generative(opts, make_net, loss_fn, command, loss_name, name):
    """Train `make_net(images, label_dim)` with `loss_fn(net, images, onehot, generator)` (per-element losses) and
    write the EMA network as <outdir>/<name>.{safetensors,json} (snapshots every snap_kimg, then the final one)."""
    torch.set_num_threads(opts['threads'])
    torch.manual_seed(opts['seed'])
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    images, labels = load_data(opts['data'])
    images = (images.to(device, torch.float32) / 127.5 - 1)
    onehot = torch.nn.functional.one_hot(labels, 10).to(device, torch.float32) if opts['cond'] else None

    net = make_net(images, 10 if opts['cond'] else 0).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=opts['lr'], betas=(0.9, 0.999), eps=1e-8)
    generator = torch.Generator(device).manual_seed(opts['seed'])
    total_steps = int(np.ceil(opts['kimg'] * 1000 / opts['batch']))
    print(f'Training {count_params(net)} parameters on {len(images)} images for {total_steps} steps of '
          f'{opts["batch"]} ({opts["kimg"]:g} kimg) on {device}')

    def save(cur_nimg, wall, loss_curve):
        training_options = dict(opts, command=command, device=str(device), cur_kimg=cur_nimg / 1000,
                                wall_time_s=round(wall, 1), final_loss=loss_curve[-1][1] if loss_curve else None,
                                loss_curve=loss_curve, loss=loss_name)
        save_model(ema, opts['outdir'], name=name, training_options=training_options)

    start = time.time()
    order = torch.empty(0, dtype=torch.int64)
    loss_curve, loss_acc, loss_n = [], 0.0, 0
    snap_steps = max(int(opts['snap_kimg'] * 1000 / opts['batch']), 1) if opts['snap_kimg'] else None
    curve_steps = max(total_steps // 100, 1)
    bar = tqdm.tqdm(range(total_steps), unit='step', mininterval=10)
    for step in bar:
        # Next minibatch: a fresh permutation of the dataset per epoch.
        if len(order) < opts['batch']:
            order = torch.cat([order, torch.randperm(len(images), generator=torch.Generator().manual_seed(
                opts['seed'] * 100003 + step))])
        idx, order = order[:opts['batch']], order[opts['batch']:]
        idx = idx.to(device)

        # Learning rate: linear warm-up, constant, linear decay at the end.
        cur_nimg = step * opts['batch']
        lr = opts['lr'] * min(cur_nimg / max(opts['lr_rampup_kimg'] * 1000, 1e-8), 1)
        decay_start = total_steps * (1 - opts['lr_decay_frac'])
        if step >= decay_start:
            lr *= (total_steps - step) / (total_steps - decay_start)
        for g in optimizer.param_groups:
            g['lr'] = lr

        loss = loss_fn(net, images[idx], onehot[idx] if onehot is not None else None, generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        optimizer.step()

        # EMA with EDM's half-life and ramp-up.
        cur_nimg += opts['batch']
        ema_nimg = min(opts['ema_halflife_kimg'] * 1000, cur_nimg * opts['ema_rampup'])
        beta = 0.5 ** (opts['batch'] / max(ema_nimg, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))

        loss_acc, loss_n = loss_acc + loss.item(), loss_n + 1
        if (step + 1) % curve_steps == 0 or step + 1 == total_steps:
            loss_curve.append([round(cur_nimg / 1000, 3), round(loss_acc / loss_n, 5)])
            bar.set_postfix(kimg=f'{cur_nimg / 1000:.0f}', loss=f'{loss_curve[-1][1]:.4f}', lr=f'{lr:.2e}')
            bar.write(f'kimg {cur_nimg / 1000:8.1f}  loss {loss_curve[-1][1]:.5f}  lr {lr:.2e}  '
                      f'elapsed {time.time() - start:7.0f}s')
            loss_acc, loss_n = 0.0, 0
        if snap_steps is not None and (step + 1) % snap_steps == 0 and step + 1 < total_steps:
            save(cur_nimg, time.time() - start, loss_curve)
    save(total_steps * opts['batch'], time.time() - start, loss_curve)
    print(f'Saved {opts["outdir"]} after {time.time() - start:.0f} s, final loss {loss_curve[-1][1]:.5f}')


def unet_kwargs(opts):
    return dict(model_channels=opts['channels'], channel_mult=parse_int_list(opts['channel_mult']),
                num_blocks=opts['num_blocks'], attn_resolutions=parse_int_list(opts['attn']), dropout=opts['dropout'])


@main.command()
@network_options
@click.option('--kimg', help='Training duration in thousands of images', type=cli.Finite(min=0, min_open=True),
              default=400, show_default=True)
def denoiser(**opts):
    """Train the EDM-preconditioned digits denoiser (model.safetensors + model.json)."""
    opts = dict(opts)
    train_generative(opts, lambda images, label_dim: EDMPrecond(
        img_resolution=images.shape[-1], img_channels=images.shape[1], label_dim=label_dim, **unet_kwargs(opts)),
        edm_loss, 'python train_digits.py denoiser', 'EDM (P_mean -1.2, P_std 1.2, sigma_data 0.5)', MODEL_NAME)

#----------------------------------------------------------------------------
# Rectified flow (flow matching): x_t = (1 - t) x_0 + t n with t ~ logit-normal(m, s) (SD3's sampling of t), the
# network predicts the velocity v = n - x_0, plain MSE (docs/flow.md).


def flow_loss(net, images, labels, generator, logit_mean=0.0, logit_std=1.0):
    u = torch.randn([images.shape[0]], generator=generator, device=images.device) * logit_std + logit_mean
    t = torch.sigmoid(u).clamp(net.t_min, net.t_max)
    n = torch.randn(images.shape, generator=generator, device=images.device)
    tb = t.reshape(-1, 1, 1, 1)
    v = net.velocity((1 - tb) * images + tb * n, t, class_labels=labels)
    return (v - (n - images)) ** 2


@main.command()
@network_options
@click.option('--kimg', help='Training duration in thousands of images', type=cli.Finite(min=0, min_open=True),
              default=200, show_default=True)
@click.option('--logit_mean', help='Mean of logit(t) (SD3: 0)', type=cli.Finite(), default=0.0, show_default=True)
@click.option('--logit_std', help='Std of logit(t) (SD3: 1)', type=cli.Finite(min=0), default=1.0,
              show_default=True)
def flow(**opts):
    """Train the digits rectified-flow model (velocity prediction; flow.safetensors + flow.json)."""
    opts = dict(opts)
    train_generative(opts, lambda images, label_dim: DigitsFlow(
        img_resolution=images.shape[-1], img_channels=images.shape[1], label_dim=label_dim, **unet_kwargs(opts)),
        lambda net, images, labels, generator: flow_loss(net, images, labels, generator, opts['logit_mean'],
                                                         opts['logit_std']),
        'python train_digits.py flow', f'rectified flow, velocity MSE (logit(t) ~ N({opts["logit_mean"]:g}, '
        f'{opts["logit_std"]:g}^2))', FLOW_NAME)

#----------------------------------------------------------------------------
# Digits classifier for the FID detector: train on a held-out split to report
# its accuracy, then (by default) retrain on all images and save it.


def train_classifier(net, images, labels, steps, batch, lr, seed):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for step in range(steps):
        idx = torch.randint(len(images), [batch], generator=generator)
        x = images[idx].float()
        # Augmentation: random integer shifts by up to one pixel (never flips: digits are not symmetric).
        shift = torch.randint(-1, 2, [2], generator=generator).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = torch.nn.functional.cross_entropy(net.classify(x), labels[idx])
        for g in optimizer.param_groups:
            g['lr'] = lr * (1 - step / steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


def accuracy(net, images, labels):
    with torch.no_grad():
        return float((net.classify(images.float()).argmax(1) == labels).float().mean())


def classifier_options(files, seed, seed_help):
    """The options shared by the two digits classifiers (the FID detector and the loss network)."""
    def decorate(fn):
        options = [
            click.option('--data', help='Dataset zip or folder', metavar='PATH', default=DEFAULT_DATA,
                         show_default=True),
            click.option('--outdir', help=f'Where to write {files}', metavar='DIR', required=True),
            click.option('--seed', help=seed_help, type=int, default=seed, show_default=True),
            click.option('--num_test', help='Held-out images for the accuracy check', type=click.IntRange(min=1),
                         default=297, show_default=True),
            click.option('--steps', help='Adam steps', type=click.IntRange(min=1), default=3000, show_default=True),
            click.option('--batch', help='Batch size', type=click.IntRange(min=1), default=128, show_default=True),
            click.option('--lr', help='Adam learning rate (linear decay to 0)', type=cli.Finite(), default=2e-3,
                         show_default=True),
            click.option('--threads', help='torch CPU threads (1 is fastest on a shared machine)',
                         type=click.IntRange(min=1), default=1, show_default=True),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def train_heldout(cls, data, seed, num_test, steps, batch, lr, threads):
    """Train cls() on all but `num_test` images (a seeded split); returns the data, the net and its accuracies."""
    torch.set_num_threads(threads)
    images, labels = load_data(data)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:num_test], perm[num_test:]
    torch.manual_seed(seed)
    net = train_classifier(cls(), images[train], labels[train], steps, batch, lr, seed)
    train_acc, test_acc = accuracy(net, images[train], labels[train]), accuracy(net, images[test], labels[test])
    print(f'Held-out split: {len(train)} train / {len(test)} test images: train accuracy {train_acc:.4f}, '
          f'test accuracy {test_acc:.4f}')
    return images, labels, net, train_acc, test_acc


@main.command()
@classifier_options('detector.safetensors + detector.json', 0, 'Random seed')
def detector(data, outdir, seed, num_test, steps, batch, lr, threads):
    """Train the digits classifier whose penultimate features are the digits FID detector."""
    start = time.time()
    images, labels, _, train_acc, test_acc = train_heldout(detectors.DigitsClassifier, data, seed, num_test, steps,
                                                           batch, lr, threads)
    torch.manual_seed(seed)
    net = train_classifier(detectors.DigitsClassifier(), images, labels, steps, batch, lr, seed)
    all_acc = accuracy(net, images, labels)
    print(f'Retrained on all {len(images)} images: accuracy {all_acc:.4f}')
    options = dict(command='python train_digits.py detector', data=os.path.basename(data), seed=seed,
                   num_test=num_test, steps=steps, batch=batch, lr=lr, heldout_train_accuracy=train_acc,
                   heldout_test_accuracy=test_acc, final_train_accuracy=all_acc,
                   wall_time_s=round(time.time() - start, 1))
    detectors.save_digits_net(net, outdir, training_options=options)
    print(f'Saved {os.path.join(outdir, detectors.DIGITS_WEIGHTS)}')
    print(json.dumps(options))


@main.command('feature_net')
@classifier_options('feature_net.safetensors + feature_net.json', 1, 'Random seed (the detector uses 0)')
def feature_net(data, outdir, seed, num_test, steps, batch, lr, threads):
    """Train the digits loss network of the distillation (another architecture, split and seed than the FID
    detector, so that FID with the detector stays an independent judge of what was trained against this one).
    The held-out images are never trained on: the network shipped is the one of the split."""
    start = time.time()
    _, _, net, train_acc, test_acc = train_heldout(detectors.DigitsLossNet, data, seed, num_test, steps, batch, lr,
                                                   threads)
    options = dict(command='python train_digits.py feature_net', data=os.path.basename(data), seed=seed,
                   num_test=num_test, steps=steps, batch=batch, lr=lr, train_accuracy=train_acc,
                   heldout_accuracy=test_acc, wall_time_s=round(time.time() - start, 1))
    detectors.save_digits_net(net, outdir, training_options=options)
    print(f'Saved {os.path.join(outdir, detectors.LOSS_NET_WEIGHTS)}')
    print(json.dumps(options))

#----------------------------------------------------------------------------


if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

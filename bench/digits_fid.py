"""Quality of the embedded digits model: FID (digits detector) of Heun samples at 40 NFE against the reference
statistics of all 1797 training images, next to the floor: the FID of a random half of the training images
against the same statistics. The model should be within 3x of that floor.

    python bench/digits_fid.py [--num 10000] [--grid docs/digits-samples.png] [--make_ref]

--make_ref (or a missing src/digits/fid-ref.npz) writes the reference statistics first.
"""

import os
import time

import click
import numpy as np
import PIL.Image
import torch

import dataset_tool
import fid
from models import load_model
from models.detectors import get_detector
from models.zoo import ZOO, detector_for
from sample import generate_images
from torch_utils.misc import to_pixels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'src', 'digits', 'digits-8x8.zip')
REF = ZOO['digits'].fid_ref

#----------------------------------------------------------------------------


def to_uint8(x):
    """EDM's conversion of [-1, 1] images to uint8 NCHW (to_pixels, truncated)."""
    return to_pixels(x).to(torch.uint8)


def save_grid(images, path, cols=20, scale=6, pad=1):
    """uint8 [N, 1, H, W] -> one PNG grid (gray lines between images), each image enlarged `scale` times."""
    images = images[: (len(images) // cols) * cols].cpu().numpy()[:, 0]
    images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)), constant_values=96)
    n, h, w = images.shape
    grid = images.reshape(n // cols, cols, h, w).transpose(0, 2, 1, 3).reshape(n // cols * h, cols * w)
    PIL.Image.fromarray(grid, 'L').save(path)


@click.command()
@click.option('--num', help='Number of samples', type=click.IntRange(min=2), default=10000, show_default=True)
@click.option('--num_steps', help='Heun time points (NFE = 2 (num_steps - 1))', type=click.IntRange(min=2),
              default=21, show_default=True)
@click.option('--batch', help='Samples per batch', type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--model', help='Model (zoo name or directory)', default='digits', show_default=True)
@click.option('--grid', help='Write the first 200 samples as a PNG grid', type=str, default=None)
@click.option('--make_ref', help='(Re)write the reference statistics', is_flag=True)
@click.option('--floor_seeds', help='Random halves averaged for the floor', type=click.IntRange(min=1), default=5,
              show_default=True)
def main(num, num_steps, batch, model, grid, make_ref, floor_seeds):
    torch.set_num_threads(1)
    detector = get_detector(detector_for('digits'), 'cpu')
    images, _labels = dataset_tool.read_dataset(DATA)
    images = torch.as_tensor(images)
    if make_ref or not os.path.isfile(REF):
        mu, sigma = fid.compute_image_stats(images, detector)
        fid.save_stats(REF, mu, sigma, detector=detector.name)
        print(f'Wrote {REF} ({len(images)} images, detector {detector.name})')
    ref = fid.load_stats(REF)
    fid.check_compatible(ref, detector)

    def fid_of(x):
        mu, sigma = fid.compute_image_stats(x, detector, batch=1000)
        return fid.frechet_distance(mu, sigma, ref['mu'], ref['sigma'])

    # Floor: random halves of the training images.
    floors = []
    for seed in range(floor_seeds):
        idx = np.sort(np.random.RandomState(seed).permutation(len(images))[: len(images) // 2])
        floors.append(fid_of(images[idx]))
    print(f'Floor: FID of a random half ({len(images) // 2} images) of the training set: seed 0 {floors[0]:.4f}, '
          f'mean over {floor_seeds} halves {np.mean(floors):.4f} (min {min(floors):.4f}, max {max(floors):.4f})')

    start = time.time()
    net = load_model(model)
    load_time = time.time() - start
    start = time.time()
    chunks = [x for _, x in generate_images(net, range(num), 'heun', {}, num_steps=num_steps, max_batch_size=batch,
                                            net_batch=batch)]
    samples = to_uint8(torch.cat(chunks))
    sample_time = time.time() - start
    if grid is not None:
        save_grid(samples[:200], grid)
        print(f'Wrote {grid}')
    value = fid_of(samples)
    print(f'Model {model}: load {load_time:.2f} s; {num} Heun samples at {2 * (num_steps - 1)} NFE in '
          f'{sample_time:.0f} s')
    print(f'FID {value:.4f}   floor (seed 0) {floors[0]:.4f}   ratio {value / floors[0]:.2f}   '
          f'(mean floor {np.mean(floors):.4f}, ratio {value / np.mean(floors):.2f})')

#----------------------------------------------------------------------------


if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

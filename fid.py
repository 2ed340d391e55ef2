"""Frechet distance (FID) between a set of images and reference statistics, compatible with EDM's fid.py.

Features come from a detector (models.detectors: 'inception' as in EDM, 'digits' for the embedded 8x8 model).
Statistics are the mean and the unbiased covariance of the features, accumulated in float64 across processes.
Also a library: frechet_distance(), FeatureStats, compute_image_stats(), load_stats(), save_stats().
"""

# ruff: noqa: E402 -- torch_utils.cli comes first: the thread policy must be set before torch loads OpenMP.
from torch_utils import cli

cli.apply_thread_policy()
cli.apply_memory_policy()

import functools
import os
import zipfile

import click
import numpy as np
import scipy.linalg
import torch
import tqdm

import dnnlib
from dataset_tool import DatasetError, ImageFolder, shape_str
from models.zoo import ZOO, detector_for
from torch_utils import distributed as dist
from torch_utils.misc import atomic_write


class FIDInputError(ValueError):
    """Bad input (images, statistics, detector); the CLI prints its message as one line."""

#----------------------------------------------------------------------------
# Frechet distance between two Gaussians.


def frechet_distance(mu, sigma, mu_ref, sigma_ref):
    """||mu - mu_ref||^2 + Tr(sigma + sigma_ref - 2 sqrtm(sigma sigma_ref)), in float64 (EDM fid.py)."""
    mu, mu_ref = np.asarray(mu, dtype=np.float64), np.asarray(mu_ref, dtype=np.float64)
    sigma, sigma_ref = np.asarray(sigma, dtype=np.float64), np.asarray(sigma_ref, dtype=np.float64)
    if mu.shape != mu_ref.shape or sigma.shape != sigma_ref.shape or sigma.shape != mu.shape * 2:
        raise FIDInputError(f'Statistics of different shapes: mu {mu.shape}, sigma {sigma.shape} '
            f'vs. mu {mu_ref.shape}, sigma {sigma_ref.shape}')
    for name, value in (('mu', mu), ('sigma', sigma), ('reference mu', mu_ref), ('reference sigma', sigma_ref)):
        if not np.isfinite(value).all():
            raise FIDInputError(f'Statistics with non-finite values: {name} holds nan or inf')
    m = np.square(mu - mu_ref).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma, sigma_ref))
    if isinstance(s, tuple): # SciPy < 1.16 with disp=False returned (sqrtm, errest).
        s = s[0]
    fid = m + np.trace(sigma + sigma_ref - s * 2)
    return float(np.real(fid))

#----------------------------------------------------------------------------
# Kernel Inception Distance (Binkowski et al. 2018): the unbiased estimate of
# MMD^2 with the polynomial kernel k(a, b) = (a.b / D + 1)^3, averaged over
# `num_subsets` random subsets of m = min(N, N_ref, max_subset_size) rows each
# (the subset scheme of the StyleGAN metrics). Unlike FID it is unbiased in N,
# so small sample sets compare fairly; it can be slightly negative.


def kernel_distance(features, ref_features, num_subsets=100, max_subset_size=1000, seed=0):
    """KID of features [N, D] against ref_features [N_ref, D] (any feature network), in float64."""
    x_all, y_all = np.asarray(features, dtype=np.float64), np.asarray(ref_features, dtype=np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise FIDInputError(f'features of different shapes: {x_all.shape} vs. {y_all.shape}')
    d = x_all.shape[1]
    m = min(len(x_all), len(y_all), max_subset_size)
    if m < 2:
        raise FIDInputError('KID needs at least 2 feature vectors on each side')
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        total += within - 2 * k_xy.mean()
    return float(total / num_subsets)

#----------------------------------------------------------------------------
# Streaming feature statistics: float64 sums of f and f^T f, summed over processes.


class FeatureStats:
    """Accumulates the mean and the unbiased covariance of feature vectors [N, feature_dim]."""

    def __init__(self, feature_dim, device='cpu'):
        self.feature_dim = feature_dim
        self.num = 0
        self.sum = torch.zeros([feature_dim], dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros([feature_dim, feature_dim], dtype=torch.float64, device=device)

    def append(self, features):
        features = torch.as_tensor(features).to(device=self.sum.device, dtype=torch.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise FIDInputError(f'Expected features of shape [N, {self.feature_dim}], got {list(features.shape)}')
        self.num += features.shape[0]
        self.sum += features.sum(0)
        self.sum_sq += features.T @ features

    def get(self, all_reduce=True):
        """(mu, sigma) as float64 NumPy arrays; with `all_reduce`, over the features of all processes."""
        num = torch.as_tensor(float(self.num), dtype=torch.float64, device=self.sum.device)
        mu, sigma = self.sum.clone(), self.sum_sq.clone()
        if all_reduce:
            for t in [num, mu, sigma]:
                dist.all_reduce(t)
        num = int(num)
        if num < 2:
            raise FIDInputError(f'Statistics need at least 2 images, got {num}')
        mu /= num
        sigma -= mu.outer(mu) * num
        sigma /= num - 1
        return mu.cpu().numpy(), sigma.cpu().numpy()


def feature_stats(features):
    """(mu, sigma) of a local [N, D] feature array, float64, unbiased covariance (no reduction over processes)."""
    features = torch.as_tensor(features)
    stats = FeatureStats(features.shape[-1], features.device)
    stats.append(features)
    return stats.get(all_reduce=False)

#----------------------------------------------------------------------------
# Reference statistics files: np.savez with mu, sigma and, for this project's own files, the detector name.
# A zoo name (--ref=cifar10) stands for the fid_ref of its row in models/zoo.py, which also knows the shape of
# the images behind it.

REF_NAMES = [name for name, entry in ZOO.items() if entry.fid_ref is not None]


def ref_location(ref):
    """The path or URL of reference statistics given as a path, a URL or a zoo name (its row's fid_ref)."""
    entry = ZOO.get(ref)
    return entry.fid_ref if entry is not None and entry.fid_ref is not None else ref


def published_image_shape(url):
    """[C, H, W] of the images behind statistics the model zoo lists (EDM's published files, the digits
    reference), which do not record it themselves; None for any other file."""
    for entry in ZOO.values():
        if entry.ref_image_shape is None:
            continue
        same = entry.fid_ref == url or (os.path.isfile(url) and os.path.isfile(entry.fid_ref)
                                        and os.path.samefile(url, entry.fid_ref))
        if same:
            return entry.ref_image_shape
    return None


def load_stats(ref):
    """Statistics from a .npz path, URL or zoo name (REF_NAMES) -> dict(mu, sigma, detector or None, image_shape
    [C, H, W] or None)."""
    url = ref_location(ref)
    if not dnnlib.util.is_url(url, allow_file_urls=True) and not os.path.isfile(url):
        unlisted = f' (zoo model {ref!r} has no FID statistics; listed: {", ".join(REF_NAMES)})' if ref in ZOO else ''
        raise FIDInputError(f'Reference statistics not found: {ref}{unlisted}')
    # Read only the arrays needed: some published files (ADM reference batches) also hold images. Anything but a
    # zip is refused before NumPy sees it (NumPy's own message advises unpickling the file).
    try:
        with dnnlib.util.open_url(url, verbose=(dist.get_rank() == 0)) as f:
            if f.read(4) != b'PK\x03\x04':
                raise FIDInputError(f'Reference statistics {ref} are not an .npz file')
            f.seek(0)
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise FIDInputError(f'Reference statistics {ref} are not an .npz file')
            with data:
                keys = list(data.files)
                if 'mu' not in keys or 'sigma' not in keys:
                    raise FIDInputError(f'Reference statistics {ref} lack "mu" and "sigma" (keys: {", ".join(keys)})')
                mu, sigma = data['mu'].astype(np.float64), data['sigma'].astype(np.float64)
                detector = str(data['detector']) if 'detector' in keys else None
                image_shape = tuple(int(n) for n in data['image_shape']) if 'image_shape' in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, FIDInputError):
            raise
        raise FIDInputError(f'Cannot read reference statistics {ref}: {cli.one_line(err)}') from err
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise FIDInputError(f'Reference statistics {ref} have mismatched shapes: mu {mu.shape}, sigma {sigma.shape}')
    if image_shape is None:
        image_shape = published_image_shape(url)
    return dict(mu=mu, sigma=sigma, detector=detector, image_shape=image_shape)


def save_stats(path, mu, sigma, detector=None, image_shape=None):
    """Write mu, sigma (and the detector name, the [C, H, W] of the images) to `path` through a temporary file and
    an atomic rename."""
    arrays = dict(mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
    if detector is not None:
        arrays['detector'] = np.array(str(detector))
    if image_shape is not None:
        arrays['image_shape'] = np.array([int(n) for n in image_shape], dtype=np.int64)

    def write(tmp):
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)
    atomic_write(path, write)

#----------------------------------------------------------------------------
# Detectors.


def default_detector_name(image_shape, ref=None):
    """The detector recorded in `ref`; else Inception for 2048-d statistics (EDM's, which record none); else the
    zoo's detector of images of `image_shape` (models.zoo.detector_for: digits for 1x8x8, else Inception)."""
    if ref is not None and ref['detector'] is not None:
        return ref['detector']
    if ref is not None and ref['mu'].shape[0] == 2048:
        return 'inception'
    return detector_for(image_shape=image_shape)


def load_detector(name, device):
    """models.detectors.get_detector(name, device); a dotted name 'module.factory' calls factory(device=device)."""
    try:
        if '.' in name:
            return dnnlib.util.get_obj_by_name(name)(device=device)
        from models.detectors import get_detector
        return get_detector(name, device)
    except ImportError as err:
        raise FIDInputError(f'Unknown detector "{name}": {cli.one_line(err)}') from err
    except (ValueError, OSError, RuntimeError) as err:
        raise FIDInputError(f'Cannot load detector "{name}": {cli.one_line(err)}') from err


def check_image_shape(ref, image_shape, images_name='The images', ref_name='the reference statistics'):
    """Reject images of another resolution or channel count than the images the statistics were made from."""
    if ref.get('image_shape') is not None and tuple(image_shape) != tuple(ref['image_shape']):
        raise FIDInputError(f'{images_name} are {shape_str(image_shape)}, but {ref_name} are of '
                            f'{shape_str(ref["image_shape"])} images')


def check_compatible(ref, detector, ref_name='the reference statistics'):
    """Reject statistics made with another detector or of another feature dimension."""
    if ref['detector'] is not None and ref['detector'] != detector.name:
        raise FIDInputError(f'{ref_name} were made with detector "{ref["detector"]}", not "{detector.name}"')
    if ref['mu'].shape[0] != detector.feature_dim:
        raise FIDInputError(f'{ref_name} have {ref["mu"].shape[0]} features, but detector "{detector.name}" '
            f'gives {detector.feature_dim}')

#----------------------------------------------------------------------------
# Statistics of images: a folder/zip split over processes, or an in-memory batch.


def rank_batches(num_items, max_batch, rank=None, world_size=None):
    """EDM's split: the same number of batches on every rank (some may be empty), rank r takes every world-th."""
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    num_batches = ((num_items - 1) // (max_batch * world_size) + 1) * world_size
    return torch.arange(num_items).tensor_split(num_batches)[rank :: world_size]


def _detector_device(detector, default):
    return torch.device(getattr(detector, 'device', default))


def _features(detector, images):
    # A detector rejects images it cannot take (e.g. the wrong channel count) with a ValueError.
    try:
        return detector(images)
    except FIDInputError:
        raise
    except ValueError as err:
        raise FIDInputError(f'Detector "{detector.name}" cannot take these images: {cli.one_line(err)}') from err


def compute_dataset_stats(dataset, detector, max_batch=64, device=None):
    """(mu, sigma) of the detector features of `dataset` (ImageFolder), split over all processes."""
    device = _detector_device(detector, dist.device() if device is None else device)
    stats = FeatureStats(detector.feature_dim, device)
    for idx in tqdm.tqdm(rank_batches(len(dataset), max_batch), unit='batch', disable=(dist.get_rank() != 0)):
        if len(idx) == 0:
            continue
        images = torch.from_numpy(np.stack([dataset[int(i)] for i in idx])).to(device)
        stats.append(_features(detector, images))
    return stats.get(all_reduce=True)


def compute_image_stats(images, detector, batch=64, all_reduce=False):
    """(mu, sigma) of the detector features of an image tensor [N, C, H, W] (uint8 or float, 0..255).

    With `all_reduce`, every process passes its own images and gets the statistics of all of them.
    """
    device = _detector_device(detector, images.device)
    stats = FeatureStats(detector.feature_dim, device)
    for start in range(0, images.shape[0], batch):
        stats.append(_features(detector, images[start : start + batch].to(device)))
    return stats.get(all_reduce=all_reduce)


def fid_from_images(images, ref, detector=None, batch=64):
    """FID of an in-memory image tensor [N, C, H, W] (0..255) against stats (path, URL, name or a loaded dict).

    `detector` is a detector object or name; by default the one recorded in the statistics.
    """
    if not isinstance(ref, dict):
        ref = load_stats(ref)
    check_image_shape(ref, images.shape[1:])
    if detector is None or isinstance(detector, str):
        name = detector or default_detector_name(images.shape[1:], ref)
        detector = load_detector(name, images.device)
    check_compatible(ref, detector)
    mu, sigma = compute_image_stats(images, detector, batch=batch)
    return frechet_distance(mu, sigma, ref['mu'], ref['sigma'])

#----------------------------------------------------------------------------
# Small helpers.


def _click_errors(fn):
    """Turn FIDInputError and DatasetError (image folders) into a one-line click error."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FIDInputError, DatasetError) as err:
            raise click.ClickException(str(err)) from err
    return wrapper

#----------------------------------------------------------------------------


@click.group()
def main():
    """Calculate Frechet Inception Distance (FID).

    Examples:

    \b
    # Generate 50000 images and save them as fid-tmp/*/*.png
    torchrun --standalone --nproc_per_node=1 sample.py --outdir=fid-tmp --seeds=0-49999 --subdirs ...

    \b
    # Calculate FID against the EDM reference statistics of CIFAR-10
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=fid-tmp --ref=cifar10

    \b
    # Compute dataset reference statistics
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz
    """

#----------------------------------------------------------------------------


@main.command()
@click.option('--images', 'image_path', help='Path to the images', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help=f'Reference statistics, or {"|".join(REF_NAMES)}', metavar='NPZ|URL',
              type=str, required=True)
@click.option('--num', '--num_images', 'num_expected', metavar='INT', type=click.IntRange(min=2), default=None,
              help='Number of images to use (under torchrun write --num_images: torchrun takes --num for its '
                   '--numa-binding)  [default: all]')
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0,
              show_default=True)
@click.option('--batch', help='Maximum batch size per process', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@click.option('--detector', help='Feature detector  [default: the one recorded in the statistics]', metavar='NAME',
              type=str, default=None)
@_click_errors
def calc(image_path, ref_path, num_expected, seed, batch, detector):
    """Calculate FID for a given set of images."""
    dist.init()

    # Rank 0 loads (and downloads) the statistics first.
    dist.print0(f'Loading dataset reference statistics from "{ref_path}"...')
    with dist.rank0_first():
        ref = load_stats(ref_path)

    dist.print0(f'Loading images from "{image_path}"...')
    dataset = ImageFolder(image_path, max_size=num_expected, random_seed=seed)
    if num_expected is not None and len(dataset) < num_expected:
        raise FIDInputError(f'Found {len(dataset)} images in {image_path}, but expected at least {num_expected}')
    if len(dataset) < 2:
        raise FIDInputError(f'Found {len(dataset)} image in {image_path}, but need at least 2')
    check_image_shape(ref, dataset.image_shape, images_name=f'The images in {image_path}',
                      ref_name=f'reference statistics {ref_path}')

    detector_name = detector or default_detector_name(dataset.image_shape, ref)
    with dist.rank0_first():  # rank 0 downloads the detector into the cache, the others then find it there
        det = load_detector(detector_name, dist.device())
    check_compatible(ref, det, ref_name=f'Reference statistics {ref_path}')

    dist.print0(f'Calculating statistics for {len(dataset)} images with detector "{det.name}"...')
    mu, sigma = compute_dataset_stats(dataset, det, max_batch=batch)
    dist.print0('Calculating FID...')
    if dist.get_rank() == 0:
        fid = frechet_distance(mu, sigma, ref['mu'], ref['sigma'])
        print(f'{fid:g}')
    dist.barrier()

#----------------------------------------------------------------------------


#----------------------------------------------------------------------------
# A judge without a feature network: how far each image lies from the image
# that a converged sampler made from the same seed (matched by file name).


def rmse_to_reference(images, reference):
    """Mean over images of the per-image RMSE in [0, 1] pixel units; both [N, C, H, W], uint8 or floats in
    0..255, row i of one belonging to row i of the other."""
    if images.shape != reference.shape:
        raise FIDInputError(f'cannot compare {shape_str(images.shape[1:])} images with '
                            f'{shape_str(reference.shape[1:])} ones (or {len(images)} with {len(reference)})')
    diff = (images.to(torch.float64) - reference.to(torch.float64)) / 255
    return float(diff.pow(2).flatten(1).mean(1).sqrt().mean())


@main.command()
@click.option('--images', 'image_path', help='Path to the images', metavar='PATH|ZIP', type=str, required=True)
@click.option('--reference', 'ref_path', help='Images of the same seeds from a converged sampler (same file names)',
              metavar='PATH|ZIP', type=str, required=True)
@_click_errors
def rmse(image_path, ref_path):
    """Mean per-image RMSE (pixels in [0, 1]) to the images of the same names under --reference.

    Only the names (seeds) found in both folders are scored; a line before the value says how many, and how many
    were found in one folder only (e.g. 10k samples for FID against a 1k converged reference: 1000 scored)."""
    images, reference = ImageFolder(image_path), ImageFolder(ref_path)
    names, ref_names = set(images.names), set(reference.names)
    common = sorted(names & ref_names)
    if not common:
        raise FIDInputError(f'no image of {image_path} has a namesake under {ref_path}')
    print(f'Scoring {len(common)} images found in both folders; {len(names) - len(common)} only under --images, '
          f'{len(ref_names) - len(common)} only under --reference (not scored)')

    def pick(folder):
        where = {name: i for i, name in enumerate(folder.names)}
        return torch.from_numpy(np.stack([folder[where[name]] for name in common]))
    print(f'{rmse_to_reference(pick(images), pick(reference)):g}')

@main.command()
@click.option('--data', 'dataset_path', help='Path to the dataset', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Destination .npz file', metavar='NPZ', type=str, required=True)
@click.option('--batch', help='Maximum batch size per process', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@click.option('--detector', help='Feature detector  [default: digits for 1x8x8 images, else inception]',
              metavar='NAME', type=str, default=None)
@_click_errors
def ref(dataset_path, dest_path, batch, detector):
    """Calculate dataset reference statistics needed by 'calc'."""
    dist.init()
    dest_path = cli.check_output_file(dest_path, option='--dest', need_bytes=2**20)

    dist.print0(f'Loading images from "{dataset_path}"...')
    dataset = ImageFolder(dataset_path)
    if len(dataset) < 2:
        raise FIDInputError(f'Found {len(dataset)} image in {dataset_path}, but need at least 2')
    with dist.rank0_first():
        det = load_detector(detector or default_detector_name(dataset.image_shape), dist.device())

    dist.print0(f'Calculating statistics for {len(dataset)} images with detector "{det.name}"...')
    mu, sigma = compute_dataset_stats(dataset, det, max_batch=batch)
    dist.print0(f'Saving dataset reference statistics to "{dest_path}"...')
    if dist.get_rank() == 0:
        save_stats(dest_path, mu, sigma, detector=det.name, image_shape=dataset.image_shape)
    dist.barrier()
    dist.print0('Done.')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cli.run(main)

#----------------------------------------------------------------------------

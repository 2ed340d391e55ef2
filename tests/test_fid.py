"""fid.py: Frechet distance, feature statistics, stats files, image loading, the CLI and its errors, torchrun."""

import hashlib
import os
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

import dnnlib
import fid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = 'tests.test_fid.StandinDetector'

#----------------------------------------------------------------------------
# Stand-in feature network: deterministic, batch-independent, fast. Reached from the CLI by its dotted name.


class StandinDetector:
    """Fixed random projection of the 4x4-pooled gray image, through a sine: 16 features per image."""
    name = STANDIN
    feature_dim = 16

    def __init__(self, device='cpu'):
        self.device = torch.device(device)
        weight = torch.randn([16, 16], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.weight = weight.to(device=self.device, dtype=torch.float32)

    def __call__(self, images):
        if images.shape[1] != 1:
            raise ValueError(f'expected 1 channel, got {images.shape[1]}')
        x = images.to(self.device, torch.float32).mean(dim=1, keepdim=True) / 255
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return torch.sin(3 * (x[:, None, :] * self.weight[None]).sum(-1)) # Row by row: batch-independent.


def _write_images(folder, num, size=8, channels=1, seed=0, start=0):
    rnd = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(start, start + num):
        pixels = rnd.randint(0, 256, size=[size, size, channels], dtype=np.uint8)
        image = PIL.Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, 'L' if channels == 1 else 'RGB')
        sub = os.path.join(folder, f'{i - i % 10:06d}')
        os.makedirs(sub, exist_ok=True)
        image.save(os.path.join(sub, f'{i:06d}.png'))
    return folder


@pytest.fixture
def images(tmp_path):
    return _write_images(str(tmp_path / 'images'), 37)


def _runner():
    # dist.init() fills the torchrun variables; the runner removes them again afterwards.
    return CliRunner(env={key: None for key in ['MASTER_ADDR', 'MASTER_PORT', 'RANK', 'LOCAL_RANK', 'WORLD_SIZE']})


def _invoke(*args):
    result = _runner().invoke(fid.main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout


def _assert_one_line_error(args, message):
    result = _runner().invoke(fid.main, args, catch_exceptions=False)
    assert result.exit_code == 1 and 'Traceback' not in result.output, result.output
    lines = result.stderr.strip().splitlines() # Progress bars may come first.
    assert lines[-1].startswith('Error: ') and message in lines[-1], result.output
    assert not any('Error' in line for line in lines[:-1]), result.output

#----------------------------------------------------------------------------
# Frechet distance.


def _random_spd(rnd, dim):
    a = rnd.randn(dim, dim)
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_golden():
    # 1-D: (0 - 3)^2 + 4 + 1 - 2 sqrt(4 * 1) = 10.
    assert fid.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == 10.0
    # Diagonal: sum of (mean difference)^2 + (std difference)^2 = (1 + 4) + ((1 - 3)^2 + (3 - 4)^2) = 10.
    assert fid.frechet_distance([1, 2], np.diag([1.0, 9.0]), [0, 0], np.diag([9.0, 16.0])) == pytest.approx(10, 1e-12)


def test_frechet_distance_matches_direct_computation():
    rnd = np.random.RandomState(1)
    dim = 24
    mu1, mu2 = rnd.randn(dim), rnd.randn(dim)
    s1, s2 = _random_spd(rnd, dim), _random_spd(rnd, dim)

    # Tr sqrtm(s1 s2) = sum of sqrt(eigenvalues of s1^(1/2) s2 s1^(1/2)), which is symmetric positive definite.
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(w)) @ v.T
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(s1_half @ s2 @ s1_half)).sum()
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_frechet_distance_accepts_old_scipy_tuple(monkeypatch):
    rnd = np.random.RandomState(2)
    s1, s2 = _random_spd(rnd, 5), _random_spd(rnd, 5)
    expected = fid.frechet_distance(np.zeros(5), s1, np.ones(5), s2)
    sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, 'sqrtm', lambda a: (sqrtm(a), 0.0))
    assert fid.frechet_distance(np.zeros(5), s1, np.ones(5), s2) == expected


def test_frechet_distance_shape_mismatch():
    with pytest.raises(ValueError, match='different shapes'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match='non-finite values: reference mu holds nan or inf'):  # printed 'nan'
        fid.frechet_distance(np.zeros(3), np.eye(3), np.full(3, np.nan), np.eye(3))

#----------------------------------------------------------------------------
# Feature statistics.


def test_feature_stats_match_numpy():
    features = torch.randn([50, 7], generator=torch.Generator().manual_seed(0)) * 3 + 1
    mu, sigma = fid.feature_stats(features)
    f64 = features.double().numpy()
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f64.mean(0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(f64, rowvar=False, ddof=1), rtol=1e-12, atol=1e-12)

    # Streaming in uneven chunks gives the same statistics.
    stats = fid.FeatureStats(7)
    for chunk in features.split([3, 20, 27]):
        stats.append(chunk)
    mu2, sigma2 = stats.get()
    np.testing.assert_allclose(mu2, mu, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match=r'Expected features of shape \[N, 7\]'):
        stats.append(torch.zeros(2, 6))
    with pytest.raises(ValueError, match='at least 2 images, got 1'):
        fid.feature_stats(torch.zeros(1, 3))


def test_rank_batches_follow_edm_split():
    batches = fid.rank_batches(50000, 64, rank=0, world_size=1)
    sizes = [len(b) for b in batches]
    assert len(sizes) == 782 and sizes.count(64) == 734 and sizes.count(63) == 48
    per_rank = [fid.rank_batches(37, 8, rank=r, world_size=2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3 # 6 batches in all.
    assert sorted(torch.cat([torch.cat(b) for b in per_rank]).tolist()) == list(range(37))

#----------------------------------------------------------------------------
# Stats files.


def test_save_load_stats_round_trip(tmp_path):
    rnd = np.random.RandomState(0)
    mu, sigma = rnd.randn(4), _random_spd(rnd, 4)
    path = str(tmp_path / 'sub' / 'stats.npz')
    fid.save_stats(path, mu, sigma, detector='digits')
    assert os.listdir(tmp_path / 'sub') == ['stats.npz']
    loaded = fid.load_stats(path)
    assert loaded['detector'] == 'digits'
    assert np.array_equal(loaded['mu'], mu) and np.array_equal(loaded['sigma'], sigma)
    with np.load(path) as data:
        assert sorted(data.files) == ['detector', 'mu', 'sigma'] and data['detector'].dtype.kind == 'U'

    # An EDM-style file (mu and sigma only) records no detector; file:// URLs work.
    np.savez(str(tmp_path / 'edm.npz'), mu=mu.astype(np.float32), sigma=sigma)
    loaded = fid.load_stats((tmp_path / 'edm.npz').as_uri())
    assert loaded['detector'] is None and loaded['mu'].dtype == np.float64

    # Extra arrays (even pickled ones) are not read; files without mu/sigma or not .npz are refused.
    np.savez(str(tmp_path / 'extra.npz'), mu=mu, sigma=sigma, images=np.array([{'a': 1}], dtype=object))
    assert np.array_equal(fid.load_stats(str(tmp_path / 'extra.npz'))['sigma'], sigma)
    np.savez(str(tmp_path / 'keys.npz'), a=mu)
    with pytest.raises(ValueError, match=r'lack "mu" and "sigma" \(keys: a\)'):
        fid.load_stats(str(tmp_path / 'keys.npz'))
    np.save(str(tmp_path / 'plain.npy'), mu)
    with pytest.raises(ValueError, match='are not an .npz file'):
        fid.load_stats(str(tmp_path / 'plain.npy'))


def test_ref_shorthand_uses_dnnlib_cache(tmp_path, monkeypatch):
    url = 'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz'
    assert fid.ref_location('cifar10') == url
    monkeypatch.setattr(dnnlib.util, '_dnnlib_cache_dir', str(tmp_path))
    os.makedirs(tmp_path / 'downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    np.savez(str(tmp_path / 'downloads' / f'{url_md5}_cifar10-32x32.npz'), mu=np.zeros(3), sigma=np.eye(3))
    loaded = fid.load_stats('cifar10')
    assert np.array_equal(loaded['sigma'], np.eye(3)) and loaded['detector'] is None

def test_ref_names_resolve_through_the_zoo(tmp_path):
    from models.zoo import ZOO
    listed = {name: e for name, e in ZOO.items() if e.fid_ref is not None}
    assert fid.REF_NAMES == list(listed) and set(listed) == {'digits', 'digits_flow', 'cifar10', 'ffhq', 'afhqv2',
                                                                'imagenet64'}
    for name, e in listed.items():
        assert fid.ref_location(name) == e.fid_ref
        assert fid.published_image_shape(e.fid_ref) == e.ref_image_shape == (e.channels, e.resolution, e.resolution)
        assert fid.default_detector_name(e.ref_image_shape) == e.detector
    assert fid.ref_location(str(tmp_path / 'ref.npz')) == str(tmp_path / 'ref.npz')
    digits = fid.load_stats('digits')  # the shipped statistics by name; the image shape is the row's
    assert digits['detector'] == 'digits' and digits['image_shape'] == (1, 8, 8)
    with pytest.raises(fid.FIDInputError, match="zoo model 'ms_coco' has no FID statistics; listed: digits, "):
        fid.load_stats('ms_coco')
    assert 'digits|digits_flow|cifar10|ffhq|afhqv2|imagenet64' in _runner().invoke(fid.main, ['calc', '--help']).output


def test_default_detector():
    edm = dict(mu=np.zeros(2048), sigma=np.eye(2048), detector=None)
    assert fid.default_detector_name((1, 8, 8)) == 'digits'
    assert fid.default_detector_name((3, 8, 8)) == 'inception'
    assert fid.default_detector_name((1, 8, 8), edm) == 'inception'
    assert fid.default_detector_name((3, 32, 32), dict(edm, mu=np.zeros(128))) == 'inception'
    assert fid.default_detector_name((1, 8, 8), dict(edm, mu=np.zeros(128))) == 'digits'
    assert fid.default_detector_name((3, 32, 32), dict(edm, detector=STANDIN)) == STANDIN

#----------------------------------------------------------------------------
# Image loading.


def test_image_folder_matches_edm_rules(tmp_path, images):
    dataset = fid.ImageFolder(images)
    assert len(dataset) == 37 and dataset.image_shape == (1, 8, 8)
    assert dataset.names[:2] == [os.path.join('000000', '000000.png'), os.path.join('000000', '000001.png')]
    first = np.array(PIL.Image.open(os.path.join(images, '000000', '000000.png')))
    assert dataset[0].dtype == np.uint8 and np.array_equal(dataset[0][0], first)

    # A zip of the same files gives the same images.
    zip_path = str(tmp_path / 'images.zip')
    with zipfile.ZipFile(zip_path, 'w') as z:
        for name in reversed(dataset.names):
            z.write(os.path.join(images, name), name.replace(os.sep, '/'))
    zipped = fid.ImageFolder(zip_path)
    assert len(zipped) == 37 and all(np.array_equal(zipped[i], dataset[i]) for i in range(37))

    # Subset: shuffle all indices with RandomState(seed), keep the first `max_size`, sorted.
    subset = fid.ImageFolder(images, max_size=10, random_seed=5)
    idx = np.arange(37)
    np.random.RandomState(5).shuffle(idx)
    assert subset.indices.tolist() == sorted(idx[:10].tolist())
    assert np.array_equal(subset[0], dataset[int(subset.indices[0])])

    rgb = fid.ImageFolder(_write_images(str(tmp_path / 'rgb'), 3, size=4, channels=3))
    assert rgb.image_shape == (3, 4, 4)

#----------------------------------------------------------------------------
# The CLI and the library on images.


def test_calc_against_own_ref_is_zero(tmp_path, images):
    dest = str(tmp_path / 'refs' / 'ref.npz')
    exit_code, output = _invoke('ref', f'--data={images}', f'--dest={dest}', '--batch=8', f'--detector={STANDIN}')
    assert exit_code == 0, output
    assert output.strip().splitlines()[-1] == 'Done.'
    assert fid.load_stats(dest)['detector'] == STANDIN

    # The detector comes from the stats file.
    exit_code, output = _invoke('calc', f'--images={images}', f'--ref={dest}', '--batch=5')
    assert exit_code == 0, output
    assert abs(float(output.strip().splitlines()[-1])) < 1e-6

    # A subset differs from the full set; the printed value is the library's FID with '{:g}'.
    exit_code, output = _invoke('calc', f'--images={images}', f'--ref={dest}', '--num=20', '--seed=3')
    assert exit_code == 0, output
    subset = fid.ImageFolder(images, max_size=20, random_seed=3)
    tensor = torch.from_numpy(np.stack([subset[i] for i in range(len(subset))]))
    value = fid.fid_from_images(tensor, dest, batch=7)
    assert value > 1e-3 and output.strip().splitlines()[-1] == f'{value:g}'
    assert fid.fid_from_images(tensor, dest, detector=StandinDetector(), batch=7) == value


def test_compute_image_stats_equals_folder_stats(images):
    det = StandinDetector()
    dataset = fid.ImageFolder(images)
    mu, sigma = fid.compute_dataset_stats(dataset, det, max_batch=6)
    tensor = torch.from_numpy(np.stack([dataset[i] for i in range(len(dataset))]))
    mu2, sigma2 = fid.compute_image_stats(tensor, det, batch=11)
    np.testing.assert_allclose(mu2, mu, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-12, atol=1e-14)
    features = det(tensor).double().numpy()
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-10, atol=1e-13)


def test_torchrun_two_processes_match_one(tmp_path, images):
    one, two = str(tmp_path / 'one.npz'), str(tmp_path / 'two.npz')
    args = [f'--data={images}', '--batch=8', f'--detector={STANDIN}']
    assert _invoke('ref', f'--dest={one}', *args)[0] == 0
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'fid.py']
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    res = subprocess.run(torchrun + ['ref', f'--dest={two}'] + args, cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count('Done.') == 1 # Rank 0 prints.
    a, b = fid.load_stats(one), fid.load_stats(two)
    assert a['detector'] == b['detector'] == STANDIN
    np.testing.assert_allclose(b['mu'], a['mu'], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b['sigma'], a['sigma'], rtol=1e-10, atol=1e-12)

    # calc under torchrun: a subset (--num_images, since torchrun itself claims --num) gives one process's FID.
    res = subprocess.run(torchrun + ['calc', f'--images={images}', f'--ref={one}', '--num_images=20', '--seed=3',
        '--batch=3'], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    exit_code, output = _invoke('calc', f'--images={images}', f'--ref={one}', '--num=20', '--seed=3')
    assert exit_code == 0 and float(res.stdout.strip().splitlines()[-1]) > 1e-3
    assert float(res.stdout.strip().splitlines()[-1]) == pytest.approx(float(output.strip().splitlines()[-1]), 1e-5)

DIGITS_ZIP = os.path.join(REPO, 'src', 'digits', 'digits-8x8.zip')
DIGITS_DETECTOR = os.path.join(REPO, 'src', 'digits', 'detector.safetensors')


@pytest.mark.skipif(not (os.path.isfile(DIGITS_ZIP) and os.path.isfile(DIGITS_DETECTOR)),
    reason='the embedded digits data and detector are not in src/digits')
def test_digits_detector_end_to_end(tmp_path):
    dest = str(tmp_path / 'digits.npz')
    exit_code, output = _invoke('ref', f'--data={DIGITS_ZIP}', f'--dest={dest}', '--batch=500')
    assert exit_code == 0, output
    ref = fid.load_stats(dest)
    assert ref['detector'] == 'digits' and ref['mu'].shape == (128,) # Chosen for 1x8x8 images.
    exit_code, output = _invoke('calc', f'--images={DIGITS_ZIP}', f'--ref={dest}', '--batch=500')
    assert exit_code == 0 and abs(float(output.strip().splitlines()[-1])) < 1e-6, output

    # A random half of the digits is far closer to the reference than the same images with pixel noise.
    dataset = fid.ImageFolder(DIGITS_ZIP, max_size=900, random_seed=1)
    images = torch.from_numpy(np.stack([dataset[i] for i in range(len(dataset))]))
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 40
    noisy = (images.float() + noise).clip(0, 255)
    clean_fid, noisy_fid = fid.fid_from_images(images, ref), fid.fid_from_images(noisy, ref)
    assert 0 < clean_fid < noisy_fid / 5, (clean_fid, noisy_fid)

#----------------------------------------------------------------------------
# Bad input: one line, no traceback.


def test_bad_inputs_give_one_line_errors(tmp_path, images):
    ref = str(tmp_path / 'ref.npz')
    assert _invoke('ref', f'--data={images}', f'--dest={ref}', f'--detector={STANDIN}')[0] == 0

    _assert_one_line_error(['calc', f'--images={images}', f'--ref={ref}', '--num=100'],
        f'Found 37 images in {images}, but expected at least 100')
    _assert_one_line_error(['calc', f'--images={images}', f'--ref={tmp_path / "missing.npz"}'],
        f'Reference statistics not found: {tmp_path / "missing.npz"}')
    _assert_one_line_error(['calc', f'--images={tmp_path / "nowhere"}', f'--ref={ref}'],
        f'Image path not found: {tmp_path / "nowhere"}')

    empty = tmp_path / 'empty'
    (empty / 'sub').mkdir(parents=True)
    (empty / 'notes.txt').write_text('no images here')
    _assert_one_line_error(['ref', f'--data={empty}', f'--dest={tmp_path / "x.npz"}'], f'No images found in {empty}')

    mixed = _write_images(str(tmp_path / 'mixed'), 5)
    _write_images(mixed, 1, size=16, start=5)
    _assert_one_line_error(['ref', f'--data={mixed}', f'--dest={tmp_path / "x.npz"}', f'--detector={STANDIN}'],
        'Images of mixed sizes: ' + os.path.join('000000', '000005.png') + ' is 16x16 with 1 channel, but')

    broken = _write_images(str(tmp_path / 'broken'), 4)
    png = os.path.join(broken, '000000', '000002.png')
    with open(png, 'rb') as f:
        data = f.read()
    with open(png, 'wb') as f:
        f.write(data[: len(data) // 2])
    _assert_one_line_error(['ref', f'--data={broken}', f'--dest={tmp_path / "x.npz"}', f'--detector={STANDIN}'],
        'Cannot read image ' + os.path.join('000000', '000002.png') + ': ')

    fid.save_stats(str(tmp_path / 'dim5.npz'), np.zeros(5), np.eye(5))
    _assert_one_line_error(['calc', f'--images={images}', f'--ref={tmp_path / "dim5.npz"}', f'--detector={STANDIN}'],
        f'have 5 features, but detector "{STANDIN}" gives 16')
    fid.save_stats(str(tmp_path / 'other.npz'), np.zeros(16), np.eye(16), detector='inception')
    _assert_one_line_error(['calc', f'--images={images}', f'--ref={tmp_path / "other.npz"}', f'--detector={STANDIN}'],
        f'were made with detector "inception", not "{STANDIN}"')

    rgb = _write_images(str(tmp_path / 'rgb'), 3, channels=3)
    _assert_one_line_error(['calc', f'--images={rgb}', f'--ref={ref}'],
        f'The images in {rgb} are 8x8 with 3 channels, but reference statistics {ref} are of 8x8 with 1 channel '
        'images')
    # Statistics that do not record the image shape: the detector still refuses the wrong channel count.
    loaded = fid.load_stats(ref)
    fid.save_stats(str(tmp_path / 'noshape.npz'), loaded['mu'], loaded['sigma'], detector=loaded['detector'])
    _assert_one_line_error(['calc', f'--images={rgb}', f'--ref={tmp_path / "noshape.npz"}'],
        f'Detector "{STANDIN}" cannot take these images: expected 1 channel, got 3')

    (tmp_path / 'corrupt.npz').write_bytes(b'PK\x03\x04 not really a zip')
    _assert_one_line_error(['calc', f'--images={images}', f'--ref={tmp_path / "corrupt.npz"}'],
        'Cannot read reference statistics')
    _assert_one_line_error(['calc', f'--images={images}', f'--ref={ref}', '--detector=no_such_pkg.Detector'],
        'Unknown detector "no_such_pkg.Detector"')

#----------------------------------------------------------------------------

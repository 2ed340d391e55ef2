"""Fixtures shared by the test files."""

import urllib.error
import urllib.request

import pytest

from models import detectors


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network and empty caches: downloads fail at once (URLError), as on a machine without internet.
    Yields (tmp_path, the list of URLs that were asked for)."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setenv('ADASDE_SRC_DIR', str(tmp_path / 'src'))
    calls = []

    def urlopen(request, *args, **kwargs):
        calls.append(getattr(request, 'full_url', request))
        raise urllib.error.URLError('network is unreachable (test)')
    monkeypatch.setattr(urllib.request, 'urlopen', urlopen)
    detectors._cache.clear()
    yield tmp_path, calls
    detectors._cache.clear()


@pytest.fixture
def reference_package(tmp_path, monkeypatch):
    """make({relative path: source}) writes the files (dedented) under one folder put first on sys.path, and returns
    it: the reference codes' own modules (e.g. their `training/networks.py`, which builds the snapshot pickles the
    import tests read). Modules of the same names (this project's `training` package) are set aside meanwhile and
    put back afterwards."""
    import sys
    import textwrap
    root = tmp_path / 'ref'
    saved, created = {}, []

    def make(files):
        for rel, source in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(source))
            parts = rel[:-len('.py')].split('/')
            if parts[-1] == '__init__':
                parts = parts[:-1]
            names = ['.'.join(parts[:k]) for k in range(1, len(parts) + 1)]
            for name in names:
                if name not in saved:
                    saved[name] = sys.modules.pop(name, None)
                    created.append(name)
        monkeypatch.syspath_prepend(str(root))
        return root
    yield make
    for name in created:
        sys.modules.pop(name, None)
    for name, module in saved.items():
        if module is not None:
            sys.modules[name] = module


@pytest.fixture(scope='session')
def sd_dir(tmp_path_factory):
    """A tiny random Stable Diffusion pipeline folder (tests/tiny_sd.py), built once per session; needs diffusers."""
    pytest.importorskip('diffusers')
    pytest.importorskip('transformers')
    from tiny_sd import build_tiny_sd
    return build_tiny_sd(str(tmp_path_factory.mktemp('sd')))


SD_PROMPTS = ['a photo of a cat', 'two dogs on a red sofa', 'a bowl of fruit', 'a red car']
SD_PREDICTORS = {  # train.py flags; AdaSDE and EPD with AFS (train.py's default), AMED without
    'adasde': ['--sampler_stu=adasde', '--M=1', '--gamma=0.02'],
    'epd': ['--sampler_stu=epd', '--sampler_tea=heun', '--M=1', '--num_points=2', '--scale_time=0.05'],
    'amed': ['--sampler_stu=amed', '--sampler_tea=heun', '--M=1', '--scale_time=0.2', '--afs=False'],
}


@pytest.fixture(scope='session')
def sd_predictors(sd_dir, tmp_path_factory):
    """{kind: run folder} of an AdaSDE, an EPD (K = 2) and an AMED predictor trained by train.py on the tiny pipeline
    (3 time points, discrete schedule, guidance 7.5, plain L2 loss, 4 trajectories)."""
    import glob
    import os

    from click.testing import CliRunner

    import train
    root = tmp_path_factory.mktemp('sd-runs')
    captions = root / 'captions.csv'
    captions.write_text('text\n' + '\n'.join(SD_PROMPTS) + '\n')
    found = {}
    for kind, args in SD_PREDICTORS.items():
        result = CliRunner().invoke(train.main, [
            '--dataset_name=ms_coco', f'--model_path={sd_dir}', f'--prompts={captions}', f'--outdir={root}/{kind}',
            '--num_steps=3', '--schedule_type=discrete', '--schedule_rho=1', '--guidance_type=cfg',
            '--guidance_rate=7.5', '--feature_net=none', '--lr=0.01', '--batch=2', '--total_kimg=0.004',
            '--device=cpu', *args])
        assert result.exit_code == 0, result.output + repr(result.exception)
        found[kind], = glob.glob(os.path.join(root, kind, '*'))
    return found

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

"""Framework-free helpers in the NVlabs/dnnlib style: EasyDict, the download cache, construct-by-name, logging."""

import glob
import hashlib
import importlib
import io
import os
import re
import sys
import tempfile
import types
import urllib.parse
import urllib.request

#----------------------------------------------------------------------------
# Convenience class that behaves like a dict but allows access with the attribute syntax.


class EasyDict(dict):
    """A dict whose keys are also attributes; a missing attribute raises AttributeError."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

#----------------------------------------------------------------------------
# Redirect stdout and stderr to a log file while still printing them.


class Logger:
    """Copies everything written to stdout/stderr into `file_name` (if given) and restores them on close()."""

    def __init__(self, file_name=None, file_mode='w', should_flush=True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self.close()

    def write(self, text):
        if isinstance(text, bytes):
            text = text.decode()
        if len(text) == 0:
            return
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self):
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def close(self):
        self.flush()
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None

#----------------------------------------------------------------------------
# Cache directory: set_cache_dir(), then $DNNLIB_CACHE_DIR, then the home folder, then the temp folder.

_dnnlib_cache_dir = None


def set_cache_dir(path):
    global _dnnlib_cache_dir
    _dnnlib_cache_dir = path


def make_cache_dir_path(*paths):
    """Path under the dnnlib cache directory (not created)."""
    if _dnnlib_cache_dir is not None:
        return os.path.join(_dnnlib_cache_dir, *paths)
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    if 'HOME' in os.environ:
        return os.path.join(os.environ['HOME'], '.cache', 'dnnlib', *paths)
    if 'USERPROFILE' in os.environ:
        return os.path.join(os.environ['USERPROFILE'], '.cache', 'dnnlib', *paths)
    return os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib', *paths)

#----------------------------------------------------------------------------
# Small formatting helpers.


def format_time(seconds):
    """Human-readable duration: '12s', '3m 04s', '2h 05m 09s', '1d 02h 03m'."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // (60 * 60)}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // (24 * 60 * 60)}d {(s // (60 * 60)) % 24:02d}h {(s // 60) % 60:02d}m'

#----------------------------------------------------------------------------
# Resolve dotted names such as 'torch.optim.Adam' or 'models.edm.EDMPrecond' to objects.


def get_module_from_obj_name(obj_name):
    """Split `obj_name` into (module, attribute path), trying the longest importable module prefix first."""
    obj_name = re.sub('^np.', 'numpy.', obj_name)
    obj_name = re.sub('^tf.', 'tensorflow.', obj_name)
    parts = obj_name.split('.')
    splits = [('.'.join(parts[:i]), '.'.join(parts[i:])) for i in range(len(parts), 0, -1)]

    # Try each split; the first one whose module imports and whose attributes resolve wins.
    for module_name, local_name in splits:
        try:
            module = importlib.import_module(module_name)
            get_obj_from_module(module, local_name)
            return module, local_name
        except ImportError as err:
            if not str(err).startswith(f"No module named '{module_name}'"):
                raise
        except AttributeError:
            pass
    raise ImportError(obj_name)


def get_obj_from_module(module, obj_name):
    """Walk a dotted attribute path inside a module ('' returns the module)."""
    if obj_name == '':
        return module
    obj = module
    for part in obj_name.split('.'):
        obj = getattr(obj, part)
    return obj


def get_obj_by_name(name):
    module, obj_name = get_module_from_obj_name(name)
    return get_obj_from_module(module, obj_name)


def call_func_by_name(*args, func_name=None, **kwargs):
    assert func_name is not None
    func_obj = get_obj_by_name(func_name)
    assert callable(func_obj)
    return func_obj(*args, **kwargs)


def construct_class_by_name(*args, class_name=None, **kwargs):
    return call_func_by_name(*args, func_name=class_name, **kwargs)


def get_top_level_function_name(obj):
    """Dotted name of a top-level function, usable with get_obj_by_name()."""
    assert callable(obj) and not isinstance(obj, types.BuiltinFunctionType)
    module = obj.__module__
    if module == '__main__':
        module = os.path.splitext(os.path.basename(sys.modules[module].__file__))[0]
    return module + '.' + obj.__name__

#----------------------------------------------------------------------------
# URLs and the download cache.


def is_url(obj, allow_file_urls=False):
    """True for a string with a scheme and a dotted host (file:// only with allow_file_urls)."""
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if allow_file_urls and obj.startswith('file://'):
        return True
    try:
        res = urllib.parse.urlparse(obj)
        if not res.scheme or not res.netloc or '.' not in res.netloc:
            return False
        res = urllib.parse.urlparse(urllib.parse.urljoin(obj, '/'))
        if not res.scheme or not res.netloc or '.' not in res.netloc:
            return False
    except ValueError:
        return False
    return True


def _file_url_to_path(url):
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    if re.match(r'^/[a-zA-Z]:', path):
        path = path[1:] # Windows drive path '/c:/...'.
    return path


def _download(url, num_attempts, verbose):
    """Fetch `url` with urllib, retrying; returns (data, file name from the server or the URL)."""
    if verbose:
        print(f'Downloading {url} ...', end='', flush=True)
    for attempts_left in reversed(range(num_attempts)):
        try:
            request = urllib.request.Request(url, headers={'User-Agent': 'dnnlib'})
            with urllib.request.urlopen(request, timeout=60) as res:
                data = res.read()
                disposition = res.headers.get('Content-Disposition', '')
            if len(data) == 0:
                raise OSError('No data received')
            break
        except KeyboardInterrupt:
            raise
        except Exception:
            if not attempts_left:
                if verbose:
                    print(' failed')
                raise
            if verbose:
                print('.', end='', flush=True)
    if verbose:
        print(' done')
    match = re.search(r'filename="([^"]*)"', disposition)
    name = match.group(1) if match else urllib.parse.urlparse(url).path.rsplit('/', 1)[-1] or url
    return data, name


def open_url(url, cache_dir=None, num_attempts=10, verbose=True, return_filename=False, cache=True):
    """Open a local path, a file:// URL or an http(s) URL (cached as <cache_dir>/<md5(url)>_<name>) for reading."""
    assert num_attempts >= 1
    assert not (return_filename and not cache)

    # Local file or file:// URL.
    if not re.match('^[a-z]+://', url):
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        path = _file_url_to_path(url)
        return path if return_filename else open(path, 'rb')
    if not is_url(url):
        raise ValueError(f'Not a valid URL: {url}')

    # Cache hit: exactly one file named <md5>_*.
    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    if cache:
        cache_files = glob.glob(os.path.join(glob.escape(cache_dir), url_md5 + '_*'))
        if len(cache_files) == 1:
            return cache_files[0] if return_filename else open(cache_files[0], 'rb')

    # Download, then save atomically (a temporary '.tmp_*' file, never matched as <md5>_*, renamed into place).
    data, name = _download(url, num_attempts, verbose)
    if cache:
        from torch_utils.misc import atomic_write  # here, not above: dnnlib itself loads no torch
        safe_name = re.sub(r'[^0-9a-zA-Z-._]', '_', name)[:128]
        cache_file = os.path.join(cache_dir, f'{url_md5}_{safe_name}')

        def write(tmp):
            with open(tmp, 'wb') as f:
                f.write(data)
        atomic_write(cache_file, write)
        if return_filename:
            return cache_file
    return io.BytesIO(data)

#----------------------------------------------------------------------------

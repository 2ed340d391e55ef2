"""Everything that turns a checkpoint into one denoiser interface (see DESIGN.md).

load_model(name_or_path) accepts
  - a zoo name (models/zoo.py: digits, cifar10, ffhq, afhqv2, imagenet64, ms_coco, ...), downloaded on first use
    into ./src/<name>/ (the embedded `digits` model ships with the repository and loads offline);
  - an EDM network pickle (.pkl path or URL, e.g. network-snapshot-*.pkl of EDM's train.py);
  - a directory with this project's model.json + model.safetensors (models/edm.py save_model);
  - a Stable Diffusion checkpoint or diffusers directory (models/sd.py).

SECURITY: a network pickle holds Python source code that is executed while it is loaded (torch_utils.persistence,
as in EDM). Load pickles only from sources you trust. This project's own models are safetensors + JSON.
"""

import os

from .zoo import ZOO, ModelError

#----------------------------------------------------------------------------
# EDM network pickles (formats.md §1): pickle['ema'] through torch_utils.persistence;
# storages saved on CUDA load on a CPU-only machine. As AdaSDE and diff-sampler do
# after loading, sigma_min and sigma_max are set to 0.002 and 80.


def load_edm_pickle(path_or_url, verbose=True):
    """The 'ema' network of an EDM training snapshot (a file path or URL). Runs the code embedded in the pickle."""
    import pickle

    import dnnlib
    from torch_utils import persistence
    is_url = dnnlib.util.is_url(path_or_url, allow_file_urls=True)
    if not is_url and not os.path.isfile(path_or_url):
        raise ModelError(f'network pickle not found: {path_or_url}')
    try:
        with dnnlib.util.open_url(path_or_url, num_attempts=3, verbose=verbose) as f:
            data = persistence.load_network_pickle(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as err:
        raise ModelError(f'{path_or_url}: not a readable network pickle ({type(err).__name__}: '
                         f'{_first_line(err)})') from err
    except OSError as err:
        raise ModelError(f'cannot open {path_or_url}: {_first_line(err)}') from err
    if not isinstance(data, dict) or 'ema' not in data:
        if isinstance(data, dict) and 'model' in data and 'loss_fn' in data:
            raise ModelError(f'{path_or_url} is an AdaSDE predictor snapshot, not a diffusion model')
        keys = ', '.join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ModelError(f'{path_or_url}: not an EDM network pickle (expected a dict with key "ema", got {keys})')
    net = data['ema']
    net.sigma_min = 0.002
    net.sigma_max = 80.0
    return net


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

#----------------------------------------------------------------------------
# Adapters per zoo kind.


def _load_sd(path_or_id, **kwargs):
    try:
        from . import sd
    except ImportError as err:
        raise ModelError(f'Stable Diffusion needs diffusers and transformers (pip install "adasde[sd]"): '
                         f'{_first_line(err)}') from err
    try:
        return sd.load_sd(path_or_id, **kwargs)
    except ImportError as err:
        raise ModelError(f'Stable Diffusion needs diffusers and transformers (pip install "adasde[sd]"): '
                         f'{_first_line(err)}') from err
    except ValueError as err:
        if isinstance(err, ModelError):
            raise
        raise ModelError(_first_line(err)) from err


def _no_kwargs(what, kwargs):
    given = {k: v for k, v in kwargs.items() if v is not None}
    if given:
        raise ModelError(f'{what} takes no option {", ".join(sorted(given))} (it has no guidance)')


def _load_zoo(name, device, **kwargs):
    from . import edm, zoo
    entry = zoo.get_entry(name)
    if entry.missing:
        raise ModelError(f'zoo model {name!r} is not available: {entry.missing}')
    if entry.kind == 'embedded':
        _no_kwargs(f'model {name!r}', kwargs)
        return edm.load_local(os.path.dirname(zoo.local_path(entry)), device=device)
    if entry.kind == 'edm':
        _no_kwargs(f'model {name!r}', kwargs)
        return load_edm_pickle(zoo.fetch(name))
    if entry.kind == 'sd':
        local = zoo.local_path(entry)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.setdefault('guidance_rate', entry.guidance_rate)
        if os.path.isfile(local):
            return _load_sd(local, device=device, **kwargs)
        from .sd import SD_DEFAULT
        return _load_sd(SD_DEFAULT, device=device, **kwargs)
    raise ModelError(f'zoo entry {name!r} is a data file, not a model (use models.zoo.fetch({name!r}))')

#----------------------------------------------------------------------------


def load_model(name_or_path, device='cpu', **kwargs):
    """A Denoiser (DESIGN.md) in eval mode with requires_grad False, from a zoo name, a network pickle (path or URL),
    a model directory (model.json) or a Stable Diffusion checkpoint. kwargs go to guided adapters
    (guidance_type, guidance_rate, ...). Raises ModelError (a ValueError) with a one-line message.

    Loading a .pkl executes the Python code stored in it: only load pickles you trust.
    """
    import dnnlib
    src = os.fspath(name_or_path)
    if src in ZOO:
        net = _load_zoo(src, device, **kwargs)
    elif os.path.isdir(src) and os.path.isfile(os.path.join(src, 'model.json')):
        from . import edm
        _no_kwargs(f'model {src}', kwargs)
        net = edm.load_local(src)
    elif src.lower().endswith('.pkl') or dnnlib.util.is_url(src, allow_file_urls=True):
        _no_kwargs(f'model {src}', kwargs)
        net = load_edm_pickle(src)
    elif os.path.exists(src) and _is_sd(src):
        net = _load_sd(src, device=device, **{k: v for k, v in kwargs.items() if v is not None})
    elif os.path.isdir(src):
        raise ModelError(f'{src}: no model.json (a model saved by models.edm.save_model) or diffusers pipeline')
    elif os.path.exists(src):
        raise ModelError(f'{src}: not a model file (expected a .pkl network pickle, a model directory or a Stable '
                         'Diffusion checkpoint)')
    else:
        raise ModelError(f'unknown model {src!r}: not a zoo name ({", ".join(ZOO)}), nor an existing file, '
                         'directory or URL')
    return net.eval().requires_grad_(False).to(device)


def _is_sd(path):
    try:
        from .sd import is_sd_path
    except ImportError:
        return False
    return is_sd_path(path)


__all__ = ['load_model', 'load_edm_pickle', 'ModelError', 'ZOO']

#----------------------------------------------------------------------------

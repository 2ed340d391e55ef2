"""Everything that turns a checkpoint into one denoiser interface (see docs/design.md).

load_model(name_or_path) accepts
  - a zoo name (models/zoo.py: digits, cifar10, ffhq, afhqv2, imagenet64, ms_coco, ...), downloaded on first use
    into ./src/<name>/ (the embedded `digits` model ships with the repository and loads offline);
  - an EDM network pickle (.pkl path or URL, e.g. network-snapshot-*.pkl of EDM's train.py);
  - a directory with this project's model.json + model.safetensors (models/edm.py save_model);
  - a Stable Diffusion (1.x/2.x or XL) checkpoint or diffusers directory (models/sd.py);
  - a diffusers directory of SD3 or FLUX (models/flow_pipes.py: rectified flow seen as this denoiser);
  - with kind='cm'|'adm'|'ldm', a checkpoint of a consistency-models, guided-diffusion or latent-diffusion
    model (models/adapters.py), its architecture given as arch={...} in the original code's names.

SECURITY: a network pickle holds Python source code that is executed while it is loaded (torch_utils.persistence,
as in EDM). Load pickles only from sources you trust. This project's own models are safetensors + JSON.
"""

import os

from torch_utils.cli import one_line

from .zoo import ZOO, ModelError

#----------------------------------------------------------------------------
# EDM network pickles (formats.md §1): pickle['ema'] through torch_utils.persistence;
# storages saved on CUDA load on a CPU-only machine. EDM's networks carry
# sigma_min = 0 and sigma_max = inf (no range of their own), so, as AdaSDE and
# diff-sampler do after loading, they get the sampling range of their zoo row
# (0.002 and 80); a pickle outside the zoo that of EDM's published models.


def load_edm_pickle(path_or_url, verbose=True, entry=None):
    """The 'ema' network of an EDM training snapshot (a file path or URL), set to the sigma range of the zoo row
    `entry` (default: the row of EDM's published models, see _KIND_ENTRY). Runs the code embedded in the pickle."""
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
                         f'{one_line(err)})') from err
    except OSError as err:
        raise ModelError(f'cannot open {path_or_url}: {one_line(err)}') from err
    if not isinstance(data, dict) or 'ema' not in data:
        if isinstance(data, dict) and 'model' in data and 'loss_fn' in data:
            raise ModelError(f'{path_or_url} is a learned-solver predictor snapshot, not a diffusion model')
        keys = ', '.join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ModelError(f'{path_or_url}: not an EDM network pickle (expected a dict with key "ema", got {keys})')
    net = data['ema']
    entry = entry or ZOO[_KIND_ENTRY['edm']]
    net.sigma_min, net.sigma_max = entry.sigma_min, entry.sigma_max
    net.bottleneck = edm_bottleneck(net)
    return net


def edm_bottleneck(net):
    """Where AMED reads an EDM network's features (solvers/amed.py), as the AMED code picks it: encoder block
    8x8_block2 if the net is class-conditional, else 8x8_block3 (the last 8x8 block of DhariwalUNet, resp.
    SongUNet); a net without that block gets its last encoder block. None if it has no `model.enc` dict."""
    enc = getattr(getattr(net, 'model', None), 'enc', None)
    names = list(enc.keys()) if hasattr(enc, 'keys') else []  # EDM's encoders are ModuleDicts
    if not names:
        return None
    name = '8x8_block2' if getattr(net, 'label_dim', 0) else '8x8_block3'
    return f'model.enc.{name if name in names else names[-1]}'

#----------------------------------------------------------------------------
# Adapters per zoo kind.


def _through_diffusers(what, load):
    """load(), a diffusers-based loader, with its failures as one-line ModelErrors."""
    try:
        return load()
    except ImportError as err:
        raise ModelError(f'{what} needs diffusers and transformers (pip install "adasde[sd]"): '
                         f'{one_line(err)}') from err
    except ValueError as err:
        if isinstance(err, ModelError):
            raise
        raise ModelError(one_line(err)) from err


def _load_sd(path_or_id, family=None, **kwargs):
    """Stable Diffusion 1.x/2.x or XL (`family` 'sd' or 'sdxl'; default: what models.sd.pipeline_family finds at
    a local path, else 'sd')."""
    def load():
        from . import sd
        chosen = family or sd.pipeline_family(path_or_id) or 'sd'
        return (sd.load_sdxl if chosen == 'sdxl' else sd.load_sd)(path_or_id, **kwargs)
    return _through_diffusers('Stable Diffusion', load)


def _load_flow_pipeline(path_or_id, family=None, **kwargs):
    """SD3 or FLUX (models/flow_pipes.py), with the same one-line errors as Stable Diffusion."""
    def load():
        from . import flow_pipes
        return flow_pipes.load_flow_pipeline(path_or_id, family=family, **kwargs)
    return _through_diffusers('SD3 / FLUX', load)


FLOW_KINDS = ('sd3', 'flux')  # zoo kinds of models/flow_pipes.py


def _flow_family(path):
    try:
        from .flow_pipes import pipeline_family
    except ImportError:
        return None
    return pipeline_family(path)


GUIDANCE_KWARGS = {'guidance_type', 'guidance_rate', 'classifier_path', 'classifier_arch'}


def _no_kwargs(what, kwargs):
    given = {k: v for k, v in kwargs.items() if v is not None}
    if given:
        why = ' (it has no guidance)' if set(given) <= GUIDANCE_KWARGS else ''
        raise ModelError(f'{what} takes no option {", ".join(sorted(given))}{why}')


def _load_openai(kind, path, entry=None, arch=None, classifier_path=None, classifier_arch=None, guidance_type=None,
                 guidance_rate=None, **options):
    """cm / adm / ldm checkpoints (models/adapters.py); `entry` supplies the published architecture and files."""
    from . import adapters, zoo
    if kind not in adapters.KINDS:
        raise ModelError(f'unknown model kind {kind!r}; choose from {", ".join(adapters.KINDS)}')
    what = f'model {entry.name!r}' if entry else f'a {kind} model'
    published = (entry.arch if entry else zoo.ZOO[_KIND_ENTRY[kind]].arch) or {}
    if kind != 'adm':
        if guidance_type not in (None, 'uncond') or guidance_rate not in (None, 1, 1.0) or classifier_path \
                or classifier_arch:
            _no_kwargs(what, dict(guidance_type=guidance_type if guidance_type != 'uncond' else None,
                                  guidance_rate=guidance_rate if guidance_rate != 1 else None,
                                  classifier_path=classifier_path, classifier_arch=classifier_arch))
        if kind == 'cm':
            return adapters.load_cm(path, arch, published=published.get('model'), **options)
        first_stage = None
        if entry is not None and entry.extra:
            first_stage = lambda: zoo.fetch(entry.name, file=entry.extra[0][1], url=entry.extra[0][0])  # noqa: E731
        return adapters.load_ldm(path, arch, published=published.get('model'), first_stage_path=first_stage,
                                 **options)
    if guidance_type not in (None, 'cg'):
        raise ModelError(f"{what} takes classifier guidance (guidance_type 'cg'), not {guidance_type!r}")
    if guidance_rate is None:
        guidance_rate = entry.guidance_rate if entry else 1.0
    if classifier_path is None and entry is not None and entry.extra and guidance_rate != 0:
        classifier_path = zoo.fetch(entry.name, file=entry.extra[0][1], url=entry.extra[0][0])
    return adapters.load_adm(path, arch, classifier_path=classifier_path, classifier_arch=classifier_arch,
                             guidance_rate=guidance_rate, published=published.get('model'),
                             published_classifier=published.get('classifier'), **options)


# The zoo row whose published model a user's checkpoint of each kind takes its defaults from (architecture; for
# an EDM pickle, the sigma range).
_KIND_ENTRY = dict(edm='cifar10', cm='lsun_bedroom', adm='imagenet256', ldm='lsun_bedroom_ldm')


def _load_zoo(name, device, **kwargs):
    from . import adapters, edm, zoo
    entry = zoo.get_entry(name)
    if entry.missing:
        raise ModelError(f'zoo model {name!r} is not available: {entry.missing}')
    if entry.kind in adapters.KINDS:
        return _load_openai(entry.kind, zoo.fetch(name), entry=entry, **kwargs)
    if entry.kind == 'embedded':
        _no_kwargs(f'model {name!r}', kwargs)
        path = zoo.local_path(entry)
        return edm.load_local(os.path.dirname(path), device=device, name=os.path.splitext(os.path.basename(path))[0])
    if entry.kind == 'edm':
        _no_kwargs(f'model {name!r}', kwargs)
        return load_edm_pickle(zoo.fetch(name), entry=entry)
    if entry.kind in ('sd', 'sdxl'):
        # The row's original checkpoint if it is stored, else the diffusers pipeline on the hub (its cache).
        local = zoo.local_path(entry)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.setdefault('guidance_type', entry.guidance_type)
        kwargs.setdefault('guidance_rate', entry.guidance_rate)
        if os.path.isfile(local):
            return _load_sd(local, family=entry.kind, device=device, **kwargs)
        from . import sd
        return _load_sd(sd.SDXL_DEFAULT if entry.kind == 'sdxl' else sd.SD_DEFAULT, family=entry.kind, device=device,
                        **kwargs)
    if entry.kind in FLOW_KINDS:
        local = zoo.local_path(entry)  # <src>/<name>/model_index.json
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.setdefault('guidance_type', entry.guidance_type)
        kwargs.setdefault('guidance_rate', entry.guidance_rate)
        from . import flow_pipes
        default = dict(sd3=flow_pipes.SD3_DEFAULT, flux=flow_pipes.FLUX_DEFAULT)[entry.kind]
        if os.path.isfile(local):
            return _load_flow_pipeline(os.path.dirname(local), family=entry.kind, device=device, **kwargs)
        try:
            return _load_flow_pipeline(default, family=entry.kind, device=device, **kwargs)
        except ModelError as err:
            if not str(err).startswith('cannot load'):
                raise
            raise ModelError(f'{err} (without network: put its diffusers folder at {os.path.dirname(local)})') \
                from err
    raise ModelError(f'zoo entry {name!r} is a data file, not a model (use models.zoo.fetch({name!r}))')

#----------------------------------------------------------------------------


def load_model(name_or_path, device='cpu', **kwargs):
    """A Denoiser (docs/design.md) in eval mode with requires_grad False, from a zoo name, a network pickle (path or
    URL), a model directory (model.json), a Stable Diffusion checkpoint or an SD3 / FLUX folder. kwargs go to guided
    adapters (guidance_type, guidance_rate, ...); resolution (image pixels) only to SD3 and FLUX. With
    kind='cm'|'adm'|'ldm', name_or_path is a checkpoint of that family (.pt, .ckpt or .zip) and arch (a dict or JSON
    string), classifier_path and classifier_arch describe it (keys of the original code; omitted keys take the
    published model's values). Raises ModelError (a ValueError) with a one-line message.

    Loading a .pkl executes the Python code stored in it: only load pickles you trust.
    """
    import dnnlib
    src = os.fspath(name_or_path)
    resolution = kwargs.pop('resolution', None)  # the image size of SD3 and FLUX (models/flow_pipes.py)
    if resolution is not None and not (ZOO[src].kind in FLOW_KINDS if src in ZOO else
                                       kwargs.get('kind') is None and os.path.isdir(src) and _flow_family(src)):
        raise ModelError(f'resolution: only SD3 and FLUX pipelines take an image size, not {src}')
    if resolution is not None:
        kwargs['resolution'] = resolution
    sd_kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kind = kwargs.pop('kind', None)
    if kind is not None:
        net = _load_openai(kind, src, **kwargs)
    elif src in ZOO:
        net = _load_zoo(src, device, **kwargs)
    elif os.path.isdir(src) and os.path.isfile(os.path.join(src, 'model.json')):
        from . import edm
        _no_kwargs(f'model {src}', kwargs)
        net = edm.load_local(src)
    elif dnnlib.util.is_url(src, allow_file_urls=True):
        _no_kwargs(f'model {src}', kwargs)
        net = load_edm_pickle(src)
    elif os.path.isfile(src):
        # By content, not by name: the first bytes say which loader may read the file.
        kind = sniff_model_file(src)
        if kind == 'pickle':
            _no_kwargs(f'model {src}', kwargs)
            net = load_edm_pickle(src)
        elif kind in ('zip', 'sd-safetensors', 'sdxl-safetensors'):
            from .sd import SINGLE_FILE_SUFFIXES
            if not src.endswith(SINGLE_FILE_SUFFIXES):
                raise ModelError(f'{src}: a torch checkpoint; for a cm/adm/ldm one give its kind (--model_kind), and '
                                 'a Stable Diffusion checkpoint must be named *.ckpt or *.safetensors')
            net = _load_sd(src, family='sdxl' if kind == 'sdxl-safetensors' else 'sd', device=device, **sd_kwargs)
        elif kind == 'predictor':
            raise ModelError(f'{src} is a learned-solver predictor, not a diffusion model (give it as '
                             '--predictor_path)')
        elif kind == 'safetensors':
            raise ModelError(f'{src}: a safetensors file without Stable Diffusion weights (model.diffusion_model.*); '
                             f'accepted: {ACCEPTED_FORMATS}')
        else:
            raise ModelError(f'{src}: not a model file of a format this project reads; accepted: {ACCEPTED_FORMATS}')
    elif os.path.isdir(src) and _flow_family(src):
        net = _load_flow_pipeline(src, device=device, **sd_kwargs)
    elif os.path.isdir(src) and _is_sd(src):
        net = _load_sd(src, device=device, **sd_kwargs)
    elif os.path.isdir(src):
        raise ModelError(f'{src}: no model.json (a model saved by models.edm.save_model) or diffusers pipeline')
    elif src.lower().endswith('.pkl'):
        raise ModelError(f'network pickle not found: {src}')
    else:
        raise ModelError(f'unknown model {src!r}: not a zoo name ({", ".join(ZOO)}), nor an existing file, '
                         'directory or URL')
    return net.eval().requires_grad_(False).to(device)


ACCEPTED_FORMATS = ('an EDM network pickle, a Stable Diffusion checkpoint (.ckpt torch zip or .safetensors), '
                    'a folder with model.json (models.edm.save_model), a diffusers folder, a URL of a network pickle, '
                    'a zoo name, or a cm/adm/ldm checkpoint with its kind (--model_kind)')


def sniff_model_file(path):
    """What a file holds, from its first bytes: 'pickle' (protocol 2-5), 'zip' (torch.save, .ckpt),
    'sdxl-safetensors' / 'sd-safetensors' / 'predictor' / 'safetensors' (a valid safetensors header: SDXL weights
    (a second text encoder, conditioner.embedders.1.*), Stable Diffusion 1.x/2.x weights, a learned-solver
    predictor (AdaSDE, AMED, EPD), anything else), or None."""
    import json

    from torch_utils.misc import starts_a_pickle
    with open(path, 'rb') as f:
        head = f.read(9)
        if head[:4] == b'PK\x03\x04':
            return 'zip'
        if starts_a_pickle(head, os.path.getsize(path)):
            return 'pickle'
        f.seek(8)
        head = head[:8]
        if len(head) < 8:
            return None
        header_len = int.from_bytes(head, 'little')
        if not 2 <= header_len <= min(os.path.getsize(path) - 8, 100 << 20):
            return None
        try:
            header = json.loads(f.read(header_len).decode('utf-8'))
        except (UnicodeDecodeError, ValueError):
            return None
    if not isinstance(header, dict):
        return None
    meta = header.get('__metadata__')
    if isinstance(meta, dict) and str(meta.get('format', '')).endswith('-predictor'):
        return 'predictor'
    if any(str(name).startswith('model.diffusion_model.') for name in header):
        return 'sdxl-safetensors' if any(str(name).startswith('conditioner.embedders.1.') for name in header) \
            else 'sd-safetensors'
    return 'safetensors'


def _is_sd(path):
    try:
        from .sd import is_sd_path
    except ImportError:
        return False
    return is_sd_path(path)


__all__ = ['load_model', 'load_edm_pickle', 'sniff_model_file', 'ModelError', 'ZOO']

#----------------------------------------------------------------------------

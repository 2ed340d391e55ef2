"""Reading PyTorch checkpoints of the openai-UNet families safely, with one-line errors.

Files are read with torch.load(weights_only=True): tensors and plain containers only, never code. A .zip that is
not itself a torch.save archive (the latent-diffusion downloads) is read through its *.ckpt member. Keys are
matched strictly; a mismatch names what the file looks like instead ("a guided-diffusion classifier", ...).
"""

import io
import os
import pickle
import zipfile

import torch

from torch_utils.cli import one_line

from .zoo import ModelError


def _zip_member(path):
    """The checkpoint inside a model archive, or None when `path` is not such an archive."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if any(n.endswith('data.pkl') for n in names):
        return None  # a torch.save file (they are zip archives too)
    ckpts = [n for n in names if n.endswith('.ckpt')]
    if not ckpts:
        raise ModelError(f'{path}: a zip archive without a .ckpt checkpoint inside')
    preferred = [n for n in ckpts if os.path.basename(n) == 'model.ckpt']
    return sorted(preferred or ckpts, key=len)[0]


def read(path, what='checkpoint'):
    """The object stored in a checkpoint file (.pt, .ckpt, or a .zip holding a .ckpt), loaded weights-only."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f'{what} not found: {path}')
    try:
        member = _zip_member(path)
        if member is None:
            return torch.load(path, map_location='cpu', weights_only=True)
        with zipfile.ZipFile(path) as zf:
            data = zf.read(member)
        return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except ModelError:
        raise
    except pickle.UnpicklingError as err:
        if 'Unsupported global' in str(err) or 'This file can still be loaded' in str(err):
            raise ModelError(f'{path}: refused by the safe loader (torch.load with weights_only=True): the file '
                             'stores Python objects besides tensors; in an environment you trust, load it and '
                             'torch.save its state_dict') from None
        raise ModelError(f'{path}: not a PyTorch checkpoint (the safe loader stopped: {_reason(err)})') from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError) as err:
        raise ModelError(f'{path}: not a readable PyTorch checkpoint (truncated or another format: '
                         f'{_reason(err)})') from None


def _reason(err):
    """torch's reason for refusing a file, without its advice to retry with weights_only=False: that unpickles
    arbitrary code, never to be done for a file that is not known to be a checkpoint."""
    text = str(err)
    if 'WeightsUnpickler error:' in text:
        text = text.split('WeightsUnpickler error:', 1)[1].split('Check the documentation', 1)[0]
    text = one_line(text)
    return text if text and 'weights_only' not in text else 'not a valid checkpoint stream'


def state_dict_of(obj, path):
    """The tensor dictionary of a loaded checkpoint: a plain state dict, or a Lightning checkpoint's 'state_dict'."""
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
        obj = obj['state_dict']
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        kind = ', '.join(map(str, list(obj)[:5])) if isinstance(obj, dict) else type(obj).__name__
        raise ModelError(f'{path}: not a state dict of tensors (got {kind or "an empty dict"})')
    return obj


def looks_like(sd):
    """What a state dict appears to be, in words."""
    keys = set(sd)
    if any(k.startswith('model.diffusion_model.') for k in keys):
        return 'a latent-diffusion (ldm) checkpoint'
    if 'out.2.positional_embedding' in keys:
        return 'a guided-diffusion classifier'
    if 'input_blocks.0.0.weight' in keys:
        if 'label_emb.weight' in keys:
            return f"a class-conditional openai UNet ({sd['label_emb.weight'].shape[0]} classes, adm)"
        out, inp = sd.get('out.2.weight'), sd['input_blocks.0.0.weight']
        if out is not None and out.shape[0] == 2 * inp.shape[1]:
            return 'an openai UNet with learned variance (adm)'
        return 'an unconditional openai UNet (cm or adm)'
    if 'quantize.embedding.weight' in keys and 'encoder.conv_in.weight' in keys:
        return 'a VQ autoencoder (first stage)'
    if any(k.startswith(('first_stage_model.', 'cond_stage_model.')) for k in keys):
        return 'a latent-diffusion checkpoint without its UNet'
    if 'map_noise.freqs' in keys or any(k.startswith('model.map_') for k in keys):
        return 'an EDM network'
    return f'something else (first key {next(iter(keys))!r})'


def load_strict(module, sd, path, what):
    """load_state_dict(strict=True), with a mismatch reported on one line."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing keys (e.g. {missing[0]})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected (e.g. {unexpected[0]})')
        if shapes:
            k = shapes[0]
            parts.append(f'{len(shapes)} of another shape (e.g. {k}: {list(sd[k].shape)} in the file, '
                         f'{list(own[k].shape)} expected)')
        raise ModelError(f'{path}: does not fit the {what} architecture: {", ".join(parts)}; the file looks like '
                         f'{looks_like(sd)}')
    module.load_state_dict(sd, strict=True)
    return module


__all__ = ['read', 'state_dict_of', 'load_strict', 'looks_like']

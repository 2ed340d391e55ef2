"""The model zoo: ONE table from dataset name to where the pretrained model comes from and what it is
(the official AdaSDE code's download table, docs/references.md), and the file fetching behind models.load_model.

A row is what runs: models.load_model gives EDM pickles the row's sigma range and Stable Diffusion the row's
guidance; the other loaders' models compute their own range, which tests/test_backends.py and tests/test_sd.py
check against the row. fid.py resolves --ref=<name> to the row's fid_ref, reads the image shape of those
statistics from the row, and takes the row's FID detector (detector_for).

Downloaded files live in <src>/<name>/<file>, where <src> is $ADASDE_SRC_DIR or ./src (as in AdaSDE); a file
already there, or in the dnnlib cache (<md5(url)>_*), is used without network access. `digits` is embedded in
the repository (src/digits/) and never downloaded.
"""

import dataclasses
import glob
import hashlib
import os

from torch_utils.cli import one_line

REPO_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'src')
_EDM = 'https://nvlabs-fi-cdn.nvidia.com/edm/'
_OPENAI = 'https://openaipublic.blob.core.windows.net/'
DEFAULT_DETECTOR = 'inception'  # the FID detector of every image that no zoo row claims (EDM's fid.py)

#----------------------------------------------------------------------------


class ModelError(ValueError):
    """A model cannot be loaded (unknown name, missing file, no network, adapter not built). One-line message."""


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str                       # adapter: 'embedded', 'edm', 'cm', 'adm', 'ldm', 'sd', 'sdxl', 'sd3', 'flux',
                                    #   'file'
    url: str = None                 # source of the file (None: shipped with the repository)
    file: str = None                # name of the stored file in <src>/<name>/
    storage: str = 'src'            # 'src': <src>/<name>/; 'repo': the repository's src/<name>/; 'hub': diffusers
    folder: str = None              # the folder under <src> or src/ when not <name> (digits_flow lives in digits/)
    resolution: int = None          # sampling space (latent resolution for latent models); with fid_ref, the
    channels: int = None            # images of those statistics are channels x resolution x resolution
    label_kind: str = 'none'        # 'none', 'onehot' (float [B, label_dim]), 'index' (int64 [B]), 'text'
    label_dim: int = 0
    sigma_min: float = None         # the sampling range: given to EDM pickles (which carry 0 and inf), computed
    sigma_max: float = None         # by the other adapters from their schedules (tests check they agree)
    guidance_type: str = None       # guidance of the adapter ('cg', 'cfg', 'uncond', 'distilled'): the one spelling
    guidance_rate: float = None
    detector: str = DEFAULT_DETECTOR  # FID feature network (models.detectors), chosen through detector_for
    feature_net: str = 'inception'  # loss network of the distillation's feature loss (the official code's
                                    # Inception; digits trains against another network than its detector)
    fid_ref: str = None             # FID reference statistics (path or URL; fid.py --ref=<name>)
    extra: tuple = ()               # other files: ((url, file), ...)
    missing: str = None             # set while the adapter is not built: what is missing, in one line
    arch: dict = None               # published architecture (cm/adm/ldm), in the original code's names:
                                    # {'model': {...}, 'classifier': {...}}; users' --model_arch keys update it
    description: str = ''

    @property
    def ref_image_shape(self):
        """[C, H, W] of the images behind `fid_ref` (the published files do not record it), or None."""
        return (self.channels, self.resolution, self.resolution) if self.fid_ref and self.resolution else None


ZOO = {e.name: e for e in [
    ZooEntry('digits', 'embedded', file='model.json', storage='repo', resolution=8, channels=1,
             sigma_min=0.002, sigma_max=80.0, detector='digits', feature_net='digits_loss',
             fid_ref=os.path.join(REPO_SRC, 'digits', 'fid-ref.npz'),
             description='EDM-preconditioned U-Net on the 8x8 scikit-learn digits (embedded, train_digits.py)'),
    ZooEntry('digits_flow', 'embedded', file='flow.json', storage='repo', folder='digits', resolution=8, channels=1,
             sigma_min=1e-3 / (1 - 1e-3), sigma_max=(1 - 1e-3) / 1e-3, detector='digits', feature_net='digits_loss',
             fid_ref=os.path.join(REPO_SRC, 'digits', 'fid-ref.npz'),
             description='rectified-flow (velocity) U-Net on the 8x8 digits, t in [0.001, 0.999] (embedded, '
                         'train_digits.py flow; docs/flow.md)'),
    ZooEntry('cifar10', 'edm', _EDM + 'pretrained/edm-cifar10-32x32-uncond-vp.pkl', 'edm-cifar10-32x32-uncond-vp.pkl',
             resolution=32, channels=3, sigma_min=0.002, sigma_max=80.0, fid_ref=_EDM + 'fid-refs/cifar10-32x32.npz',
             description='EDM CIFAR-10 32x32 unconditional (VP, DDPM++)'),
    ZooEntry('ffhq', 'edm', _EDM + 'pretrained/edm-ffhq-64x64-uncond-vp.pkl', 'edm-ffhq-64x64-uncond-vp.pkl',
             resolution=64, channels=3, sigma_min=0.002, sigma_max=80.0, fid_ref=_EDM + 'fid-refs/ffhq-64x64.npz',
             description='EDM FFHQ 64x64 unconditional (VP, DDPM++)'),
    ZooEntry('afhqv2', 'edm', _EDM + 'pretrained/edm-afhqv2-64x64-uncond-vp.pkl', 'edm-afhqv2-64x64-uncond-vp.pkl',
             resolution=64, channels=3, sigma_min=0.002, sigma_max=80.0, fid_ref=_EDM + 'fid-refs/afhqv2-64x64.npz',
             description='EDM AFHQv2 64x64 unconditional (VP, DDPM++)'),
    ZooEntry('imagenet64', 'edm', _EDM + 'pretrained/edm-imagenet-64x64-cond-adm.pkl',
             'edm-imagenet-64x64-cond-adm.pkl', resolution=64, channels=3, label_kind='onehot', label_dim=1000,
             sigma_min=0.002, sigma_max=80.0, fid_ref=_EDM + 'fid-refs/imagenet-64x64.npz',
             description='EDM ImageNet 64x64 class-conditional (ADM, fp16)'),
    ZooEntry('lsun_bedroom', 'cm', _OPENAI + 'consistency/edm_bedroom256_ema.pt', 'edm_bedroom256_ema.pt',
             resolution=256, channels=3, sigma_min=0.002, sigma_max=80.0,
             arch=dict(model=dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult='1,1,2,2,4,4',
                                  attention_resolutions='32,16,8', num_head_channels=64, use_scale_shift_norm=False,
                                  resblock_updown=True, dropout=0.1, class_cond=False, learn_sigma=False,
                                  use_fp16=True)),
             description='Consistency Models EDM-trained LSUN Bedroom 256 (CMPrecond)'),
    ZooEntry('imagenet256', 'adm', _OPENAI + 'diffusion/jul-2021/256x256_diffusion.pt', '256x256_diffusion.pt',
             resolution=256, channels=3, label_kind='index', label_dim=1000, sigma_min=0.0104838,
             sigma_max=152.16698, guidance_type='cg', guidance_rate=1.0,
             extra=((_OPENAI + 'diffusion/jul-2021/256x256_classifier.pt', '256x256_classifier.pt'),),
             arch=dict(model=dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult='1,1,2,2,4,4',
                                  attention_resolutions='32,16,8', num_head_channels=64, use_scale_shift_norm=True,
                                  resblock_updown=True, dropout=0.0, class_cond=True, learn_sigma=True,
                                  use_fp16=True),
                       classifier=dict(image_size=256, classifier_width=128, classifier_depth=2,
                                       classifier_attention_resolutions='32,16,8', classifier_use_scale_shift_norm=True,
                                       classifier_resblock_updown=True, classifier_pool='attention',
                                       classifier_use_fp16=True)),
             description='guided-diffusion ImageNet 256 with classifier guidance (CGPrecond)'),
    ZooEntry('lsun_bedroom_ldm', 'ldm', 'https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip', 'model.ckpt',
             resolution=64, channels=3, sigma_min=0.038759, sigma_max=83.82248, guidance_type='uncond',
             guidance_rate=1.0, extra=(('https://ommer-lab.com/files/latent-diffusion/vq-f4.zip', 'vq-f4/model.ckpt'),),
             arch=dict(model=dict(image_size=64, in_channels=3, out_channels=3, model_channels=224,
                                  attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 4],
                                  num_head_channels=32, embed_dim=3, n_embed=8192,
                                  ddconfig=dict(double_z=False, z_channels=3, resolution=256, in_channels=3, out_ch=3,
                                                ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[],
                                                dropout=0.0),
                                  linear_start=0.0015, linear_end=0.0195, timesteps=1000)),
             description='latent diffusion LSUN Bedroom (VQ-f4 latents 3x64x64)'),
    ZooEntry('ms_coco', 'sd', 'https://huggingface.co/runwayml/stable-diffusion-v1-5/resolve/main/'
             'v1-5-pruned-emaonly.ckpt', 'v1-5-pruned-emaonly.ckpt', storage='hub', resolution=64, channels=4,
             label_kind='text', sigma_min=0.0291675, sigma_max=14.6146, guidance_type='cfg',
             guidance_rate=7.5, description='Stable Diffusion v1.5, text-to-image (CFG 7.5), MS-COCO prompts'),
    # SDXL keeps SD's DDPM schedule (scaled_linear 0.00085-0.012, 1000 steps), hence ms_coco's sigma range;
    # guidance 5.0 is the SDXL pipeline's default scale. With the MS-COCO captions as its prompts.
    ZooEntry('sdxl', 'sdxl', 'https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/'
             'sd_xl_base_1.0.safetensors', 'sd_xl_base_1.0.safetensors', storage='hub', resolution=128, channels=4,
             label_kind='text', sigma_min=0.0291675, sigma_max=14.6146, guidance_type='cfg', guidance_rate=5.0,
             description='Stable Diffusion XL base 1.0, text-to-image 1024 px (CFG 5), MS-COCO prompts'),
    # Rectified-flow transformers (models/flow_pipes.py): a diffusers folder at <src>/<name>/ (model_index.json),
    # else the hub id. The range is the scheduler's time shift s times the unshifted sigma(1e-3), sigma(1 - 1e-3);
    # FLUX's s is that of its default 1024x1024 images (4096 tokens: exp(1.15)).
    ZooEntry('sd3', 'sd3', 'https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers', 'model_index.json',
             storage='hub', resolution=128, channels=16, label_kind='text', sigma_min=0.003003003, sigma_max=2997.0,
             guidance_type='cfg', guidance_rate=7.0,
             description='Stable Diffusion 3 Medium, rectified flow (shift 3), CFG 7, MS-COCO prompts'),
    ZooEntry('flux', 'flux', 'https://huggingface.co/black-forest-labs/FLUX.1-dev', 'model_index.json', storage='hub',
             resolution=128, channels=16, label_kind='text', sigma_min=0.00316135, sigma_max=3155.035,
             guidance_type='distilled', guidance_rate=3.5,
             description='FLUX.1-dev, rectified flow (1024px shift), distilled guidance 3.5, MS-COCO prompts'),
    ZooEntry('prompts', 'file', 'https://github.com/boomb0om/text2image-benchmark/releases/download/v0.0.1/'
             'MS-COCO_val2014_30k_captions.csv', 'MS-COCO_val2014_30k_captions.csv',
             description='the 30k MS-COCO val2014 captions (column "text"; caption index = seed)'),
]}

#----------------------------------------------------------------------------
# Files: <src>/<name>/<file> if present, else the dnnlib cache, else a
# download (through dnnlib.util.open_url) saved atomically to <src>/<name>/.


def src_dir():
    """Root of the download storage: $ADASDE_SRC_DIR, else ./src."""
    return os.environ.get('ADASDE_SRC_DIR') or os.path.join('.', 'src')


def get_entry(name):
    if name not in ZOO:
        raise ModelError(f'unknown model {name!r}: not a zoo name ({", ".join(ZOO)}), file, directory or URL')
    return ZOO[name]


def local_path(entry, file=None):
    folder = os.path.join(REPO_SRC if entry.storage == 'repo' else src_dir(), entry.folder or entry.name)
    return os.path.join(folder, file or entry.file)


def cached_path(url):
    """The dnnlib download-cache file of `url` (<md5>_*), or None."""
    import dnnlib
    pattern = os.path.join(glob.escape(dnnlib.make_cache_dir_path('downloads')),
                           hashlib.md5(url.encode('utf-8')).hexdigest() + '_*')
    files = glob.glob(pattern)
    return files[0] if len(files) == 1 else None


def fetch(name, file=None, url=None, verbose=True):
    """Path of a zoo entry's file (its main file, or one of `extra`), downloading it on first use."""
    entry = get_entry(name)
    url, file = (url, file) if file is not None else (entry.url, entry.file)
    path = local_path(entry, file)
    if os.path.isfile(path):
        return path
    if url is None:
        raise ModelError(f'{name}: {path} is missing from the repository')
    cached = cached_path(url)
    if cached is not None:
        return cached
    import dnnlib
    from torch_utils.misc import atomic_write  # loads torch, which the table itself does not need
    try:
        with dnnlib.util.open_url(url, num_attempts=3, verbose=verbose, cache=False) as f:
            data = f.read()
    except Exception as err:
        raise ModelError(f'{name}: cannot download {url} ({one_line(err)}); without network, put the file at {path}') \
            from err

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(data if not url.endswith('.zip') else _unzip_member(data, os.path.basename(path), url))
    atomic_write(path, write)
    return path


def _unzip_member(data, basename, url):
    """The bytes of the file `basename` (else the only .ckpt) inside a downloaded zip archive."""
    import io
    import zipfile
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = [n for n in zf.namelist() if not n.endswith('/')]
            match = [n for n in names if os.path.basename(n) == basename] or [n for n in names if n.endswith('.ckpt')]
            if len(match) != 1:
                raise ModelError(f'{url}: the archive has no single {basename} (it holds {", ".join(names[:5])})')
            return zf.read(match[0])
    except zipfile.BadZipFile as err:
        raise ModelError(f'{url}: the download is not a readable zip archive ({err})') from None


def detector_for(dataset=None, image_shape=None):
    """The FID detector (a models.detectors name) of the zoo row `dataset`; for images of `image_shape` [C, H, W]
    that of the rows whose reference statistics are of such images (digits: 1x8x8); else DEFAULT_DETECTOR."""
    if dataset in ZOO:
        return ZOO[dataset].detector
    if image_shape is not None:
        claimed = {e.detector for e in ZOO.values() if e.ref_image_shape == tuple(image_shape)}
        if len(claimed) == 1:
            return claimed.pop()
    return DEFAULT_DETECTOR


def describe():
    """One line per entry, for --help texts and the README."""
    return '\n'.join(f'{e.name:18s} {e.description}' + (' [not built]' if e.missing else '') for e in ZOO.values())

#----------------------------------------------------------------------------

"""Write image datasets in the EDM dataset format (an uncompressed zip or a folder of PNGs + dataset.json),
and read them back as uint8 NCHW arrays (ImageFolder, read_dataset).

    python dataset_tool.py --source=digits --dest=src/digits/digits-8x8.zip

`--source=digits` is scikit-learn's bundled 8x8 digits (1797 images, values 0..16 mapped to 0..255). The zip it
writes ships with the project as src/digits/digits-8x8.zip, so nothing needs scikit-learn at run time.
"""

import functools
import io
import json
import os
import zipfile

import click
import numpy as np
import PIL.Image

from torch_utils import cli
from torch_utils.cli import one_line
from torch_utils.misc import atomic_write

#----------------------------------------------------------------------------
# Sources. Each returns (uint8 images [N, H, W] or [N, H, W, 3], int labels [N] or None).


def load_digits_source():
    """scikit-learn's 8x8 digits: values 0..16 -> uint8 round(v * 255 / 16)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise click.ClickException('--source=digits needs scikit-learn (pip install scikit-learn)') from err
    digits = load_digits()
    images = np.round(digits.images.astype(np.float64) * 255 / 16).astype(np.uint8)
    return images, digits.target.astype(np.int64)

#----------------------------------------------------------------------------
# Writer: EDM layout, entry names '00000/img00000000.png', PNGs with
# compress_level=0, dataset.json with [[name, label], ...] or null.


def archive_name(idx):
    idx_str = f'{idx:08d}'
    return f'{idx_str[:5]}/img{idx_str}.png'


def encode_png(image):
    buf = io.BytesIO()
    PIL.Image.fromarray(image, mode='L' if image.ndim == 2 else 'RGB').save(buf, format='png', compress_level=0,
                                                                            optimize=False)
    return buf.getvalue()


def _write_bytes(path, data):
    with open(path, 'wb') as f:
        f.write(data)


def write_dataset(dest, images, labels=None):
    """Write images (uint8 [N, H, W] or [N, H, W, 3]) to a .zip (atomically) or an empty/new directory."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise click.ClickException(f'images must be uint8 [N, H, W] or [N, H, W, 3], got {images.dtype} '
                                   f'{list(images.shape)}')
    height, width = images.shape[1:3]
    if height != width or width & (width - 1):
        raise click.ClickException(f'images must be square with a power-of-two size, got {width}x{height}')
    names = [archive_name(idx) for idx in range(len(images))]
    meta = dict(labels=None if labels is None else [[n, int(c)] for n, c in zip(names, labels)])
    files = [(n, encode_png(img)) for n, img in zip(names, images)] + [('dataset.json', json.dumps(meta).encode())]

    if dest.lower().endswith('.zip'):
        def write_zip(tmp):
            with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED) as zf:
                for name, data in files:
                    zf.writestr(name, data)
        atomic_write(dest, write_zip)
    else:
        if os.path.isdir(dest) and os.listdir(dest):
            raise click.ClickException(f'--dest folder {dest} is not empty')
        for name, data in files:
            atomic_write(os.path.join(dest, name), functools.partial(_write_bytes, data=data))

#----------------------------------------------------------------------------
# Reader: the images of a folder (walked recursively) or a zip, as EDM's ImageFolderDataset reads them: every file
# with a PIL image extension, sorted by relative path, uint8 [C, H, W] (grayscale keeps 1 channel), an optional
# random subset chosen by seed, and the labels of dataset.json. fid.py reads image folders through it too.


class DatasetError(ValueError):
    """An unreadable dataset: missing path, damaged archive or image, mixed sizes. One-line message."""


def shape_str(shape):
    """An image shape [C, H, W] in words: 'HxW with C channel(s)'."""
    return f'{shape[1]}x{shape[2]} with {shape[0]} channel{"s" if shape[0] != 1 else ""}'


class ImageFolder:
    """uint8 [C, H, W] arrays of the images under `path` (folder or .zip); `max_size` picks a seeded subset."""

    def __init__(self, path, max_size=None, random_seed=0):
        self.path = path
        self._zip = None
        PIL.Image.init()
        if os.path.isdir(path):
            files = [os.path.relpath(os.path.join(root, fname), start=path)
                     for root, _dirs, fnames in os.walk(path) for fname in fnames]
        elif os.path.isfile(path) and path.lower().endswith('.zip'):
            try:
                self._zip = zipfile.ZipFile(path)
            except (OSError, zipfile.BadZipFile) as err:
                raise DatasetError(f'Cannot read zip file {path}: {one_line(err)}') from err
            files = self._zip.namelist()
        elif os.path.exists(path):
            raise DatasetError(f'Image path must be a folder or a .zip file: {path}')
        else:
            raise DatasetError(f'Image path not found: {path}')
        self._has_labels = 'dataset.json' in files
        self.names = sorted(name for name in files if os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION)
        if len(self.names) == 0:
            raise DatasetError(f'No images found in {path}')
        self.num_found = len(self.names)

        # Random subset, as EDM: shuffle all indices with the seed, keep the first max_size, sorted.
        self.indices = np.arange(self.num_found, dtype=np.int64)
        if max_size is not None and self.indices.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self.indices)
            self.indices = np.sort(self.indices[:max_size])
        self.image_shape = self._load(self.names[self.indices[0]]).shape

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, idx):
        name = self.names[self.indices[idx]]
        image = self._load(name)
        if image.shape != self.image_shape:
            raise DatasetError(f'Images of mixed sizes: {name} is {shape_str(image.shape)}, but '
                               f'{self.names[self.indices[0]]} is {shape_str(self.image_shape)}')
        return image

    def labels(self):
        """int64 labels [len(self)] from dataset.json ({"labels": [[name, label], ...]}), or None without them."""
        if not self._has_labels:
            return None
        with self._open('dataset.json') as f:
            labels = json.load(f).get('labels')
        if labels is None:
            return None
        labels = dict(labels)
        return np.array([labels[self.names[i].replace(os.sep, '/')] for i in self.indices], dtype=np.int64)

    def _open(self, name):
        return self._zip.open(name, 'r') if self._zip is not None else open(os.path.join(self.path, name), 'rb')

    def _load(self, name):
        try:
            with self._open(name) as f:
                image = np.array(PIL.Image.open(f))
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on damaged files.
            raise DatasetError(f'Cannot read image {name}: {one_line(err)}') from err
        if image.dtype != np.uint8:
            raise DatasetError(f'Image {name} is not 8-bit ({image.dtype}); expected grayscale or RGB')
        if image.ndim == 2:
            image = image[:, :, np.newaxis]  # HW => HWC
        return image.transpose(2, 0, 1)  # HWC => CHW


def read_dataset(path, max_size=None, random_seed=0):
    """All images of a dataset zip or folder (uint8 [N, C, H, W]) and their labels (int64 [N], or None), in
    ImageFolder's order and subset."""
    dataset = ImageFolder(path, max_size=max_size, random_seed=random_seed)
    return np.stack([dataset[i] for i in range(len(dataset))]), dataset.labels()

#----------------------------------------------------------------------------


@click.command()
@click.option('--source', help='Input: "digits" (scikit-learn bundled 8x8 digits)', type=click.Choice(['digits']),
              required=True)
@click.option('--dest', help='Output .zip or empty directory', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Write at most this many images', metavar='INT', type=click.IntRange(min=1))
def main(source, dest, max_images):
    """Write a dataset in the EDM format (an uncompressed zip of PNGs with dataset.json labels)."""
    dest = cli.check_output_file(dest) if dest.lower().endswith('.zip') else cli.check_output_dir(dest, option='--dest')
    images, labels = load_digits_source()
    if max_images is not None:
        images, labels = images[:max_images], labels[:max_images]
    try:
        write_dataset(dest, images, labels)
    except OSError as err:
        raise click.ClickException(f'--dest={dest}: cannot write ({one_line(err)})') from None
    click.echo(f'Wrote {len(images)} images of {images.shape[2]}x{images.shape[1]} to {dest}')

#----------------------------------------------------------------------------


if __name__ == '__main__':
    cli.run(main)

#----------------------------------------------------------------------------

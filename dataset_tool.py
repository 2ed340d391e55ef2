"""Write image datasets in the EDM dataset format (an uncompressed zip or a folder of PNGs + dataset.json),
and read them back as uint8 NCHW arrays.

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
# Reader: a zip or folder in the EDM layout -> (uint8 [N, C, H, W], int64
# labels [N] or None). Files are every image with a PIL extension, sorted.


def read_dataset(path, max_size=None, random_seed=0):
    """Read all images of a dataset zip or folder, as EDM's ImageFolderDataset orders and subsets them."""
    PIL.Image.init()
    if os.path.isdir(path):
        names = sorted(os.path.relpath(os.path.join(root, f), path).replace('\\', '/')
                       for root, _dirs, fs in os.walk(path) for f in fs)
        def read(name):
            with open(os.path.join(path, name), 'rb') as f:
                return f.read()
    elif os.path.isfile(path) and path.lower().endswith('.zip'):
        zf = zipfile.ZipFile(path)
        names = sorted(zf.namelist())
        read = zf.read
    else:
        raise ValueError(f'{path}: not a dataset folder or .zip file')
    image_names = [n for n in names if os.path.splitext(n)[1].lower() in PIL.Image.EXTENSION]
    if not image_names:
        raise ValueError(f'{path}: no images found')
    idx = np.arange(len(image_names))
    if max_size is not None and len(idx) > max_size:
        np.random.RandomState(random_seed % (1 << 31)).shuffle(idx)
        idx = np.sort(idx[:max_size])
    image_names = [image_names[i] for i in idx]

    images = []
    for name in image_names:
        image = np.array(PIL.Image.open(io.BytesIO(read(name))))
        image = image[:, :, np.newaxis] if image.ndim == 2 else image
        images.append(image.transpose(2, 0, 1))
        if images[-1].shape != images[0].shape:
            raise ValueError(f'{path}: {name} has shape {images[-1].shape}, expected {images[0].shape}')
    labels = None
    if 'dataset.json' in names:
        meta = json.loads(read('dataset.json')).get('labels')
        if meta is not None:
            meta = dict(meta)
            labels = np.array([meta[n] for n in image_names], dtype=np.int64)
    return np.stack(images), labels

#----------------------------------------------------------------------------


@click.command()
@click.option('--source', help='Input: "digits" (scikit-learn bundled 8x8 digits)', type=click.Choice(['digits']),
              required=True)
@click.option('--dest', help='Output .zip or empty directory', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Write at most this many images', metavar='INT', type=click.IntRange(min=1))
def main(source, dest, max_images):
    """Write a dataset in the EDM format (an uncompressed zip of PNGs with dataset.json labels)."""
    images, labels = load_digits_source()
    if max_images is not None:
        images, labels = images[:max_images], labels[:max_images]
    write_dataset(dest, images, labels)
    click.echo(f'Wrote {len(images)} images of {images.shape[2]}x{images.shape[1]} to {dest}')

#----------------------------------------------------------------------------


if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""CLIP score of generated images against their prompts (Hessel et al. 2021): 100 * max(cos(E_image, E_text), 0),
averaged over images, as torchmetrics computes it. Images are matched to prompts by seed (file name <seed>.png)."""

import os

import click
import numpy as np
import PIL.Image
import torch

from torch_utils.cli import one_line

CLIP_DEFAULT = 'openai/clip-vit-large-patch14'

#----------------------------------------------------------------------------
# Library.


def load_clip(path_or_id=CLIP_DEFAULT, device='cpu', **kwargs):
    """A transformers CLIPModel and CLIPProcessor from a local directory or a hub id."""
    from transformers import CLIPModel, CLIPProcessor
    try:
        model = CLIPModel.from_pretrained(path_or_id, **kwargs)
        processor = CLIPProcessor.from_pretrained(path_or_id, **kwargs)
    except OSError as e:
        raise ValueError(f'cannot load CLIP from {path_or_id}: {one_line(e)}') from e
    return model.eval().requires_grad_(False).to(device), processor


@torch.no_grad()
def clip_scores(model, processor, images, prompts, batch_size=64):
    """Per-image CLIP scores 100 * max(cos, 0) of PIL images against their prompts, as a float64 numpy array."""
    if len(images) != len(prompts):
        raise ValueError(f'{len(images)} images but {len(prompts)} prompts')
    device = next(model.parameters()).device
    max_length = model.config.text_config.max_position_embeddings
    scores = []
    for start in range(0, len(images), batch_size):
        inputs = processor(text=list(prompts[start:start + batch_size]), images=list(images[start:start + batch_size]),
                           return_tensors='pt', padding=True, truncation=True, max_length=max_length)
        out = model(**{k: v.to(device) for k, v in inputs.items()})
        img = torch.nn.functional.normalize(out.image_embeds.double(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.double(), dim=-1)
        scores.append(100 * (img * txt).sum(-1).clamp(min=0))
    return torch.cat(scores).cpu().numpy()


def clip_score(model, processor, images, prompts, batch_size=64):
    """Mean CLIP score (the usual single number)."""
    return float(clip_scores(model, processor, images, prompts, batch_size=batch_size).mean())


def find_images(path):
    """Sorted (seed, file) pairs of the PNGs under `path` (recursively), seed read from the file name."""
    if not os.path.isdir(path):
        raise ValueError(f'image folder not found: {path}')
    found = []
    for root, _dirs, files in os.walk(path):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() == '.png':
                if not stem.isdigit():
                    raise ValueError(f'{os.path.join(root, name)}: file name is not a seed (expected <seed>.png)')
                found.append((int(stem), os.path.join(root, name)))
    if not found:
        raise ValueError(f'no PNG images in {path}')
    return sorted(found)

#----------------------------------------------------------------------------
# Command line.


@click.command()
@click.option('--images', 'image_path', help='Folder of generated images (<seed>.png, subfolders allowed)',
              metavar='DIR', type=str, required=True)
@click.option('--prompts', 'prompt_path', help='CSV of prompts, column "text"; row index = seed', metavar='CSV',
              type=str)
@click.option('--prompt', help='One prompt for every image (instead of --prompts)', metavar='STR', type=str)
@click.option('--clip', 'clip_path', help='CLIP model: local dir or hub id', metavar='PATH|ID', type=str,
              default=CLIP_DEFAULT, show_default=True)
@click.option('--batch', 'batch_size', help='Batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@click.option('--device', help='Torch device', metavar='STR', type=str,
              default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
def main(image_path, prompt_path, prompt, clip_path, batch_size, device):
    """CLIP score of generated images against the prompts they were made from.

    Examples:

    \b
    # Stable Diffusion samples against the MS-COCO captions (seed = caption index)
    python clip_score.py --images=out --prompts=src/prompts/MS-COCO_val2014_30k_captions.csv
    """
    from models.sd import load_prompts, prompts_for_seeds
    if (prompt_path is None) == (prompt is None):
        raise click.UsageError('give exactly one of --prompts and --prompt')
    try:
        found = find_images(image_path)
        seeds = [seed for seed, _file in found]
        prompts = [prompt] * len(seeds) if prompt is not None else prompts_for_seeds(load_prompts(prompt_path), seeds)
        model, processor = load_clip(clip_path, device=device)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    scores = []
    for start in range(0, len(found), batch_size):
        images = [PIL.Image.open(file).convert('RGB') for _seed, file in found[start:start + batch_size]]
        scores.append(clip_scores(model, processor, images, prompts[start:start + batch_size], batch_size=batch_size))
    scores = np.concatenate(scores)
    click.echo(f'CLIP score: {scores.mean():.4f} (std {scores.std():.4f}, {len(scores)} images, {clip_path})')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""A tiny random Stable Diffusion pipeline built offline from diffusers' own classes (the `sd_dir` fixture of
conftest.py): UNet 32/64 channels, 8x8 latents, 16x16 images, SD's own schedule (scaled_linear betas
0.00085..0.012, 1000 steps), a byte-level CLIP tokenizer."""

import json
import os

import torch


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map, which CLIP's BPE works on."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs + [256 + n for n in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    return [chr(c) for _b, c in sorted(zip(bs, cs))]


def make_tokenizer(path):
    """A tiny byte-level CLIP tokenizer: every byte is a token (no merges)."""
    from transformers import CLIPTokenizer
    chars = _bytes_to_unicode()
    tokens = chars + [c + '</w>' for c in chars] + ['<|startoftext|>', '<|endoftext|>']
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'vocab.json'), 'w') as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(path, 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\n')
    return CLIPTokenizer(os.path.join(path, 'vocab.json'), os.path.join(path, 'merges.txt'), model_max_length=77)


def text_config(vocab_size):
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                pad_token_id=vocab_size - 1)


def build_tiny_sd(root):
    """Save a tiny random StableDiffusionPipeline under root/tiny-sd and return that folder."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    tokenizer = make_tokenizer(os.path.join(root, 'tok'))
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                                up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(len(tokenizer))))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path = os.path.join(root, 'tiny-sd')
    pipe.save_pretrained(path)
    return path

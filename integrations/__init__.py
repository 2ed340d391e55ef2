"""Adapters of this project's solvers to the tools practitioners sample with: a diffusers scheduler
(diffusers_scheduler.py), k-diffusion-convention samplers (k_diffusion_samplers.py, what ComfyUI, Forge and
AUTOMATIC1111 call) and a ComfyUI custom-node folder (comfyui/). They drive the solvers of `solvers` and never
re-implement one; nothing in the core imports this package. docs/diffusers.md and docs/comfyui.md describe them."""

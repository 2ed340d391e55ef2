"""Everything that turns a checkpoint into one denoiser interface (see DESIGN.md)."""

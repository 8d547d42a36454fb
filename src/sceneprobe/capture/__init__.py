"""Capture: record self-attention outputs at every denoising step into on-disk shards."""

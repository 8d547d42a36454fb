"""Models: diffusers VAE and U-Net built from config, saved and loaded as diffusers folders, and site names."""

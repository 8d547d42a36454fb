"""sceneprobe: probe what a latent diffusion model knows about the 3D scene it draws."""
__version__ = "0.1.0"

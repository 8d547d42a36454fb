"""Training: the VAE, the latent U-Net and the labeller share one resumable loop (``loop.py``)."""

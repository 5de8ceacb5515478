"""DreamBooth fine-tuning of Stable Diffusion with PyTorch Lightning."""

"""DreamBooth fine-tuning of Stable Diffusion with PyTorch Lightning."""

import logging

# diffusers imports torchao whenever it is installed (the int8 `quantize_base` option); that import logs two
# deprecation warnings from torch's pytree and one from diffusers' torchao loader (checkpoints serialised with
# torchao, which this project never loads) on every run, before any output of ours. Quiet those two loggers only.
for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)

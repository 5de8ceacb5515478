"""Slow: SD 1.5-, SD 2.1- and SDXL-size random components through the real loading, training and sampling code."""

from __future__ import annotations

import ctypes
import gc

import pytest
import pytorch_lightning as pl
import torch

from dreambooth_pl import components, tiny
from dreambooth_pl.data import DreamBoothDataModule
from dreambooth_pl.module import DreamBoothModule, LoraSettings, Optimization, SpeedSettings

from .conftest import make_photos

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def give_memory_back():
    """After each public-size model: collect it and hand the freed heap back to the OS (glibc keeps it otherwise),
    so the SDXL test, ~20 GB at its peak, still fits a 24 GB machine after the SD 1.5 / 2.1 ones."""
    yield
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


@pytest.mark.parametrize("arch, prediction", [("sd15", "epsilon"), ("sd21", "v_prediction")])
def test_public_architecture_trains_and_samples(arch, prediction, tmp_path):
    folder = tiny.build_random(arch, tmp_path / arch)  # diffusers layout, loaded back by from_pretrained
    m = DreamBoothModule(pretrained=str(folder), optim=Optimization(learning_rate=1e-5),
                         speed=SpeedSettings(gradient_checkpointing=True))
    assert m.noise_scheduler.config.prediction_type == prediction
    n_unet = sum(p.numel() for p in m.unet.parameters())
    assert n_unet > 850_000_000 and sum(p.numel() for p in m.trainable_parameters()) == n_unet
    before = m.unet.conv_out.weight.detach().clone()
    dm = DreamBoothDataModule(subject="t", class_noun="can", instance_dir=str(make_photos(tmp_path / "i", 2)),
                              class_dir=str(make_photos(tmp_path / "c", 2, seed=5)), resolution=64,
                              min_image_size=64, batch_size=1)
    losses = []

    class Rec(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, callbacks=[Rec()]).fit(m, datamodule=dm)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
    assert not torch.equal(before, m.unet.conv_out.weight)
    pipe = components.pipeline(m.parts(), sampler="dpm++")
    img = pipe("a sks can", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    del m, pipe
    gc.collect()


def test_sdxl_size_lora_trains_one_step_and_samples(tmp_path):
    """SDXL base 1.0 shapes (2.6B UNet, two text encoders; weights stored fp16 on disk, loaded fp32): one LoRA step on
    a bucketed batch (both text encoders adapted too) and a 2-step 64 px sample, through the code every run uses."""
    folder = tiny.build_random("sdxl", tmp_path / "sdxl", dtype=torch.float16)
    # Frozen weights in bf16 (as the SDXL presets keep them) so the step fits a 24 GB machine.
    m = DreamBoothModule(pretrained=str(folder), optim=Optimization(learning_rate=1e-4),
                         lora=LoraSettings(rank=4, text_encoder_rank=4),
                         speed=SpeedSettings(gradient_checkpointing=True, frozen_dtype="bf16"))
    assert m.backbone.name == "sdxl" and m.unet.config.cross_attention_dim == 2048
    assert sum(p.numel() for p in m.unet.parameters()) > 2_500_000_000
    lora_before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad and "lora_B" in n}
    assert any(n.startswith("text_encoder_2.") for n in lora_before)
    dm = DreamBoothDataModule(subject="t", class_noun="can", instance_dir=str(make_photos(tmp_path / "i", 2, size=(96, 64))),
                              class_dir=str(make_photos(tmp_path / "c", 2, seed=5)), resolution=64, min_image_size=64,
                              batch_size=1, bucket_step=16, model=m.source())
    pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, precision="bf16-mixed").fit(m, datamodule=dm)
    assert dm.use_buckets
    moved = [n for n, p in m.named_parameters() if n in lora_before and not torch.equal(p, lora_before[n])]
    assert any(n.startswith("unet.") for n in moved) and any(n.startswith("text_encoder_2.") for n in moved)
    pipe = components.pipeline(m.parts(), sampler="euler")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = pipe("a sks can", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    del m, pipe
    gc.collect()

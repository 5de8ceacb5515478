"""Slow: SD 1.5-, SD 2.1-, SDXL- and SD3.5-medium-size random components, and FLUX.1-dev's blocks at their real width,
through the real loading, training and sampling code."""

from __future__ import annotations

import ctypes
import gc
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from dreambooth_pl import components, tiny
from dreambooth_pl.architectures import architecture
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


def with_public_transformer(tiny_name: str, public: str, folder: Path, **change) -> Path:
    """`tiny_name`'s pipeline (its small text encoders and 16-channel VAE) with `public`'s transformer, random, stored
    bf16: the denoiser at its real size; only the two layers that read the text encoders take their tiny widths."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    folder = tiny.build_random(tiny_name, folder)
    tiny_cfg = architecture(tiny_name)["transformer"]
    cfg = {**architecture(public)["transformer"], "joint_attention_dim": tiny_cfg["joint_attention_dim"],
           "pooled_projection_dim": tiny_cfg["pooled_projection_dim"], **change}
    cls = SD3Transformer2DModel if tiny_name == "tiny-sd3" else FluxTransformer2DModel
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no fp32 copy of billions of weights
    try:
        torch.manual_seed(0)
        model = cls(**cfg)
    finally:
        torch.set_default_dtype(default)
    shutil.rmtree(folder / "transformer")
    model.save_pretrained(folder / "transformer")
    return folder


def lora_step_and_sample(folder: Path, tmp_path: Path, idle: str = "", **speed) -> DreamBoothModule:
    """One LoRA (rank 4) step on the frozen bf16 base and a 2-step 64 px sample; every LoRA weight must move but
    those whose name contains `idle` (adapters of a layer whose output the model discards: no gradient reaches
    them)."""
    m = DreamBoothModule(pretrained=str(folder), optim=Optimization(learning_rate=1e-4), lora=LoraSettings(rank=4),
                         speed=SpeedSettings(gradient_checkpointing=True, frozen_dtype="bf16", **speed))
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad and "lora_B" in n}
    assert before and all(n.startswith("unet.") for n in before)
    dm = DreamBoothDataModule(subject="t", class_noun="can", instance_dir=str(make_photos(tmp_path / "i", 2)),
                              class_dir=str(make_photos(tmp_path / "c", 2, seed=5)), resolution=64, min_image_size=64,
                              batch_size=1)
    pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, precision="bf16-mixed").fit(m, datamodule=dm)
    still = [n for n, p in m.named_parameters() if n in before and torch.equal(p, before[n])]
    assert all(idle and idle in n for n in still), f"{len(still)} LoRA tensors never changed: {still[:3]}"
    pipe = components.pipeline(m.parts(), sampler="default")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = pipe("a sks can", num_inference_steps=2, height=64, width=64, output_type="np", **m.backbone.sample_kwargs).images
    assert img.shape == (1, 64, 64, 3)
    return m


def test_sd35_medium_size_transformer_lora_trains_one_step_and_samples(tmp_path):
    """SD3.5 medium's MMDiT-X (24 layers, 1536 wide, dual attention, 2.2B) through the flow-matching step."""
    # The last block reads the text but does not update it (context_pre_only): its text queries are discarded.
    last = architecture("sd35-medium")["transformer"]["num_layers"] - 1
    m = lora_step_and_sample(with_public_transformer("tiny-sd3", "sd35-medium", tmp_path / "sd35m"), tmp_path,
                             idle=f"transformer_blocks.{last}.attn.add_q_proj.")
    assert m.backbone.name == "sd3" and sum(p.numel() for p in m.unet.parameters()) > 2_200_000_000


def test_flux_dev_blocks_at_real_width_lora_trains_over_int8_base_weights(tmp_path):
    """FLUX.1-dev's blocks (3072 wide, 24 heads, guidance embedding), one double and two single (the public model has
    19 and 38: 12B, more than this machine holds), with the 24 GB preset's int8 base weights (torchao)."""
    pytest.importorskip("torchao")
    folder = with_public_transformer("tiny-flux", "flux-dev", tmp_path / "flux", num_layers=1, num_single_layers=2)
    m = lora_step_and_sample(folder, tmp_path, quantize_base="int8")
    assert m.backbone.name == "flux" and m.unet.config.num_attention_heads * 128 == 3072

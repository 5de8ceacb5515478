"""Slow: SD 1.5- and SD 2.1-size random components through the real loading, training and sampling code."""

from __future__ import annotations

import gc

import pytest
import pytorch_lightning as pl
import torch

from dreambooth_pl import components, tiny
from dreambooth_pl.data import DreamBoothDataModule
from dreambooth_pl.module import DreamBoothModule

from .conftest import make_photos

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch, prediction", [("sd15", "epsilon"), ("sd21", "v_prediction")])
def test_public_architecture_trains_and_samples(arch, prediction, tmp_path):
    folder = tiny.build_random(arch, tmp_path / arch)  # diffusers layout, loaded back by from_pretrained
    m = DreamBoothModule(pretrained=str(folder), learning_rate=1e-5, gradient_checkpointing=True)
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
               enable_model_summary=False, callbacks=[Rec()]).fit(m, datamodule=dm)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
    assert not torch.equal(before, m.unet.conv_out.weight)
    pipe = components.pipeline(m.parts(), sampler="dpm++")
    img = pipe("a sks can", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    del m, pipe
    gc.collect()

"""DreamBoothModule: freezing, trainable counts, checkpoints, resume, determinism, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from dreambooth_pl.data import DreamBoothDataModule
from dreambooth_pl.module import DreamBoothModule, NonFiniteLossError, learning_probe


class LossRecorder(Callback):
    """Collects every step's train/loss parts."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def datamodule(photos, **kw) -> DreamBoothDataModule:
    args = dict(subject="t", class_noun="can", instance_dir=str(photos["instance"]), class_dir=str(photos["class"]),
                resolution=64, batch_size=2, min_image_size=64)
    return DreamBoothDataModule(**{**args, **kw})


def trainer(tmp_path, steps: int, callbacks=(), **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(callbacks=list(callbacks), **{**args, **kw})


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_parts_and_trainable_counts(tiny_dir):
    m = DreamBoothModule(pretrained="tiny")
    n_unet = sum(p.numel() for p in m.unet.parameters())
    assert sum(p.numel() for p in m.trainable_parameters()) == n_unet
    assert not any(p.requires_grad for p in m.vae.parameters())
    assert not any(p.requires_grad for p in m.text_encoder.parameters())
    m.train()
    assert m.unet.training and not m.vae.training and not m.text_encoder.training
    # The optimizer holds exactly the trainable parameters.
    opt = m.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.trainable_parameters()}


def test_train_text_encoder_adds_its_parameters(tiny_dir):
    m = DreamBoothModule(pretrained="tiny", train_text_encoder=True, text_encoder_learning_rate=1e-4)
    n = sum(p.numel() for p in m.unet.parameters()) + sum(p.numel() for p in m.text_encoder.parameters())
    assert sum(p.numel() for p in m.trainable_parameters()) == n
    m.train()
    assert m.text_encoder.training and not m.vae.training
    groups = m.configure_optimizers()["optimizer"].param_groups
    assert [g["lr"] for g in groups] == [m.hparams.learning_rate, 1e-4]


def test_steps_change_unet_only(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny", learning_rate=1e-3)
    vae0, te0, unet0 = state(m.vae), state(m.text_encoder), state(m.unet)
    trainer(tmp_path, 3).fit(m, datamodule=datamodule(photos))
    assert all(torch.equal(vae0[k], v) for k, v in m.vae.state_dict().items())
    assert all(torch.equal(te0[k], v) for k, v in m.text_encoder.state_dict().items())
    assert any(not torch.equal(unet0[k], v) for k, v in m.unet.state_dict().items())


def test_checkpoint_holds_trainable_weights_and_optimizer_only(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny")
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=2)
    trainer(tmp_path, 2, [ckpt_cb], enable_checkpointing=True).fit(m, datamodule=datamodule(photos))
    path = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # safe loading works
    assert set(ckpt["state_dict"]) == {f"unet.{k}" for k, _ in m.unet.named_parameters()}
    assert ckpt["optimizer_states"] and ckpt["global_step"] == 2
    trainable_bytes = sum(p.numel() * p.element_size() for p in m.trainable_parameters())
    all_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    # weights + two Adam moments (+ per-tensor pickle overhead); far below the whole model + optimizer
    assert path.stat().st_size < 1.05 * 3 * trainable_bytes
    assert path.stat().st_size < all_bytes + 2 * trainable_bytes


def test_resume_continues_step_count_and_weights(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny", learning_rate=1e-3)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer(tmp_path, 3, [ckpt_cb], enable_checkpointing=True).fit(m, datamodule=datamodule(photos))
    saved = state(m.unet)

    seen = {}

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["equal"] = all(torch.equal(saved[k], v) for k, v in pl_module.unet.state_dict().items())

    m2 = DreamBoothModule(pretrained="tiny", learning_rate=1e-3)
    t2 = trainer(tmp_path, 5, [AtStart()])
    t2.fit(m2, datamodule=datamodule(photos), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert seen == {"step": 3, "equal": True}
    assert t2.global_step == 5


def test_checkpoint_from_other_trainable_set_is_refused(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny")
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer(tmp_path, 1, [ckpt_cb], enable_checkpointing=True).fit(m, datamodule=datamodule(photos))
    m2 = DreamBoothModule(pretrained="tiny", train_text_encoder=True)
    with pytest.raises(KeyError, match="text_encoder"):
        trainer(tmp_path, 2).fit(m2, datamodule=datamodule(photos), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


def run_losses(photos, tmp_path, seed: int, steps: int = 4) -> list[float]:
    pl.seed_everything(seed)
    rec = LossRecorder()
    trainer(tmp_path, steps, [rec]).fit(DreamBoothModule(pretrained="tiny", learning_rate=1e-3),
                                        datamodule=datamodule(photos, seed=seed))
    return rec.losses


def test_same_seed_same_losses(tiny_dir, photos, tmp_path):
    a = run_losses(photos, tmp_path, seed=0)
    b = run_losses(photos, tmp_path, seed=0)
    c = run_losses(photos, tmp_path, seed=1)
    assert len(a) == 4 and a == b
    assert a != c


def test_non_finite_loss_stops_with_step(tiny_dir, photos, tmp_path):
    class Poison(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                batch["pixel_values"].fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"at step 2.*learning rate"):
        trainer(tmp_path, 5, [Poison()]).fit(DreamBoothModule(pretrained="tiny"), datamodule=datamodule(photos))


def test_v_prediction_trains(tiny_v_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny-v", learning_rate=1e-3)
    assert m.noise_scheduler.config.prediction_type == "v_prediction"
    rec = LossRecorder()
    trainer(tmp_path, 3, [rec]).fit(m, datamodule=datamodule(photos))
    assert len(rec.losses) == 3 and all(torch.isfinite(torch.tensor(rec.losses)))


def test_tiny_fit_with_prior_preservation_learns(tiny_dir, photos, tmp_path):
    pl.seed_everything(0)
    m = DreamBoothModule(pretrained="tiny", learning_rate=1e-3, lr_warmup_steps=5)
    dm = datamodule(photos)
    logged = []

    class Parts(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    trainer(tmp_path, 60, [Parts()]).fit(m, datamodule=dm)
    assert {"train/loss", "train/loss_instance", "train/loss_prior", "train/lr"} <= set(logged[-1])
    assert all(r["train/loss_prior"] > 0 for r in logged)  # class rows are in every batch
    base, tuned = learning_probe(m, dm)
    assert tuned <= 0.7 * base, (base, tuned)


def test_export_round_trip(tiny_dir, photos, tmp_path):
    from diffusers import StableDiffusionPipeline

    m = DreamBoothModule(pretrained="tiny", learning_rate=1e-3)
    trainer(tmp_path, 2).fit(m, datamodule=datamodule(photos))
    out = m.export(tmp_path / "export" / "model", metadata={"subject": "t"})
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model"]  # no temp folders left
    assert list(out.rglob("*.safetensors")) and not list(out.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert all(torch.equal(v, m.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    assert json.loads((out / "dreambooth_pl.json").read_text())["subject"] == "t"
    img = pipe("a sks can", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    # A second export replaces the first atomically.
    m.unet.conv_out.bias.data.add_(1.0)
    m.export(out)
    reloaded = StableDiffusionPipeline.from_pretrained(out)
    assert torch.equal(reloaded.unet.conv_out.bias, m.unet.conv_out.bias)
    assert sorted(p.name for p in Path(tmp_path / "export").iterdir()) == ["model"]


def test_denoising_mse_is_deterministic(tiny_dir):
    m = DreamBoothModule(pretrained="tiny")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert m.denoising_mse(x, ["a sks can"] * 2) == m.denoising_mse(x, ["a sks can"] * 2)


# ------------------------------------------------------------------------------------ speed / memory options


def option_losses(photos, tmp_path, steps: int = 3, dm_kw=None, precision="32-true", **mod_kw) -> list[float]:
    """Losses of a short seeded fit with center crops and no flips (so every option sees the same images)."""
    pl.seed_everything(0)
    rec = LossRecorder()
    dm = datamodule(photos, center_crop=True, random_flip=False, **(dm_kw or {}))
    trainer(tmp_path, steps, [rec], precision=precision).fit(
        DreamBoothModule(pretrained="tiny", learning_rate=1e-3, **mod_kw), datamodule=dm)
    return rec.losses


@pytest.fixture(scope="module")
def plain_losses(tiny_dir, tmp_path_factory):
    from .conftest import make_photos

    tmp = tmp_path_factory.mktemp("plain")
    p = {"instance": make_photos(tmp / "instance", 4, seed=1), "class": make_photos(tmp / "class", 6, seed=2, kind="noise")}
    return p, option_losses(p, tmp, cache_text_embeddings=False)


def test_cached_latents_equal_uncached(plain_losses, tmp_path):
    photos, plain = plain_losses
    cached = option_losses(photos, tmp_path, dm_kw={"cache_latents": True}, cache_latents=True)
    assert cached == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_cached_latents_skip_image_decoding_and_need_center_crop(tiny_dir, photos):
    from dreambooth_pl.data import DataError

    dm = datamodule(photos, center_crop=True, cache_latents=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "pixel_values" not in batch and batch["image_index"].shape == (4,)
    with pytest.raises(DataError, match="center_crop"):
        datamodule(photos, center_crop=False, cache_latents=True)


def test_cached_latents_cover_both_flips(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny", cache_latents=True)
    dm = datamodule(photos, center_crop=True, random_flip=True, cache_latents=True)
    trainer(tmp_path, 1).fit(m, datamodule=dm)
    cache = m._latent_cache["instance"]  # (N, 2 flips, 2 moments, 4, h, w)
    assert cache.shape[:3] == (4, 2, 2)
    from dreambooth_pl.data import DreamBoothDataset

    ds = DreamBoothDataset(dm.instance_images, "", resolution=64, center_crop=True, random_flip=False)
    x = ds[0]["instance_pixel_values"][None]  # (1, 3, 64, 64), unflipped
    # slot 0 holds the image's moments, slot 1 those of its mirror image
    assert torch.allclose(cache[0, 0, 0], m.latent_moments(x)[0][0], atol=1e-5)
    assert torch.allclose(cache[0, 1, 0], m.latent_moments(x.flip(-1))[0][0], atol=1e-5)
    assert not torch.allclose(cache[0, 0, 0], cache[0, 1, 0], atol=1e-3)


@pytest.mark.parametrize("option, tol", [
    ({"cache_text_embeddings": True}, 1e-6),
    ({"gradient_checkpointing": True}, 1e-5),
    ({"channels_last": True}, 1e-4),
    ({"optimizer": "adamw_fused"}, 1e-4),
    ({"frozen_dtype": "bf16"}, 5e-2),
])
def test_option_trains_like_the_plain_path(plain_losses, tmp_path, option, tol):
    photos, plain = plain_losses
    assert option_losses(photos, tmp_path, **option) == pytest.approx(plain, rel=tol, abs=tol)


def test_bf16_mixed_precision_close_to_fp32(plain_losses, tmp_path):
    photos, plain = plain_losses
    assert option_losses(photos, tmp_path, precision="bf16-mixed") == pytest.approx(plain, rel=5e-2, abs=5e-2)


def test_loss_options_change_the_loss_as_defined(plain_losses, tmp_path):
    """min-SNR and offset noise are different objectives: finite, and not the plain loss."""
    photos, plain = plain_losses
    snr = option_losses(photos, tmp_path, snr_gamma=5.0)
    off = option_losses(photos, tmp_path, noise_offset=0.1)
    for losses in (snr, off):
        assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))) and losses != plain


def test_text_encoder_training_with_half_frozen_parts(tiny_dir, photos, tmp_path):
    """Trainable weights stay fp32 (no 'unscale FP16 gradients'); the frozen VAE is half precision."""
    m = DreamBoothModule(pretrained="tiny", train_text_encoder=True, frozen_dtype="bf16", learning_rate=1e-4)
    assert m.vae.dtype == torch.bfloat16 and m.text_encoder.dtype == torch.float32 and m.unet.dtype == torch.float32
    te0 = state(m.text_encoder)
    trainer(tmp_path, 2, precision="bf16-mixed").fit(m, datamodule=datamodule(photos))
    assert any(not torch.equal(te0[k], v) for k, v in m.text_encoder.state_dict().items())


def test_lora_trains_only_adapter_weights(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny", lora_rank=4, lora_text_encoder=True, learning_rate=1e-3)
    names = m.trainable_state_names()
    assert names and all("lora_" in n for n in names)
    assert any(n.startswith("text_encoder.") for n in names) and any(n.startswith("unet.") for n in names)
    base = {k: v.clone() for k, v in m.unet.state_dict().items() if "lora_" not in k}
    lora0 = {k: v.clone() for k, v in m.unet.state_dict().items() if "lora_" in k}
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=2)
    trainer(tmp_path, 2, [ckpt_cb], enable_checkpointing=True).fit(m, datamodule=datamodule(photos))
    after = m.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())  # base weights untouched
    assert any(not torch.equal(v, after[k]) for k, v in lora0.items())
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == names  # the checkpoint is the adapters only


def test_adamw_8bit_without_bitsandbytes_says_how(tiny_dir):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes installed")
    except ImportError:
        pass
    m = DreamBoothModule(pretrained="tiny", optimizer="adamw_8bit")
    with pytest.raises(ImportError, match="bitsandbytes"):
        m.configure_optimizers()


def test_lora_fit_exports_both_formats_that_change_the_output(tiny_dir, photos, tmp_path):
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from dreambooth_pl.export import export_lora

    m = DreamBoothModule(pretrained="tiny", lora_rank=4, learning_rate=1e-2)
    trainer(tmp_path, 3).fit(m, datamodule=datamodule(photos))
    paths = export_lora(m, tmp_path / "lora")

    def image(lora: str | None):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
        pipe.set_progress_bar_config(disable=True)
        if lora:
            pipe.load_lora_weights(lora)
        return pipe("a sks can", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base, diffusers_fmt, kohya_fmt = image(None), image(str(paths["diffusers"].parent)), image(str(paths["kohya"]))
    assert np.abs(diffusers_fmt - base).max() > 1e-4
    assert np.abs(kohya_fmt - diffusers_fmt).max() < 1e-2  # kohya file is fp16

"""DreamBoothModule: freezing, trainable counts, the loss, the optimizer, checkpoints, resume, determinism, options."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.strategies import FSDPStrategy

from dreambooth_pl.components import ModelSource, load_components
from dreambooth_pl.data import DreamBoothDataset
from dreambooth_pl.losses import fixed_draws
from dreambooth_pl.module import (
    VAL_DRAWS,
    DreamBoothModule,
    LoraSettings,
    MissingPackageError,
    NonFiniteLossError,
    Optimization,
    SpeedSettings,
)
from dreambooth_pl.priors import PriorSampling

from .conftest import make_datamodule, make_photos, make_trainer

# The layers LoRA adapts by default (peft matches a target as the full name or its last dotted part).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class Tape(Callback):
    """Records every step: its batch (cloned), the global RNG state it starts from, its loss and what it logged."""

    def __init__(self):
        self.steps: list[dict] = []

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        self.steps.append({"batch": batch, "rng": torch.get_rng_state()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.steps[-1].update(loss=float(outputs["loss"]), logged=logged)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def numel(params) -> int:
    return sum(p.numel() for p in params)


def optimizer_ids(opt: torch.optim.Optimizer) -> list[int]:
    return [id(p) for g in opt.param_groups for p in g["params"]]


def assert_optimizer_holds_exactly_the_trainable(m: DreamBoothModule) -> torch.optim.Optimizer:
    opt = m.make_optimizer()  # no Trainer needed
    ids = optimizer_ids(opt)
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in m.trainable_parameters()}
    return opt


@pytest.fixture(scope="module")
def base_parts(tiny_dir):
    """The tiny model as loaded, with no adapters: what adapter sizes are computed from."""
    return load_components(str(tiny_dir))


def lora_size(model: torch.nn.Module, targets: tuple[str, ...], rank: int) -> tuple[int, int]:
    """(adapted Linear layers, LoRA parameters): each adapted (in -> out) layer gains rank * (in + out) weights."""
    layers = [m for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    return len(layers), sum(rank * (m.in_features + m.out_features) for m in layers)


def test_frozen_parts_and_trainable_counts(tiny_dir):
    m = DreamBoothModule(pretrained="tiny")
    n_unet = sum(p.numel() for p in m.unet.parameters())
    assert sum(p.numel() for p in m.trainable_parameters()) == n_unet
    assert not any(p.requires_grad for p in m.vae.parameters())
    assert not any(p.requires_grad for p in m.text_encoder.parameters())
    m.train()
    assert m.unet.training and not m.vae.training and not m.text_encoder.training
    # The optimizer holds exactly the trainable parameters, at the configured rate.
    opt = assert_optimizer_holds_exactly_the_trainable(m)
    assert [g["lr"] for g in opt.param_groups] == [Optimization().learning_rate]


def test_train_text_encoder_adds_its_parameters(tiny_dir):
    m = DreamBoothModule(pretrained="tiny", train_text_encoder=True, optim=Optimization(text_encoder_learning_rate=1e-4))
    n = sum(p.numel() for p in m.unet.parameters()) + sum(p.numel() for p in m.text_encoder.parameters())
    assert sum(p.numel() for p in m.trainable_parameters()) == n
    m.train()
    assert m.text_encoder.training and not m.vae.training
    groups = assert_optimizer_holds_exactly_the_trainable(m).param_groups
    assert [g["lr"] for g in groups] == [m.optim.learning_rate, 1e-4]
    assert numel(groups[1]["params"]) == numel(m.text_encoder.parameters())


@pytest.mark.parametrize("rank, text_rank", [(2, 0), (4, 0), (4, 3), (0, 3)])
def test_lora_trainable_counts(base_parts, rank, text_rank):
    m = DreamBoothModule(pretrained="tiny", lora=LoraSettings(rank=rank, text_encoder_rank=text_rank))
    unet_layers, unet_lora = lora_size(base_parts.unet, UNET_TARGETS, rank)
    text_layers, text_lora = lora_size(base_parts.text_encoder, TEXT_TARGETS, text_rank)
    # 4 transformer blocks x 2 attentions x 4 projections; 2 CLIP layers x 4 projections
    assert (unet_layers, text_layers) == (32, 8)
    unet_trainable = unet_lora if rank else numel(base_parts.unet.parameters())  # rank 0: the whole UNet trains
    assert numel(p for p in m.unet.parameters() if p.requires_grad) == unet_trainable
    assert numel(p for p in m.text_encoder.parameters() if p.requires_grad) == text_lora
    assert numel(m.trainable_parameters()) == unet_trainable + text_lora
    assert not any(p.requires_grad for p in m.vae.parameters())
    if rank:
        assert all("lora_" in n for n in m.trainable_state_names())
    opt = assert_optimizer_holds_exactly_the_trainable(m)
    assert len(opt.param_groups) == (2 if text_rank else 1)


def test_train_text_encoder_and_text_encoder_lora_conflict(tiny_dir):
    with pytest.raises(ValueError) as err:
        DreamBoothModule(pretrained="tiny", train_text_encoder=True, lora=LoraSettings(text_encoder_rank=4))
    assert "train_text_encoder" in str(err.value) and "text_encoder_rank" in str(err.value)


# ------------------------------------------------------------------------------------------ the loss


def reference_loss(m: DreamBoothModule, step: dict, snr_gamma: float | None = None, noise_offset: float = 0.0,
                   prior_loss_weight: float = 1.0) -> float:
    """The DreamBooth loss of a taped step, computed the diffusers-example way from `m`'s components."""
    batch, sched = step["batch"], m.noise_scheduler
    torch.set_rng_state(step["rng"])  # draws in the training step's order: posterior sample, noise, offset, t
    with torch.no_grad():
        latents = m.vae.encode(batch["pixel_values"]).latent_dist.sample() * m.vae.config.scaling_factor
        noise = torch.randn(latents.shape)
        if noise_offset:
            noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],))
        ids = m.tokenizer(batch["prompts"], padding="max_length", max_length=m.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
        pred = m.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=m.text_encoder(ids)[0]).sample
    v = sched.config.prediction_type == "v_prediction"
    target = sched.get_velocity(latents, noise, t) if v else noise
    per_row = (pred - target).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma:
        a = sched.alphas_cumprod[t]
        snr = a / (1 - a)
        per_row = per_row * torch.minimum(snr, torch.full_like(snr, snr_gamma)) / (snr + 1 if v else snr)
    n = batch["num_instance"]
    return float(per_row[:n].mean() + prior_loss_weight * per_row[n:].mean())


@pytest.mark.integration
def test_compute_loss_equals_the_logged_training_loss(tiny_dir, photos, tmp_path):
    pl.seed_everything(0)
    tape = Tape()
    make_trainer(tmp_path, 1, [tape]).fit(DreamBoothModule(pretrained="tiny"), datamodule=make_datamodule(photos))
    (step,) = tape.steps
    fresh = DreamBoothModule(pretrained="tiny")  # the weights the fit's first step saw
    torch.set_rng_state(step["rng"])
    loss, parts = fresh.compute_loss(step["batch"])
    assert loss.item() == step["logged"]["train/loss"] == step["loss"]
    assert parts["instance"].item() == step["logged"]["train/loss_instance"]
    assert parts["prior"].item() == step["logged"]["train/loss_prior"]
    assert step["logged"]["train/loss"] == pytest.approx(reference_loss(fresh, step), rel=1e-5)


@pytest.mark.integration
def test_steps_change_unet_only(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=1e-3))
    vae0, te0, unet0 = state(m.vae), state(m.text_encoder), state(m.unet)
    tape = Tape()
    make_trainer(tmp_path, 3, [tape]).fit(m, datamodule=make_datamodule(photos))
    assert all(torch.equal(vae0[k], v) for k, v in m.vae.state_dict().items())
    assert all(torch.equal(te0[k], v) for k, v in m.text_encoder.state_dict().items())
    assert any(not torch.equal(unet0[k], v) for k, v in m.unet.state_dict().items())
    # The UNet moved exactly as three AdamW steps on compute_loss of the same batches move it.
    replay = DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=1e-3))
    opt = replay.make_optimizer()
    for step in tape.steps:
        torch.set_rng_state(step["rng"])
        opt.zero_grad()
        loss, _ = replay.compute_loss(step["batch"])
        assert loss.item() == step["loss"]
        loss.backward()
        opt.step()
    after = replay.unet.state_dict()
    assert all(torch.allclose(v, after[k], rtol=0, atol=1e-7) for k, v in m.unet.state_dict().items())


@pytest.mark.integration
def test_checkpoint_holds_trainable_weights_and_optimizer_only(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=1e-4), lora=LoraSettings(),
                         speed=SpeedSettings(channels_last=True))
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=2)
    make_trainer(tmp_path, 2, [ckpt_cb], enable_checkpointing=True).fit(m, datamodule=make_datamodule(photos))
    path = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # safe loading works
    assert set(ckpt["state_dict"]) == {f"unet.{k}" for k, _ in m.unet.named_parameters()}
    assert ckpt["optimizer_states"] and ckpt["global_step"] == 2
    # The config groups are stored as plain values.
    hp = ckpt["hyper_parameters"]
    assert hp["pretrained"] == "tiny" and hp["train_text_encoder"] is False
    assert hp["optim"] == dataclasses.asdict(Optimization(learning_rate=1e-4))
    assert hp["lora"] == dataclasses.asdict(LoraSettings())
    assert hp["speed"] == dataclasses.asdict(SpeedSettings(channels_last=True))
    trainable_bytes = sum(p.numel() * p.element_size() for p in m.trainable_parameters())
    all_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    # weights + two Adam moments (+ per-tensor pickle overhead); far below the whole model + optimizer
    assert path.stat().st_size < 1.05 * 3 * trainable_bytes
    assert path.stat().st_size < all_bytes + 2 * trainable_bytes


@pytest.mark.integration
def test_resume_continues_step_count_and_weights(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=1e-3))
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    make_trainer(tmp_path, 3, [ckpt_cb], enable_checkpointing=True).fit(m, datamodule=make_datamodule(photos))
    saved = state(m.unet)

    seen = {}

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["equal"] = all(torch.equal(saved[k], v) for k, v in pl_module.unet.state_dict().items())

    m2 = DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=1e-3))
    t2 = make_trainer(tmp_path, 5, [AtStart()])
    t2.fit(m2, datamodule=make_datamodule(photos), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert seen == {"step": 3, "equal": True}
    assert t2.global_step == 5


@pytest.mark.integration
def test_checkpoint_from_other_trainable_set_is_refused(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny")
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    make_trainer(tmp_path, 1, [ckpt_cb], enable_checkpointing=True).fit(m, datamodule=make_datamodule(photos))
    m2 = DreamBoothModule(pretrained="tiny", train_text_encoder=True)
    with pytest.raises(KeyError, match="text_encoder"):
        make_trainer(tmp_path, 2).fit(m2, datamodule=make_datamodule(photos), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


def run_losses(photos, tmp_path, seed: int, steps: int = 4) -> list[float]:
    pl.seed_everything(seed)
    tape = Tape()
    make_trainer(tmp_path, steps, [tape]).fit(DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=1e-3)),
                                              datamodule=make_datamodule(photos, seed=seed))
    return tape.losses


@pytest.mark.integration
def test_same_seed_same_losses(tiny_dir, photos, tmp_path):
    a = run_losses(photos, tmp_path, seed=0)
    b = run_losses(photos, tmp_path, seed=0)
    c = run_losses(photos, tmp_path, seed=1)
    assert len(a) == 4 and a == b
    assert a != c


@pytest.mark.integration
def test_non_finite_loss_stops_with_step(tiny_dir, photos, tmp_path):
    class Poison(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                batch["pixel_values"].fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"at step 2.*learning rate"):
        make_trainer(tmp_path, 5, [Poison()]).fit(DreamBoothModule(pretrained="tiny"), datamodule=make_datamodule(photos))


@pytest.mark.integration
def test_v_prediction_trains(tiny_v_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny-v", optim=Optimization(learning_rate=1e-3))
    assert m.noise_scheduler.config.prediction_type == "v_prediction"
    tape = Tape()
    make_trainer(tmp_path, 3, [tape]).fit(m, datamodule=make_datamodule(photos))
    assert len(tape.losses) == 3 and all(torch.isfinite(torch.tensor(tape.losses)))
    # The first step's loss is the MSE to diffusers' velocity target.
    assert tape.losses[0] == pytest.approx(reference_loss(DreamBoothModule(pretrained="tiny-v"), tape.steps[0]), rel=1e-5)


def test_denoising_mse_is_deterministic(tiny_dir):
    m = DreamBoothModule(pretrained="tiny")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert m.denoising_mse(x, ["a sks can"] * 2) == m.denoising_mse(x, ["a sks can"] * 2)


# ------------------------------------------------------------------------------------ validation loss


class Logged(Callback):
    """What each validation logged (val/*), by the step it ran after."""

    def __init__(self):
        self.at: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer, pl_module):
        self.at[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def test_validation_loss_is_the_fixed_noise_mse_of_each_split(tiny_dir, photos):
    """validation_step: the plain MSE to the target at each image's own fixed noise and timesteps (VAL_DRAWS of them),
    logged per split; the same number every time."""
    m = DreamBoothModule(pretrained="tiny").eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    batch = {"pixel_values": x, "prompts": ["a can"] * 2, "split": "prior", "seeds": torch.tensor([5, 9])}
    logged = {}
    m.log = lambda key, value, **kw: logged.update({key: (float(value), kw["batch_size"])})
    loss = m.validation_step(batch, 0)
    assert m.validation_step(batch, 0) == loss and logged == {"val/loss_prior": (float(loss), 2)}
    latents = m.vae.encode(x).latent_dist.mean * m.vae.config.scaling_factor
    cond = m.text_encoder(m.tokenizer(["a can"] * 2, padding="max_length", max_length=m.tokenizer.model_max_length,
                                      return_tensors="pt").input_ids)[0]
    expected = []
    for k in range(VAL_DRAWS):  # row i: draw k of the generator seeded with its seed
        draws = [fixed_draws([s], (4, 8, 8), VAL_DRAWS, 1000) for s in (5, 9)]
        noise = torch.cat([n[k] for n, _ in draws])
        t = torch.cat([ts[k] for _, ts in draws])
        noisy = m.noise_scheduler.add_noise(latents, noise, t)
        expected.append(torch.nn.functional.mse_loss(m.unet(noisy, t, cond).sample, noise))
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean().detach()), rel=1e-5)


@pytest.mark.integration
def test_validation_during_fit_logs_both_losses_and_leaves_training_as_it_was(tiny_dir, photos, tmp_path):
    """Every val_check_interval batches: val/loss_prior (held-out class images) and val/loss_instance; the training
    steps are the ones a fit without validation takes (validation draws nothing from their random stream)."""
    # Generated class images (the tiny model, 2 steps): 4 trained on, 2 held out.
    dm_kw = dict(class_dir=None, num_class_images=4, val_class_images=2, model=ModelSource("tiny"),
                 prior=PriorSampling(steps=2, batch_size=6))
    logged, with_val = Logged(), Tape()
    pl.seed_everything(0)
    make_trainer(tmp_path, 4, [logged, with_val], limit_val_batches=1.0, val_check_interval=2, num_sanity_val_steps=0,
                 check_val_every_n_epoch=None).fit(DreamBoothModule(pretrained="tiny"), make_datamodule(photos, **dm_kw))
    without = Tape()
    pl.seed_everything(0)
    make_trainer(tmp_path, 4, [without]).fit(DreamBoothModule(pretrained="tiny"), make_datamodule(photos, **dm_kw))
    assert sorted(logged.at) == [2, 4] and all(set(v) == {"val/loss_prior", "val/loss_instance"} for v in logged.at.values())
    assert with_val.losses == without.losses


@pytest.mark.integration
def test_validation_scores_the_ema_weights_and_training_goes_on_with_its_own(tiny_dir, photos, tmp_path):
    class Seen(Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.weight = pl_module.unet.conv_out.weight.detach().clone()

    seen = Seen()
    m = DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=1e-3, ema_decay=0.9))
    make_trainer(tmp_path, 2, [seen], limit_val_batches=1, val_check_interval=2, check_val_every_n_epoch=None).fit(
        m, make_datamodule(photos))  # validation after the last step: the EMA is as validation saw it
    conv = next(i for i, p in enumerate(m.trainable_parameters()) if p is m.unet.conv_out.weight)
    averaged = m.ema.shadow_params[conv]
    assert torch.equal(seen.weight, averaged)  # validation scored the average
    assert not torch.equal(m.unet.conv_out.weight, averaged)  # and gave the trained weights back


# ------------------------------------------------------------------------------------ speed / memory options


def option_run(photos, tmp_path, steps: int = 3, dm_kw=None, precision="32-true", optim=None, speed=None,
               **mod_kw) -> Tape:
    """A short seeded fit with center crops and no flips (so every option sees the same images); `optim` and
    `speed` override the groups' fields."""
    pl.seed_everything(0)
    tape = Tape()
    dm = make_datamodule(photos, center_crop=True, random_flip=False, **(dm_kw or {}))
    m = DreamBoothModule(pretrained="tiny", optim=Optimization(**{"learning_rate": 1e-3, **(optim or {})}),
                         speed=SpeedSettings(**(speed or {})), **mod_kw)
    make_trainer(tmp_path, steps, [tape], precision=precision).fit(m, datamodule=dm)
    return tape


def option_losses(photos, tmp_path, **kw) -> list[float]:
    return option_run(photos, tmp_path, **kw).losses


@pytest.fixture(scope="module")
def plain_losses(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    p = {"instance": make_photos(tmp / "instance", 4, seed=1), "class": make_photos(tmp / "class", 6, seed=2, kind="noise")}
    return p, option_losses(p, tmp, speed={"cache_text_embeddings": False})


@pytest.mark.integration
def test_cached_latents_equal_uncached(plain_losses, tmp_path):
    photos, plain = plain_losses
    cached = option_losses(photos, tmp_path, dm_kw={"cache_latents": True}, speed={"cache_latents": True})
    assert cached == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_cached_latents_skip_image_decoding_and_need_center_crop(tiny_dir, photos):
    from dreambooth_pl.data import DataError

    dm = make_datamodule(photos, center_crop=True, cache_latents=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "pixel_values" not in batch and batch["image_index"].shape == (4,)
    with pytest.raises(DataError, match="center_crop"):
        make_datamodule(photos, center_crop=False, cache_latents=True)


@pytest.mark.integration
def test_cached_latents_cover_both_flips(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny", speed=SpeedSettings(cache_latents=True))
    dm = make_datamodule(photos, center_crop=True, random_flip=True, cache_latents=True)
    make_trainer(tmp_path, 1).fit(m, datamodule=dm)
    assert {k for k in m._latent_cache if k[0] == "instance"} == {("instance", j, -1) for j in range(4)}
    cache, ids = m._latent_cache[("instance", 0, -1)]  # (2 flips, 2 moments, 4, h, w), (2, 6)
    assert cache.shape[:2] == (2, 2) and ids.shape == (2, 6)
    ds = DreamBoothDataset(dm.instance_images, "", resolution=64, center_crop=True, random_flip=False)
    x = ds[0]["instance_pixel_values"][None]  # (1, 3, 64, 64), unflipped
    # slot 0 holds the image's moments, slot 1 those of its mirror image
    assert torch.allclose(cache[0, 0], m.latent_moments(x)[0][0], atol=1e-5)
    assert torch.allclose(cache[1, 0], m.latent_moments(x.flip(-1))[0][0], atol=1e-5)
    assert not torch.allclose(cache[0, 0], cache[1, 0], atol=1e-3)
    assert torch.equal(ids[0], ds[0]["instance_time_ids"])  # the view's size/crop ids travel with it


@pytest.mark.parametrize("random_flip", [True, False])
def test_cache_latents_fills_the_moments_of_the_views(tiny_dir, photos, random_flip):
    m = DreamBoothModule(pretrained="tiny")
    dm = make_datamodule(photos, center_crop=True, random_flip=random_flip)
    dm.setup("fit")
    m.cache_latents(dm.cache_views(), progress=False)
    flips = 2 if random_flip else 1
    for split, n in (("instance", 4), ("class", 6)):
        keys = sorted(k for k in m._latent_cache if k[0] == split)
        assert keys == [(split, i, -1) for i in range(n)]
        for i, views in enumerate(dm.fixed_views(split)):  # views (F, 3, 64, 64)
            cache, _ = m._latent_cache[(split, i, -1)]
            assert cache.shape == (flips, 2, 4, 8, 8)
            mean, std = m.latent_moments(views)
            assert torch.allclose(cache[:, 0], mean, atol=1e-6) and torch.allclose(cache[:, 1], std, atol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("option, tol", [
    ({"speed": {"cache_text_embeddings": True}}, 1e-6),
    ({"speed": {"gradient_checkpointing": True}}, 1e-5),
    ({"speed": {"channels_last": True}}, 1e-4),
    ({"optim": {"optimizer": "adamw_fused"}}, 1e-4),
    ({"speed": {"frozen_dtype": "bf16"}}, 5e-2),
])
def test_option_trains_like_the_plain_path(plain_losses, tmp_path, option, tol):
    photos, plain = plain_losses
    assert option_losses(photos, tmp_path, **option) == pytest.approx(plain, rel=tol, abs=tol)


@pytest.mark.integration
def test_bf16_mixed_precision_close_to_fp32(plain_losses, tmp_path):
    photos, plain = plain_losses
    assert option_losses(photos, tmp_path, precision="bf16-mixed") == pytest.approx(plain, rel=5e-2, abs=5e-2)


# gamma 1 (not the usual 5): it clips the weights of the first step's timesteps, so that step tells the two apart
@pytest.mark.integration
@pytest.mark.parametrize("option", [{"snr_gamma": 1.0}, {"noise_offset": 0.1}, {"prior_loss_weight": 0.5}])
def test_loss_options_change_the_loss_as_defined(plain_losses, tmp_path, option):
    """min-SNR, offset noise and the prior weight are different objectives: the first step's loss is the
    reference loss with that option, not the plain loss."""
    photos, plain = plain_losses
    tape = option_run(photos, tmp_path, **option)
    losses = tape.losses
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))) and losses != plain
    fresh = DreamBoothModule(pretrained="tiny")
    expected = reference_loss(fresh, tape.steps[0], **option)
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert losses[0] != pytest.approx(reference_loss(fresh, tape.steps[0]), rel=1e-3)  # the option mattered


@pytest.mark.integration
def test_text_encoder_training_with_half_frozen_parts(tiny_dir, photos, tmp_path):
    """Trainable weights stay fp32 (no 'unscale FP16 gradients'); the frozen VAE is half precision."""
    m = DreamBoothModule(pretrained="tiny", train_text_encoder=True, speed=SpeedSettings(frozen_dtype="bf16"),
                         optim=Optimization(learning_rate=1e-4))
    assert m.vae.dtype == torch.bfloat16 and m.text_encoder.dtype == torch.float32 and m.unet.dtype == torch.float32
    te0 = state(m.text_encoder)
    make_trainer(tmp_path, 2, precision="bf16-mixed").fit(m, datamodule=make_datamodule(photos))
    assert any(not torch.equal(te0[k], v) for k, v in m.text_encoder.state_dict().items())


@pytest.mark.integration
def test_lora_trains_only_adapter_weights(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny", lora=LoraSettings(rank=4, text_encoder_rank=4),
                         optim=Optimization(learning_rate=1e-3))
    names = m.trainable_state_names()
    assert names and all("lora_" in n for n in names)
    assert any(n.startswith("text_encoder.") for n in names) and any(n.startswith("unet.") for n in names)
    base = {k: v.clone() for k, v in m.unet.state_dict().items() if "lora_" not in k}
    lora0 = {k: v.clone() for k, v in m.unet.state_dict().items() if "lora_" in k}
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=2)
    make_trainer(tmp_path, 2, [ckpt_cb], enable_checkpointing=True).fit(m, datamodule=make_datamodule(photos))
    after = m.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())  # base weights untouched
    assert any(not torch.equal(v, after[k]) for k, v in lora0.items())
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == names  # the checkpoint is the adapters only


def test_adamw_8bit_without_bitsandbytes_says_how(tiny_dir):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes installed")
    except ImportError:
        pass
    m = DreamBoothModule(pretrained="tiny", optim=Optimization(optimizer="adamw_8bit"))
    with pytest.raises(MissingPackageError, match=r"adamw_8bit needs bitsandbytes.*pip install"):
        m.make_optimizer()


# ----------------------------------------------------------------------------------------- prior_loss: teacher


@pytest.mark.integration
@pytest.mark.parametrize("lora", [LoraSettings(), LoraSettings(rank=4)], ids=["full", "lora"])
def test_teacher_prior_is_zero_before_training_and_the_teacher_stays_the_base(tiny_dir, photos, tmp_path, lora):
    m = DreamBoothModule(pretrained="tiny", prior_loss="teacher", lora=lora, optim=Optimization(learning_rate=1e-3))
    assert numel(m.trainable_parameters()) == numel(DreamBoothModule(pretrained="tiny", lora=lora).trainable_parameters())
    assert (m.teacher_unet is None) == bool(lora.rank)  # LoRA's teacher is the UNet with its adapters off
    dm = make_datamodule(photos, with_prior_preservation=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["class_prompt"] == "a can" and len(batch["prompts"]) == batch["num_instance"]
    _, parts = m.compute_loss(batch)
    # The student is still the base model: the same class-prompt predictions (batched 2N vs N rows: float noise).
    assert parts["prior"].item() == pytest.approx(0.0, abs=1e-10)
    base = state(load_components(str(tiny_dir)).unet)
    make_trainer(tmp_path, 3).fit(m, datamodule=dm)
    torch.manual_seed(0)
    _, parts = m.compute_loss(batch)
    assert parts["prior"].item() > 0
    # The target is the base model's prediction: the teacher's weights are the pretrained ones after training.
    with m.base_unet() as teacher:
        got = {k.replace(".base_layer", ""): v for k, v in teacher.state_dict().items() if "lora_" not in k}
        assert all(torch.equal(base[k], got[k]) for k in base)


def test_teacher_prior_equals_the_mse_to_the_frozen_base_prediction(tiny_dir, photos):
    m = DreamBoothModule(pretrained="tiny", prior_loss="teacher", prior_loss_weight=0.5)
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a student that has moved away from the base
    dm = make_datamodule(photos, with_prior_preservation=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(3)
    loss, parts = m.compute_loss(batch)
    torch.manual_seed(3)  # the same draws, recomputed by hand: posterior sample, noise, timesteps
    base = load_components(str(tiny_dir)).unet
    with torch.no_grad():
        latents = m.vae.encode(batch["pixel_values"]).latent_dist.sample() * m.vae.config.scaling_factor
        noise = torch.randn(latents.shape)
        t = torch.randint(0, 1000, (latents.shape[0],))
        noisy = m.noise_scheduler.add_noise(latents, noise, t)
        cls = m.encode_prompts([batch["class_prompt"]] * len(t)).hidden  # (B, 77, D)
        student = m.unet(noisy, t, encoder_hidden_states=cls).sample
        teacher = base(noisy, t, encoder_hidden_states=cls).sample
    expected = (student - teacher).pow(2).mean()
    assert parts["prior"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(parts["instance"].item() + 0.5 * expected.item(), rel=1e-5)


def test_teacher_prior_with_class_images_constrains_the_class_latents_too(tiny_dir, photos):
    """With class images, the teacher rows are each photo's noisy latents and each class image's, both with the class
    prompt, and their target is the base model's prediction (the class images' noise is not the target)."""
    m = DreamBoothModule(pretrained="tiny", prior_loss="teacher")
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dm = make_datamodule(photos)  # with class images: rows [0, B) photos, [B, 2B) class images
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    n = batch["num_instance"]
    torch.manual_seed(4)
    _, parts = m.compute_loss(batch)
    torch.manual_seed(4)
    base = load_components(str(tiny_dir)).unet
    with torch.no_grad():
        latents = m.vae.encode(batch["pixel_values"]).latent_dist.sample() * m.vae.config.scaling_factor  # (2B, ...)
        noise = torch.randn(latents.shape)
        t = torch.randint(0, 1000, (latents.shape[0],))
        noisy = m.noise_scheduler.add_noise(latents, noise, t)
        rows = torch.cat([torch.arange(n), torch.arange(n, 2 * n)])  # photos, then class images
        cls = m.encode_prompts(["a can"] * len(rows)).hidden
        student = m.unet(noisy[rows], t[rows], encoder_hidden_states=cls).sample
        teacher = base(noisy[rows], t[rows], encoder_hidden_states=cls).sample
    assert parts["prior"].item() == pytest.approx((student - teacher).pow(2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("text", ["lora", "full"])
def test_the_teacher_is_conditioned_by_the_base_text_encoder_while_it_trains(tiny_dir, text):
    """A training text encoder (its LoRA, or all of it) conditions the student; the teacher rows get the base encoder's
    class-prompt states, also after the encoder has moved."""
    kw = dict(lora=LoraSettings(text_encoder_rank=4)) if text == "lora" else dict(train_text_encoder=True)
    m = DreamBoothModule(pretrained="tiny", prior_loss="teacher", **kw)
    base = DreamBoothModule(pretrained="tiny")
    with torch.no_grad():
        for p in m.text_encoder.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # the encoder has trained
    want = base.encode_prompts(["a can"]).hidden
    assert not torch.allclose(m.encode_prompts(["a can"]).hidden, want, atol=1e-4)  # the student's states moved
    assert torch.allclose(m.teacher_conditioning(["a can"]).hidden, want, atol=1e-6)
    assert torch.allclose(m.encode_prompts(["a can"]).hidden, m.encode_prompts(["a can"]).hidden)  # adapters back on
    assert not torch.allclose(m.encode_prompts(["a can"]).hidden, want, atol=1e-4)


def test_fused_adamw_with_gradient_clipping_is_refused_naming_both_keys(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny", optim=Optimization(optimizer="adamw_fused"))
    with pytest.raises(ValueError, match=r"adamw_fused.*trainer.gradient_clip_val: null"):
        make_trainer(tmp_path, 1, gradient_clip_val=1.0).fit(m, datamodule=make_datamodule(photos))


def test_ema_under_fsdp_is_refused_with_one_clear_message(tiny_dir):
    module = DreamBoothModule(pretrained=str(tiny_dir), optim=Optimization(ema_decay=0.99))
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="ema_decay with trainer.strategy: fsdp.*ema_decay: null"):
        module.setup("fit")


@pytest.mark.integration
@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial"])
def test_every_schedule_warms_up_from_zero_and_is_diffusers(tiny_dir, name):
    module = DreamBoothModule(pretrained=str(tiny_dir), optim=Optimization(learning_rate=1e-3, lr_schedule=name,
                                                                          lr_warmup_steps=4))
    opt = module.make_optimizer()
    sched = module.make_scheduler(opt, 20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up from 0 (constant too)
    if name.startswith("constant"):
        assert lrs[4:] == pytest.approx([1e-3] * 16)
    else:
        assert lrs[-1] < 1e-3 * 0.2 and all(b <= a + 1e-12 for a, b in zip(lrs[4:-1], lrs[5:], strict=True))  # decays


# ------------------------------------------------------------------------------------------------ quantised base


@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_int8_base_weights_under_lora_train_the_adapters_only(model, photos, tmp_path, tiny_dir, tiny_flux_dir):
    """quantize_base: int8 (torchao weight-only) stores every frozen Linear of the denoiser and the text encoders as
    int8; the fp32 adapters train, and the base weights do not move."""
    pytest.importorskip("torchao")
    m = DreamBoothModule(pretrained=model, optim=Optimization(learning_rate=1e-2), lora=LoraSettings(rank=4),
                         speed=SpeedSettings(quantize_base="int8"))
    frozen = [mod for mod in m.unet.modules() if isinstance(mod, torch.nn.Linear) and not mod.weight.requires_grad]
    assert frozen and {type(mod.weight).__name__ for mod in frozen} == {"Int8Tensor"}
    assert all(p.dtype == torch.float32 for p in m.trainable_parameters())
    before = [p.detach().clone() for p in m.trainable_parameters()]
    base = frozen[0].weight.dequantize().clone()
    make_trainer(tmp_path, 2).fit(m, datamodule=make_datamodule(photos))
    assert all(not torch.equal(a, b) for a, b in zip(before, m.trainable_parameters(), strict=True))
    assert torch.equal(frozen[0].weight.dequantize(), base)


def test_quantised_base_needs_lora_and_says_what_this_machine_lacks(tiny_dir):
    with pytest.raises(ValueError, match="quantize_base=int8 quantises the frozen base weights.*lora.rank"):
        DreamBoothModule(pretrained="tiny", speed=SpeedSettings(quantize_base="int8"))
    with pytest.raises(MissingPackageError, match="nf4 is bitsandbytes' 4-bit format.*CUDA"):
        DreamBoothModule(pretrained="tiny", lora=LoraSettings(rank=4), speed=SpeedSettings(quantize_base="nf4"))
    if not torch.cuda.is_available():
        with pytest.raises(MissingPackageError, match="fp8 needs a GPU with fp8 arithmetic"):
            DreamBoothModule(pretrained="tiny", lora=LoraSettings(rank=4), speed=SpeedSettings(quantize_base="fp8"))

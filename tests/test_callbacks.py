"""SampleAndScore: protocol prompts, score orchestration against numpy, a tiny fit that samples, scores and logs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from dreambooth_pl.callbacks import EvalPrompt, SampleAndScore, protocol_prompts, real_vs_real, score

from .conftest import SHARED_DATA

TEMPLATES = "a {0} {1} in the jungle\na {0} {1} in the snow\na red {0} {1}\n"


@pytest.fixture
def prompts_dir(tmp_path) -> Path:
    d = tmp_path / "prompts"
    d.mkdir()
    (d / "prompts_object.txt").write_text(TEMPLATES)
    (d / "prompts_live.txt").write_text(TEMPLATES)
    return d


def test_protocol_prompts_with_and_without_identifier():
    if not (SHARED_DATA / "prompts_object.txt").is_file():
        pytest.skip("DreamBench data absent")
    for kind in ("object", "live"):
        ps = protocol_prompts(SHARED_DATA, kind, "sks", "dog")
        assert len(ps) == 25 and [p.index for p in ps] == list(range(25))
        assert all("sks dog" in p.prompt and "sks" not in p.prompt_no_token for p in ps)
        assert all("  " not in p.prompt_no_token and " dog" in p.prompt_no_token for p in ps)
    assert protocol_prompts(SHARED_DATA, "object", "sks", "can")[20].prompt_no_token == "a red can"


class FakeEncoder:
    """Deterministic embeddings: images -> mean RGB + 1; texts -> a vector that depends on 'sks'."""

    name, calibrated = "fake", False

    def encode_images(self, images):
        return torch.tensor(np.stack([np.asarray(i, dtype=np.float64).mean((0, 1)) / 255 + [1, 0, 0] for i in images]))

    def encode_texts(self, texts):
        return torch.tensor([[1.0, 2.0, 0.0] if "sks" in t else [1.0, 0.0, 2.0] for t in texts], dtype=torch.float64)

    def distances(self, a, b):
        return torch.tensor([float(np.abs(np.asarray(x, float) - np.asarray(y, float)).mean()) for x, y in zip(a, b, strict=True)])


def solid(rgb) -> Image.Image:
    return Image.new("RGB", (8, 8), tuple(rgb))


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_score_matches_numpy():
    enc = {"dino": FakeEncoder(), "clip": FakeEncoder(), "lpips": FakeEncoder()}
    rng = np.random.default_rng(0)
    real = [solid(rng.integers(0, 255, 3)) for _ in range(3)]
    gens = [[solid(rng.integers(0, 255, 3)) for _ in range(4)] for _ in range(2)]
    cls = [solid(rng.integers(0, 255, 3)) for _ in range(5)]
    groups = [(EvalPrompt(i, f"a sks can {i}", f"a can {i}"), [0, 1, 2, 3], g) for i, g in enumerate(gens)]
    s = score(enc, real, groups, cls)
    emb = lambda ims: unit([np.asarray(i, float).mean((0, 1)) / 255 + [1, 0, 0] for i in ims])  # noqa: E731
    r, g_all = emb(real), emb([i for g in gens for i in g])
    assert s.metrics["dino"] == pytest.approx((r @ g_all.T).mean(), abs=1e-9)
    assert s.metrics["clip_i"] == pytest.approx((r @ g_all.T).mean(), abs=1e-9)
    assert s.metrics["pres"] == pytest.approx((r @ emb(cls).T).mean(), abs=1e-9)
    assert s.metrics["clip_t"] == pytest.approx((g_all @ unit([1, 2, 0])).mean(), abs=1e-9)
    assert s.metrics["clip_t_no_token"] == pytest.approx((g_all @ unit([1, 0, 2])).mean(), abs=1e-9)
    dists = [np.abs(np.asarray(g[i], float) - np.asarray(g[j], float)).mean() for g in gens for i in range(4) for j in range(i + 1, 4)]
    assert s.metrics["div"] == pytest.approx(np.mean(dists), abs=1e-9)
    assert len(s.rows) == 8 and len(s.per_prompt) == 2
    assert s.rows[0]["dino"] == pytest.approx((r @ g_all[0]).mean(), abs=1e-9)


def test_real_vs_real_excludes_self_pairs_and_self_scores_one():
    enc = {"dino": FakeEncoder(), "clip": FakeEncoder()}
    photos = [solid((10, 200, 30)), solid((200, 10, 30)), solid((30, 30, 200))]
    e = unit([np.asarray(p, float).mean((0, 1)) / 255 + [1, 0, 0] for p in photos])
    sims = e @ e.T
    expect = (sims.sum() - np.trace(sims)) / 6
    assert real_vs_real(enc, photos)["dino"] == pytest.approx(expect, abs=1e-9)
    assert real_vs_real(enc, photos[:1])["dino"] == pytest.approx(1.0, abs=1e-9)


def test_tiny_fit_samples_scores_logs_and_checkpoints_on_val_dino(tiny_dir, photos, prompts_dir, tmp_path, wandb_run):
    from dreambooth_pl.data import DreamBoothDataModule
    from dreambooth_pl.module import DreamBoothModule
    from dreambooth_pl.report import write_report

    out = tmp_path / "run"
    cb = SampleAndScore(every_n_steps=2, subset_prompts=2, images_per_prompt=2, steps=3, encoders="tiny",
                        prompts_dir=str(prompts_dir), pres_images=3, batch_size=8)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", monitor="val/dino", mode="max", save_top_k=1, every_n_train_steps=2)
    dm = DreamBoothDataModule(subject="toy", class_noun="can", instance_dir=str(photos["instance"]),
                              class_dir=str(photos["class"]), resolution=64, batch_size=2, min_image_size=64)
    from dreambooth_pl.cli import AutoWandbLogger

    loggers = [CSVLogger(out, name="", version="csv"), AutoWandbLogger(save_dir=str(out), name="toy")]
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, default_root_dir=out, callbacks=[cb, ckpt],
                         logger=loggers, log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DreamBoothModule(pretrained="tiny", learning_rate=1e-3), datamodule=dm)
    for stage in ("base", "final"):
        names = sorted(p.name for p in (out / "samples" / stage).iterdir())
        assert names == ["00_0.png", "00_1.png", "01_0.png", "01_1.png", "02_0.png", "02_1.png",
                         "class_0.png", "class_1.png", "class_2.png"]
    assert sorted(p.name for p in (out / "samples" / "step000002").iterdir()) == ["00_0.png", "00_1.png", "01_0.png", "01_1.png"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["calibrated"] is False and all("uncalibrated" in n for n in m["encoders"].values())
    for stage in ("base", "final"):
        assert set(m["stages"][stage]["metrics"]) == {"dino", "clip_i", "clip_t", "clip_t_no_token", "pres", "div"}
        assert all(-1 <= v <= 1 for k, v in m["stages"][stage]["metrics"].items() if k != "div")
    assert m["stages"]["final"]["step"] == 5 and len(m["stages"]["final"]["per_prompt"]) == 3
    # val/dino was logged during training and drove the checkpoint choice.
    assert ckpt.best_model_score is not None and Path(ckpt.best_model_path).is_file()
    csv_text = (out / "csv" / "metrics.csv").read_text()
    assert "val/dino" in csv_text and "train/loss_prior" in csv_text
    # W&B (offline): the sample table, per-prompt grids, the class grid and val/* history.
    loggers[1].experiment.finish()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    assert list((media / "table" / "samples").glob("base*.table.json")) and list((media / "table" / "samples").glob("final*"))
    assert list((media / "images" / "grids").glob("*.png")) and list((media / "images" / "priors").glob("*.png"))
    history = wandb_run(run_dir)["history"]
    assert any("val/dino" in h for h in history) and any("val/clip_t_no_token" in h for h in history)
    # The local report from the same run.
    report = write_report(out).read_text()
    assert "Uncalibrated" in report and "Base model (before)" in report and "0.668" in report
    assert (out / "figures" / "loss.png").is_file() and (out / "figures" / "prompt_00.png").is_file()
    assert Image.open(out / "figures" / "prompt_00.png").size[1] > 2 * 100  # two rows: base and final


"""The command line: a tiny fit end to end, resume, W&B run, config errors."""

from __future__ import annotations

import json

import pytest
import torch

from dreambooth_pl import cli, components

BASE = ["--config", "experiments/base.yaml", "--config", "experiments/tiny.yaml"]


@pytest.fixture
def run_args(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(cli.Path(__file__).resolve().parents[1])
    return BASE + [
        "--data.subject", "toy", "--data.class_noun", "can",
        "--data.instance_dir", str(photos["instance"]), "--data.class_dir", str(photos["class"]),
        "--output_dir", str(tmp_path / "out"), "--trainer.enable_progress_bar", "false",
        "--probe_learning", "false",
        "--eval.every_n_steps", "0", "--eval.evaluate_base", "false", "--eval.final", "false",  # tested in test_callbacks
    ]


def test_fit_writes_run_folder_export_and_wandb(run_args, tmp_path, wandb_run, tiny_dir):
    c = cli._lightning_cli(["fit", *run_args, "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1"])
    out = tmp_path / "out"
    assert c.trainer.global_step == 6
    assert (out / "config.yaml").is_file() and "learning_rate" in (out / "config.yaml").read_text()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    assert torch.equal(pipe.unet.conv_out.weight, c.model.unet.conv_out.weight)
    single = components.load_components(str(out / "model.safetensors"), single_file_config=str(out / "model"))
    assert torch.allclose(single.unet.conv_out.weight, c.model.unet.conv_out.weight.half().float())
    meta = json.loads((out / "model" / "dreambooth_pl.json").read_text())
    assert meta["instance_prompt"] == "a sks can" and meta["steps"] == 6
    # Offline W&B run: the three loss curves, one point per step, and the parsed config as run config.
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = wandb_run(runs[0])
    for key in ("train/loss", "train/loss_instance", "train/loss_prior", "train/lr"):
        assert sum(key in h for h in run["history"]) == 6, key
    config = json.loads(run["config"]["config"])
    assert config["model"]["learning_rate"] == 1e-3 and config["data"]["subject"] == "toy"
    assert "git_sha" in run["config"]


def test_resume_from_last_checkpoint_continues(run_args, tmp_path, tiny_dir):
    cli._lightning_cli(["fit", *run_args, "--trainer.max_steps", "4", "--export", "false",
                        "--checkpoint.every_n_train_steps", "2"])
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").is_file()
    c = cli._lightning_cli(["fit", *run_args, "--trainer.max_steps", "6", "--export", "false", "--ckpt_path", "last"])
    assert c.trainer.global_step == 6
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize("bad", [["--model.learning_rat", "1"], ["--data.clas_noun", "can"]])
def test_misspelt_key_fails_at_parse_time(bad, capsys):
    with pytest.raises(SystemExit):
        cli.parse_config(BASE + bad)
    assert bad[0].split(".")[-1] in capsys.readouterr().err


def test_misspelt_key_in_yaml_fails(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  prior_los_weight: 0.5\n")
    with pytest.raises(SystemExit):
        cli.parse_config(BASE + ["--config", str(bad)])
    assert "prior_los_weight" in capsys.readouterr().err


def test_unknown_command_is_named():
    with pytest.raises(SystemExit, match="trian"):
        cli.main(["trian"])


def test_wandb_logger_online_only_with_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert cli.AutoWandbLogger(save_dir=str(tmp_path))._offline is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert cli.AutoWandbLogger(save_dir=str(tmp_path))._offline is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert cli.AutoWandbLogger(save_dir=str(tmp_path))._offline is True


def test_evaluate_real_vs_real_and_self_is_one(tmp_path, monkeypatch):
    from .conftest import SHARED_DATA, make_photos

    photos = SHARED_DATA / "dataset" / "can"
    if not photos.is_dir():
        photos = make_photos(tmp_path / "can", 4)
    out = tmp_path / "rvr.json"
    cli.main(["evaluate", "--real-vs-real", "--subject", str(photos), "--encoders", "tiny", "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["real_vs_real"]) == {"dino", "clip_i"} and r["calibrated"] is False
    assert all(-1 <= v < 1 for v in r["real_vs_real"].values())  # distinct photos: below 1
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.jpg").write_bytes(sorted(photos.iterdir())[0].read_bytes())
    cli.main(["evaluate", "--real-vs-real", "--subject", str(one), "--encoders", "tiny", "--out", str(out)])
    assert json.loads(out.read_text())["real_vs_real"] == pytest.approx({"dino": 1.0, "clip_i": 1.0}, abs=1e-6)


def test_evaluate_scores_a_folder_of_generated_images(tmp_path):
    from PIL import Image

    from .conftest import make_photos

    real = make_photos(tmp_path / "real", 3)
    gen = tmp_path / "gen"
    gen.mkdir()
    for name, src in (("00_0.png", 0), ("00_1.png", 1), ("02_0.png", 2), ("class_0.png", 0)):
        Image.open(sorted(real.iterdir())[src]).save(gen / name)
    (tmp_path / "prompts_object.txt").write_text("a {0} {1} in the snow\na {0} {1} on the beach\na red {0} {1}\n")
    cli.main(["evaluate", "--images", str(gen), "--subject", str(real), "--class-noun", "can",
              "--prompts-dir", str(tmp_path), "--encoders", "tiny"])
    r = json.loads((gen / "metrics.json").read_text())
    assert set(r["metrics"]) == {"dino", "clip_i", "clip_t", "clip_t_no_token", "pres", "div"}
    assert [p["prompt"] for p in r["per_prompt"]] == ["a sks can in the snow", "a red sks can"]
    assert len(r["rows"]) == 3


def test_8gb_preset_fits_lora_and_exports_lora_files(run_args, tmp_path, tiny_dir):
    args = run_args[:4] + ["--config", "experiments/memory/8gb.yaml"] + run_args[4:]
    c = cli._lightning_cli(["fit", *args, "--trainer.max_steps", "2", "--trainer.precision", "bf16-mixed"])
    assert c.model.hparams.lora_rank == 16 and c.datamodule.hparams.cache_latents
    out = tmp_path / "out"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and (out / "lora" / "lora_kohya.safetensors").is_file()
    assert not (out / "model").exists()
    with pytest.raises(ValueError, match="bf16-mixed"):
        cli._lightning_cli(["fit", *args, "--trainer.max_steps", "1", "--trainer.precision", "32-true"])

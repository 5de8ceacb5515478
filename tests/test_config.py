"""dreambooth_pl.config: LightningCLI fits end to end, resume, parse-time errors, a run's config read back."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dreambooth_pl import components, config, loggers
from dreambooth_pl.callbacks import LearningProbe

from .conftest import REPO, make_photos

BASE = ["--config", "experiments/base.yaml", "--config", "experiments/tiny.yaml"]


def fit_args(photos: dict[str, Path], out: Path, *extra: str, overlays: tuple[str, ...] = ()) -> list[str]:
    """`fit` on the tiny model with the photos; per-step evaluation off (SampleAndScore: test_callbacks)."""
    return ["fit", *BASE, *(a for f in overlays for a in ("--config", f)),
            "--data.subject", "toy", "--data.class_noun", "can",
            "--data.instance_dir", str(photos["instance"]), "--data.class_dir", str(photos["class"]),
            "--output_dir", str(out), "--trainer.enable_progress_bar", "false", "--probe.enabled", "false",
            "--eval.every_n_steps", "0", "--eval.evaluate_base", "false", "--eval.final", "false", *extra]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name experiments/... relative to the checkout


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_dir):
    """One 6-step fit through `config.lightning_cli` (W&B offline, every step logged), shared by the checks below."""
    root = tmp_path_factory.mktemp("fit")
    photos = {"instance": make_photos(root / "instance", 4, seed=1),
              "class": make_photos(root / "class", 6, seed=2, kind="noise")}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        start = time.perf_counter()
        c = config.lightning_cli(fit_args(photos, root / "out", "--trainer.max_steps", "6",
                                          "--trainer.log_every_n_steps", "1"))
        c.wall_seconds = time.perf_counter() - start
    return c, root / "out"


@pytest.mark.integration
def test_fit_runs_the_steps_and_writes_the_run_folder(fitted):
    c, out = fitted
    assert c.trainer.global_step == 6
    assert (out / "config.yaml").is_file() and "learning_rate" in (out / "config.yaml").read_text()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 6 and run["seed"] == 0 and run["git_sha"] == loggers.git_sha()
    if torch.cuda.is_available():
        assert run["peak_gpu_memory_gb"] >= 0  # the CUDA peak during this CPU fit (other tests may hold memory)
    else:
        assert run["peak_gpu_memory_gb"] is None  # no GPU: nothing to report
    assert 0 < run["fit_seconds"] < c.wall_seconds  # Trainer.fit alone, inside the whole CLI call


@pytest.mark.integration
def test_fit_exports_pipeline_and_single_file(fitted):
    c, out = fitted

    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    assert torch.equal(pipe.unet.conv_out.weight, c.model.unet.conv_out.weight)
    single = components.load_components(str(out / "toy.safetensors"), single_file_config=str(out / "model"))
    assert torch.allclose(single.unet.conv_out.weight, c.model.unet.conv_out.weight.half().float())
    meta = json.loads((out / "model" / "dreambooth_pl.json").read_text())
    assert meta["instance_prompt"] == "a sks can" and meta["steps"] == 6


@pytest.mark.integration
def test_fit_logs_offline_wandb_history_and_config(fitted, wandb_run):
    _, out = fitted
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = wandb_run(runs[0])
    for key in ("train/loss", "train/loss_instance", "train/loss_prior", "train/lr"):
        assert sum(key in h for h in run["history"]) == 6, key
    # LearningRateMonitor before each step: tiny.yaml's 1e-3 after a 20-step linear warm-up from 0, i / 20 (diffusers).
    lrs = [json.loads(h["train/lr"]) for h in run["history"] if "train/lr" in h]
    assert lrs == pytest.approx([1e-3 * i / 20 for i in range(6)], rel=1e-6)
    cfg = json.loads(run["config"]["config"])
    assert cfg["model"]["optim"]["learning_rate"] == 1e-3 and cfg["data"]["subject"] == "toy"
    assert json.loads(run["config"]["git_sha"]) == loggers.git_sha()


@pytest.mark.integration
def test_parse_run_config_reads_the_run_back(fitted):
    c, out = fitted
    back = config.parse_run_config(out).as_dict()
    used = c.config["fit"].as_dict()
    back.pop("config", None), used.pop("config", None)  # the YAML paths it came from; the values are what count
    assert back == used
    assert back["model"]["optim"]["learning_rate"] == 1e-3 and back["data"]["class_dir"] == used["data"]["class_dir"]


def test_parse_run_config_without_a_run_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="make experiment"):
        config.parse_run_config(tmp_path)


@pytest.mark.integration
def test_resume_from_last_checkpoint_continues(photos, tmp_path, in_repo, tiny_dir):
    out = tmp_path / "out"
    config.lightning_cli(fit_args(photos, out, "--trainer.max_steps", "4", "--export.enabled", "false",
                                  "--checkpoint.every_n_train_steps", "2"))
    assert (out / "checkpoints" / "last.ckpt").is_file()
    first = loggers.last_run_id(out)
    c = config.lightning_cli(fit_args(photos, out, "--trainer.max_steps", "6", "--export.enabled", "false",
                                      "--ckpt_path", "last"))
    assert c.trainer.global_step == 6
    assert not (out / "model").exists()
    # The resumed fit continued the same W&B run; a fresh fit in the same folder starts a new one.
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert first and len(runs) == 2 and {r.name.rsplit("-", 1)[-1] for r in runs} == {first}
    config.lightning_cli(fit_args(photos, out, "--trainer.max_steps", "1", "--export.enabled", "false"))
    assert loggers.last_run_id(out) != first


def test_a_sweep_run_gets_its_own_folder(monkeypatch, in_repo):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "r7")  # what the W&B agent sets for each run it launches
    assert config.default_run_folder("can") == Path("outputs/sweeps/sw1/r7")
    monkeypatch.delenv("WANDB_SWEEP_ID")
    assert config.default_run_folder("can") == Path("outputs/can")


@pytest.mark.parametrize("bad", [["--model.optim.learning_rat", "1"], ["--data.clas_noun", "can"],
                                 ["--model.learning_rate", "1"], ["--eval.images_per_prompt", "2"]])
def test_misspelt_key_fails_at_parse_time(bad, in_repo, capsys):
    with pytest.raises(SystemExit):
        config.parse_config(BASE + bad)
    assert bad[0].split(".")[-1] in capsys.readouterr().err


def test_misspelt_key_in_yaml_fails(tmp_path, in_repo, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  prior_los_weight: 0.5\n")
    with pytest.raises(SystemExit):
        config.parse_config(BASE + ["--config", str(bad)])
    assert "prior_los_weight" in capsys.readouterr().err


@pytest.mark.integration
def test_8gb_preset_fits_lora_and_exports_lora_files(photos, tmp_path, in_repo, tiny_dir):
    out = tmp_path / "out"
    args = fit_args(photos, out, "--trainer.max_steps", "2", "--trainer.precision", "bf16-mixed",
                    overlays=("experiments/memory/8gb.yaml",))
    c = config.lightning_cli(args)
    assert c.model.lora.rank == 16 and c.model.hparams.lora["rank"] == 16 and c.datamodule.hparams.cache_latents
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "lora" / "toy_lora.safetensors").is_file()
    assert not (out / "model").exists()
    with pytest.raises(ValueError, match="bf16-mixed"):
        config.lightning_cli([*args, "--trainer.max_steps", "1", "--trainer.precision", "32-true"])


@pytest.mark.integration
def test_a_subjects_list_in_yaml_fits_through_the_cli_and_a_missing_folder_is_named(photos, tmp_path, in_repo,
                                                                                    tiny_dir, capsys):
    """`data.subjects:` from a YAML file: parsed into `Subject`s, each folder checked before any model loads, one
    fit learning both (the probe per subject)."""
    extra = make_photos(tmp_path / "mug", 3, seed=7)
    spec = tmp_path / "two.yaml"
    spec.write_text(f"data:\n  subjects:\n"
                    f"    - {{subject: ball, class_noun: toy, instance_dir: {photos['instance']}, identifier: sks,"
                    f" class_dir: {photos['class']}}}\n"
                    f"    - {{subject: mug, class_noun: cup, instance_dir: {extra}, identifier: zwx,"
                    f" class_dir: {photos['class']}}}\n")
    out = tmp_path / "out"
    c = config.lightning_cli(fit_args(photos, out, "--config", str(spec), "--trainer.max_steps", "2",
                                      "--probe.enabled", "true", "--export.enabled", "false", "--data.class_dir", "null"))
    assert [s.subject for s in c.datamodule.subjects] == ["ball", "mug"]
    assert {s.instance_prompt for s in c.datamodule.subjects} == {"a sks toy", "a zwx cup"}
    assert "Denoising MSE on the instance photos of mug" in capsys.readouterr().out
    spec.write_text(spec.read_text().replace(str(extra), str(tmp_path / "nowhere")))
    with pytest.raises(Exception, match="nowhere"):
        config.lightning_cli(fit_args(photos, out, "--config", str(spec), "--trainer.max_steps", "1",
                                      "--data.class_dir", "null"))


PRESETS = sorted(p.stem for p in (REPO / "experiments" / "memory").glob("*.yaml"))


PRESET_MODELS = (("sdxl", "tiny-xl"), ("sd3", "tiny-sd3"), ("flux", "tiny-flux"))  # a preset's prefix -> its backbone


@pytest.mark.integration
@pytest.mark.parametrize("preset", PRESETS)
def test_every_memory_preset_runs_on_its_backbone_with_every_default_callback(preset, photos, tmp_path, in_repo,
                                                                              tiny_dir, tiny_xl_dir, tiny_sd3_dir,
                                                                              tiny_flux_dir):
    """What `make experiment SUBJECT=... MODEL=tiny|tiny-xl|tiny-sd3|tiny-flux ARGS="--config
    experiments/memory/<preset>.yaml"` runs, with every callback the configs turn on (evaluation before/after, the
    probe, validation, the export): 2 steps, then the export loads into a fresh pipeline and samples. Only the sizes
    of evaluation are cut, and bitsandbytes' 8-bit AdamW (CUDA only) becomes plain AdamW on CPU."""
    model = next((m for prefix, m in PRESET_MODELS if preset.startswith(prefix)), "tiny")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "prompts_object.txt").write_text("a {0} {1} in the snow\n")
    out = tmp_path / "out"
    cfg = config.parse_config([*BASE, "--config", f"experiments/memory/{preset}.yaml"])
    cpu_optim = ["--model.optim.optimizer", "adamw"] if cfg.model.optim.optimizer == "adamw_8bit" else []
    c = config.lightning_cli([
        "fit", *BASE, "--model.pretrained", model, "--config", f"experiments/memory/{preset}.yaml",
        "--data.subject", "toy", "--data.class_noun", "can", "--data.instance_dir", str(photos["instance"]),
        "--data.class_dir", str(photos["class"]), "--output_dir", str(out), "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--eval.prompts_dir", str(prompts),
        "--eval.protocol.images_per_prompt", "1", "--eval.protocol.pres_images", "1", "--eval.protocol.steps", "2",
        *cpu_optim])
    backbone = c.model.backbone
    assert c.trainer.global_step == 2 and backbone.name == {"tiny-xl": "sdxl", "tiny-sd3": "sd3",
                                                            "tiny-flux": "flux"}.get(model, "sd")
    assert c.model.speed.frozen_dtype == "bf16" and c.trainer.precision == "bf16-mixed"
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    assert set(stages) == {"base", "final"} and "dino" in stages["final"]["metrics"]
    base, tuned = next(cb for cb in c.trainer.callbacks if isinstance(cb, LearningProbe)).results["toy"]
    assert math.isfinite(base) and math.isfinite(tuned)
    logged = (out / "csv" / "metrics.csv").read_text()
    assert "probe/denoising_mse_tuned" in logged and "val/loss_instance" in logged
    pipe_class = backbone.pipeline_class("text2img")
    sample = dict(prompt="a sks can", num_inference_steps=2, height=64, width=64, output_type="np",
                  **backbone.sample_kwargs)
    if c.model.lora.rank:  # LoRA: the adapters load into the base pipeline and change its image
        pipe = pipe_class.from_pretrained(components.resolve(model))
        before = pipe(**sample, generator=torch.Generator().manual_seed(0)).images
        pipe.load_lora_weights(out / "lora")
        assert (out / "lora" / "toy_lora.safetensors").is_file() and not (out / "model").exists()
    else:  # a full fine-tune: one fp32 pipeline, its frozen parts the base model's own weights, not bf16 copies
        pipe = pipe_class.from_pretrained(out / "model")
        denoiser = getattr(pipe, backbone.denoiser)
        assert {denoiser.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
        trained = c.model.unet.state_dict()
        assert all(torch.equal(denoiser.state_dict()[k], trained[k]) for k in list(trained)[:8])
        assert (out / "toy.safetensors").is_file()
        if backbone.objective != "flow":  # the UNets' single file reads back as a model (SD3's: test_single_file)
            single = components.load_components(str(out / "toy.safetensors"), single_file_config=str(out / "model"))
            assert torch.equal(single.unet.conv_out.weight, c.model.unet.conv_out.weight.half().float())
    image = pipe(**sample, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0
    if c.model.lora.rank:
        assert abs(image - before).max() > 0

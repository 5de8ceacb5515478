"""dreambooth_pl.config: LightningCLI fits end to end, resume, parse-time errors, a run's config read back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dreambooth_pl import components, config, loggers

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


def test_fit_exports_pipeline_and_single_file(fitted):
    c, out = fitted
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    assert torch.equal(pipe.unet.conv_out.weight, c.model.unet.conv_out.weight)
    single = components.load_components(str(out / "toy.safetensors"), single_file_config=str(out / "model"))
    assert torch.allclose(single.unet.conv_out.weight, c.model.unet.conv_out.weight.half().float())
    meta = json.loads((out / "model" / "dreambooth_pl.json").read_text())
    assert meta["instance_prompt"] == "a sks can" and meta["steps"] == 6


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


@pytest.mark.parametrize("preset", ["8gb", "12gb", "16gb", "24gb"])
def test_every_memory_preset_fits_with_evaluation_on_exports_and_the_export_samples(preset, photos, tmp_path, in_repo,
                                                                                   tiny_dir):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "prompts_object.txt").write_text("a {0} {1} in the snow\n")  # one prompt, one image: evaluation on
    # bitsandbytes' 8-bit AdamW needs CUDA: on CPU the 12gb/16gb presets run with plain AdamW, every other lever as set.
    cpu_optim = ["--model.optim.optimizer", "adamw"] if preset in ("12gb", "16gb") else []
    out = tmp_path / "out"
    c = config.lightning_cli(fit_args(
        photos, out, "--trainer.max_steps", "2", "--trainer.precision", "bf16-mixed", *cpu_optim,
        "--eval.evaluate_base", "true", "--eval.final", "true", "--eval.prompts_dir", str(prompts),
        "--eval.protocol.images_per_prompt", "1", "--eval.protocol.pres_images", "1", "--eval.protocol.steps", "2",
        overlays=(f"experiments/memory/{preset}.yaml",)))
    assert c.trainer.global_step == 2 and c.model.speed.frozen_dtype == "bf16"
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    assert set(stages) == {"base", "final"} and "dino" in stages["final"]["metrics"]
    if preset == "8gb":  # LoRA: the adapters load into the base pipeline and change its image
        pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
        before = pipe("a sks can", num_inference_steps=2, height=64, width=64, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
        pipe.load_lora_weights(out / "lora")
    else:  # a full fine-tune: one fp32 pipeline, its frozen parts the base model's own weights, not bf16 copies
        pipe = StableDiffusionPipeline.from_pretrained(out / "model")
        assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
        base = components.load_components(str(tiny_dir))
        assert torch.equal(pipe.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)
        assert torch.equal(pipe.unet.conv_out.weight, c.model.unet.conv_out.weight)
    image = pipe("a sks can", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0
    if preset == "8gb":
        assert abs(image - before).max() > 0


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


@pytest.mark.parametrize("preset", ["sdxl-12gb", "sdxl-16gb", "sdxl-full"])
def test_every_sdxl_preset_fits_tiny_xl_with_evaluation_and_its_export_samples(preset, photos, tmp_path, in_repo,
                                                                               tiny_xl_dir):
    """sdxl.yaml + each SDXL memory preset on the tiny SDXL model (64 px, buckets on): evaluation before and after,
    and the export (LoRA or full) loads into a fresh StableDiffusionXLPipeline and samples."""
    from diffusers import StableDiffusionXLPipeline

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "prompts_object.txt").write_text("a {0} {1} in the snow\n")
    # bitsandbytes' 8-bit AdamW needs CUDA: on CPU the full preset runs with plain AdamW, every other lever as set.
    cpu_optim = ["--model.optim.optimizer", "adamw"] if preset == "sdxl-full" else []
    out = tmp_path / "out"
    c = config.lightning_cli(fit_args(
        photos, out, "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "1", *cpu_optim,
        "--model.pretrained", "tiny-xl", "--data.resolution", "64", "--data.bucket_step", "16",
        "--data.min_image_size", "64", "--eval.evaluate_base", "true", "--eval.final", "true",
        "--eval.prompts_dir", str(prompts), "--eval.encoders", "tiny", "--eval.protocol.images_per_prompt", "1",
        "--eval.protocol.pres_images", "1", "--eval.protocol.steps", "2",
        overlays=("experiments/sdxl.yaml", f"experiments/memory/{preset}.yaml")))
    assert c.trainer.global_step == 2 and c.model.backbone.name == "sdxl" and c.datamodule.use_buckets
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    assert set(stages) == {"base", "final"} and "dino" in stages["final"]["metrics"]
    sample = dict(prompt="a sks can", num_inference_steps=2, height=64, width=64, output_type="np")
    if preset == "sdxl-full":  # the diffusers folder and the single file are the fine-tuned model
        pipe = StableDiffusionXLPipeline.from_pretrained(out / "model")
        assert torch.equal(pipe.unet.conv_out.weight, c.model.unet.conv_out.weight)
        single = components.load_components(str(out / "toy.safetensors"), single_file_config=str(tiny_xl_dir))
        assert torch.equal(single.unet.conv_out.weight, c.model.unet.conv_out.weight.half().float())
    else:  # LoRA: the adapters load into the base pipeline and change its image
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir)
        before = pipe(**sample, generator=torch.Generator().manual_seed(0)).images
        pipe.load_lora_weights(out / "lora")
        assert (out / "lora" / "toy_lora.safetensors").is_file()
    image = pipe(**sample, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0
    if preset != "sdxl-full":
        assert abs(image - before).max() > 0

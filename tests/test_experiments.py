"""Every YAML in experiments/ parses (litgpt's config-hub test) and subject files match DreamBench."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dreambooth_pl import world
from dreambooth_pl.config import parse_config

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "experiments"
SUBJECTS = sorted((EXP / "subjects").glob("*.yaml"))
SHARED = REPO.parent / "shared" / "data" / "dreambooth"
OVERLAYS = sorted([*(p for p in EXP.glob("*.yaml") if p.name != "base.yaml"), *EXP.glob("memory/*.yaml")])
SWEEPS = sorted((EXP / "sweeps").glob("*.yaml"))


def layered(*files: Path) -> list[str]:
    return [a for f in (EXP / "base.yaml", *files) for a in ("--config", str(f))]


@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda p: p.stem)
def test_subject_config_parses(subject):
    cfg = parse_config(layered(subject))
    assert cfg.data.subject == subject.stem
    assert cfg.data.class_noun and cfg.data.subject_type in ("object", "live", "world")
    assert cfg.model.optim.learning_rate == 5e-6 and cfg.model.prior_loss_weight == 1.0


@pytest.mark.parametrize("extra", OVERLAYS, ids=lambda p: p.stem)
def test_overlay_config_parses(extra):
    cfg = parse_config(layered(EXP / "subjects" / "can.yaml", extra))
    assert cfg.data.subject == "can"


def test_every_yaml_is_checked_here():
    """Base, subjects, overlays (incl. memory presets) and sweeps: a YAML in a new place would go unchecked."""
    checked = {EXP / "base.yaml", *SUBJECTS, *OVERLAYS, *SWEEPS}
    assert set(EXP.rglob("*.yaml")) == checked
    assert {p.stem for p in OVERLAYS} == {"tiny", "world", "sdxl", "sd3", "flux", "8gb", "12gb", "16gb", "24gb",
                                          "sdxl-12gb", "sdxl-16gb", "sdxl-full", "sd3-24gb", "sd3-80gb", "flux-24gb",
                                          "flux-80gb"}


@pytest.mark.parametrize("preset", ["sdxl-12gb", "sdxl-16gb", "sdxl-full"])
def test_sdxl_presets_layer_on_the_sdxl_recipe(preset):
    """SDXL memory presets on top of sdxl.yaml: the diffusers LoRA recipe's 1024 px, buckets on; LoRA for 12/16 GB
    (16 GB adds both text encoders' adapters), a full fine-tune with 8-bit AdamW and checkpointing otherwise."""
    cfg = parse_config(layered(EXP / "subjects" / "can.yaml", EXP / "sdxl.yaml", EXP / "memory" / f"{preset}.yaml"))
    assert cfg.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert cfg.data.resolution == 1024 and cfg.data.buckets and cfg.model.speed.gradient_checkpointing
    if preset == "sdxl-full":
        assert cfg.model.lora.rank == 0 and cfg.model.optim.optimizer == "adamw_8bit"
    else:
        assert cfg.model.lora.rank > 0 and (cfg.model.lora.text_encoder_rank > 0) == (preset == "sdxl-16gb")


@pytest.mark.parametrize("preset", ["sd3-24gb", "sd3-80gb", "flux-24gb", "flux-80gb"])
def test_flow_presets_layer_on_their_recipe(preset):
    """SD3 / Flux presets on sd3.yaml / flux.yaml: 1024 px, the backbone's sigma scheme; LoRA but sd3-80gb's full
    fine-tune; flux-24gb's int8 base weights."""
    model = preset.split("-")[0]
    cfg = parse_config(layered(EXP / "subjects" / "can.yaml", EXP / f"{model}.yaml", EXP / "memory" / f"{preset}.yaml"))
    assert cfg.model.pretrained == {"sd3": "stabilityai/stable-diffusion-3.5-medium",
                                    "flux": "black-forest-labs/FLUX.1-dev"}[model]
    assert cfg.data.resolution == 1024 and cfg.model.speed.gradient_checkpointing and cfg.model.speed.cache_latents
    assert cfg.model.flow_weighting == {"sd3": "logit_normal", "flux": "none"}[model]
    assert (cfg.model.lora.rank == 0) == (preset == "sd3-80gb")
    assert (cfg.model.speed.quantize_base == "int8") == (preset == "flux-24gb")


def test_tiny_overlay_is_offline_and_small():
    cfg = parse_config(layered(EXP / "subjects" / "can.yaml", EXP / "tiny.yaml"))
    assert cfg.model.pretrained == "tiny" and cfg.data.resolution == 64 and cfg.trainer.accelerator == "cpu"


def test_every_world_subject_has_a_config():
    for name, spec in world.ALL_SUBJECTS.items():  # reported and validation subjects
        cfg = parse_config(layered(EXP / "subjects" / f"{name}.yaml", EXP / "world.yaml"))
        assert (cfg.data.class_noun, cfg.data.subject_type) == (spec["shape"], world.SUBJECT_TYPE)
        assert cfg.data.instance_dir == f"data/world/dataset/{name}" and cfg.model.pretrained == "world"
        assert cfg.eval.encoders == "world" and cfg.eval.prompts_dir == "data/world" and cfg.data.resolution == world.SIZE
        # The recipe the README measures: the photos' captions (make world-data) and the text encoder trained.
        assert cfg.data.captions and cfg.model.train_text_encoder


def test_every_dreambench_subject_has_a_config():
    if not (SHARED / "subjects.csv").is_file():
        pytest.skip("DreamBench data absent")
    rows = list(csv.DictReader((SHARED / "subjects.csv").open()))
    assert len(rows) == 30
    for row in rows:
        cfg = parse_config(layered(EXP / "subjects" / f"{row['subject_name']}.yaml"))
        assert (cfg.data.class_noun, cfg.data.subject_type) == (row["class"], row["type"])
        assert cfg.data.instance_dir == f"data/dreambooth/dataset/{row['subject_name']}"
        assert (SHARED / "dataset" / row["subject_name"]).is_dir()


def test_sweep_parameters_are_config_keys():
    import yaml

    assert SWEEPS
    for sweep in SWEEPS:
        spec = yaml.safe_load(sweep.read_text())
        assert spec["metric"]["name"] == "val/dino"
        cmd = spec["command"]
        configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
        for key, values in spec["parameters"].items():
            for v in values["values"]:
                args = [x for c in configs for x in ("--config", str(REPO / c))] + [f"--{key}={v}"]
                cfg = parse_config(args)
                assert float(cfg[key]) == float(v)  # a dotted key names a nested setting


def test_memory_presets_choose_the_memory_levers():
    cfg = {name: parse_config(layered(EXP / "subjects" / "can.yaml", EXP / "memory" / f"{name}.yaml"))
           for name in ("8gb", "12gb", "16gb", "24gb")}
    assert cfg["8gb"].model.lora.rank > 0 and all(cfg[n].model.lora.rank == 0 for n in ("12gb", "16gb", "24gb"))
    assert cfg["8gb"].model.lora.rank == 16 and cfg["8gb"].model.optim.learning_rate == 1e-4
    assert cfg["16gb"].model.speed.gradient_checkpointing and cfg["16gb"].model.optim.optimizer == "adamw_8bit"
    assert cfg["12gb"].model.speed.gradient_checkpointing and cfg["12gb"].model.optim.optimizer == "adamw_8bit"
    assert not cfg["24gb"].model.speed.gradient_checkpointing and cfg["24gb"].model.optim.optimizer == "adamw"  # fused cannot clip
    assert all(c.model.speed.cache_latents and c.data.cache_latents and c.data.center_crop for c in cfg.values())
    assert all(c.model.speed.frozen_dtype == "bf16" and c.trainer.precision == "bf16-mixed" for c in cfg.values())

"""Every YAML in experiments/ parses (litgpt's config-hub test) and subject files match DreamBench."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dreambooth_pl.cli import parse_config

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "experiments"
SUBJECTS = sorted((EXP / "subjects").glob("*.yaml"))
SHARED = REPO.parent / "shared" / "data" / "dreambooth"


def layered(*files: Path) -> list[str]:
    return [a for f in (EXP / "base.yaml", *files) for a in ("--config", str(f))]


@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda p: p.stem)
def test_subject_config_parses(subject):
    cfg = parse_config(layered(subject))
    assert cfg.data.subject == subject.stem
    assert cfg.data.class_noun and cfg.data.subject_type in ("object", "live")
    assert cfg.model.learning_rate == 5e-6 and cfg.model.prior_loss_weight == 1.0


@pytest.mark.parametrize("extra", sorted([*(p for p in EXP.glob("*.yaml") if p.name != "base.yaml"), *EXP.glob("memory/*.yaml")]),
                         ids=lambda p: p.stem)
def test_overlay_config_parses(extra):
    cfg = parse_config(layered(EXP / "subjects" / "can.yaml", extra))
    assert cfg.data.subject == "can"


def test_tiny_overlay_is_offline_and_small():
    cfg = parse_config(layered(EXP / "subjects" / "can.yaml", EXP / "tiny.yaml"))
    assert cfg.model.pretrained == "tiny" and cfg.data.resolution == 64 and cfg.trainer.accelerator == "cpu"


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

    for sweep in sorted((EXP / "sweeps").glob("*.yaml")):
        spec = yaml.safe_load(sweep.read_text())
        assert spec["metric"]["name"] == "val/dino"
        cmd = spec["command"]
        configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
        for key, values in spec["parameters"].items():
            for v in values["values"]:
                args = [x for c in configs for x in ("--config", str(REPO / c))] + [f"--{key}={v}"]
                cfg = parse_config(args)
                section, name = key.split(".")
                assert float(getattr(getattr(cfg, section), name)) == float(v)


def test_memory_presets_choose_the_memory_levers():
    cfg = {name: parse_config(layered(EXP / "subjects" / "can.yaml", EXP / "memory" / f"{name}.yaml"))
           for name in ("8gb", "12gb", "16gb", "24gb")}
    assert cfg["8gb"].model.lora_rank > 0 and all(cfg[n].model.lora_rank == 0 for n in ("12gb", "16gb", "24gb"))
    assert cfg["16gb"].model.gradient_checkpointing and cfg["16gb"].model.optimizer == "adamw_8bit"
    assert not cfg["24gb"].model.gradient_checkpointing
    assert all(c.model.cache_latents and c.data.cache_latents and c.data.center_crop for c in cfg.values())

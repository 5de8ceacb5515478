"""dreambooth_pl.experiment: the `experiment` command (class images -> fit -> report from one parse) on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreambooth_pl import cli

from .conftest import REPO

pytestmark = pytest.mark.integration


def experiment_args(photos: dict[str, Path], out: Path, prompts: Path, *extra: str) -> list[str]:
    """`make experiment SUBJECT=... MODEL=tiny` with the test's photos, and one evaluation image per prompt."""
    return ["experiment", "--config", "experiments/base.yaml", "--config", "experiments/tiny.yaml",
            "--model.pretrained", "tiny", "--data.subject", "toy", "--data.class_noun", "can",
            "--data.instance_dir", str(photos["instance"]), "--output_dir", str(out),
            "--trainer.enable_progress_bar", "false", "--eval.prompts_dir", str(prompts),
            "--eval.protocol.images_per_prompt", "1", "--eval.protocol.pres_images", "1", "--eval.protocol.steps", "2",
            "--data.prior.steps", "2", *extra]


def test_experiment_makes_the_overridden_class_images_once_fits_on_them_reports_and_resumes(
        tmp_path, monkeypatch, capsys, photos, fresh_cache):
    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "prompts_object.txt").write_text("a {0} {1} in the snow\n")
    out = tmp_path / "out"
    args = experiment_args(photos, out, prompts, "--data.num_class_images", "3", "--data.val_class_images", "1")
    cli.main([*args, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    printed = capsys.readouterr()
    # One folder, made by the priors step with the override (3 trained on + 1 held out) and reused by fit as it is.
    (folder,) = (fresh_cache / "priors").glob("*/manifest.jsonl")
    folder = folder.parent
    assert f"4 class images in {folder} (0 reused, 4 made)" in printed.out
    assert f"Class images (a can): 4 class images in {folder} (4 reused, 0 made)" in printed.err
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 2 and (out / "report.md").is_file() and (out / "figures" / "val_loss.png").is_file()
    assert f"wrote {out / 'report.md'}" in printed.out
    assert "num_class_images: 3" in (out / "config.yaml").read_text()
    assert "val/loss_prior" in (out / "csv" / "metrics.csv").read_text()
    # Resume: the same command with --ckpt_path last goes on from step 2; nothing is made again.
    cli.main([*args, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    printed = capsys.readouterr()
    assert f"4 class images in {folder} (4 reused, 0 made)" in printed.out
    assert json.loads((out / "run.json").read_text())["steps"] == 4
    assert json.loads((out / "metrics.json").read_text())["stages"]["final"]["step"] == 4


def test_experiment_without_evaluation_fits_and_says_there_is_no_report(tmp_path, monkeypatch, capsys, photos,
                                                                          tiny_dir):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    cli.main([*experiment_args(photos, out, tmp_path, "--data.class_dir", str(photos["class"])),
              "--trainer.max_steps", "1", "--eval.evaluate_base", "false", "--eval.final", "false",
              "--eval.every_n_steps", "0", "--export.enabled", "false"])
    assert f"{out} has no scores" in capsys.readouterr().out and not (out / "report.md").exists()
    assert json.loads((out / "run.json").read_text())["steps"] == 1

"""dreambooth_pl.commands and the priors command through `cli.main`: evaluate, priors, report, compare, tiny-model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from dreambooth_pl import cli, components, config, tiny
from dreambooth_pl.components import ModelSource
from dreambooth_pl.data import list_images, load_image
from dreambooth_pl.encoders import load_encoders
from dreambooth_pl.priors import PriorSampling, PriorSettings, default_folder

from .conftest import REPO, SHARED_DATA, make_photos
from .test_instructpix2pix import make_run
from .test_tiny import WEIGHT_FILES

# ------------------------------------------------------------------------------------------ evaluate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where `evaluate` runs the encoders


def mean_cosine_of_distinct_pairs(encoder, images) -> float:
    """The paper's real-vs-real number, computed directly: mean cosine over ordered pairs i != j."""
    e = torch.nn.functional.normalize(encoder.encode_images(images).double(), dim=-1)
    sim, n = e @ e.T, len(images)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


@pytest.mark.integration
def test_evaluate_real_vs_real_and_self_is_one(tmp_path):
    photos = SHARED_DATA / "dataset" / "can"
    if not photos.is_dir():
        photos = make_photos(tmp_path / "can", 4)
    out = tmp_path / "rvr.json"
    cli.main(["evaluate", "--real-vs-real", "--subject", str(photos), "--encoders", "tiny", "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["real_vs_real"]) == {"dino", "clip_i"} and r["calibrated"] is False
    assert all(-1 <= v < 1 for v in r["real_vs_real"].values())  # distinct photos: below 1
    enc = load_encoders("tiny", device=DEVICE)
    images = [load_image(p) for p in list_images(photos)]
    assert r["num_photos"] == len(images)
    assert r["real_vs_real"] == pytest.approx({"dino": mean_cosine_of_distinct_pairs(enc["dino"], images),
                                               "clip_i": mean_cosine_of_distinct_pairs(enc["clip"], images)}, abs=1e-6)
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.jpg").write_bytes(sorted(photos.iterdir())[0].read_bytes())
    cli.main(["evaluate", "--real-vs-real", "--subject", str(one), "--encoders", "tiny", "--out", str(out)])
    assert json.loads(out.read_text())["real_vs_real"] == pytest.approx({"dino": 1.0, "clip_i": 1.0}, abs=1e-6)


def test_evaluate_scores_a_folder_of_generated_images(tmp_path):
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
    # Each generated image is a copy of real photo `src`: its DINO row is that photo's mean cosine to all three.
    enc = load_encoders("tiny", device=DEVICE)
    e = torch.nn.functional.normalize(enc["dino"].encode_images([load_image(p) for p in list_images(real)]).double(), dim=-1)
    expected = [float((e @ e[src]).mean()) for src in (0, 1, 2)]
    assert [row["dino"] for row in r["rows"]] == pytest.approx(expected, abs=1e-6)
    assert [(row["prompt_index"], row["seed"]) for row in r["rows"]] == [(0, 0), (0, 1), (2, 0)]


# ------------------------------------------------------------------------------------------ priors


@pytest.mark.integration
def test_priors_takes_fits_arguments_and_makes_the_class_images_fit_reuses(monkeypatch, tmp_path, fresh_cache, capsys,
                                                                           photos):
    """priors reads the class-image settings from fit's own arguments (overrides included) through the data module,
    so it makes exactly the folder (training images, then the held-out ones) that fit then reads."""
    monkeypatch.chdir(REPO)
    args = ["--config", "experiments/base.yaml", "--config", "experiments/tiny.yaml", "--data.class_noun", "can",
            "--data.num_class_images", "2", "--data.val_class_images", "1", "--data.prior.steps", "2",
            "--trainer.accelerator", "cpu"]
    # base.yaml + tiny.yaml: the tiny model at 64 px, DPM++ with guidance 7.5, seeds 0..2 -- fit's cache folder.
    settings = PriorSettings(model=ModelSource("tiny"), prompt="a can", resolution=64,
                             sampling=PriorSampling(sampler="dpm++", steps=2, guidance_scale=7.5, seed=0))
    folder = default_folder(settings)
    cli.main(["priors", *args])
    assert capsys.readouterr().out.splitlines()[-1] == f"3 class images in {folder} (0 reused, 3 made)"  # after the bar
    assert [Image.open(folder / f"{i:05d}.png").size for i in range(3)] == [(64, 64)] * 3
    cli.main(["priors", *args])
    assert capsys.readouterr().out.splitlines()[-1] == f"3 class images in {folder} (3 reused, 0 made)"
    # The data module of a fit with the same arguments trains on the first two and validates on the third.
    c = config.lightning_cli([*args, "--output_dir", str(tmp_path), "--data.instance_dir", str(photos["instance"])],
                             run=False)
    c.datamodule.setup("fit")
    assert c.datamodule.class_folder() == folder
    assert [p.name for p in c.datamodule.class_images] == ["00000.png", "00001.png"]
    assert [(split, p.name) for split, p, _ in c.datamodule.validation_items()][0] == ("prior", "00002.png")


@pytest.mark.integration
def test_priors_makes_each_subjects_class_images_for_a_several_subject_config(monkeypatch, tmp_path, fresh_cache,
                                                                              capsys, photos):
    """`make experiment` on a `data.subjects` config: priors makes one class folder per class noun, the ones fit
    then pairs each subject with."""
    monkeypatch.chdir(REPO)
    spec = tmp_path / "two.yaml"
    spec.write_text(f"data:\n  subject: pair\n  subjects:\n"
                    f"    - {{subject: ball, class_noun: toy, instance_dir: {photos['instance']}, identifier: sks}}\n"
                    f"    - {{subject: mug, class_noun: cup, instance_dir: {photos['instance']}, identifier: zwx}}\n")
    args = ["--config", "experiments/base.yaml", "--config", "experiments/tiny.yaml", "--config", str(spec),
            "--data.num_class_images", "1", "--data.val_class_images", "0", "--data.prior.steps", "2"]
    cli.main(["priors", *args, "--trainer.accelerator", "cpu"])
    out = capsys.readouterr().out
    c = config.lightning_cli([*args, "--output_dir", str(tmp_path / "run")], run=False)
    folders = [c.datamodule.class_folder(s) for s in c.datamodule.subjects]
    assert len(set(folders)) == 2
    for f in folders:
        assert f"1 class images in {f} (0 reused, 1 made)" in out and (f / "00000.png").is_file()


def test_priors_help_says_what_it_does_and_lists_fits_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["priors", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("priors: make the run's class-prior images")
    assert "--data.num_class_images" in out and "--trainer.devices" in out


# ------------------------------------------------------------------------------------------ report


def write_metrics(run: Path, subject: str, dino: float) -> Path:
    """A run folder's metrics.json as SampleAndScore writes it (base and final stages, one prompt)."""
    run.mkdir(parents=True)
    per_prompt = [{"index": 0, "prompt": "a sks can in the snow", "dino": dino, "clip_i": 0.5, "clip_t": 0.25}]
    (run / "metrics.json").write_text(json.dumps({
        "subject": subject, "class_noun": "can", "identifier": "sks", "calibrated": False, "encoders": {"dino": "tiny"},
        "stages": {"base": {"metrics": {"dino": dino - 0.2}, "per_prompt": per_prompt},
                   "final": {"step": 6, "metrics": {"dino": dino, "clip_t": 0.25}, "per_prompt": per_prompt}}}))
    return run


def test_report_command_writes_each_run_and_the_aggregate(tmp_path, capsys):
    a, b = write_metrics(tmp_path / "a", "a", 0.6), write_metrics(tmp_path / "b", "b", 0.8)
    cli.main(["report", str(a), str(b)])
    assert capsys.readouterr().out.splitlines() == [f"wrote {a / 'report.md'}", f"wrote {b / 'report.md'}"]
    text = (a / "report.md").read_text()
    assert text.startswith("# DreamBooth report: a (can)")
    assert "| Base model (before) | 0.400 |" in text and "| DreamBooth (after, step 6) | 0.600 |" in text
    assert "**00. a sks can in the snow** — DINO 0.600" in text
    table = tmp_path / "bench.md"
    cli.main(["report", str(a), str(b), "--aggregate", str(table)])
    assert capsys.readouterr().out.strip() == f"wrote {table}"
    half = 12.706 * math.sqrt(0.02) / math.sqrt(2)  # t(0.975, df 1) * sample std / sqrt(n)
    assert f"| DreamBooth (ours) | 0.700 ± {half:.3f} |" in table.read_text()


def test_report_command_without_metrics_says_why(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(tmp_path)])
    assert e.value.code == 1 and "SampleAndScore" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ compare


@pytest.mark.integration
def test_compare_command_uses_the_runs_config(tmp_path, capsys, model_cache):
    run_dir = make_run(tmp_path)
    cli.main(["compare", str(run_dir), "--model", "tiny-ip2p", "--steps", "2"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {run_dir / 'compare' / 'report.md'}"
    m = json.loads((run_dir / "compare" / "metrics.json").read_text())
    # From the run's config.yaml: 2 images per prompt, seed 0, 64 px, tiny encoders; 2 prompts x 2 seeds edited.
    assert m["settings"] == {"images_per_prompt": 2, "seed": 0, "steps": 2, "guidance_scale": 7.5,
                             "image_guidance_scale": 1.5, "resolution": 64}
    assert m["subject"] == "toy" and m["model"] == "tiny-ip2p" and m["calibrated"] is False
    assert sorted(p.name for p in (run_dir / "compare" / "instructpix2pix").iterdir()) == [
        "00_0.png", "00_1.png", "01_0.png", "01_1.png", "edit_settings.json"]
    table = tmp_path / "cmp.md"
    cli.main(["compare", str(run_dir), "--aggregate", str(table)])
    assert capsys.readouterr().out.strip() == f"wrote {table}"
    dino = m["methods"]["InstructPix2Pix"]["metrics"]["dino"]
    assert f"| InstructPix2Pix | {dino:.3f} ± 0.000 |" in table.read_text()


# ------------------------------------------------------------------------------------------ tiny-model


def test_tiny_model_subcommand(tmp_path, tiny_dir, capsys):
    """`tiny-model DIR` writes a loadable seed-0 pipeline and leaves no temp folders behind."""
    out = tmp_path / "m"
    cli.main(["tiny-model", str(out)])
    assert str(out) in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, UNet2DConditionModel) and pipe.safety_checker is None
    assert (out / WEIGHT_FILES[0]).read_bytes() == (tiny_dir / WEIGHT_FILES[0]).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_tiny_model_subcommand_arch_and_seed(tmp_path):
    """`--arch tiny-v --seed 3` writes a v-prediction model stamped with its seed."""
    out = tmp_path / "v"
    cli.main(["tiny-model", str(out), "--arch", "tiny-v", "--seed", "3"])
    assert components.load_components(str(out)).prediction_type == "v_prediction"
    assert (out / "TINY_VERSION").read_text().split() == ["tiny-v", str(tiny.TINY_VERSION), "seed=3"]


def test_tiny_model_subcommand_keeps_unrelated_files(tmp_path):
    """Pointing `tiny-model` at a folder with user files refuses or keeps them; it never deletes them."""
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model built by dreambooth_pl"):
        cli.main(["tiny-model", str(target)])
    assert (target / "notes.txt").read_text() == "keep me"

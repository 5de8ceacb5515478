"""InstructPix2Pix baseline: instruction table, fixed-seed edits, both methods scored alike, the compare report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dreambooth_pl import components
from dreambooth_pl.config import parse_run_config
from dreambooth_pl.evaluation import EvalPrompt, protocol_prompts
from dreambooth_pl.instructpix2pix import (
    DEFAULT_MODEL,
    EDIT_SETTINGS,
    INSTRUCTIONS,
    Edit,
    EditFolderError,
    check_edit_folder,
    compare,
    default_model,
    instruction_for,
    load,
    plan,
    run,
    score_method,
)

from .conftest import SHARED_DATA, make_photos

TEMPLATES = "a {0} {1} in the snow\na red {0} {1}\n"


def test_every_dreambench_template_has_an_instruction():
    if not (SHARED_DATA / "prompts_object.txt").is_file():
        pytest.skip("DreamBench data absent")
    for kind in ("object", "live"):
        for ep in protocol_prompts(SHARED_DATA, kind, "sks", "dog"):
            assert instruction_for(ep.template)  # raises KeyError when a template lacks one
    assert instruction_for("a {0} {1} wearing a santa hat") == "give it a santa hat"
    assert instruction_for("a red {0} {1}") == "make it red"
    with pytest.raises(KeyError, match="on the moon"):
        instruction_for("a {0} {1} on the moon")
    assert all(v and v.split()[0] in {"put", "add", "make", "give", "dress"} for v in INSTRUCTIONS.values())


def test_plan_pairs_photos_and_seeds_like_dreambooth():
    prompts = [EvalPrompt(0, "a sks can in the snow", "a can in the snow", "a {0} {1} in the snow")]
    edits = plan(prompts, num_photos=3, images_per_prompt=4, seed=10)
    assert [(e.seed, e.photo_index, e.filename) for e in edits] == [
        (10, 0, "00_10.png"), (11, 1, "00_11.png"), (12, 2, "00_12.png"), (13, 0, "00_13.png")]
    assert {e.instruction for e in edits} == {"put it in the snow"}


@pytest.fixture(scope="module")
def ip2p_pipe(model_cache):
    return load("tiny-ip2p")


def test_baseline_makes_the_stated_images_and_reruns_identically(ip2p_pipe, tmp_path):
    (tmp_path / "prompts_object.txt").write_text(TEMPLATES)
    prompts = protocol_prompts(tmp_path, "object", "sks", "can")
    photos = [Image.open(p).convert("RGB") for p in sorted(make_photos(tmp_path / "photos", 2).iterdir())]
    edits = plan(prompts, len(photos), images_per_prompt=3, seed=0)
    a = run(ip2p_pipe, edits, photos, tmp_path / "a", resolution=64, steps=3)
    assert a.images == 6
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["00_0.png", "00_1.png", "00_2.png", "01_0.png", "01_1.png", "01_2.png", EDIT_SETTINGS]
    assert json.loads((tmp_path / "a" / EDIT_SETTINGS).read_text())["steps"] == 3
    run(ip2p_pipe, edits, photos, tmp_path / "b", resolution=64, steps=3)
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    assert run(ip2p_pipe, edits, photos, tmp_path / "a", resolution=64, steps=3).images == 0  # resumable
    assert Image.open(tmp_path / "a" / names[0]).size == (64, 64)


@pytest.mark.integration
def test_an_sdxl_run_is_compared_with_the_sdxl_instructpix2pix(tiny_dir, tiny_xl_dir, tmp_path):
    """The default baseline follows the run's backbone; the SDXL pipeline edits the photos like the SD one."""
    assert default_model(str(tiny_dir)) == DEFAULT_MODEL == "timbrooks/instruct-pix2pix"
    assert default_model(str(tiny_xl_dir)) == default_model("tiny-xl") == "diffusers/sdxl-instructpix2pix-768"
    pipe = load("tiny-xl-ip2p")
    assert type(pipe).__name__ == "StableDiffusionXLInstructPix2PixPipeline"
    (tmp_path / "prompts_object.txt").write_text(TEMPLATES)
    photos = [Image.open(p).convert("RGB") for p in sorted(make_photos(tmp_path / "photos", 2).iterdir())]
    edits = plan(protocol_prompts(tmp_path, "object", "sks", "can"), len(photos), images_per_prompt=1, seed=0)
    assert run(pipe, edits, photos, tmp_path / "out", resolution=64, steps=2).images == 2
    edited = np.asarray(Image.open(tmp_path / "out" / "00_0.png"))
    assert edited.shape == (64, 64, 3) and edited.std() > 0


def test_loading_a_plain_sd_model_as_instructpix2pix_is_refused(tiny_dir):
    with pytest.raises(components.ModelLoadError, match="8"):
        load("tiny")


class Fake:
    """Image embedding = mean RGB + offset; text embedding depends on the words."""

    name, calibrated = "fake", False

    def encode_images(self, images):
        return torch.tensor(np.stack([np.asarray(i, float).mean((0, 1)) / 255 + [0.5, 0, 0] for i in images]))

    def encode_texts(self, texts):
        return torch.tensor([[1.0, float("red" in t), float("snow" in t) + 0.1] for t in texts], dtype=torch.float64)

    def distances(self, a, b):
        return torch.zeros(len(a))


def unit(x):
    x = np.asarray(x, float)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_directional_similarity_matches_independent_computation(tmp_path):
    enc = {"dino": Fake(), "clip": Fake(), "lpips": Fake()}
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
    outs = [[Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]]
    ep = EvalPrompt(0, "a sks can in the snow", "a can in the snow", "a {0} {1} in the snow")
    r = score_method(enc, photos, [ep], outs, "a can", resolution=16)
    emb = lambda ims: unit([np.asarray(i, float).mean((0, 1)) / 255 + [0.5, 0, 0] for i in ims])  # noqa: E731
    src = emb(photos)[[0, 1, 0]]
    out = emb(outs[0])
    dt = unit([1.0, 0.0, 1.1]) - unit([1.0, 0.0, 0.1])  # "a can in the snow" - "a can"
    di = out - src
    expect = np.mean([(di[j] @ dt) / (np.linalg.norm(di[j]) * np.linalg.norm(dt)) for j in range(3)])
    assert r["metrics"]["clip_dir"] == pytest.approx(expect, abs=1e-9)
    assert r["metrics"]["clip_img_input"] == pytest.approx(np.mean(np.sum(src * out, -1)), abs=1e-9)
    assert r["metrics"]["clip_t"] == pytest.approx(np.mean(out @ unit([1.0, 0.0, 1.1])), abs=1e-9)


def make_run(tmp_path):
    """A DreamBooth run folder as `fit` leaves it for `compare`: config.yaml, run.json, base and final samples."""
    (tmp_path / "prompts_object.txt").write_text(TEMPLATES)
    photos = make_photos(tmp_path / "photos", 2)
    run_dir = tmp_path / "run"
    for stage in ("base", "final"):
        (run_dir / "samples" / stage).mkdir(parents=True)
        for i in range(2):
            for k in range(2):
                Image.open(sorted(photos.iterdir())[k]).resize((64, 64)).save(run_dir / "samples" / stage / f"{i:02d}_{k}.png")
    cfg = {"data": {"subject": "toy", "class_noun": "can", "subject_type": "object", "identifier": "sks",
                    "instance_dir": str(photos), "resolution": 64},
           "eval": {"protocol": {"images_per_prompt": 2, "seed": 0}, "prompts_dir": str(tmp_path), "encoders": "tiny"},
           # As in every config.yaml that fit writes: the seed it ran with, and fit's own arguments.
           "seed_everything": 0, "ckpt_path": None, "weights_only": True}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "run.json").write_text(json.dumps({"fit_seconds": 12.5, "peak_gpu_memory_gb": None, "steps": 50}))
    return run_dir


@pytest.mark.integration
def test_compare_writes_report_for_all_methods(ip2p_pipe, tmp_path):
    run_dir = make_run(tmp_path)
    report = compare(run_dir, parse_run_config(run_dir), model="tiny-ip2p", steps=2).read_text()
    m = json.loads((run_dir / "compare" / "metrics.json").read_text())
    assert list(m["methods"]) == ["base model", "DreamBooth", "InstructPix2Pix"]
    for res in m["methods"].values():
        assert set(res["metrics"]) == {"dino", "clip_i", "clip_t", "div", "clip_dir", "clip_img_input"}
    assert m["calibrated"] is False and m["cost"]["DreamBooth"]["seconds"] == 12.5
    assert "Uncalibrated" in report and "| InstructPix2Pix |" in report and "tradeoff.png" in report
    assert (run_dir / "compare" / "figures" / "tradeoff.png").is_file()
    # Rows real | DreamBooth | InstructPix2Pix of 2 images (128 px) under a 24 px title, beside 130 px labels.
    assert Image.open(run_dir / "compare" / "figures" / "prompt_01.png").size == (130 + 2 * 128, 24 + 3 * 128)
    assert len(list((run_dir / "compare" / "wandb").glob("offline-run-*"))) == 1


def test_an_edits_folder_made_with_other_settings_is_refused_not_reused(tmp_path):
    edits = [Edit(0, 10, 0, "make it red"), Edit(0, 11, 1, "make it red")]
    settings = {"guidance_scale": 5.0, "image_guidance_scale": 1.5, "steps": 25, "resolution": 64}
    check_edit_folder(tmp_path, settings, edits)  # empty: recorded
    Image.new("RGB", (64, 64)).save(tmp_path / edits[0].filename)
    check_edit_folder(tmp_path, settings, edits)  # same settings: resumable
    with pytest.raises(EditFolderError, match=r"image_guidance_scale: folder has 1.5, this run asks 5.0") as err:
        check_edit_folder(tmp_path, {**settings, "image_guidance_scale": 5.0}, edits)
    assert str(tmp_path) in str(err.value) and "Delete" in str(err.value)
    assert (tmp_path / edits[0].filename).is_file()  # nothing removed
    (tmp_path / EDIT_SETTINGS).unlink()  # a folder from before the settings were recorded
    with pytest.raises(EditFolderError, match="not recorded"):
        check_edit_folder(tmp_path, settings, edits)

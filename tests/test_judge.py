"""The world judge: the committed weights read held-out renders, prompts parse, the `world` encoders score them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from dreambooth_pl import encoders as enc
from dreambooth_pl import judge as J
from dreambooth_pl import world
from dreambooth_pl.evaluation import EvalPrompt, score, text_image_scores


@pytest.fixture(scope="module")
def judge() -> J.Judge:
    """The committed judge (models/world/judge), loaded once."""
    return J.load_judge()


@pytest.fixture(scope="module")
def world_encoders() -> dict:
    """load_encoders('world'): the committed judge in the DINO / CLIP / LPIPS roles."""
    return enc.load_encoders("world")


def marked_scene(seed: int = 3, **fixed) -> world.Scene:
    """A scene with a marking, so that its full caption names all 7 attributes."""
    return world.random_scene(np.random.default_rng(seed), **{"color": "red", "marking": "stripe",
                                                               "marking_color": "white", **fixed})


# ------------------------------------------------------------------------------------------------ the judge


def test_committed_judge_reads_fresh_held_out_renders(judge):
    # A third random stream: neither training's ([0, 0]) nor the manifest's evaluation ([0, 1]).
    held_out = J.scenes(np.random.default_rng([0, 2]), 300, subject_share=0.2)
    accuracy = J.evaluate(judge, held_out)
    assert set(accuracy) == set(world.ATTRIBUTES)
    assert all(v >= 0.98 for v in accuracy.values()), accuracy


def test_judge_reads_each_world_subject(judge):
    rng = np.random.default_rng(7)
    for name, identity in world.SUBJECTS.items():
        reads = judge.read([world.render(world.subject_scene(name, rng)) for _ in range(10)])
        right = sum(all(r[k] == v for k, v in identity.items()) for r in reads)
        assert right >= 9, (name, reads)


def test_committed_manifest_matches_the_recipe():
    manifest = json.loads((J.JUDGE_DIR / J.MANIFEST).read_text())
    config = json.loads((J.JUDGE_DIR / J.CONFIG).read_text())
    assert manifest["recipe"] == J.RECIPE  # retrain (`make world`) after changing the recipe
    assert manifest["device"] == "cpu" and manifest["steps"] == J.RECIPE["steps"]
    assert set(manifest["accuracy"]) == set(world.ATTRIBUTES) and manifest["min_accuracy"] >= 0.98
    assert config["attributes"] == world.ATTRIBUTES and config["widths"] == J.RECIPE["widths"]
    assert (J.JUDGE_DIR / J.WEIGHTS).stat().st_size < 1_000_000  # fp16, well inside the 12 MB for all


def test_read_returns_class_names_and_accepts_other_sizes(judge):
    scene = marked_scene()
    img = world.render(scene)
    reads = judge.read([img, img.resize((128, 128), resample=0)])  # nearest: the same picture, 2x
    assert reads[0] == scene.attributes() == reads[1]
    assert judge.read([]) == []


def test_missing_or_corrupt_weights_name_the_file_and_make_world(tmp_path, monkeypatch):
    folder = tmp_path / "judge"
    shutil.copytree(J.JUDGE_DIR, folder)
    (folder / J.WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(J.JudgeLoadError, match=r"model\.safetensors is corrupt.*`make world`"):
        J.load_judge(folder)
    (folder / J.CONFIG).write_text("{")
    with pytest.raises(J.JudgeLoadError, match=r"config\.json is corrupt.*`make world`"):
        J.load_judge(folder)
    shutil.copy(J.JUDGE_DIR / J.CONFIG, folder / J.CONFIG)
    (folder / J.WEIGHTS).unlink()
    with pytest.raises(J.JudgeLoadError, match=r"judge/model\.safetensors is missing.*`make world`"):
        J.load_judge(folder)
    monkeypatch.setattr(J, "JUDGE_DIR", folder)  # the encoders say the same, as an EncoderLoadError
    with pytest.raises(enc.EncoderLoadError, match=r"model\.safetensors is missing.*`make world`"):
        enc.load_encoders("world")


def test_tiny_training_is_deterministic_and_round_trips(tmp_path):
    state = torch.random.get_rng_state()
    runs = [J.train_judge(steps=3, batch_size=8, seed=5, eval_size=16, progress=False) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    (a, acc_a), (b, acc_b) = runs
    assert acc_a == acc_b and set(acc_a) == set(world.ATTRIBUTES)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    J.save_judge(a, tmp_path, {"steps": 3})
    loaded = J.load_judge(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in sa.items())  # fp16 weights: lossless
    assert json.loads((tmp_path / J.MANIFEST).read_text()) == {"steps": 3}


# ------------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize(("prompt", "wanted"), [
    ("a sks star at night", {"shape": "star", "background": "at night"}),
    ("a blue sks ball", {"shape": "ball", "color": "blue"}),
    ("a small sks heart in the top left", {"shape": "heart", "size": "small", "position": "top left"}),
    ("a sks box in the snow in the top", {"shape": "box", "background": "in the snow", "position": "top"}),
    ("a large red ring with white dots on a pink background in the bottom right",
     {"shape": "ring", "color": "red", "marking": "dots", "marking_color": "white", "background": "pink",
      "size": "large", "position": "bottom right"}),
    ("A purple star, with a yellow band!", {"shape": "star", "color": "purple", "marking": "band",
                                           "marking_color": "yellow"}),
    ("a star", {"shape": "star"}),
    ("a sks", {}),
    ("", {}),
])
def test_parse_prompt(prompt, wanted):
    assert J.parse_prompt(prompt) == wanted


def test_parse_prompt_reads_every_caption_the_world_writes():
    rng = np.random.default_rng(11)
    for _ in range(200):
        scene = world.random_scene(rng)
        named = scene.attributes()
        assert J.parse_prompt(world.caption(scene)) == named  # full captions name all 7 ("plain": no marking)
        partial = J.parse_prompt(world.caption(scene, rng, keep=0.5))
        assert partial["shape"] == scene.shape and partial.items() <= named.items()


def test_parse_prompt_reads_the_benchmark_templates():
    for t in world.TEMPLATES:
        parsed = J.parse_prompt(t["template"].format("sks", "star"))
        assert parsed == {"shape": "star", **t["change"]}, t["template"]


def test_parse_prompt_reads_plain_as_no_marking():
    assert J.parse_prompt("a plain red star") == {"shape": "star", "color": "red", "marking": "none", "marking_color": "none"}


def test_agreement():
    read = {"shape": "star", "color": "red", "position": "top"}
    assert J.agreement(read, {"shape": "star", "color": "blue"}) == {"shape": True, "color": False}
    assert J.agreement(read, {}) == {}


# ------------------------------------------------------------------------------------------------ encoders


def test_world_encoders_are_named_and_calibrated(world_encoders):
    assert set(world_encoders) == {"dino", "clip", "lpips", "dino_identity", "clip_identity"}
    for e in world_encoders.values():
        assert "world judge" in e.name and e.calibrated
        e.train()  # as a LightningModule does each epoch: the judge's batch norm stays in eval mode
        assert not any(m.training for m in e.modules())
    assert enc.load_dino("world").name == world_encoders["dino"].name


def test_clip_t_is_the_share_of_the_named_attributes_right_whatever_their_number(world_encoders):
    clip = world_encoders["clip"]
    scene = marked_scene(background="on grass")
    other = dataclasses.replace(scene, color="orange")
    texts = [world.caption(scene), "a sks " + scene.shape, f"a {scene.color} {scene.shape}"]  # all 7; shape; 2 named
    t = clip.encode_texts(texts)  # (3, D) 0/1 rows
    img = clip.encode_images([world.render(scene), world.render(other)])  # (2, D)
    scores = {(i, j): text_image_scores(clip, t[i : i + 1], img[j : j + 1]).item() for i in range(3) for j in range(2)}
    assert scores[0, 0] == scores[1, 0] == scores[1, 1] == scores[2, 0] == 1.0  # every named attribute right: 1
    assert scores[0, 1] == pytest.approx(6 / 7) and scores[2, 1] == 0.5  # one named attribute wrong of 7, of 2
    unit = torch.nn.functional.normalize(img, dim=-1)
    assert (unit[0] @ unit[1]).item() == pytest.approx(6 / 7)  # CLIP-I: the share of agreeing attributes
    assert text_image_scores(clip, clip.encode_texts(["a sks"]), img[:1]).isnan().all()  # names nothing: no score


def test_identity_roles_count_the_subject_not_its_scene(world_encoders):
    """Identity-only DINO / CLIP-I: the same subject on another background, size and position scores 1."""
    rng = np.random.default_rng(8)
    a, b = world.subject_scene("red_ball", rng, background="gray"), world.subject_scene("green_box", rng)
    moved = world.subject_scene("red_ball", rng, background="at night")
    for role in ("dino_identity", "clip_identity"):
        e = torch.nn.functional.normalize(world_encoders[role].encode_images([world.render(x) for x in (a, moved, b)]),
                                          dim=-1)
        assert (e[0] @ e[1]).item() == pytest.approx(1.0, abs=0.02) and (e[0] @ e[2]).item() < 0.6, role


def test_dino_and_div_roles(world_encoders):
    rng = np.random.default_rng(4)
    images = [world.render(world.random_scene(rng)) for _ in range(4)]
    d = world_encoders["dino"].encode_images(images)
    assert d.shape == (4, world_encoders["dino"].dim) and torch.allclose(d.norm(dim=-1), torch.ones(4))
    dist = world_encoders["lpips"].distances(images[:2] + images[:1], images[:2] + images[1:2])
    assert dist[0].item() == pytest.approx(0, abs=1e-6) and dist[1].item() == pytest.approx(0, abs=1e-6)
    assert 0 < dist[2].item() <= 1
    with pytest.raises(ValueError, match="pairs"):
        world_encoders["lpips"].distances(images[:2], images[:1])


def test_the_metric_code_runs_on_the_world_encoders(world_encoders):
    rng = np.random.default_rng(5)
    real = [world.render(world.subject_scene("red_ball", rng)) for _ in range(3)]
    night = [world.render(world.subject_scene("red_ball", rng, background="at night")) for _ in range(3)]
    ep = EvalPrompt(0, "a sks ball at night", "a ball at night")
    m = score(world_encoders, real, [(ep, [0, 1, 2], night)]).metrics
    # Ball, colour, marking and its colour agree with the photos; background, size, position mostly not.
    assert 4 / 7 - 1e-6 <= m["clip_i"] < 1 and 0 < m["dino"] < 1 and 0 < m["div"] <= 1
    assert m["clip_t"] == 1.0 == m["clip_t_no_token"]  # shape and background named, both right
    assert m["clip_i_identity"] == pytest.approx(1.0) and m["dino_identity"] > 0.95  # the same ball, another scene

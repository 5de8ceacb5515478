"""The toy world: renders follow their scene exactly, captions name its attributes, subjects stay held out."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import numpy as np
import pytest
from PIL import Image

from dreambooth_pl import world
from dreambooth_pl.data import list_images, read_captions

VOCAB = json.loads(resources.files("dreambooth_pl").joinpath("world_vocabulary.json").read_text())


def scenes(n: int, seed: int = 0) -> list[world.Scene]:
    rng = np.random.default_rng(seed)
    return [world.random_scene(rng) for _ in range(n)]


def test_vocabulary_sizes_meet_the_issue():
    assert len(VOCAB["shapes"]) >= 5 and len(VOCAB["palette"]) >= 8 and len(VOCAB["scenes"]) >= 3
    assert len(world.SUBJECTS) >= 4 and len(VOCAB["markings"]) >= 4
    assert {t["category"] for t in world.TEMPLATES} == {"recontextualization", "seen", "property", "pose"}
    assert all(t["instruction"] and "{0} {1}" in t["template"] for t in world.TEMPLATES)
    # Every colour any part uses comes from the one palette.
    used = VOCAB["object_colors"] + VOCAB["marking_colors"] + VOCAB["flat_backgrounds"]
    used += [c for sc in VOCAB["scenes"].values() for c in (sc["top"], sc["bottom"], sc["specks"]) if c]
    assert set(used) <= set(world.PALETTE)


def test_render_is_deterministic_64px_and_uses_only_palette_colours():
    for sc in scenes(40):
        a, b = np.asarray(world.render(sc)), np.asarray(world.render(sc))
        assert a.shape == (64, 64, 3) and np.array_equal(a, b)
        colours = {tuple(c) for c in a.reshape(-1, 3)}
        assert colours <= set(world.PALETTE.values())  # flat colours, no anti-aliasing


def test_render_paints_the_body_and_marking_colours_where_the_masks_say():
    sc = world.Scene("ball", "red", "band", "white", "gray", "large", "center", 32.0, 32.0, 20.0)
    img = np.asarray(world.render(sc))
    body = world.shape_mask("ball", 32, 32, 20)
    band = body & world.marking_mask("band", 32, 32, 20)
    assert (img[band] == world.PALETTE["white"]).all()
    assert (img[body & ~band] == world.PALETTE["red"]).all()
    assert (img[~body] == world.PALETTE["gray"]).all()
    assert band.sum() > 0 and (body & ~band).sum() > band.sum()


def test_shapes_differ_and_ring_has_a_hole():
    masks = {s: world.shape_mask(s, 32, 32, 20) for s in VOCAB["shapes"]}
    assert len({m.tobytes() for m in masks.values()}) == len(masks)
    assert not masks["ring"][32, 32] and masks["ball"][32, 32]


def test_size_and_position_follow_their_names():
    rng = np.random.default_rng(1)
    for size, (lo, hi) in VOCAB["sizes"].items():
        for pos in VOCAB["positions"]:
            x, y, r = world.place(size, pos, rng)
            assert lo * 64 <= r <= hi * 64 and r <= x <= 64 - r and r <= y <= 64 - r
            row, col = divmod(VOCAB["positions"].index(pos), 3)
            # The object's centre lies nearer its own cell centre than any other cell's.
            cells = [((c + 0.5) * 64 / 3, (rw + 0.5) * 64 / 3) for rw in range(3) for c in range(3)]
            nearest = min(range(9), key=lambda k: (cells[k][0] - x) ** 2 + (cells[k][1] - y) ** 2)
            assert nearest == row * 3 + col or size == "large"  # large objects are kept in frame


def test_subjects_are_held_out_of_random_scenes():
    seen = {(s.shape, s.color, s.marking) for s in scenes(3000, seed=2)}
    # Reported and validation subjects alike: tuning on the validation ones is as blind as reporting the others.
    assert not seen & world.HELD_OUT and len(world.HELD_OUT) == len(world.ALL_SUBJECTS) == 8
    assert not set(world.SUBJECTS) & set(world.VALIDATION_SUBJECTS)
    assert len(seen) > 100  # everything else does appear
    assert all(s.background != s.color for s in scenes(500, seed=3))


def test_full_caption_names_every_attribute_and_partial_captions_drop_some():
    sc = world.Scene("star", "purple", "band", "yellow", "at night", "small", "top left", 10.0, 10.0, 9.0)
    assert world.caption(sc) == "a small purple star with a yellow band at night in the top left"
    dots = dataclasses.replace(sc, marking="dots", background="cyan")
    assert world.caption(dots) == "a small purple star with yellow dots on a cyan background in the top left"
    plain = dataclasses.replace(sc, marking="none", marking_color="none")  # no marking is said, before the colour
    assert world.caption(plain) == "a small plain purple star at night in the top left"
    rng = np.random.default_rng(0)
    partial = [world.caption(sc, rng) for _ in range(200)]
    assert all(" star" in c for c in partial) and "a star" in partial and len(set(partial)) > 20


def test_edits_change_one_attribute_and_keep_the_seed():
    rng = np.random.default_rng(4)
    kinds = set()
    for sc in scenes(200, seed=5):
        text, new = world.random_edit(sc, rng)
        changed = {k for k in ("color", "background", "size", "position") if getattr(new, k) != getattr(sc, k)}
        kinds.add(text.split()[0] + ("bg" if "background" in text else ""))
        assert new.seed == sc.seed and new.shape == sc.shape and new.marking == sc.marking
        if text.startswith("make it ") and " and move it" not in text:
            assert changed == {"color"} and text == f"make it {new.color}"
        elif " and move it" in text:
            assert changed <= {"size", "position"} and "position" in changed
        else:
            assert changed == {"background"}
    assert len(kinds) == 3


def test_no_op_edits_give_the_scene_back_and_colour_edits_never_make_a_held_out_subject():
    rng = np.random.default_rng(6)
    edits = [(sc, *world.random_edit(sc, rng, no_op=0.2)) for sc in scenes(1000, seed=7)]
    no_ops = [(sc, new) for sc, text, new in edits if text == world.NO_OP]
    assert 120 < len(no_ops) < 280 and all(new == sc for sc, new in no_ops)
    # A yellow band on a star one colour edit from purple_star: the edit never paints it purple.
    star = world.Scene("star", "red", "band", "yellow", "gray", "small", "top", 20.0, 20.0, 10.0)
    colours = {world.random_edit(star, rng)[1].color for _ in range(300)}
    assert "purple" not in colours and len(colours) >= 4
    assert all((new.shape, new.color, new.marking) not in world.HELD_OUT for _, _, new in edits)


def test_write_dataset_has_the_dreambench_layout(tmp_path):
    root = world.write_dataset(tmp_path / "world", photos=3)
    rows = world.read_subjects(root)
    assert [r["subject_name"] for r in rows] == list(world.ALL_SUBJECTS)
    assert [r["split"] for r in rows] == ["reported"] * 4 + ["validation"] * 4
    assert all(r["type"] == "world" and r["class"] == world.ALL_SUBJECTS[r["subject_name"]]["shape"] for r in rows)
    assert (root / "prompts_world.txt").read_text().splitlines() == [t["template"] for t in world.TEMPLATES]
    for name in world.ALL_SUBJECTS:
        photos = list_images(root / "dataset" / name, min_size=64)  # what every command reads
        assert len(photos) == 3 and all(Image.open(p).size == (64, 64) for p in photos)
        # Each photo's caption names its own background (read back by the data module's reader): "a sks star on a
        # gray background" for a photo whose flat background is the palette's gray.
        shape = world.ALL_SUBJECTS[name]["shape"]
        for photo, text in zip(photos, read_captions(photos, "sks", "a sks shape"), strict=True):
            bg = text.removeprefix(f"a sks {shape} on a ").removesuffix(" background")
            pixels = np.asarray(Image.open(photo).convert("RGB")).reshape(-1, 3)
            assert (pixels == world.PALETTE[bg]).all(axis=1).mean() > 0.25, (photo, text)
    again = world.write_dataset(tmp_path / "again", photos=3)
    assert (again / "dataset" / "red_ball" / "01.png").read_bytes() == (root / "dataset" / "red_ball" / "01.png").read_bytes()


@pytest.mark.parametrize("name", list(world.SUBJECTS))
def test_subject_scenes_keep_the_subject_and_vary_the_rest(name):
    rng = np.random.default_rng(6)
    ss = [world.subject_scene(name, rng) for _ in range(30)]
    assert all(s.identity() == tuple(world.SUBJECTS[name][k] for k in ("shape", "color", "marking", "marking_color"))
               for s in ss)
    assert len({s.background for s in ss}) > 3 and len({s.position for s in ss}) > 3 and len({s.size for s in ss}) == 3


def test_photos_use_no_context_a_template_asks_for_and_the_seen_templates_ask_the_photos_own():
    """Every recontextualisation template's background and every pose template's position is new to the photos; the
    'seen' templates ask for backgrounds every subject's photos show."""
    rng = np.random.default_rng(0)
    asked = {k: {t["change"][k] for t in world.TEMPLATES if t["category"] != "seen" and k in t["change"]}
             for k in ("background", "position")}
    for name, spec in world.ALL_SUBJECTS.items():
        photos = [world.photo_scene(name, i, rng) for i in range(5)]
        assert all(p.identity() == tuple(spec[k] for k in world.IDENTITY) for p in photos)
        assert not {p.background for p in photos} & asked["background"]
        assert not {p.position for p in photos} & asked["position"]
        assert all(p.background != spec["color"] for p in photos)
        seen = {t["change"]["background"] for t in world.TEMPLATES if t["category"] == "seen"}
        assert seen <= {p.background for p in photos}

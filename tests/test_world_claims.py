"""The toy world's claims: the scoring of judged images, and the claims themselves on the committed world models."""

from __future__ import annotations

import math

import pytest

from dreambooth_pl import world
from dreambooth_pl.world_claims import category_means, score_reads, subject_prompts, summarize, wanted

STAR = world.SUBJECTS["purple_star"]
NIGHT = next(t for t in world.TEMPLATES if t["template"] == "a {0} {1} at night")
BLUE = next(t for t in world.TEMPLATES if t["template"] == "a blue {0} {1}")


def read(**over) -> dict[str, str]:
    """A judge reading of the purple star at night, with `over` changed."""
    return {**STAR, "background": "at night", "size": "small", "position": "center", **over}


def test_wanted_applies_the_template_change_to_the_subject():
    assert wanted("purple_star", NIGHT) == {**STAR, "background": "at night"}
    assert wanted("purple_star", BLUE)["color"] == "blue" and wanted("purple_star", BLUE)["marking"] == "band"
    assert subject_prompts("red_ball")[0] == (world.TEMPLATES[0], "a sks ball at night")


def test_score_reads_counts_subject_context_and_pose():
    reads = [read(), read(color="red"), read(background="on grass"), read(color="red", background="on grass")]
    got = score_reads(reads, wanted("purple_star", NIGHT), NIGHT["change"],
                      poses=[{"size": "small", "position": "center"}] * 3 + [{"size": "large", "position": "center"}])
    assert got == {"subject": 0.5, "context": 0.5, "context_given_subject": 0.5, "pose_kept": 0.75}
    none = score_reads([read(color="red")], wanted("purple_star", NIGHT), NIGHT["change"])
    assert none["subject"] == 0.0 and math.isnan(none["context_given_subject"]) and "pose_kept" not in none


def test_property_change_counts_the_new_colour_as_the_subject():
    got = score_reads([read(color="blue"), read()], wanted("purple_star", BLUE), BLUE["change"])
    assert got["subject"] == 0.5 and got["context"] == 0.5


def run_with(value: float, class_is_subject: float = 0.0) -> dict:
    rows = {t["template"]: {"subject": value, "context": 1 - value, "context_given_subject": value}
            for t in world.TEMPLATES}
    return {"templates": rows, "class_is_subject": class_is_subject, "class_colours": 7}


def test_category_means_and_summary_over_runs():
    r = run_with(0.25)
    assert category_means(r, "subject") == {c: 0.25 for c in ("recontextualization", "property", "pose")}
    assert math.isnan(category_means(r, "pose_kept")["pose"])
    s = summarize({"class_images": [run_with(0.2, 0.1), run_with(0.4, 0.3)]})["class_images"]
    mean, half = s["subject"]["recontextualization"]
    sd = math.sqrt(2 * 0.1**2 / 1)  # sample standard deviation of 0.2 and 0.4
    assert mean == pytest.approx(0.3) and half == pytest.approx(12.706 * sd / math.sqrt(2))  # Student t, df 1
    assert s["class_is_subject"][0] == pytest.approx(0.2) and s["class_colours"] == (7, 0.0)

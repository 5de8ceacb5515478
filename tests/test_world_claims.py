"""The toy world's claims: the scoring of judged images, and the claims themselves on the committed world models."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dreambooth_pl import components, world
from dreambooth_pl.judge import load_judge
from dreambooth_pl.world_claims import (
    ClaimsSettings,
    base_follows_prompts,
    category_means,
    finetune,
    measure_samples,
    sample_subject,
    score_reads,
    subject_prompts,
    summarize,
    wanted,
)

pytestmark = pytest.mark.integration  # fits and samples the committed world models (~2 min)

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


# ------------------------------------------------------------------------------------------------ the claims
# On the committed world models (models/world), one subject and one seed: about a minute of CPU in all. The figures
# of every subject and seed, with their CIs, are `make world-claims`'s (README, "What the toy world shows").

SETTINGS = ClaimsSettings(base_prompts=100)


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def base_parts():
    return components.load_components(SETTINGS.model)


@pytest.fixture(scope="module")
def world_data(tmp_path_factory) -> ClaimsSettings:
    """The settings, with the world subjects written to a temporary data root."""
    root = tmp_path_factory.mktemp("world")
    world.write_dataset(root)
    return dataclasses.replace(SETTINGS, data_root=str(root))


@pytest.fixture(scope="module")
def measured(base_parts, judge, world_data) -> dict:
    """purple_star, seed 0: the base model, DreamBooth with lambda = 0 and with lambda = 1, judged."""
    out = {"base": measure_samples(judge, "purple_star", sample_subject(base_parts, "purple_star", world_data, 0))}
    for variant in ("no_prior", "class_images"):
        module, _ = finetune("purple_star", variant, 0, world_data)
        out[variant] = measure_samples(judge, "purple_star", sample_subject(module.parts(), "purple_star", world_data, 0))
    return out


@pytest.fixture(scope="module")
def base_follows(base_parts, judge) -> dict:
    """The base model on 100 held-out full prompts and on "a <shape>" for every shape, judged."""
    return base_follows_prompts(base_parts, judge, SETTINGS)


def test_claim_base_model_follows_shape_colour_background_and_size_words(base_follows):
    per = base_follows["per_attribute"]
    assert min(per[a] for a in ("shape", "color", "background", "size")) >= 0.75, per


def test_claim_class_prompts_spread_over_six_colours(base_follows):
    assert min(len(c) for c in base_follows["colours"].values()) >= 6, base_follows["colours"]


# The target, not reached by the committed models (README, "What the toy world shows"): the markings
# (stripe / band / dots and their colour) are drawn right in under half of the images, the position in ~56%.
@pytest.mark.xfail(strict=True, reason="not reached: every attribute right in 7-11% of images (target 80%)")
def test_claim_base_model_gets_every_attribute_of_full_prompts(base_follows):
    assert base_follows["all_right"] >= 0.8, base_follows["per_attribute"]


RC = "recontextualization"


def test_claim_dreambooth_learns_the_subject(measured):
    base, tuned = category_means(measured["base"], "subject")[RC], category_means(measured["class_images"], "subject")[RC]
    assert base <= 0.05, base
    assert tuned >= 0.3, tuned  # from none of the images to a third or more (the target is 70%: below)
    assert category_means(measured["class_images"], "context_given_subject")[RC] >= 0.7


@pytest.mark.xfail(strict=True, reason="not reached: 25-50% of recontextualisation images judged the subject (target 70%)")
def test_claim_dreambooth_subject_share_reaches_70_percent(measured):
    assert category_means(measured["class_images"], "subject")[RC] >= 0.7


def test_claim_prior_preservation_prevents_language_drift(measured):
    drift, kept = measured["no_prior"], measured["class_images"]
    assert drift["class_is_subject"] > 0, "without the prior no class image is the subject: nothing to prevent"
    assert kept["class_is_subject"] <= 0.5 * drift["class_is_subject"]
    assert kept["class_colours"] >= drift["class_colours"]

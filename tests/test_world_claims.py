"""The toy world's claims: the scoring of judged images, and the claims themselves on the committed world models."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from dreambooth_pl import components, world
from dreambooth_pl.judge import load_judge
from dreambooth_pl.report import mean_ci
from dreambooth_pl.world_claims import (
    ClaimsSettings,
    _claims_compare,
    _claims_dreambooth,
    _claims_head,
    base_follows_prompts,
    confusion,
    counts,
    described_prompts,
    finetune,
    fit_config,
    judge_reads,
    marking_cells,
    measure_samples,
    over_subjects,
    sample_subject,
    subject_photo_reads,
    subject_prompts,
    summarize,
    wanted,
)

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
    assert subject_prompts("black_ring")[0][1] == "a sks ring at night"  # validation subjects too


def test_described_prompts_spell_out_the_subject_and_take_the_templates_colour():
    prompts = dict((t["template"], p) for t, p in described_prompts("purple_star"))
    assert prompts[NIGHT["template"]] == "a purple star with a yellow band at night"
    assert prompts[BLUE["template"]] == "a blue star with a yellow band"  # the asked colour, not purple
    assert prompts["a small {0} {1} in the top left"] == "a small purple star with a yellow band in the top left"
    assert dict((t["template"], p) for t, p in described_prompts("red_ball"))[NIGHT["template"]] == \
        "a red ball with white dots at night"
    assert len(prompts) == len(world.TEMPLATES)


def test_the_base_model_told_in_words_is_judged_without_a_class_prompt(judge):
    # Templates judged as for a fine-tune; no class-prompt images, so no drift row, but its own row in the tables.
    images = [world.render(world.subject_scene("purple_star", np.random.default_rng(k), background="at night"))
              for k in range(2)]
    m = measure_samples(judge, "purple_star", {"templates": {t["template"]: images for t in world.TEMPLATES}})
    assert "class" not in m and m["templates"][NIGHT["template"]]["subject"] == [True, True]
    sm = summarize({"base": [run_with("a", 0)], "described": [m], "class_images": [run_with("a", 2, class_hits=1)],
                    "no_prior": [run_with("a", 2)]})
    assert "class_is_subject" not in sm["described"]
    text = "".join(_claims_dreambooth({"summary": sm}))
    assert "| base model, subject in words | 1.00 ± " in text


def test_judge_reads_gives_each_images_subject_context_and_pose():
    reads = [read(), read(color="red"), read(background="on grass"), read(color="red", background="on grass")]
    got = judge_reads(reads, wanted("purple_star", NIGHT), NIGHT["change"],
                      poses=[{"size": "small", "position": "center"}] * 3 + [{"size": "large", "position": "center"}])
    assert {k: got[k] for k in ("subject", "context", "pose_kept")} == {
        "subject": [True, False, True, False], "context": [True, True, False, False], "pose_kept": [True, True, True, False]}
    # Which part of the subject is wrong: the body colour in images 1 and 3, nothing else.
    assert got["right_color"] == [True, False, True, False] and got["right_marking"] == [True] * 4
    assert "pose_kept" not in judge_reads([read()], wanted("purple_star", NIGHT), NIGHT["change"])


def test_property_change_counts_the_new_colour_as_the_subject():
    got = judge_reads([read(color="blue"), read()], wanted("purple_star", BLUE), BLUE["change"])
    assert got["subject"] == [True, False] and got["context"] == [True, False] and got["right_color"] == [True, False]


def test_marking_cells_split_marking_and_colour_reads_by_marking_and_size():
    rng = np.random.default_rng(0)
    scenes = [world.random_scene(rng, marking="dots", size="small", marking_color="white"),
              world.random_scene(rng, marking="dots", size="small", marking_color="white"),
              world.random_scene(rng, marking="band", size="large", marking_color="red")]
    reads = [{"marking": "dots", "marking_color": "white"}, {"marking": "dots", "marking_color": "red"},
             {"marking": "band", "marking_color": "red"}]
    assert marking_cells(reads, scenes) == {"band": {"large": 1.0}, "dots": {"small": 0.5}}


def run_with(subject: str, hits: int, n: int = 4, class_hits: int = 0) -> dict:
    """A run whose every template has `hits` of `n` images the subject (and the context on the others)."""
    rows = {t["template"]: {"subject": [i < hits for i in range(n)], "context": [i >= hits or i == 0 for i in range(n)]}
            for t in world.TEMPLATES}
    return {"subject": subject, "templates": rows,
            "class": {"is_subject": [i < class_hits for i in range(8)], "colours": ["red", "blue"] * 4}}


def test_counts_pool_a_categorys_templates_and_context_given_subject_counts_subject_images():
    r = run_with("purple_star", 1)
    n_unseen = sum(t["category"] == "recontextualization" for t in world.TEMPLATES)
    assert counts(r, "subject", "recontextualization") == (n_unseen, 4 * n_unseen)
    assert counts(r, "context_given_subject", "recontextualization") == (n_unseen, n_unseen)  # image 0: both
    assert counts(r, "pose_kept", "pose") == (0, 0)


def test_seeds_are_averaged_within_a_subject_and_the_ci_is_over_subjects():
    runs = [run_with("a", 1), run_with("a", 3), run_with("b", 2), run_with("b", 2)]  # subject means 0.5 and 0.5
    got = over_subjects(runs, lambda r: counts(r, "subject", "property"))
    assert got["mean"] == 0.5 and got["ci"] == 0.0 and got["subjects"] == 2  # t over the two subject means
    assert got["pooled"][0] == 0.5 and got["images"] == 4 * 4 * 3 and 0.3 < got["pooled"][1] < 0.5 < got["pooled"][2]
    runs = [run_with("a", 1), run_with("b", 3)]
    got = over_subjects(runs, lambda r: counts(r, "subject", "property"))
    assert got["mean"] == 0.5 and got["ci"] == pytest.approx(12.706 * math.sqrt(2 * 0.25**2) / math.sqrt(2))


def test_summary_has_every_category_metric_and_the_drift_figures():
    s = summarize({"class_images": [run_with("a", 2, class_hits=2), run_with("b", 2, class_hits=4)]})["class_images"]
    assert set(s["subject"]) == {"recontextualization", "seen", "property", "pose"}
    assert s["class_is_subject"]["mean"] == pytest.approx(0.375) and s["class_colours"]["mean"] == 2


def test_claims_md_says_which_part_of_the_subject_is_missing():
    # Body colour right in 1 of 4 images, the rest always right: the table names the colour as what is lost.
    run = run_with("a", 1)
    for row in run["templates"].values():
        row.update(right_shape=[True] * 4, right_color=[i == 0 for i in range(4)], right_marking=[True] * 4,
                   right_marking_color=[True] * 4)
    text = "".join(_claims_dreambooth({"summary": summarize({m: [run] for m in ("base", "no_prior", "class_images")})}))
    assert "| method | shape | color | marking | marking color |" in text
    assert "| DreamBooth, lambda 1 | 100% | 25% | 100% | 100% |" in text


def test_wall_times_of_reused_edits_are_said_to_be_untimed():
    # A rerun reuses InstructPix2Pix's edits already on disk; their wall time would read 0.0 s, as if free.
    ip2p = [{**run_with("a", 2), "no_op": [True, False]}]
    p = {"summary": summarize({"class_images": [run_with("a", 2)], "ip2p": ip2p}),
         "seconds": {"class_images": mean_ci([60.0, 62.0]), "ip2p": mean_ci([float("nan")] * 2)}}
    text = "".join(_claims_compare(p))
    assert "| DreamBooth, lambda 1 | 61.0 ± " in text
    assert "| InstructPix2Pix | reused from an earlier run, not timed |" in text


def test_a_fine_tune_reads_world_yaml_and_the_variant():
    cfg = fit_config("green_box", "no_prior", 3, ClaimsSettings(fit_args=("--trainer.max_steps", "7")))
    assert cfg.model.pretrained == "world" and cfg.data.subject == "green_box" and cfg.seed_everything == 3
    assert not cfg.data.with_prior_preservation and cfg.trainer.max_steps == 7
    teacher = fit_config("green_box", "teacher", 0, ClaimsSettings())
    assert teacher.model.prior_loss == "teacher" and not teacher.data.with_prior_preservation


# ------------------------------------------------------------------------------------------------ the claims
# On the committed world models (models/world), one subject and one seed: about 3 min of one core in all (two 800-step
# fine-tunes that train the text encoder). The figures of every subject and seed, with their CIs, are
# `make world-claims`'s (README, "What the toy world shows").

SETTINGS = ClaimsSettings(base_prompts=100)


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def base_parts():
    return components.load_components(fit_config("purple_star", "class_images", 0, SETTINGS).model.pretrained)


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


def test_finetune_returns_the_ema_weights_when_ema_is_on(world_data):
    s = dataclasses.replace(world_data, fit_args=("--trainer.max_steps", "3", "--model.optim.ema_decay", "0.999"))
    module, _ = finetune("purple_star", "class_images", 0, s)
    # After 3 steps the warmed-up decay is low but not 0: the average differs from the last weights it returns in place
    assert all(torch.equal(p, e) for p, e in zip(module.trainable_parameters(), module.ema.shadow_params, strict=True))


@pytest.fixture(scope="module")
def base_follows(base_parts, judge) -> dict:
    """The base model on 100 held-out full prompts and on "a <shape>" for every shape, judged."""
    return base_follows_prompts(base_parts, judge, SETTINGS)


def test_claims_md_gives_each_subjects_photo_round_trips():
    rates = {a: 0.99 for a in world.ATTRIBUTES}
    p = {"judge_accuracy": {"renders": rates, "vae_round_trips": rates,
                            "subject_photos": {"purple_star": {"photos": [5, 5], "round_trips": [4, 5]}}},
         "base": {"colours": {"star": ["red"] * 6}, "all_right_pooled": (0.2, 0.1, 0.3), "all_right": 0.2,
                  "per_attribute": rates}}
    assert "purple_star 5/5 → 4/5" in "".join(_claims_head(p))
    p["base"]["marking_confusion"] = {"band": {"dots": 3, "band": 1}, "stripe": {"band": 2}}
    assert "Marking asked → drawn (as the judge reads it): band: dots 3, band 1; stripe: band 2." in \
        "".join(_claims_head(p))


def test_confusion_counts_what_is_drawn_for_each_value_asked():
    rng = np.random.default_rng(0)
    scenes = [world.random_scene(rng, marking=m) for m in ("band", "band", "stripe", "none")]
    reads = [{"marking": m} for m in ("dots", "band", "band", "none")]
    assert confusion(reads, scenes, "marking") == {"band": {"dots": 1, "band": 1}, "stripe": {"band": 1},
                                                   "none": {"none": 1}}


def test_subject_photos_are_the_subject_and_the_vae_loses_small_dots(judge, base_parts, world_data):
    got = subject_photo_reads(judge, base_parts.vae, ["purple_star", "white_box"], world_data.data_root)
    assert got["purple_star"]["photos"] == [5, 5]  # the judge reads a reported subject's photos right
    # white_box's red dots are finer than one 8 px latent cell: most of its round trips are no longer the subject,
    # which caps what any fine-tune on them can draw.
    assert got["white_box"]["round_trips"][0] < got["white_box"]["photos"][0]
    assert got["white_box"]["round_trips"][1] == 5


def test_claim_base_model_follows_shape_colour_background_and_size_words(base_follows):
    per = base_follows["per_attribute"]
    assert min(per[a] for a in ("shape", "color", "background", "size")) >= 0.75, per


def test_claim_class_prompts_spread_over_six_colours(base_follows):
    assert min(len(c) for c in base_follows["colours"].values()) >= 6, base_follows["colours"]


# The target, not reached by the committed models (README, "What the toy world shows"): the markings
# (stripe / band / dots) are drawn right in 65% of the images, their colour in 56%.
@pytest.mark.xfail(strict=True, reason="not reached: every attribute right in 31.5% of images in make world-claims (target 80%)")
def test_claim_base_model_gets_every_attribute_of_full_prompts(base_follows):
    assert base_follows["all_right"] >= 0.8, base_follows["per_attribute"]


RC = "recontextualization"


def rate(run: dict, metric: str, category: str = RC) -> float:
    """The share of one run's images of a category with `metric` true."""
    k, n = counts(run, metric, category)
    return k / n if n else float("nan")


# Not reached since the photos stopped sharing backgrounds and positions with the templates (issue 18, item 1): the
# overlap had made it 25%. world.yaml's captioned photos and trained text encoder reach 38 +- 43% over subjects in
# make world-claims, but purple_star (this test's subject) only 22%: yellow_heart 78%, the others 22-28% (README).
@pytest.mark.xfail(strict=True, reason="not reached on purple_star, one seed (milestone 30%); make world-claims: purple_star 22%, 38 +- 43% over subjects")
def test_claim_dreambooth_learns_the_subject(measured):
    base, tuned = rate(measured["base"], "subject"), rate(measured["class_images"], "subject")
    assert base <= 0.05, base
    assert tuned >= 0.3, tuned  # from none of the images to a third or more (the target is 70%: below)
    assert rate(measured["class_images"], "context_given_subject") >= 0.7


@pytest.mark.xfail(strict=True, reason="not reached: 38 +- 43% of unseen-background images judged the subject in make world-claims (target 70%)")
def test_claim_dreambooth_subject_share_reaches_70_percent(measured):
    assert rate(measured["class_images"], "subject") >= 0.7


# Met (make world-claims with world.yaml's captions and text encoder: 41% -> 0% of "a <shape>" images judged the subject).
def test_claim_prior_preservation_prevents_language_drift(measured):
    drift, kept = measured["no_prior"]["class"], measured["class_images"]["class"]
    share = {k: sum(c["is_subject"]) / len(c["is_subject"]) for k, c in (("drift", drift), ("kept", kept))}
    assert share["drift"] > 0, "without the prior no class image is the subject: nothing to prevent"
    assert share["kept"] <= 0.5 * share["drift"], share
    # Body colours of "a <shape>" (λ = 1 against λ = 0) are compared over subjects and seeds by `make world-claims`:
    # 16 images of one seed differ by a colour or two either way.

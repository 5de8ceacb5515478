"""dreambooth_pl.world_ablations: the numbers of one point, their summary over subjects, the figures and the report."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

from dreambooth_pl import world
from dreambooth_pl.world_ablations import (
    AblationSettings,
    Snapshots,
    _photo_kept,
    _summarize,
    ablations_markdown,
    error_bars,
    fit_args,
    plot_ablations,
    point,
    run_ablations,
    tradeoff_figure,
)


def measured(hits: int, drift: int) -> dict:
    """A judged model: `hits` of 4 images of every template the subject (image 0 always in context), `drift` of 8
    class-prompt images the subject, two body colours."""
    rows = {t["template"]: {"subject": [i < hits for i in range(4)], "context": [i == 0 for i in range(4)]}
            for t in world.TEMPLATES}
    return {"subject": "black_ring", "templates": rows,
            "class": {"is_subject": [i < drift for i in range(8)], "colours": ["red", "blue"] * 4}}


def test_a_point_reads_unseen_backgrounds_drift_and_diversity():
    assert point(measured(3, 2)) == {"subject": 0.75, "context": 0.25, "drift": 0.25, "diversity": 2.0}


def test_points_average_seeds_within_a_subject_then_ci_over_subjects():
    got = _summarize({"a": [{"subject": 0.2}, {"subject": 0.4}], "b": [{"subject": 0.5}]})
    mean, half = got["subject"]
    assert mean == pytest.approx(0.4) and half == pytest.approx(12.706 * 0.1 * 2**0.5 / 2**0.5)


def summary() -> dict:
    one = {"subject": (0.5, 0.1), "context": (0.9, 0.05), "drift": (0.1, 0.1), "diversity": (5.0, 1.0)}
    trade = {"change_right": (0.8, 0.1), "subject_kept": (0.6, 0.1)}
    return {"steps": {"100": one, "800": one}, "lambda": {"1.0": one, "0.0": {**one, "subject": (0.2, 0.1)}}, "lr": {"0.3": one, "1.0": one},
            "class_images": {"25": one, "200": one}, "prior": {"class_images": one, "teacher": one},
            "text_encoder": {"0.0": one, "0.1": one}, "captions": {"on": one, "off": {**one, "context": (0.3, 0.1)}},
            "guidance": {"5.0": trade}, "ip2p": {"5.0/1.5": {**trade, "pose_kept": (0.7, 0.1), "no_op": (0.1, 0.05)}}}


def test_the_figures_and_the_report_show_every_axis_and_the_trade_off(tmp_path):
    figures = plot_ablations(summary(), {}, tmp_path / "figures")
    assert set(figures) == {"steps", "lambda", "lr", "class_images", "prior", "text_encoder", "captions", "tradeoff"}
    assert all(Path(p).stat().st_size > 5000 for p in figures.values())  # PNGs with content
    payload = {"settings": {**AblationSettings().__dict__, "subjects": ["black_ring"], "seeds": [0]},
               "default": {"steps": 800, "learning_rate": 5e-4, "class_images": 200, "guidance": 5.0},
               "summary": summary(), "git_sha": "abc", "wall_seconds": 60.0}
    text = ablations_markdown(payload, figures, tmp_path)
    assert "## text-encoder learning rate" in text
    assert "| off | 0.50 ± 0.10 | 0.30 ± 0.10 |" in text  # the captions axis: names, not numbers
    lam = text[text.index("## prior weight λ"):text.index("## learning rate")]
    assert lam.index("| 0.0 | 0.20 ± 0.10 | 0.90 ± 0.05 |") < lam.index("| 1.0 | 0.50 ± 0.10")  # numeric order
    assert "| InstructPix2Pix | 5.0/1.5 | 0.80 ± 0.10 | 0.60 ± 0.10 |" in text and "figures/ablation_tradeoff.png" in text
    assert "| 5.0/1.5 | 0.70 ± 0.10 | 0.10 ± 0.05 |" in text  # InstructPix2Pix's pose kept and no-op


def test_error_bars_stop_at_the_bounds_of_a_rate():
    # (mean, half-width): 0.25 ± 0.42 would reach -0.17; 0.9 ± 0.2 would reach 1.1; 0.5 ± 0.1 stays symmetric.
    low, high = error_bars([(0.25, 0.42), (0.9, 0.2), (0.5, 0.1)], 0.0, 1.0)
    assert low == pytest.approx([0.25, 0.2, 0.1]) and high == pytest.approx([0.42, 0.1, 0.1])
    low, high = error_bars([(3.0, 5.0)], 0.0, float("inf"))  # a count: no upper bound
    assert low == [3.0] and high == [5.0]


def test_snapshots_measure_once_at_each_asked_step_in_eval_mode_with_the_ema_weights():
    seen = []

    class Module:
        training, ema_in = True, False

        def eval(self):
            self.training = False

        def train(self):
            self.training = True

        @contextmanager
        def averaged(self):
            self.ema_in = True
            yield
            self.ema_in = False

    m = Module()
    cb = Snapshots((2, 4), lambda module, step: seen.append((step, module.training, module.ema_in)))
    for step in (1, 2, 2, 3, 4):  # gradient accumulation repeats a step
        cb.on_train_batch_end(type("T", (), {"global_step": step})(), m, None, None, 0)
    assert seen == [(2, False, True), (4, False, True)] and m.training and not m.ema_in


def test_fit_args_of_every_axis_including_the_teacher_prior():
    assert fit_args("lambda", 0.0, 5e-4) == ("--model.prior_loss_weight", "0.0", "--data.with_prior_preservation", "false")
    assert fit_args("lr", 3.0, 5e-4) == ("--model.optim.learning_rate", "0.0015")
    assert fit_args("class_images", 25, 5e-4) == ("--data.num_class_images", "25")
    assert fit_args("text_encoder", 0.1, 5e-4)[:2] == ("--model.train_text_encoder", "true")
    assert float(fit_args("text_encoder", 0.1, 5e-4)[3]) == pytest.approx(5e-5)
    assert fit_args("captions", "off", 5e-4) == ("--data.captions", "false")  # the paper's one prompt
    assert fit_args("prior", "teacher", 5e-4) == ()  # a string value: the other axes' arithmetic never runs on it


def test_every_instructpix2pix_guidance_pair_gets_its_own_legend_entry():
    trade = {"change_right": (0.95, 0.05), "subject_kept": (0.02, 0.02)}
    s = {"ip2p": {"2.0/1.0": trade, "5.0/1.5": trade, "7.5/2.5": trade}, "guidance": {"1.5": trade, "5.0": trade}}
    ax = tradeoff_figure(s).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [x for x in labels if x.startswith("InstructPix2Pix")] == [
        f"InstructPix2Pix {k} (text / image guidance)" for k in s["ip2p"]]
    assert sum(x.startswith("DreamBooth") for x in labels) == 1
    assert [a.get_text() for a in ax.texts] == ["1.5", "5.0"]  # DreamBooth's guidance labelled in place


def test_the_steps_axis_must_include_world_yaml_steps(tmp_path):
    # world.yaml's 800 steps is where every other axis's fit ends: a steps axis without it has no default point.
    with pytest.raises(ValueError, match="max_steps"):
        run_ablations(AblationSettings(steps=(100, 1600), data_root=str(tmp_path / "world")), tmp_path / "out")


def test_instructpix2pix_pose_is_counted_on_background_and_colour_edits_only():
    # Pose kept on every background and property template, never on the pose templates (which ask for a new pose).
    rows = {t["template"]: {"subject": [False], "context": [True], "pose_kept": [t["category"] != "pose"]}
            for t in world.TEMPLATES}
    assert _photo_kept({"templates": rows, "no_op": [True, False, False, False]}) == {"pose_kept": 1.0, "no_op": 0.25}

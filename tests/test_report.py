"""Report helpers: confidence intervals, the DreamBench aggregate table, the per-run report without a run."""

from __future__ import annotations

import json
import math

import pytest

from dreambooth_pl.evaluation import PAPER_ROWS
from dreambooth_pl.report import aggregate, mean_ci, metric_table, t975, write_report


def test_mean_ci_matches_student_t():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert mean_ci([0.5]) == (0.5, 0.0)
    assert t975(29) == 2.045 and t975(100) == 1.96 and t975(13) == 2.179  # nearest tabulated df below


def test_aggregate_table_over_subjects(tmp_path):
    files = []
    for name, dino in (("a", 0.6), ("b", 0.7), ("c", 0.8)):
        f = tmp_path / name / "metrics.json"
        f.parent.mkdir()
        f.write_text(json.dumps({"subject": name, "calibrated": True, "reference": PAPER_ROWS, "stages": {
            "base": {"metrics": {"dino": dino - 0.2}}, "final": {"metrics": {"dino": dino, "clip_t": 0.3}}}}))
        files.append(f)
    text = aggregate(files, tmp_path / "bench.md").read_text()
    half = 4.303 * 0.1 / math.sqrt(3)
    assert f"| DreamBooth (ours) | 0.700 ± {half:.3f} | – | 0.300 ± 0.000 |" in text
    assert f"| Base model | 0.500 ± {half:.3f} |" in text
    assert "Subjects: a, b, c" in text and "Uncalibrated" not in text
    assert "0.668" in text  # the paper's row for reference, beside scores on its encoders' scale
    for f in files:  # the toy world's judge: its scores mean something else, so no paper row beside them
        f.write_text(f.read_text().replace(json.dumps(PAPER_ROWS), "{}"))
    assert "0.668" not in aggregate(files, tmp_path / "world.md").read_text()


def test_metric_table_formats_missing_as_dash():
    t = metric_table({"x": {"dino": 0.12345}}, keys=("dino", "clip_t"))
    assert "| x | 0.123 | – |" in t


def test_report_without_metrics_says_why(tmp_path):
    from dreambooth_pl.report import write_report

    with pytest.raises(FileNotFoundError, match="SampleAndScore"):
        write_report(tmp_path)


def test_compare_bench_table_per_method(tmp_path):
    from dreambooth_pl.report import aggregate_compare

    files = []
    for name, (db, ip) in {"a": (0.6, 0.8), "b": (0.7, 0.9)}.items():
        f = tmp_path / name / "compare" / "metrics.json"
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"subject": name, "calibrated": False, "methods": {
            "DreamBooth": {"metrics": {"dino": db, "clip_t": 0.3}}, "InstructPix2Pix": {"metrics": {"dino": ip}}}}))
        files.append(f)
    text = aggregate_compare(files, tmp_path / "cmp.md").read_text()
    half = 12.706 * math.sqrt(0.005) / math.sqrt(2)
    assert f"| DreamBooth | 0.650 ± {half:.3f} |" in text and f"| InstructPix2Pix | 0.850 ± {half:.3f} |" in text
    assert "Uncalibrated" in text


def test_report_says_which_step_was_exported(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"subject": "can", "class_noun": "can", "stages": {}}))
    (tmp_path / "exported.json").write_text(json.dumps(
        {"step": 200, "weights": "best", "checkpoint": "c.ckpt", "monitor": "val/dino", "score": 0.61234}))
    assert "the **best checkpoint, step 200** (val/dino = 0.6123), not the last step" in \
        write_report(tmp_path).read_text()
    (tmp_path / "exported.json").write_text(json.dumps({"step": 800, "weights": "last"}))
    assert "Exported model (`model/`): the last step, 800." in write_report(tmp_path).read_text()


def test_report_names_paper_rows_only_when_it_prints_them(tmp_path):
    stages = {"final": {"step": 800, "metrics": {"dino": 0.6}}}
    (tmp_path / "metrics.json").write_text(json.dumps({"subject": "can", "stages": stages, "reference": PAPER_ROWS}))
    text = write_report(tmp_path).read_text()
    assert "Paper rows: DreamBooth Table 1" in text and "0.668" in text
    # the toy world's judge: no paper rows beside its scores, so the report does not speak of them
    (tmp_path / "metrics.json").write_text(json.dumps({"subject": "star", "stages": stages}))
    assert "Paper rows" not in write_report(tmp_path).read_text()


def test_wilson_interval_matches_its_definition_and_stays_in_0_1():
    from dreambooth_pl.report import wilson

    rate, lo, hi = wilson(8, 10)
    # Wilson (1927): (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.96
    assert rate == 0.8 and lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 20)[1] == 0.0 and 0 < wilson(0, 20)[2] < 0.2 and wilson(20, 20)[2] == 1.0
    assert all(math.isnan(v) for v in wilson(0, 0))

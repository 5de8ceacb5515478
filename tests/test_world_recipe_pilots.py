"""benchmarks/world_recipe_pilots.py: a pilot's record on one subject, end to end with a 2-step fit judged after each step."""

from __future__ import annotations

import json

from dreambooth_pl.world_claims import PARTS

from .conftest import load_benchmark


def test_a_pilot_records_each_subjects_point_parts_and_their_mean(tmp_path):
    out = tmp_path / "pilot.json"
    load_benchmark("world_recipe_pilots").main([
        "--name", "two steps", "--fit-args=--trainer.max_steps 2 --data.num_class_images 2", "--subjects", "black_ring",
        "--images", "1", "--seed", "3", "--snapshots", "1", "--data-root", str(tmp_path / "world"), "--out", str(out)])
    r = json.loads(out.read_text())
    assert (r["name"], r["subjects"], r["images_per_template"], r["seed"]) == ("two steps", ["black_ring"], 1, 3)
    assert r["fit_args"] == "--trainer.max_steps 2 --data.num_class_images 2"
    row = r["per_subject"]["black_ring"]
    assert set(row) == {"subject", "context", "drift", "diversity", "seen", "fit_seconds", *PARTS}
    assert all(0 <= row[k] <= 1 for k in ("subject", "context", "drift", "seen", *PARTS)) and row["diversity"] >= 1
    assert r["mean"] == {k: v for k, v in row.items() if k != "fit_seconds"}  # one subject: its own figures
    snap = r["snapshots"]["1"]  # judged after step 1 of 2 as well
    assert set(snap["per_subject"]["black_ring"]) == set(row) - {"fit_seconds"} and snap["mean"] == snap["per_subject"]["black_ring"]

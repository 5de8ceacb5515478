"""Multi-process training: a 2-rank DDP fit (gloo, CPU) on the tiny model through the real CLI.

Both ranks must end with identical trainable weights that moved from the initial ones, and the
sum/count metric states must merge over the process group into the exact global mean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreambooth_pl.components import load_components
from dreambooth_pl.metrics import PairwiseCosine
from tests.ddp_probe import RANK_ROWS, embeddings

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def test_ddp_two_gloo_ranks_train_identically_and_merge_metrics(photos, tmp_path, tiny_dir):
    ranks = tmp_path / "ranks"
    cmd = [
        sys.executable, "-m", "dreambooth_pl", "fit",
        "--config", "experiments/base.yaml", "--config", "experiments/tiny.yaml",
        "--data.subject", "toy", "--data.class_noun", "can",
        "--data.instance_dir", str(photos["instance"]), "--data.class_dir", str(photos["class"]),
        "--output_dir", str(tmp_path / "out"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_steps", str(STEPS),
        "--eval.every_n_steps", "0", "--eval.evaluate_base", "false", "--eval.final", "false",
        "--probe_learning", "false", "--export", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=tests.ddp_probe.DumpRankState", f"--trainer.callbacks.out_dir={ranks}",
    ]
    # DREAMBOOTH_PL_CACHE (the session's tiny model, built by `tiny_dir`) is inherited from os.environ.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("WANDB_API_KEY", None)
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(var, None)  # let Lightning's launcher pick a free port and set the ranks itself
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"DDP fit failed ({proc.returncode})\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"

    info, params = {}, {}
    for r in (0, 1):
        assert (ranks / f"rank{r}.json").is_file() and (ranks / f"rank{r}.pt").is_file(), (
            f"rank {r} wrote nothing\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
        info[r] = json.loads((ranks / f"rank{r}.json").read_text())
        params[r] = torch.load(ranks / f"rank{r}.pt", weights_only=True)
        assert info[r]["rank"] == r
        assert info[r]["world_size"] == 2 and info[r]["dist_world_size"] == 2
        assert info[r]["global_step"] == STEPS

    # Identical trainable weights on both ranks, and they moved away from the initial tiny UNet.
    assert params[0].keys() == params[1].keys() and params[0]
    init = {f"unet.{n}": p for n, p in load_components("tiny").unet.named_parameters()}
    assert set(params[0]) <= set(init), sorted(set(params[0]) - set(init))[:5]
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), f"{name} differs between the ranks"
    moved = [n for n in params[0] if not torch.equal(params[0][n], init[n])]
    assert len(moved) == len(params[0]), f"{len(params[0]) - len(moved)} trainable tensors never changed"

    # Metric states merged over the process group: the exact single-process mean over all 10 rows.
    real, generated = embeddings()
    whole = PairwiseCosine()
    whole.update(real, generated)
    expected = float(whole.compute())
    per_rank = []
    for r, rows in RANK_ROWS.items():
        m = PairwiseCosine()
        m.update(real, generated[rows])
        assert info[r]["local"]["count"] == int(m.count)  # each rank saw only its own shard before the sync
        per_rank.append(float(m.compute()))
    mean_of_means = sum(per_rank) / len(per_rank)
    assert abs(expected - mean_of_means) > 1e-3, "the test data cannot tell a merge from a mean of means"
    for r in (0, 1):
        assert info[r]["synced"] == pytest.approx(expected, abs=1e-9), (info[r], expected, mean_of_means)
        assert info[r]["synced"] != pytest.approx(mean_of_means, abs=1e-6)

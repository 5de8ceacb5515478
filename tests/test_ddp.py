"""Multi-process training: a 2-rank DDP or FSDP fit (gloo, CPU) on the tiny model through the real CLI.

Both ranks must end with identical trainable weights, equal to a one-process replay of the two ranks' steps
with averaged gradients, and the sum/count metric states must merge over the process group into the exact
global mean. Under FSDP (full sharding, `tests/fsdp_cpu.py`) the weights are gathered from the shards, and the
export (written from the gathered weights, every rank taking part) holds the same weights.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dreambooth_pl.components import load_components
from dreambooth_pl.metrics import PairwiseCosine
from dreambooth_pl.module import DreamBoothModule, LoraSettings, Optimization, SpeedSettings
from tests.ddp_probe import RANK_ROWS, embeddings

pytestmark = pytest.mark.integration  # two processes train (gloo)

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def replay(config: dict, steps: dict[int, list[dict]]) -> dict[str, torch.Tensor]:
    """The run's steps in one process: each rank's loss on its batch (from its RNG state), gradients averaged
    over the ranks as DDP does, clipped as the trainer does, then the AdamW step at the rate the run used."""
    model = config["model"]
    groups = {"optim": Optimization, "lora": LoraSettings, "speed": SpeedSettings}
    m = DreamBoothModule(**{**model, **{k: cls(**model[k]) for k, cls in groups.items()}})
    opt = m.make_optimizer()
    params = [p for g in opt.param_groups for p in g["params"]]
    for i in range(STEPS):
        grads = []
        for r in (0, 1):
            torch.set_rng_state(steps[r][i]["rng"])
            opt.zero_grad()
            m.compute_loss(steps[r][i]["batch"])[0].backward()
            grads.append([p.grad.clone() for p in params])
        for p, g0, g1 in zip(params, *grads, strict=True):
            p.grad = g0 / 2 + g1 / 2
        torch.nn.utils.clip_grad_norm_(params, config["trainer"]["gradient_clip_val"])
        for group, lr in zip(opt.param_groups, steps[0][i]["lr"], strict=True):
            group["lr"] = lr
        opt.step()
    return {f"unet.{n}": p.detach() for n, p in m.unet.named_parameters() if p.requires_grad}


FSDP_CONFIG = {"trainer": {"strategy": {"class_path": "tests.fsdp_cpu.CPUFSDPStrategy"}}}


@pytest.mark.parametrize(("strategy", "buckets"), [("ddp", False), ("ddp", True), ("fsdp", False)],
                         ids=["ddp-square", "ddp-buckets", "fsdp"])
def test_two_gloo_ranks_train_identically_and_merge_metrics(photos, tmp_path, tiny_dir, strategy, buckets):
    """With buckets the loader's items are whole one-bucket batches, which Lightning's distributed sampler shards.
    Without them the default callbacks run too (evaluation before and after, the probe; FSDP: the export): every
    rank takes part in their sampling, rank zero scores."""
    ranks = tmp_path / "ranks"
    fsdp, callbacks = strategy == "fsdp", not buckets
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(FSDP_CONFIG))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "prompts_object.txt").write_text("a {0} {1} in the snow\na red {0} {1}\n")
    cmd = [
        sys.executable, "-m", "dreambooth_pl", "fit",
        "--config", "experiments/base.yaml", "--config", "experiments/tiny.yaml",
        "--data.subject", "toy", "--data.class_noun", "can",
        "--data.instance_dir", str(photos["instance"]), "--data.class_dir", str(photos["class"]),
        "--output_dir", str(tmp_path / "out"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        *(["--config", str(tmp_path / "fsdp.yaml")] if fsdp else ["--trainer.strategy", "ddp"]),
        "--trainer.max_steps", str(STEPS),
        "--eval.every_n_steps", "0", "--eval.evaluate_base", str(callbacks).lower(), "--eval.final",
        str(callbacks).lower(), "--eval.prompts_dir", str(prompts), "--eval.protocol.images_per_prompt", "2",
        "--eval.protocol.steps", "2", "--probe.enabled", str(callbacks).lower(),
        "--export.enabled", str(fsdp).lower(), "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=tests.ddp_probe.DumpRankState", f"--trainer.callbacks.out_dir={ranks}",
        "--data.buckets", str(buckets).lower(),
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
    # ... and they are what one process gets by averaging the two ranks' gradients of the same batches.
    steps = {r: torch.load(ranks / f"rank{r}_steps.pt", weights_only=True) for r in (0, 1)}
    assert len(steps[0]) == len(steps[1]) == STEPS
    assert not torch.equal(steps[0][0]["batch"]["pixel_values"], steps[1][0]["batch"]["pixel_values"])  # own shards
    for r in (0, 1):
        assert all((s["batch"]["bucket"] >= 0).all() == buckets for s in steps[r])
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    expected = replay(config, steps)
    assert expected.keys() == params[0].keys()
    for name, value in expected.items():
        assert torch.allclose(params[0][name], value, rtol=0, atol=1e-6), name
    if callbacks:  # rank zero scored the images every rank sampled, before and after
        stages = json.loads((tmp_path / "out" / "metrics.json").read_text())["stages"]
        assert set(stages) == {"base", "final"} and all(
            math.isfinite(v["metrics"][k]) for v in stages.values() for k in ("dino", "clip_i", "clip_t", "pres"))
        assert len(list((tmp_path / "out" / "samples" / "final").glob("0*_*.png"))) == 2 * 2
    if fsdp:  # the export holds the trained (gathered) weights, not one rank's shard
        exported = load_components(str(tmp_path / "out" / "model")).unet.state_dict()
        for name, value in params[0].items():
            assert torch.equal(exported[name.removeprefix("unet.")], value), name

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

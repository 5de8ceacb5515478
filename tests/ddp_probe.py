"""A callback for tests/test_ddp.py: each DDP / FSDP rank dumps its trainable weights, its steps and a synced metric.

Used from the command line (`--trainer.callbacks+=tests.ddp_probe.DumpRankState`), so it must import
from the repository root in every rank process Lightning launches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch

from dreambooth_pl.callbacks import full_weights

FSDP_PREFIX = "_fsdp_wrapped_module."  # what FSDP's wrapping adds to the names of the layers it wraps

# A fixed (10, 8) "generated" set split unevenly over two ranks, scored against a fixed (4, 8) "real" set.
NUM_GENERATED, DIM, NUM_REAL = 10, 8, 4
RANK_ROWS = {0: slice(0, 3), 1: slice(3, 10)}  # 3 and 7 rows: unequal shards make merged != mean of means


def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """(real (4, 8), generated (10, 8)), the same on every rank and in the test."""
    g = torch.Generator().manual_seed(0)
    generated = torch.randn(NUM_GENERATED, DIM, generator=g)
    real = torch.randn(NUM_REAL, DIM, generator=g)
    return real, generated


class DumpRankState(pl.Callback):
    """On train end, write `rank{R}.pt` (trainable parameters), `rank{R}_steps.pt` (every step's batch, the RNG
    state it started from and the learning rate it used: what a single-process replay needs) and `rank{R}.json`
    (synced metric, step)."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.steps.append({
            "batch": {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in batch.items()},
            "rng": torch.get_rng_state(),
            "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
        })

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from dreambooth_pl.metrics import PairwiseCosine

        rank = trainer.global_rank
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with full_weights(trainer):  # FSDP: every rank gathers the whole weights (DDP: they are whole already)
            params = {n.replace(FSDP_PREFIX, ""): p.detach().cpu().clone()
                      for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save(params, out / f"rank{rank}.pt")
        torch.save(self.steps, out / f"rank{rank}_steps.pt")
        real, generated = embeddings()
        metric = PairwiseCosine()
        metric.update(real, generated[RANK_ROWS[rank]])
        local = {"total": float(metric.total), "count": int(metric.count)}  # before compute() syncs them
        value = metric.compute()  # torchmetrics all-gathers and sums total/count over the process group
        info = {
            "rank": rank,
            "world_size": trainer.world_size,
            "dist_world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "global_step": trainer.global_step,
            "synced": float(value),
            "local": local,
        }
        (out / f"rank{rank}.json").write_text(json.dumps(info, indent=2))

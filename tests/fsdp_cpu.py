"""A CPU-capable FSDP strategy for tests/test_ddp.py: Lightning's FSDPStrategy refuses the CPU accelerator, and torch's
FSDP needs an explicit CPU device there. It wraps the LightningModule itself (as Lightning's strategy does on GPUs)
with `device_id=cpu`, then lets Lightning's strategy carry on with the wrapped module.

Used from the command line (`--trainer.strategy tests.fsdp_cpu.CPUFSDPStrategy`), so it imports from the repository
root in every rank process Lightning launches.
"""

from __future__ import annotations

import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel


class CPUFSDPStrategy(FSDPStrategy):
    """FSDP (full sharding, original parameters kept for the optimizer) over gloo on the CPU."""

    strategy_name = "fsdp_cpu"

    def __init__(self, **kwargs) -> None:
        super().__init__(process_group_backend="gloo", sharding_strategy="FULL_SHARD", state_dict_type="full",
                         use_orig_params=True, **kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            # Shard every Linear and the root: the tiny models' blocks are all Linear and conv layers.
            policy = {nn.Linear}
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            model = FullyShardedDataParallel(module=model, auto_wrap_policy=ModuleWrapPolicy(policy),
                                             sharding_strategy=self.sharding_strategy, use_orig_params=True,
                                             device_id=torch.device("cpu"))
        return super()._setup_model(model)

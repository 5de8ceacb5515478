"""LoRA: inject peft adapters for training, and export them in the two formats tools load.

The adapters sit on the UNet (diffusers' `add_adapter`) and optionally on the CLIP text encoder (peft's
`inject_adapter_in_model`). They are written in the diffusers format (`load_lora_weights`) and in the
kohya-ss / A1111 format (`lora_unet_…` / `lora_te_…` keys with `lora_down`, `lora_up`, `alpha`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from . import files
from .single_file import TEXT_MODEL_PARTS, string_metadata, unwrap

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what `save_lora_weights` writes, `load_lora_weights` reads
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # attention projections, as in the diffusers LoRA example
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora(
    module: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: list[str] | None = None,
) -> None:
    """Add one LoRA adapter (gaussian init; alpha defaults to rank) to the `targets` layers of `module`.

    `targets=None` adapts the attention projections: `UNET_LORA_TARGETS` on a diffusers model,
    `TEXT_LORA_TARGETS` otherwise (the CLIP text encoder).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    diffusers_model = isinstance(module, ModelMixin) and hasattr(module, "add_adapter")
    if targets is None:
        targets = UNET_LORA_TARGETS if diffusers_model else TEXT_LORA_TARGETS
    cfg = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                     init_lora_weights="gaussian", target_modules=list(targets))
    if diffusers_model:
        module.add_adapter(cfg)  # diffusers' integration: the pipeline's LoRA API then sees it
    else:
        # peft directly: transformers' own integration wants a newer peft than the registry has.
        inject_adapter_in_model(cfg, module)


@dataclass(frozen=True)
class _LoraWeights:
    """One adapted module's LoRA factors: delta W = (alpha / rank) * up @ down (peft's lora_B @ lora_A)."""

    down: torch.Tensor  # peft lora_A: (rank, in[, k, k])
    up: torch.Tensor  # peft lora_B: (out, rank[, 1, 1])
    rank: int
    lora_alpha: float  # as configured in peft
    rslora: bool  # peft scales by alpha / sqrt(rank) instead of alpha / rank

    @property
    def kohya_alpha(self) -> float:
        """kohya / A1111 always scale by alpha / rank, so an rsLoRA layer's alpha becomes alpha * sqrt(rank)."""
        return self.lora_alpha * math.sqrt(self.rank) if self.rslora else float(self.lora_alpha)


def has_lora(module: nn.Module | None) -> bool:
    """True when `module` (or the module behind its `torch.compile` wrapper) holds peft LoRA layers."""
    if module is None:
        return False
    return any(isinstance(m, LoraLayer) and len(m.lora_A) > 0 for m in unwrap(module).modules())


def _active_adapter(layers: Mapping[str, nn.Module], adapter_name: str | None, what: str) -> str:
    if adapter_name is not None:
        if not any(adapter_name in m.lora_A for m in layers.values()):
            raise ValueError(f"{what}: no LoRA adapter named {adapter_name!r}")
        return adapter_name
    active = {a for m in layers.values() for a in m.active_adapters if a in m.lora_A}
    if len(active) != 1:
        raise ValueError(f"{what}: {len(active)} active LoRA adapters {sorted(active)}; pass adapter_name")
    return active.pop()


def _collect_lora(module: nn.Module, adapter_name: str | None, what: str) -> dict[str, _LoraWeights]:
    """{module name: LoRA factors} of one adapter (default: the active one), read from the peft layers only."""
    layers = {n: m for n, m in unwrap(module).named_modules() if isinstance(m, LoraLayer) and len(m.lora_A)}
    if not layers:
        raise ValueError(f"{what} has no LoRA layers to export")
    adapter = _active_adapter(layers, adapter_name, what)
    out: dict[str, _LoraWeights] = {}
    for name, m in layers.items():
        if adapter not in m.lora_A:
            continue
        variant = getattr(m, "lora_variant", {}).get(adapter)
        if m.use_dora.get(adapter) or variant is not None or m.lora_bias.get(adapter):
            raise NotImplementedError(f"{what}.{name}: DoRA / LoRA variants / lora_bias are not exportable here")
        if adapter in getattr(m, "lora_embedding_A", {}):
            raise NotImplementedError(f"{what}.{name}: embedding LoRA is not exportable here")
        out[name] = _LoraWeights(
            down=m.lora_A[adapter].weight.detach(),
            up=m.lora_B[adapter].weight.detach(),
            rank=int(m.r[adapter]),
            lora_alpha=float(m.lora_alpha[adapter]),
            rslora=bool(m.use_rslora.get(adapter, False)),
        )
    return out


def _text_lora_name(name: str) -> str:
    """Text-encoder module names as `text_model.…` (transformers 5 flattens CLIPTextModel; 4.x and LoRA files don't)."""
    return f"text_model.{name}" if name.startswith(TEXT_MODEL_PARTS) else name


def _peft_metadata(layers: Mapping[str, _LoraWeights]) -> dict:
    """The `LoraConfig` kwargs diffusers rebuilds the adapter from (its `lora_adapter_metadata`).

    Everything comes from the exported layers, not the training config: the most common rank and alpha, the
    per-module differences as rank/alpha patterns, and every adapted module by name as `target_modules` (so the
    loader adapts exactly the modules the file holds, whatever exclude/layer options training used). Names omit
    `text_model.`: peft matches targets and patterns as name suffixes, so they fit either CLIP layout. Only
    long-standing `LoraConfig` fields are written, so older and newer peft versions accept the file.
    """
    r = Counter(w.rank for w in layers.values()).most_common(1)[0][0]
    alpha = Counter(w.lora_alpha for w in layers.values()).most_common(1)[0][0]
    rslora = {w.rslora for w in layers.values()}
    if len(rslora) != 1:
        raise NotImplementedError("LoRA layers mix rsLoRA and plain scaling; one adapter config cannot express that")
    short = {n.removeprefix("text_model."): w for n, w in layers.items()}
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(short),
        "rank_pattern": {n: w.rank for n, w in short.items() if w.rank != r},
        "alpha_pattern": {n: w.lora_alpha for n, w in short.items() if w.lora_alpha != alpha},
        "use_rslora": rslora.pop(),
    }


def _cpu(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.detach().to("cpu", dtype or t.dtype).contiguous()


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, not {dtype}")


def _resolve_target(text_encoder: Any, target: str | Path | None, what: str) -> Path:
    if target is None:
        raise TypeError(f"{what} is required")
    if isinstance(text_encoder, (str, os.PathLike)):
        raise TypeError(f"text_encoder is a path ({text_encoder!s}); pass {what}= by keyword")
    return Path(target)


def export_lora_diffusers(
    unet: nn.Module | None,
    text_encoder: nn.Module | None = None,
    folder: str | Path | None = None,
    adapter_name: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` as `StableDiffusionPipeline.save_lora_weights` does.

    `pipe.load_lora_weights(folder)` then loads it into a pipeline of the same base model. Keys are diffusers'
    (`unet.<module>.lora.down.weight`, `text_encoder.text_model.<module>.lora_linear_layer.down.weight`); the
    text encoder's LoRA is included when it has one. The `LoraConfig` (rank, alpha, patterns) goes into the
    file's `lora_adapter_metadata` so alpha != rank survives the round trip. `dtype=None` keeps each tensor's
    dtype. Only the LoRA factors are written; the file replaces any previous one atomically.
    """
    folder = _resolve_target(text_encoder, folder, "folder")
    _check_dtype(dtype)
    kwargs: dict[str, Any] = {}
    for part, module, rename in (("unet", unet, str), ("text_encoder", text_encoder, _text_lora_name)):
        if not has_lora(module):
            continue
        layers = {rename(n): w for n, w in _collect_lora(module, adapter_name, part).items()}
        peft_state = {}
        for name, w in layers.items():
            peft_state[f"{name}.lora_A.weight"] = _cpu(w.down, dtype)
            peft_state[f"{name}.lora_B.weight"] = _cpu(w.up, dtype)
        kwargs[f"{part}_lora_layers"] = convert_state_dict_to_diffusers(peft_state)
        kwargs[f"{part}_lora_adapter_metadata"] = _peft_metadata(layers)
    if not kwargs:
        raise ValueError("neither the unet nor the text encoder has LoRA layers to export")

    path = folder / LORA_WEIGHT_NAME
    # diffusers writes into a folder: give it a private one beside the target (marked as a temporary, so a
    # killed writer's leftover is recognised), then copy its one file into the atomic temp file. Copying keeps
    # the temp file's normal shared mode.
    with (
        files.atomic_path(path) as tmp,
        tempfile.TemporaryDirectory(prefix=f".{LORA_WEIGHT_NAME}.", suffix=files.TMP_MARK, dir=folder) as out,
    ):
        StableDiffusionPipeline.save_lora_weights(out, weight_name=LORA_WEIGHT_NAME, **kwargs)
        written = Path(out) / LORA_WEIGHT_NAME
        if not written.is_file():  # diffusers logs some failures instead of raising
            raise OSError(f"save_lora_weights wrote no {LORA_WEIGHT_NAME} in {out}")
        shutil.copyfile(written, tmp)
    return path


def lora_kohya_state_dict(
    unet: nn.Module | None,
    text_encoder: nn.Module | None = None,
    adapter_name: str | None = None,
    dtype: torch.dtype | None = torch.float16,
) -> dict[str, torch.Tensor]:
    """kohya-ss / A1111 LoRA tensors: `lora_unet_<module_path>` / `lora_te_text_model_<module_path>` with
    `.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha` (A1111 scales by alpha / rank).

    SD 1.x / 2.x kohya LoRAs name UNet modules by diffusers' module paths and text-encoder modules by
    transformers' CLIPTextModel paths (with `text_model.`), dots turned into underscores.
    (diffusers' `convert_state_dict_to_kohya` is not used: it writes alpha = rank and SDXL's `lora_te1_`.)
    """
    _check_dtype(dtype)
    out: dict[str, torch.Tensor] = {}
    for prefix, module, rename in (("lora_unet_", unet, str), ("lora_te_", text_encoder, _text_lora_name)):
        if not has_lora(module):
            continue
        for name, w in _collect_lora(module, adapter_name, prefix.strip("_")).items():
            key = prefix + rename(name).replace(".", "_")
            if f"{key}.alpha" in out:
                raise AssertionError(f"two modules map to the kohya name {key}")
            out[f"{key}.lora_down.weight"] = _cpu(w.down, dtype)
            out[f"{key}.lora_up.weight"] = _cpu(w.up, dtype)
            out[f"{key}.alpha"] = torch.tensor(w.kohya_alpha, dtype=dtype or w.down.dtype)
    if not out:
        raise ValueError("neither the unet nor the text encoder has LoRA layers to export")
    return out


def _kohya_metadata(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """kohya's `ss_network_*` fields; a LoRA whose rank or alpha differs per module is `Dynamic`, as kohya writes."""
    ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
    }


def export_lora_kohya(
    unet: nn.Module | None,
    text_encoder: nn.Module | None = None,
    path: str | Path | None = None,
    dtype: torch.dtype = torch.float16,
    adapter_name: str | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write the LoRA as one kohya / A1111 `.safetensors` (see `lora_kohya_state_dict`), atomically.

    Metadata carries kohya's `ss_network_module`, `ss_network_dim` and `ss_network_alpha` (strings);
    A1111, ComfyUI and `pipe.load_lora_weights(path)` read the file.
    """
    path = _resolve_target(text_encoder, path, "path")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the kohya LoRA export is written as .safetensors")
    state = lora_kohya_state_dict(unet, text_encoder, adapter_name=adapter_name, dtype=dtype)
    meta = {"format": "pt", "dreambooth_pl": "lora-kohya", "dtype": str(dtype).removeprefix("torch.")}
    meta.update(_kohya_metadata(state))
    meta.update(string_metadata((metadata or {}).items()))
    return files.write_tensors(state, path, meta)


def export_lora(
    module_or_parts: Any,
    folder: str | Path,
    kohya_dtype: torch.dtype = torch.float16,
    adapter_name: str | None = None,
    metadata: dict | None = None,
    kohya_name: str = KOHYA_WEIGHT_NAME,
) -> dict[str, Path]:
    """Both LoRA formats of `.unet` / `.text_encoder` into `folder`: {'diffusers': …, 'kohya': …}.

    `folder/pytorch_lora_weights.safetensors` (for `load_lora_weights(folder)`, weights in their own dtype)
    and `folder/<kohya_name>` (A1111 / ComfyUI, `kohya_dtype`). The text encoder's LoRA is
    included when it has one; `metadata` goes into the kohya file's header.
    """
    folder = Path(folder)
    unet = module_or_parts.unet
    text_encoder = getattr(module_or_parts, "text_encoder", None)
    text_encoder = text_encoder if has_lora(text_encoder) else None
    return {
        "diffusers": export_lora_diffusers(unet, text_encoder, folder=folder, adapter_name=adapter_name),
        "kohya": export_lora_kohya(
            unet, text_encoder, path=folder / kohya_name, dtype=kohya_dtype, adapter_name=adapter_name,
            metadata=metadata,
        ),
    }


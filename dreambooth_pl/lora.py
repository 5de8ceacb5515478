"""LoRA (and DoRA): inject peft adapters for training, and export them in the two formats tools load.

The adapters sit on the denoiser (diffusers' `add_adapter`: the UNet, or the SD3 / Flux transformer) and optionally
on the CLIP text encoder(s) (peft's `inject_adapter_in_model`; SDXL and SD3 have two). They are written in the
diffusers format (`load_lora_weights`; ComfyUI reads it for SD3 and Flux too) and in the kohya-ss / A1111 / ComfyUI
format (`lora_unet_…` / `lora_te_…`, SDXL `lora_te1_…` / `lora_te2_…` keys with `lora_down`, `lora_up`, `alpha`;
SD3 / Flux under their original module names, q/k/v fused as the originals fuse them). What differs between
backbones (text encoders, key prefixes, the pipeline class, the denoiser's kohya names) comes from the backbone.
DoRA's magnitudes exist only in the diffusers format: its kohya file is not written.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import files
from .backbones import BACKBONES, Backbone, backbone_of
from .single_file import TEXT_MODEL_PARTS, rename, string_metadata, transformer_linears, unet_rules, unwrap

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what `save_lora_weights` writes, `load_lora_weights` reads
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
KOHYA_UNET_PREFIX = "lora_unet_"
# kohya's `ss_base_model_version` for a backbone; A1111 files a LoRA under SDXL only when it starts with `sdxl_`.
KOHYA_BASE_VERSIONS = {"sdxl": "sdxl_base_v1-0"}
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # attention projections, as in the diffusers LoRA example
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora(
    module: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: list[str] | None = None,
    use_dora: bool = False,
) -> None:
    """Add one LoRA adapter (gaussian init; alpha defaults to rank) to the `targets` layers of `module`.

    `targets=None` adapts the attention projections: `UNET_LORA_TARGETS` on a diffusers model,
    `TEXT_LORA_TARGETS` otherwise (a CLIP text encoder, with or without SDXL's projection: the projection itself
    is not adapted).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    diffusers_model = isinstance(module, ModelMixin) and hasattr(module, "add_adapter")
    if targets is None:
        targets = UNET_LORA_TARGETS if diffusers_model else TEXT_LORA_TARGETS
    cfg = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                     init_lora_weights="gaussian", target_modules=list(targets), use_dora=use_dora)
    if diffusers_model:
        module.add_adapter(cfg)  # diffusers' integration: the pipeline's LoRA API then sees it
    else:
        # peft directly: transformers' own integration wants a newer peft than the registry has.
        inject_adapter_in_model(cfg, module)


@contextmanager
def adapters_off(*modules: nn.Module) -> Iterator[None]:
    """Inside the block, every LoRA layer of `modules` gives its base layer's output (the model as pretrained)."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@dataclass(frozen=True)
class _LoraWeights:
    """One adapted module's LoRA factors: delta W = (alpha / rank) * up @ down (peft's lora_B @ lora_A)."""

    down: torch.Tensor  # peft lora_A: (rank, in[, k, k])
    up: torch.Tensor  # peft lora_B: (out, rank[, 1, 1])
    rank: int
    lora_alpha: float  # as configured in peft
    rslora: bool  # peft scales by alpha / sqrt(rank) instead of alpha / rank
    magnitude: torch.Tensor | None = None  # DoRA's (out,) magnitude vector; None for plain LoRA

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
        dora = bool(m.use_dora.get(adapter))
        variant = getattr(m, "lora_variant", {}).get(adapter)
        if (variant is not None and not dora) or m.lora_bias.get(adapter):
            raise NotImplementedError(f"{what}.{name}: LoRA variants other than DoRA / lora_bias are not exportable here")
        if adapter in getattr(m, "lora_embedding_A", {}):
            raise NotImplementedError(f"{what}.{name}: embedding LoRA is not exportable here")
        out[name] = _LoraWeights(
            down=m.lora_A[adapter].weight.detach(),
            up=m.lora_B[adapter].weight.detach(),
            rank=int(m.r[adapter]),
            lora_alpha=float(m.lora_alpha[adapter]),
            rslora=bool(m.use_rslora.get(adapter, False)),
            magnitude=m.lora_magnitude_vector[adapter].weight.detach() if dora else None,
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
    meta = {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(short),
        "rank_pattern": {n: w.rank for n, w in short.items() if w.rank != r},
        "alpha_pattern": {n: w.lora_alpha for n, w in short.items() if w.lora_alpha != alpha},
        "use_rslora": rslora.pop(),
    }
    if any(w.magnitude is not None for w in layers.values()):
        meta["use_dora"] = True
    return meta


def is_dora(layers: Mapping[str, _LoraWeights]) -> bool:
    return any(w.magnitude is not None for w in layers.values())


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


def lora_backbone(unet: nn.Module | None, text_encoder_2: nn.Module | None = None) -> Backbone:
    """The backbone whose LoRA names the export uses: the UNet's; without a UNet, SDXL when a second text encoder
    is given (pass the UNet, with or without LoRA, whenever there is one)."""
    if unet is not None:
        return backbone_of(unwrap(unet))
    return BACKBONES["sdxl" if text_encoder_2 is not None else "sd"]


@dataclass(frozen=True)
class _Part:
    """One adapted model part as the exports name it."""

    attr: str  # unet, text_encoder, text_encoder_2
    module: nn.Module
    diffusers_kwarg: str  # its `save_lora_weights` argument: unet_lora_layers, text_encoder_lora_layers, …
    kohya_prefix: str  # lora_unet_, lora_te_ / lora_te1_, lora_te2_
    rename: Callable[[str], str]  # peft module name -> the name both formats use below the part's prefix

    @property
    def diffusers_metadata_kwarg(self) -> str:
        return self.diffusers_kwarg.replace("_lora_layers", "_lora_adapter_metadata")


def kohya_unet_namer(unet: nn.Module) -> Callable[[str], str]:
    """UNet module name -> kohya's name for it (before `lora_unet_` and the dots-to-underscores).

    SD 1.x/2.x LoRAs use diffusers' module paths (sd-scripts trains the diffusers UNet there); SDXL LoRAs the
    original SGM paths (`down_blocks.1.attentions.0.…` -> `input_blocks.4.1.…`), i.e. the backbone's single-file
    UNet layout, which diffusers' reader maps back with the UNet's config.
    """
    unet = unwrap(unet)
    if backbone_of(unet).single_file_layout != "sdxl":
        return str
    rules = unet_rules(unet.config)

    def sgm(name: str) -> str:
        new = rename(name, rules)
        if new is None:
            raise ValueError(f"unet.{name}: the module has no place in the SGM UNet, so no kohya name")
        return new

    return sgm


def _lora_parts(unet: nn.Module | None, text_encoders: Mapping[str, nn.Module | None], kohya: bool = False
                ) -> tuple[Backbone, list[_Part]]:
    """The backbone and its parts that hold LoRA layers (UNet first, then the text encoders in backbone order)."""
    backbone = lora_backbone(unet, text_encoders.get("text_encoder_2"))
    extra = [a for a, m in text_encoders.items() if m is not None and a not in backbone.lora_text_prefixes]
    if extra:
        raise ValueError(f"{', '.join(extra)} given, but a {backbone.label} UNet has no such text encoder")
    parts = [_Part("unet", unet, f"{backbone.denoiser}_lora_layers", KOHYA_UNET_PREFIX,
                   kohya_unet_namer(unet) if kohya and backbone.objective != "flow" else str)] if has_lora(unet) else []
    for attr, (kwarg, prefix) in backbone.lora_text_prefixes.items():
        module = text_encoders.get(attr)
        if has_lora(module):
            parts.append(_Part(attr, module, kwarg, prefix, _text_lora_name))
    if not parts:
        names = ", ".join(["unet", *backbone.lora_text_prefixes])
        raise ValueError(f"none of {names} has LoRA layers to export")
    return backbone, parts


def export_lora_diffusers(
    unet: nn.Module | None,
    text_encoder: nn.Module | None = None,
    folder: str | Path | None = None,
    adapter_name: str | None = None,
    dtype: torch.dtype | None = None,
    text_encoder_2: nn.Module | None = None,
) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` as the backbone's pipeline's `save_lora_weights` does
    (`StableDiffusionPipeline` / `StableDiffusionXLPipeline`).

    `pipe.load_lora_weights(folder)` then loads it into a pipeline of the same base model. Keys are diffusers'
    (`unet.<module>.lora.down.weight`, `text_encoder[_2].text_model.<module>.lora_linear_layer.down.weight`); each
    text encoder's LoRA is included when it has one (`text_encoder_2`: SDXL's second). The `LoraConfig` (rank,
    alpha, patterns) goes into the file's `lora_adapter_metadata` so alpha != rank survives the round trip.
    `dtype=None` keeps each tensor's dtype. Only the LoRA factors are written; the file replaces any previous one
    atomically.
    """
    folder = _resolve_target(text_encoder, folder, "folder")
    _check_dtype(dtype)
    backbone, parts = _lora_parts(unet, {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2})
    kwargs: dict[str, Any] = {}
    for part in parts:
        layers = {part.rename(n): w for n, w in _collect_lora(part.module, adapter_name, part.attr).items()}
        peft_state = {}
        for name, w in layers.items():
            peft_state[f"{name}.lora_A.weight"] = _cpu(w.down, dtype)
            peft_state[f"{name}.lora_B.weight"] = _cpu(w.up, dtype)
            if w.magnitude is not None:
                peft_state[f"{name}.lora_magnitude_vector"] = _cpu(w.magnitude, dtype)
        # The SD3 / Flux loaders read peft's own keys; SD 1.x/2.x/XL files use diffusers' older names (DoRA's
        # magnitudes have none there, so a DoRA adapter keeps peft's keys, which those loaders read too).
        keep = backbone.objective == "flow" or is_dora(layers)
        kwargs[part.diffusers_kwarg] = peft_state if keep else convert_state_dict_to_diffusers(peft_state)
        kwargs[part.diffusers_metadata_kwarg] = _peft_metadata(layers)

    path = folder / LORA_WEIGHT_NAME
    # diffusers writes into a folder: give it a private one beside the target (marked as a temporary, so a
    # killed writer's leftover is recognised), then copy its one file into the atomic temp file. Copying keeps
    # the temp file's normal shared mode.
    with (
        files.atomic_path(path) as tmp,
        tempfile.TemporaryDirectory(prefix=f".{LORA_WEIGHT_NAME}.", suffix=files.TMP_MARK, dir=folder) as out,
    ):
        backbone.pipeline_class("text2img").save_lora_weights(out, weight_name=LORA_WEIGHT_NAME, **kwargs)
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
    text_encoder_2: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """kohya-ss / A1111 LoRA tensors: `<prefix><module_path>` with `.lora_down.weight`, `.lora_up.weight` and a
    scalar `.alpha` (A1111 scales by alpha / rank), dots in the module path turned into underscores.

    SD 1.x / 2.x: `lora_unet_` + diffusers' UNet module paths (`lora_unet_down_blocks_1_attentions_0_…`) and
    `lora_te_text_model_…` for the CLIP text encoder. SDXL: `lora_unet_` + the original SGM UNet paths
    (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), and `lora_te1_text_model_…` /
    `lora_te2_text_model_…` for the two text encoders (transformers' CLIP paths, with `text_model.`), as kohya's
    sd-scripts write them. (diffusers' `convert_state_dict_to_kohya` is not used: it writes alpha = rank,
    `lora_te1_` for SD 1.x, and diffusers' UNet paths for SDXL.)
    """
    _check_dtype(dtype)
    backbone, parts = _lora_parts(unet, {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}, kohya=True)
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        layers = _collect_lora(part.module, adapter_name, part.attr)
        if is_dora(layers):
            raise NotImplementedError(f"{part.attr}: DoRA's magnitudes have no kohya keys; its adapters are exported "
                                      f"in the diffusers format only")
        if part.attr == "unet" and backbone.objective == "flow":
            out.update(_fused_kohya(layers, transformer_linears(unwrap(unet).config, backbone.single_file_layout),
                                    unwrap(unet), dtype))
            continue
        for name, w in layers.items():
            key = part.kohya_prefix + part.rename(name).replace(".", "_")
            if f"{key}.alpha" in out:
                raise AssertionError(f"two modules map to the kohya name {key}")
            out[f"{key}.lora_down.weight"] = _cpu(w.down, dtype)
            out[f"{key}.lora_up.weight"] = _cpu(w.up, dtype)
            out[f"{key}.alpha"] = torch.tensor(w.kohya_alpha, dtype=dtype or w.down.dtype)
    return out


def _fused_kohya(layers: Mapping[str, _LoraWeights], linears: Mapping[str, tuple[str, ...]], transformer: nn.Module,
                 dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """An SD3 / Flux transformer's LoRA under its original module names (`lora_unet_double_blocks_0_img_attn_qkv`).
    Where the original fuses several diffusers Linears (q, k, v [, mlp]) the LoRAs are stacked: down = the parts'
    downs one below the other, up = their ups on the block diagonal (a part without LoRA adds zeros), so that
    up @ down, scaled by alpha / rank of the stack, is each part's update in its rows. This is how kohya's sd-scripts
    and diffusers' reader of Flux files lay them out."""
    modules = dict(transformer.named_modules())
    out: dict[str, torch.Tensor] = {}
    for original, sources in linears.items():
        mine = [layers.get(src) for src in sources]
        if not any(mine):
            continue
        ranks = {w.rank for w in mine if w is not None}
        scales = {w.lora_alpha / (math.sqrt(w.rank) if w.rslora else w.rank) for w in mine if w is not None}
        if len(ranks) != 1 or len(scales) != 1:
            raise NotImplementedError(f"{original}: its fused parts {sources} have different LoRA ranks or alphas")
        r, scale = ranks.pop(), scales.pop()
        outs = [modules[src].base_layer.out_features if hasattr(modules[src], "base_layer") else modules[src].out_features
                for src in sources]
        ins = modules[sources[0]].in_features if not hasattr(modules[sources[0]], "base_layer") else \
            modules[sources[0]].base_layer.in_features
        down = torch.zeros(r * len(sources), ins)
        up = torch.zeros(sum(outs), r * len(sources))
        row = 0
        for k, (w, n) in enumerate(zip(mine, outs, strict=True)):
            if w is not None:
                down[k * r : (k + 1) * r] = w.down.float().cpu()
                up[row : row + n, k * r : (k + 1) * r] = w.up.float().cpu()
            row += n
        key = KOHYA_UNET_PREFIX + original.replace(".", "_")
        out[f"{key}.lora_down.weight"] = _cpu(down, dtype)
        out[f"{key}.lora_up.weight"] = _cpu(up, dtype)
        out[f"{key}.alpha"] = torch.tensor(scale * r * len(sources), dtype=dtype or torch.float32)  # alpha / rank kept
    return out


def _kohya_metadata(state: Mapping[str, torch.Tensor], backbone: Backbone) -> dict[str, str]:
    """kohya's `ss_network_*` fields; a LoRA whose rank or alpha differs per module is `Dynamic`, as kohya writes.
    An SDXL LoRA also gets kohya's `ss_base_model_version`, which A1111 reads to list it for SDXL models."""
    ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
    }
    if backbone.name in KOHYA_BASE_VERSIONS:
        meta["ss_base_model_version"] = KOHYA_BASE_VERSIONS[backbone.name]
    return meta


def export_lora_kohya(
    unet: nn.Module | None,
    text_encoder: nn.Module | None = None,
    path: str | Path | None = None,
    dtype: torch.dtype = torch.float16,
    adapter_name: str | None = None,
    metadata: dict | None = None,
    text_encoder_2: nn.Module | None = None,
) -> Path:
    """Write the LoRA as one kohya / A1111 `.safetensors` (see `lora_kohya_state_dict`), atomically.

    Metadata carries kohya's `ss_network_module`, `ss_network_dim` and `ss_network_alpha` (strings; SDXL also
    `ss_base_model_version`); A1111, ComfyUI and `pipe.load_lora_weights(path)` read the file.
    """
    path = _resolve_target(text_encoder, path, "path")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the kohya LoRA export is written as .safetensors")
    state = lora_kohya_state_dict(unet, text_encoder, adapter_name=adapter_name, dtype=dtype,
                                  text_encoder_2=text_encoder_2)
    meta = {"format": "pt", "dreambooth_pl": "lora-kohya", "dtype": str(dtype).removeprefix("torch.")}
    meta.update(_kohya_metadata(state, lora_backbone(unet, text_encoder_2)))
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
    """Both LoRA formats of `.unet` and the backbone's text encoders (`.text_encoder`, SDXL also
    `.text_encoder_2`) into `folder`: {'diffusers': …, 'kohya': …}.

    `folder/pytorch_lora_weights.safetensors` (for `load_lora_weights(folder)`, weights in their own dtype)
    and `folder/<kohya_name>` (A1111 / ComfyUI, `kohya_dtype`). Each text encoder's LoRA is included when it
    has one; `metadata` goes into the kohya file's header.
    """
    folder = Path(folder)
    unet = module_or_parts.unet
    encoders = {attr: getattr(module_or_parts, attr, None) for attr in lora_backbone(unet).lora_text_prefixes}
    encoders = {attr: module for attr, module in encoders.items() if has_lora(module)}
    paths = {"diffusers": export_lora_diffusers(unet, folder=folder, adapter_name=adapter_name, **encoders)}
    if any(is_dora(_collect_lora(m, adapter_name, a)) for a, m in {"unet": unet, **encoders}.items() if has_lora(m)):
        print(f"DoRA: {folder / kohya_name} is not written (the kohya format has no magnitudes); the diffusers file "
              f"holds the adapter")
        return paths
    paths["kohya"] = export_lora_kohya(unet, path=folder / kohya_name, dtype=kohya_dtype, adapter_name=adapter_name,
                                       metadata=metadata, **encoders)
    return paths

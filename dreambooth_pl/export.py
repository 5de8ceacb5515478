"""Export a fine-tuned Stable Diffusion as one original-layout (CompVis/LDM) `.safetensors` file.

The file is what A1111 / ComfyUI load and what `StableDiffusionPipeline.from_single_file(path,
config=<diffusers folder>)` (and so `components.load_components(path, single_file_config=...)`) reads
back. The key mapping is derived from each model's config, so the tiny test models and SD 1.x / 2.x
shapes all go through the same code; any weight the mapping does not cover raises instead of being
silently dropped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14 as a transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14 text tower in open_clip's layout
TEXT_LAYOUTS = ("auto", "clip", "open_clip")

# A rule maps one diffusers submodule prefix to its LDM prefix, renaming the first names below it.
Renames = tuple[tuple[str, str], ...]
Rules = dict[str, tuple[str, Renames]]

_UNET_RESNET: Renames = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_RESNET: Renames = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION: Renames = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)
_OPEN_CLIP_LAYER: Renames = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
)


def _unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind a `torch.compile` wrapper (whose state-dict keys gain `_orig_mod.`)."""
    return getattr(module, "_orig_mod", module)


def _uniform(value: Any, n: int, name: str) -> int:
    """A per-block config value that the LDM layout (and diffusers' reverse converter) needs uniform."""
    if isinstance(value, int):
        return value
    values = set(value)
    if len(values) != 1 or len(value) != n:
        raise NotImplementedError(f"{name}={value!r} differs per block; the original LDM layout needs one value")
    return values.pop()


def _apply(state: Mapping[str, torch.Tensor], rules: Rules, prefix: str, what: str) -> dict[str, torch.Tensor]:
    """Rename every key of `state` by its longest matching rule; an unmatched key is an error, not a drop."""
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, tensor in state.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:n])
            if head in rules:
                target, renames = rules[head]
                rest = ".".join(parts[n:])
                for old, new in renames:
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
                out[f"{prefix}{target}.{rest}"] = tensor
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise ValueError(f"{what}: {len(unmatched)} weights have no place in the original LDM layout: {unmatched[:8]}")
    if len(out) != len(state):  # two diffusers keys landing on one LDM key would lose a weight
        raise AssertionError(f"{what}: key mapping is not one-to-one ({len(state)} keys -> {len(out)})")
    return out


def unet_rules(config: Mapping[str, Any]) -> Rules:
    """Diffusers `UNet2DConditionModel` prefixes -> LDM `openaimodel.UNetModel` prefixes, from its config."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    per_block = _uniform(config["layers_per_block"], len(down), "layers_per_block")
    rules: Rules = {
        "time_embedding.linear_1": ("time_embed.0", ()),
        "time_embedding.linear_2": ("time_embed.2", ()),
        "conv_in": ("input_blocks.0.0", ()),
        "conv_norm_out": ("out.0", ()),
        "conv_out": ("out.2", ()),
    }
    # Class / added-condition embeddings (upscaler, SDXL) both live in LDM's `label_emb.0`.
    for name in ("class_embedding", "add_embedding"):
        rules[f"{name}.linear_1"] = ("label_emb.0.0", ())
        rules[f"{name}.linear_2"] = ("label_emb.0.2", ())
    # input_blocks: 0 is conv_in, then per down block `per_block` (resnet[, attention]) rows and, except after
    # the last block, one downsampler row.
    row = 1
    for b, kind in enumerate(down):
        for i in range(per_block):
            rules[f"down_blocks.{b}.resnets.{i}"] = (f"input_blocks.{row}.0", _UNET_RESNET)
            if "CrossAttn" in kind:
                rules[f"down_blocks.{b}.attentions.{i}"] = (f"input_blocks.{row}.1", ())
            row += 1
        if b < len(down) - 1:
            rules[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{row}.0.op", ())
            row += 1
    # middle_block is resnet, attention, resnet (deeper attention is inside the one transformer).
    mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise NotImplementedError(f"mid_block_type={mid_type!r} has no original LDM layout here")
    rules["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET)
    rules["mid_block.attentions.0"] = ("middle_block.1", ())
    rules["mid_block.resnets.1"] = ("middle_block.2", _UNET_RESNET)
    # output_blocks: per up block `per_block + 1` rows; the upsampler joins the block's last row after its
    # resnet (index 1) or, when that row has an attention, after the attention (index 2).
    row = 0
    for b, kind in enumerate(up):
        attn = "CrossAttn" in kind
        for i in range(per_block + 1):
            rules[f"up_blocks.{b}.resnets.{i}"] = (f"output_blocks.{row}.0", _UNET_RESNET)
            if attn:
                rules[f"up_blocks.{b}.attentions.{i}"] = (f"output_blocks.{row}.1", ())
            row += 1
        if b < len(up) - 1:
            rules[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{row - 1}.{2 if attn else 1}.conv", ())
    return rules


def vae_rules(config: Mapping[str, Any]) -> Rules:
    """Diffusers `AutoencoderKL` prefixes -> LDM `AutoencoderKL` (`encoder.down.i.block.j` ...) prefixes."""
    n = len(config["block_out_channels"])
    per_block = _uniform(config["layers_per_block"], n, "layers_per_block")
    rules: Rules = {"quant_conv": ("quant_conv", ()), "post_quant_conv": ("post_quant_conv", ())}
    for side in ("encoder", "decoder"):
        rules[f"{side}.conv_in"] = (f"{side}.conv_in", ())
        rules[f"{side}.conv_out"] = (f"{side}.conv_out", ())
        rules[f"{side}.conv_norm_out"] = (f"{side}.norm_out", ())
        for i in range(2):
            rules[f"{side}.mid_block.resnets.{i}"] = (f"{side}.mid.block_{i + 1}", _VAE_RESNET)
        rules[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", _VAE_ATTENTION)
    for i in range(n):
        for j in range(per_block):
            rules[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        rules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", ())
        # The LDM decoder numbers its levels from the latent resolution up: diffusers' up_blocks.0 is up.{n-1}.
        level = n - 1 - i
        for j in range(per_block + 1):
            rules[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        rules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", ())
    return rules


def _vae_attention_to_conv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM's VAE attention uses 1x1 convolutions: linear (out, in) weights become (out, in, 1, 1)."""
    for key, tensor in state.items():
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            if tensor.ndim == 2:
                state[key] = tensor.reshape(*tensor.shape, 1, 1)
    return state


_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _text_model_keys(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """CLIP text weights keyed as `text_model.…` whether transformers nests them there (4.x) or not (5.x)."""
    state = text_encoder.state_dict()
    return {f"text_model.{k}" if k.startswith(_TEXT_MODEL_PARTS) else k: v for k, v in state.items()}


def text_layout_of(text_encoder: nn.Module) -> str:
    """`open_clip` for an SD 2.x OpenCLIP tower (exact GELU), `clip` for OpenAI CLIP (quick_gelu, SD 1.x)."""
    # OpenAI's CLIP models were trained with quick_gelu; the OpenCLIP ViT-H/bigG towers use exact GELU.
    act = getattr(getattr(text_encoder, "config", None), "hidden_act", "quick_gelu")
    return "open_clip" if act == "gelu" else "clip"


def _clip_to_ldm(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """SD 1.x: the transformers CLIPTextModel state dict under `cond_stage_model.transformer.`."""
    # Released SD 1.x files also hold the `embeddings.position_ids` buffer; transformers >= 4.31 keeps it out
    # of the state dict and A1111, ComfyUI and diffusers all rebuild it, so it is written only where present.
    return {CLIP_PREFIX + k: v for k, v in _text_model_keys(text_encoder).items()}


def _open_clip_to_ldm(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """SD 2.x: the text tower in open_clip's layout (fused q/k/v `in_proj`) under `cond_stage_model.model.`."""
    state = _text_model_keys(text_encoder)
    # transformers < 4.31 saved the position-id buffer; open_clip has none (it indexes positions directly).
    state.pop("text_model.embeddings.position_ids", None)
    layers = text_encoder.config.num_hidden_layers
    rules: Rules = {
        "text_model.embeddings.token_embedding": ("token_embedding", ()),
        "text_model.final_layer_norm": ("ln_final", ()),
    }
    for i in range(layers):
        rules[f"text_model.encoder.layers.{i}"] = (f"transformer.resblocks.{i}", _OPEN_CLIP_LAYER)
    out: dict[str, torch.Tensor] = {}
    # open_clip keeps the position table as a bare parameter and q, k, v as one stacked projection.
    out[OPEN_CLIP_PREFIX + "positional_embedding"] = state.pop("text_model.embeddings.position_embedding.weight")
    for i in range(layers):
        src = f"text_model.encoder.layers.{i}.self_attn"
        dst = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{i}.attn"
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{src}.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}.in_proj_{kind}"] = torch.cat(qkv, dim=0)
    out.update(_apply(state, rules, OPEN_CLIP_PREFIX, "text encoder"))
    return out


def diffusers_to_ldm_state_dict(
    unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, text_layout: str = "auto"
) -> dict[str, torch.Tensor]:
    """Diffusers UNet/VAE + transformers CLIP text encoder -> one original (CompVis/LDM) state dict."""
    if text_layout not in TEXT_LAYOUTS:
        raise ValueError(f"unknown text_layout {text_layout!r}: choose one of {', '.join(TEXT_LAYOUTS)}")
    unet, vae, text_encoder = _unwrap(unet), _unwrap(vae), _unwrap(text_encoder)
    out = _apply(unet.state_dict(), unet_rules(unet.config), UNET_PREFIX, "UNet")
    out.update(_vae_attention_to_conv(_apply(vae.state_dict(), vae_rules(vae.config), VAE_PREFIX, "VAE")))
    layout = text_layout_of(text_encoder) if text_layout == "auto" else text_layout
    out.update(_open_clip_to_ldm(text_encoder) if layout == "open_clip" else _clip_to_ldm(text_encoder))
    return out


def _string_metadata(items: Iterable[tuple[str, Any]]) -> dict[str, str]:
    # safetensors metadata is str -> str; anything else is stored as JSON so it can be read back.
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in items}


def export_single_file(
    parts_or_module: Any,
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    metadata: dict | None = None,
    text_layout: str = "auto",
) -> Path:
    """Write `.unet/.vae/.text_encoder` of `parts_or_module` as one LDM-layout `.safetensors` file, atomically."""

    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, not {dtype}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the single-file export is written as .safetensors")
    state = diffusers_to_ldm_state_dict(
        parts_or_module.unet, parts_or_module.vae, parts_or_module.text_encoder, text_layout=text_layout
    )
    # Integer buffers keep their type; weights take the export dtype. safetensors needs dense CPU tensors.
    tensors = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in state.items()
    }
    meta = {"format": "pt", "dreambooth_pl": "sd-ldm-single-file", "dtype": str(dtype).removeprefix("torch.")}
    source = getattr(parts_or_module, "source", "")
    if isinstance(source, str) and source:
        meta["source"] = source
    meta.update(_string_metadata((metadata or {}).items()))

    save_safetensors_atomic(tensors, path, meta)
    return path


# ---------------------------------------------------------------------------------------------
# LoRA export: the peft adapters on the UNet (diffusers' `add_adapter`) and optionally on the CLIP text
# encoder (transformers' `add_adapter`), written in the diffusers format (`load_lora_weights`) and in the
# kohya-ss / A1111 format (`lora_unet_…` / `lora_te_…` keys with `lora_down`, `lora_up`, `alpha`).

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what `save_lora_weights` writes, `load_lora_weights` reads
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"


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


def _lora_layer_types() -> tuple[type, ...]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # without peft nothing can carry LoRA layers
        return ()
    return (LoraLayer,)


def has_lora(module: nn.Module | None) -> bool:
    """True when `module` (or the module behind its `torch.compile` wrapper) holds peft LoRA layers."""
    types = _lora_layer_types()
    if module is None or not types:
        return False
    return any(isinstance(m, types) and len(m.lora_A) > 0 for m in _unwrap(module).modules())


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
    types = _lora_layer_types()
    layers = {n: m for n, m in _unwrap(module).named_modules() if types and isinstance(m, types) and len(m.lora_A)}
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
    return f"text_model.{name}" if name.startswith(_TEXT_MODEL_PARTS) else name


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


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write beside the target and rename: readers never see a half-written file, and a crash leaves the
    previous export intact (same folder keeps `os.replace` an atomic rename on one filesystem)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        _finish_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _finish_atomically(tmp: Path, path: Path) -> None:
    """fsync `tmp`, make it a normal shared file and rename it onto `path` (same folder: atomic)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.chmod(0o644)
    os.replace(tmp, path)


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
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

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

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LORA_WEIGHT_NAME
    # diffusers writes into a folder: give it a private temp folder beside the target, then rename the file.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{LORA_WEIGHT_NAME}.", suffix=".tmp", dir=folder))
    try:
        StableDiffusionPipeline.save_lora_weights(tmp_dir, weight_name=LORA_WEIGHT_NAME, **kwargs)
        written = tmp_dir / LORA_WEIGHT_NAME
        if not written.is_file():  # diffusers logs some failures instead of raising
            raise OSError(f"save_lora_weights wrote no {LORA_WEIGHT_NAME} in {tmp_dir}")
        _finish_atomically(written, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
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
    meta.update(_string_metadata((metadata or {}).items()))

    save_safetensors_atomic(state, path, meta)
    return path


def export_lora(
    module_or_parts: Any,
    folder: str | Path,
    kohya_dtype: torch.dtype = torch.float16,
    adapter_name: str | None = None,
) -> dict[str, Path]:
    """Both LoRA formats of `.unet` / `.text_encoder` into `folder`: {'diffusers': …, 'kohya': …}.

    `folder/pytorch_lora_weights.safetensors` (for `load_lora_weights(folder)`, weights in their own dtype)
    and `folder/lora_kohya.safetensors` (A1111 / ComfyUI, `kohya_dtype`). The text encoder's LoRA is
    included when it has one.
    """
    folder = Path(folder)
    unet = module_or_parts.unet
    text_encoder = getattr(module_or_parts, "text_encoder", None)
    text_encoder = text_encoder if has_lora(text_encoder) else None
    return {
        "diffusers": export_lora_diffusers(unet, text_encoder, folder=folder, adapter_name=adapter_name),
        "kohya": export_lora_kohya(
            unet, text_encoder, path=folder / KOHYA_WEIGHT_NAME, dtype=kohya_dtype, adapter_name=adapter_name
        ),
    }

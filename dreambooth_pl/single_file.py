"""Export a fine-tuned Stable Diffusion as one original-layout (CompVis/LDM) `.safetensors` file.

The file is what A1111 / ComfyUI load and what `StableDiffusionPipeline.from_single_file(path,
config=<diffusers folder>)` (and so `components.load_components(path, single_file_config=...)`) reads
back. The key mapping is derived from each model's config, so the tiny test models and SD 1.x / 2.x
shapes all go through the same code; any weight the mapping does not cover raises instead of being
silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import files

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


def unwrap(module: nn.Module) -> nn.Module:
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


TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _text_model_keys(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """CLIP text weights keyed as `text_model.…` whether transformers nests them there (4.x) or not (5.x)."""
    state = text_encoder.state_dict()
    return {f"text_model.{k}" if k.startswith(TEXT_MODEL_PARTS) else k: v for k, v in state.items()}


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
    unet, vae, text_encoder = unwrap(unet), unwrap(vae), unwrap(text_encoder)
    out = _apply(unet.state_dict(), unet_rules(unet.config), UNET_PREFIX, "UNet")
    out.update(_vae_attention_to_conv(_apply(vae.state_dict(), vae_rules(vae.config), VAE_PREFIX, "VAE")))
    layout = text_layout_of(text_encoder) if text_layout == "auto" else text_layout
    out.update(_open_clip_to_ldm(text_encoder) if layout == "open_clip" else _clip_to_ldm(text_encoder))
    return out


def string_metadata(items: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """safetensors metadata is str -> str; anything else is stored as JSON so it can be read back."""
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
    meta.update(string_metadata((metadata or {}).items()))

    return files.write_tensors(tensors, path, meta)

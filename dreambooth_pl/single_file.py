"""Export a fine-tuned Stable Diffusion as one original-layout (CompVis/LDM, SGM, SD3 or Flux) `.safetensors` file.

The file is what A1111 / ComfyUI load and what `StableDiffusionPipeline.from_single_file(path,
config=<diffusers folder>)` / `StableDiffusionXLPipeline.from_single_file(...)` (and so
`components.load_components(path, single_file_config=...)`) reads back. SD 1.x / 2.x use the LDM layout
(`cond_stage_model.`), SDXL the SGM layout of Stability's generative-models (`conditioner.embedders.0/1.`); the
UNet and VAE keys are the same in both. The key mapping is derived from each model's config, so the tiny test
models and the public SD 1.x / 2.x / XL shapes all go through the same code; any weight the mapping does not
cover raises instead of being silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import files
from .backbones import backbone_of

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14 as a transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14 text tower in open_clip's layout
TEXT_LAYOUTS = ("auto", "clip", "open_clip")
# SDXL (SGM `GeneralConditioner`): embedders.0 is OpenAI CLIP ViT-L/14 as a transformers CLIPTextModel, embedders.1
# the OpenCLIP ViT-bigG/14 text tower (with its pooled `text_projection`) in open_clip's layout.
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
LAYOUTS = ("sd", "sdxl")  # `Backbone.single_file_layout` values of the UNets
FLOW_LAYOUTS = ("sd3", "flux")  # ... of the transformers

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


def rename(key: str, rules: Rules) -> str | None:
    """`key` (a weight or a module name) renamed by its longest matching rule; None when no rule matches."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in rules:
            target, renames = rules[head]
            rest = ".".join(parts[n:])
            for old, new in renames:
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            return f"{target}.{rest}" if rest else target
    return None


def _apply(state: Mapping[str, torch.Tensor], rules: Rules, prefix: str, what: str) -> dict[str, torch.Tensor]:
    """Rename every key of `state` by its longest matching rule; an unmatched key is an error, not a drop."""
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, tensor in state.items():
        name = rename(key, rules)
        if name is None:
            unmatched.append(key)
        else:
            out[prefix + name] = tensor
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


def _clip_to_ldm(text_encoder: nn.Module, prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SD 1.x (and SDXL's first encoder): the transformers CLIPTextModel state dict under `prefix`."""
    # Released SD 1.x / XL files also hold the `embeddings.position_ids` buffer; transformers >= 4.31 keeps it out
    # of the state dict and A1111, ComfyUI and diffusers all rebuild it, so it is written only where present.
    state = _text_model_keys(text_encoder)
    if "text_projection.weight" in state:  # a CLIPTextModelWithProjection has no place in this layout
        raise ValueError("text encoder: `text_projection` has no place in the transformers-CLIP LDM layout")
    return {prefix + k: v for k, v in state.items()}


def _open_clip_to_ldm(text_encoder: nn.Module, prefix: str = OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SD 2.x (and SDXL's second encoder): the text tower in open_clip's layout (fused q/k/v `in_proj`) under
    `prefix`; a CLIPTextModelWithProjection's projection becomes open_clip's bare `text_projection` matrix."""
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
    out[prefix + "positional_embedding"] = state.pop("text_model.embeddings.position_embedding.weight")
    for i in range(layers):
        src = f"text_model.encoder.layers.{i}.self_attn"
        dst = f"{prefix}transformer.resblocks.{i}.attn"
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{src}.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}.in_proj_{kind}"] = torch.cat(qkv, dim=0)
    if "text_projection.weight" in state:
        # open_clip computes `pooled @ text_projection` with a (width, output_dim) matrix: nn.Linear's weight,
        # transposed (diffusers' reader transposes it back and reads the width from its first dimension).
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    out.update(_apply(state, rules, prefix, "text encoder"))
    return out


def layout_of(unet: nn.Module) -> str:
    """`sd` (LDM keys: SD 1.x / 2.x) or `sdxl` (SGM keys), from the UNet's backbone."""
    return backbone_of(unwrap(unet)).single_file_layout


def diffusers_to_ldm_state_dict(
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    text_layout: str = "auto",
    text_encoder_2: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Diffusers UNet/VAE + transformers CLIP text encoder(s) -> one original-layout state dict.

    The layout follows the UNet's backbone (`layout_of`): SD 1.x / 2.x give the CompVis/LDM file, with the text
    encoder as `text_layout` says (`auto`: open_clip for an exact-GELU tower, else clip); SDXL gives the SGM file,
    which needs `text_encoder_2` (the CLIPTextModelWithProjection) and has one fixed text layout.
    """
    if text_layout not in TEXT_LAYOUTS:
        raise ValueError(f"unknown text_layout {text_layout!r}: choose one of {', '.join(TEXT_LAYOUTS)}")
    unet, vae, text_encoder = unwrap(unet), unwrap(vae), unwrap(text_encoder)
    layout = layout_of(unet)
    if layout not in LAYOUTS:
        raise NotImplementedError(f"single-file layout {layout!r} is not supported: one of {', '.join(LAYOUTS)}")
    out = _apply(unet.state_dict(), unet_rules(unet.config), UNET_PREFIX, "UNet")
    out.update(_vae_attention_to_conv(_apply(vae.state_dict(), vae_rules(vae.config), VAE_PREFIX, "VAE")))
    if layout == "sdxl":
        if text_encoder_2 is None:
            raise ValueError("an SDXL UNet's single file needs text_encoder_2 (the second text encoder)")
        if text_layout != "auto":
            raise ValueError(f"text_layout={text_layout!r}: the SDXL (SGM) layout fixes both text encoders' layouts")
        out.update(_clip_to_ldm(text_encoder, SDXL_CLIP_PREFIX))
        out.update(_open_clip_to_ldm(unwrap(text_encoder_2), SDXL_OPEN_CLIP_PREFIX))
        return out
    if text_encoder_2 is not None:
        raise ValueError("text_encoder_2 was given, but the UNet is not an SDXL UNet (SD 1.x / 2.x have one encoder)")
    text_layout = text_layout_of(text_encoder) if text_layout == "auto" else text_layout
    out.update(_open_clip_to_ldm(text_encoder) if text_layout == "open_clip" else _clip_to_ldm(text_encoder))
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
    """Write `.unet/.vae/.text_encoder` (SDXL: and `.text_encoder_2`) of `parts_or_module` as one original-layout
    `.safetensors` file, atomically; the layout (LDM for SD 1.x / 2.x, SGM for SDXL) follows the UNet's backbone."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, not {dtype}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the single-file export is written as .safetensors")
    layout = layout_of(parts_or_module.unet)
    encoders = [getattr(parts_or_module, name) for name in backbone_of(unwrap(parts_or_module.unet)).text_encoders]
    if layout in FLOW_LAYOUTS:
        state = flow_single_file_state_dict(parts_or_module, layout)
    else:
        state = diffusers_to_ldm_state_dict(parts_or_module.unet, parts_or_module.vae, encoders[0],
                                            text_layout=text_layout, text_encoder_2=encoders[1] if len(encoders) > 1 else None)
    # Integer buffers keep their type; weights take the export dtype. safetensors needs dense CPU tensors.
    tensors = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in state.items()
    }
    kind = {"sdxl": "sdxl-sgm-single-file", "sd3": "sd3-single-file", "flux": "flux-transformer-single-file"}.get(
        layout, "sd-ldm-single-file")
    meta = {"format": "pt", "dreambooth_pl": kind, "dtype": str(dtype).removeprefix("torch.")}
    source = getattr(parts_or_module, "source", "")
    if isinstance(source, str) and source:
        meta["source"] = source
    meta.update(string_metadata((metadata or {}).items()))

    return files.write_tensors(tensors, path, meta)


# ------------------------------------------------------------------------------------------------ SD3 / Flux
# The transformers' original layouts (Stability's SD3 MMDiT files, Black Forest Labs' Flux files), as diffusers'
# `convert_sd3_transformer_checkpoint_to_diffusers` / `convert_flux_transformer_checkpoint_to_diffusers` read them:
# each original Linear is one diffusers Linear, or several fused along the output dimension (q, k, v [, mlp]).
SD3_T5_PREFIX = "text_encoders.t5xxl.transformer."
SD3_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
SD3_CLIP_G_PREFIX = "text_encoders.clip_g.transformer."


def _sd3_block(i: int, last: bool, dual: bool) -> dict[str, tuple[str, ...]]:
    """One joint block: original module -> the diffusers modules fused into it (in order)."""
    b, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
    m = {b + "x_block.attn.qkv": (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"),
         b + "x_block.attn.proj": (d + "attn.to_out.0",),
         b + "context_block.attn.qkv": (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"),
         b + "x_block.adaLN_modulation.1": (d + "norm1.linear",),
         b + "context_block.adaLN_modulation.1": (d + "norm1_context.linear",),
         b + "x_block.mlp.fc1": (d + "ff.net.0.proj",), b + "x_block.mlp.fc2": (d + "ff.net.2",)}
    if not last:  # the last block reads the text only as keys and values
        m |= {b + "context_block.attn.proj": (d + "attn.to_add_out",),
              b + "context_block.mlp.fc1": (d + "ff_context.net.0.proj",),
              b + "context_block.mlp.fc2": (d + "ff_context.net.2",)}
    if dual:  # SD3.5's second self-attention on the image tokens
        m |= {b + "x_block.attn2.qkv": (d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"),
              b + "x_block.attn2.proj": (d + "attn2.to_out.0",)}
    return m


def _flux_blocks(n_double: int, n_single: int) -> dict[str, tuple[str, ...]]:
    m: dict[str, tuple[str, ...]] = {}
    for i in range(n_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        m |= {b + "img_attn.qkv": (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"),
              b + "txt_attn.qkv": (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"),
              b + "img_attn.proj": (d + "attn.to_out.0",), b + "txt_attn.proj": (d + "attn.to_add_out",),
              b + "img_mlp.0": (d + "ff.net.0.proj",), b + "img_mlp.2": (d + "ff.net.2",),
              b + "txt_mlp.0": (d + "ff_context.net.0.proj",), b + "txt_mlp.2": (d + "ff_context.net.2",),
              b + "img_mod.lin": (d + "norm1.linear",), b + "txt_mod.lin": (d + "norm1_context.linear",)}
    for i in range(n_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        m |= {b + "linear1": (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"),
              b + "linear2": (d + "proj_out",), b + "modulation.lin": (d + "norm.linear",)}
    return m


def transformer_linears(config: Mapping[str, Any], layout: str) -> dict[str, tuple[str, ...]]:
    """Every Linear of an SD3 / Flux transformer: original module name -> the diffusers module(s) fused into it."""
    if layout == "sd3":
        n = config["num_layers"]
        dual = set(config.get("dual_attention_layers") or ())
        m = {"x_embedder.proj": ("pos_embed.proj",), "context_embedder": ("context_embedder",),
             "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
             "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
             "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
             "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",),
             "final_layer.linear": ("proj_out",), "final_layer.adaLN_modulation.1": ("norm_out.linear",)}
        for i in range(n):
            m |= _sd3_block(i, i == n - 1, i in dual)
        return m
    if layout == "flux":
        m = {"img_in": ("x_embedder",), "txt_in": ("context_embedder",),
             "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
             "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
             "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
             "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
             "final_layer.linear": ("proj_out",), "final_layer.adaLN_modulation.1": ("norm_out.linear",)}
        if config.get("guidance_embeds"):
            m |= {"guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
                  "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",)}
        return m | _flux_blocks(config["num_layers"], config["num_single_layers"])
    raise NotImplementedError(f"no transformer layout {layout!r}: sd3 or flux")


def _swapped(original: str, layout: str, config: Mapping[str, Any]) -> bool:
    """Modulations whose (shift, scale) halves the original stores the other way round (diffusers swaps them)."""
    last = f"joint_blocks.{config.get('num_layers', 0) - 1}.context_block.adaLN_modulation.1"
    return original == "final_layer.adaLN_modulation.1" or (layout == "sd3" and original == last)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _transformer_norms(config: Mapping[str, Any], layout: str) -> dict[str, str]:
    """The qk RMS norms (SD3.5, Flux): original parameter -> diffusers parameter."""
    out = {}
    if layout == "sd3" and config.get("qk_norm"):
        for i in range(config["num_layers"]):
            b, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}.attn"
            out |= {b + "x_block.attn.ln_q.weight": d + ".norm_q.weight", b + "x_block.attn.ln_k.weight": d + ".norm_k.weight",
                    b + "context_block.attn.ln_q.weight": d + ".norm_added_q.weight",
                    b + "context_block.attn.ln_k.weight": d + ".norm_added_k.weight"}
            if i in set(config.get("dual_attention_layers") or ()):
                out |= {b + "x_block.attn2.ln_q.weight": d + "2.norm_q.weight",
                        b + "x_block.attn2.ln_k.weight": d + "2.norm_k.weight"}
    if layout == "flux":
        for i in range(config["num_layers"]):
            b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
            for side, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
                out |= {f"{b}{side}_attn.norm.query_norm.scale": d + q + ".weight",
                        f"{b}{side}_attn.norm.key_norm.scale": d + k + ".weight"}
        for i in range(config["num_single_layers"]):
            b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}.attn."
            out |= {b + "norm.query_norm.scale": d + "norm_q.weight", b + "norm.key_norm.scale": d + "norm_k.weight"}
    return out


def transformer_to_original(transformer: nn.Module, layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """An SD3 / Flux transformer's state dict in its original layout (fused q/k/v and, for Flux's single blocks,
    q/k/v/mlp; modulation halves swapped where the original stores them so), under `prefix`; any weight not mapped
    raises."""
    transformer = unwrap(transformer)
    config = transformer.config
    state = dict(transformer.state_dict())
    out: dict[str, torch.Tensor] = {}
    for original, sources in transformer_linears(config, layout).items():
        for kind in ("weight", "bias"):
            if f"{sources[0]}.{kind}" not in state:
                continue
            t = torch.cat([state.pop(f"{s}.{kind}") for s in sources], dim=0)
            out[f"{prefix}{original}.{kind}"] = _swap_halves(t) if _swapped(original, layout, config) else t
    for original, source in _transformer_norms(config, layout).items():
        out[prefix + original] = state.pop(source)
    if layout == "sd3":
        out[prefix + "pos_embed"] = state.pop("pos_embed.pos_embed")
    if state:
        raise NotImplementedError(f"{len(state)} transformer weights have no place in the {layout} layout, e.g. "
                                  f"{sorted(state)[:3]}")
    return out


def _t5_state(t5: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """T5's encoder in its transformers layout (tied embeddings cloned: safetensors refuses shared memory)."""
    return {prefix + k: v.clone() for k, v in unwrap(t5).state_dict().items()}


def flow_single_file_state_dict(parts: Any, layout: str) -> dict[str, torch.Tensor]:
    """SD3: the whole model as one file, as ComfyUI and `StableDiffusion3Pipeline.from_single_file` read it
    (`model.diffusion_model.`, the VAE as `first_stage_model.`, the text encoders in their transformers layouts under
    `text_encoders.clip_l/clip_g/t5xxl.transformer.`); Flux: the transformer alone in Black Forest Labs' layout (what
    ComfyUI's diffusion-model loader and `FluxTransformer2DModel.from_single_file` read), its VAE and text encoders
    being the base model's."""
    if layout == "flux":
        return transformer_to_original(parts.unet, "flux")
    out = transformer_to_original(parts.unet, "sd3", UNET_PREFIX)
    out.update(_vae_attention_to_conv(_apply(unwrap(parts.vae).state_dict(), vae_rules(parts.vae.config), VAE_PREFIX, "VAE")))
    for prefix, encoder in ((SD3_CLIP_L_PREFIX, parts.text_encoder), (SD3_CLIP_G_PREFIX, parts.text_encoder_2)):
        out.update({prefix + k: v for k, v in _text_model_keys(unwrap(encoder)).items()})
    if parts.text_encoder_3 is not None:
        out.update(_t5_state(parts.text_encoder_3, SD3_T5_PREFIX))
    return out


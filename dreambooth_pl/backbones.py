"""Backbones: what differs between SD 1.x/2.x and SDXL, behind one short interface the rest of the code calls.

A backbone says how prompts become UNet conditioning (text encoders, pooled embedding, SDXL's size/crop ids),
which diffusers pipelines sample and edit with it, and how its text encoders are named in LoRA exports. It is
chosen from the loaded UNet's config (`backbone_of`), never from a flag. Adding one (SD3, Flux) is a subclass
here plus its entry in `BACKBONES`; README "Backbones" lists what else such a model needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import diffusers
import torch
from torch import nn


@dataclass
class Conditioning:
    """The text conditioning of N prompts."""

    hidden: torch.Tensor  # (N, 77, D) cross-attention states
    pooled: torch.Tensor | None = None  # (N, P) pooled text embedding (SDXL's second encoder); None for SD 1.x/2.x

    def to(self, dtype: torch.dtype) -> Conditioning:
        return Conditioning(self.hidden.to(dtype), None if self.pooled is None else self.pooled.to(dtype))

    def rows(self, index: slice | torch.Tensor) -> Conditioning:
        """A subset of the N rows."""
        return Conditioning(self.hidden[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Rows of several conditionings, in order."""
        pooled = [p.pooled for p in parts]
        return Conditioning(torch.cat([p.hidden for p in parts]),
                            None if pooled[0] is None else torch.cat(pooled))  # type: ignore[arg-type]


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """SDXL's size/crop conditioning: (N, 2) (h, w) original size, (N, 2) (top, left) crop, (N, 2) (h, w) target
    size -> (N, 6) ids, in the order diffusers' pipelines build them."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


class Backbone:
    """SD 1.x / 2.x: one CLIP text encoder whose last hidden states condition the UNet."""

    name: ClassVar[str] = "sd"
    label: ClassVar[str] = "Stable Diffusion 1.x / 2.x"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # attribute names on SDComponents / the module
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    pipelines: ClassVar[dict[str, str]] = {"text2img": "StableDiffusionPipeline",
                                           "instruct_pix2pix": "StableDiffusionInstructPix2PixPipeline"}
    # Names of the text encoders' LoRA weights: diffusers' `save_lora_weights` argument and kohya's key prefix.
    lora_text_prefixes: ClassVar[dict[str, tuple[str, str]]] = {"text_encoder": ("text_encoder_lora_layers", "lora_te_")}
    default_ip2p: ClassVar[str] = "timbrooks/instruct-pix2pix"
    single_file_layout: ClassVar[str] = "sd"  # single_file.py's key layout

    def encode(self, tokenizers: Sequence[Any], encoders: Sequence[nn.Module], prompts: list[str],
               device: torch.device) -> Conditioning:
        """N prompts -> (N, 77, D) last hidden states."""
        ids = _ids(tokenizers[0], prompts, device)
        return Conditioning(encoders[0](ids)[0])

    def unet_kwargs(self, cond: Conditioning, time_ids: torch.Tensor | None) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments beside (noisy latents, timesteps)."""
        return {"encoder_hidden_states": cond.hidden}

    def unused_text_modules(self, encoders: Sequence[nn.Module]) -> list[nn.Module]:
        """Text-encoder parts `encode` never reads: kept frozen when the encoders train (DDP refuses parameters
        that get no gradient, and training them would do nothing)."""
        return []

    def pipeline_parts(self, parts: Any) -> dict[str, Any]:
        """Constructor arguments of this backbone's pipelines, sharing `parts`' modules."""
        return dict(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def pipeline_class(self, kind: str) -> type:
        """The diffusers pipeline class of `kind` (text2img, instruct_pix2pix)."""
        if kind not in self.pipelines:
            raise ValueError(f"unknown pipeline kind {kind!r}: choose one of {', '.join(self.pipelines)}")
        return getattr(diffusers, self.pipelines[kind])


class StableDiffusionXL(Backbone):
    """SDXL: two text encoders (penultimate hidden states concatenated), the second's pooled embedding, and the
    size/crop ids added to the timestep embedding."""

    name = "sdxl"
    label = "Stable Diffusion XL"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    pipelines = {"text2img": "StableDiffusionXLPipeline",
                 "instruct_pix2pix": "StableDiffusionXLInstructPix2PixPipeline"}
    lora_text_prefixes = {"text_encoder": ("text_encoder_lora_layers", "lora_te1_"),
                          "text_encoder_2": ("text_encoder_2_lora_layers", "lora_te2_")}
    default_ip2p = "diffusers/sdxl-instructpix2pix-768"
    single_file_layout = "sdxl"

    def encode(self, tokenizers, encoders, prompts, device):
        """N prompts -> (N, 77, D1 + D2) penultimate hidden states of both encoders, (N, P) pooled (the second's)."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
            out = encoder(_ids(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # as diffusers' SDXL pipeline (clip_skip None)
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds, (N, P)
        dtype = hidden[-1].dtype
        return Conditioning(torch.cat([h.to(dtype) for h in hidden], dim=-1), pooled)

    def unused_text_modules(self, encoders):
        # The first encoder's penultimate hidden states are read: its last layer and final norm never are.
        text = getattr(encoders[0], "text_model", encoders[0])  # transformers 5 dropped the `text_model` level
        return [text.encoder.layers[-1], text.final_layer_norm]

    def unet_kwargs(self, cond, time_ids):
        if time_ids is None:
            raise ValueError("an SDXL UNet needs the size/crop ids (batch['time_ids'], (N, 6))")
        return {"encoder_hidden_states": cond.hidden,
                "added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": time_ids.to(cond.hidden)}}

    def pipeline_parts(self, parts):
        # No invisible watermark: it is an optional package, and training scores would include its artefacts.
        return dict(vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
                    tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet, add_watermarker=False)


BACKBONES: dict[str, Backbone] = {b.name: b for b in (Backbone(), StableDiffusionXL())}


def backbone_of(unet: nn.Module) -> Backbone:
    """The backbone a loaded UNet belongs to: SDXL's adds text-and-time embeddings, SD 1.x/2.x's adds none."""
    config = getattr(unet, "config", {})
    return BACKBONES["sdxl" if config.get("addition_embed_type") == "text_time" else "sd"]


def backbone_of_pipeline(class_name: str) -> Backbone:
    """The backbone of a diffusers pipeline class name (model_index.json's `_class_name`)."""
    return BACKBONES["sdxl" if "XL" in class_name else "sd"]


def _ids(tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    """(N, 77) token ids, padded and truncated to the tokenizer's length."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)

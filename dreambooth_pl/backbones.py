"""Backbones: what differs between SD 1.x/2.x, SDXL, SD3/3.5 and Flux.1, behind one short interface the rest calls.

A backbone says how prompts become the denoiser's conditioning (text encoders, pooled embedding, SDXL's size/crop
ids, Flux's packed latents and position ids), how the denoiser is called (`predict`), what it is trained to predict
(`objective`: DDPM noise / v for the UNets, a rectified flow's velocity for the SD3 and Flux transformers), which
diffusers pipelines sample and edit with it, and how its parts are named in LoRA exports. It is chosen from the
loaded denoiser (`backbone_of`), never from a flag. The denoiser keeps the attribute name `unet` on the module and
on `SDComponents`, whatever its class.
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


UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # attention projections, as in the diffusers LoRA example


class Backbone:
    """SD 1.x / 2.x: one CLIP text encoder whose last hidden states condition the UNet."""

    name: ClassVar[str] = "sd"
    label: ClassVar[str] = "Stable Diffusion 1.x / 2.x"
    denoiser: ClassVar[str] = "unet"  # the denoiser's argument name in the pipelines (and its folder)
    objective: ClassVar[str] = "ddpm"  # ddpm: noise or v on the scheduler's alphas; flow: a rectified flow's velocity
    lora_targets: ClassVar[tuple[str, ...]] = UNET_LORA_TARGETS  # the denoiser's default LoRA targets
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # attribute names on SDComponents / the module
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    sample_kwargs: ClassVar[dict[str, Any]] = {}  # extra pipeline call arguments, as training encodes prompts
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

    def predict(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                time_ids: torch.Tensor | None) -> torch.Tensor:
        """One prediction of the denoiser, (N, C, h, w) like `noisy`; `timesteps` (N,) as the model was trained on
        them (the UNets: DDPM step indices; the flow models: the scheduler's timesteps, sigma x 1000)."""
        return denoiser(noisy, timesteps, **self.unet_kwargs(cond, time_ids)).sample

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


class StableDiffusion3(Backbone):
    """SD3 / SD3.5: an MMDiT transformer on 16-channel latents, trained as a rectified flow; two CLIPs (penultimate
    states, concatenated and zero-padded to T5's width) and T5 (its states appended along the sequence), pooled = both
    CLIPs' projections. Without T5 (a pipeline saved without it) its part of the sequence is zeros, as diffusers does."""

    name = "sd3"
    label = "Stable Diffusion 3 / 3.5"
    denoiser = "transformer"
    objective = "flow"
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")  # the diffusers SD3 DreamBooth LoRA example's
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    pipelines = {"text2img": "StableDiffusion3Pipeline"}
    lora_text_prefixes = {"text_encoder": ("text_encoder_lora_layers", "lora_te1_"),
                          "text_encoder_2": ("text_encoder_2_lora_layers", "lora_te2_")}  # diffusers adapts no T5
    single_file_layout = "sd3"
    max_sequence_length: ClassVar[int] = 77  # T5 tokens, as the diffusers SD3 DreamBooth example trains
    sample_kwargs = {"max_sequence_length": 77}
    weighting: ClassVar[str] = "logit_normal"  # how training draws sigma (the SD3 paper's and diffusers' default)

    def encode(self, tokenizers, encoders, prompts, device):
        """N prompts -> (N, 77 + 77, D_t5) states: [CLIP-L ++ CLIP-G penultimate, padded to D_t5] then T5's; (N, P)
        pooled: both CLIPs' projected embeddings."""
        clip, pooled = [], []
        for tokenizer, encoder in zip(tokenizers[:2], encoders[:2], strict=True):
            out = encoder(_ids(tokenizer, prompts, device), output_hidden_states=True)
            clip.append(out.hidden_states[-2])
            pooled.append(out[0])  # CLIPTextModelWithProjection's text_embeds
        clip_states = torch.cat(clip, dim=-1)  # (N, 77, D1 + D2)
        t5 = encoders[2] if len(encoders) > 2 else None
        if t5 is None:
            width = clip_states.shape[-1]
            t5_states = clip_states.new_zeros(len(prompts), self.max_sequence_length, width)
        else:
            t5_states = t5(_ids(tokenizers[2], prompts, device, self.max_sequence_length))[0]  # (N, L, D_t5)
        clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return Conditioning(torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2), torch.cat(pooled, dim=-1))

    def unused_text_modules(self, encoders):
        # Both CLIPs are read at their penultimate layer: their last layers (and final norms) never are.
        out = []
        for e in encoders[:2]:
            text = getattr(e, "text_model", e)
            out += [text.encoder.layers[-1], text.final_layer_norm]
        return out

    def predict(self, denoiser, noisy, timesteps, cond, time_ids):
        return denoiser(hidden_states=noisy, encoder_hidden_states=cond.hidden, pooled_projections=cond.pooled,
                        timestep=timesteps).sample

    def pipeline_parts(self, parts):
        return dict(transformer=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                    text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
                    text_encoder_3=parts.text_encoder_3, tokenizer_3=parts.tokenizer_3)


class Flux(Backbone):
    """FLUX.1 (dev, schnell): a double- then single-stream transformer on 2 x 2-packed 16-channel latents, trained as a
    rectified flow; CLIP's pooled output and T5's states; dev also takes the distilled guidance scale as an input."""

    name = "flux"
    label = "FLUX.1"
    denoiser = "transformer"
    objective = "flow"
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")  # the diffusers Flux DreamBooth LoRA example's
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    pipelines = {"text2img": "FluxPipeline"}
    lora_text_prefixes = {"text_encoder": ("text_encoder_lora_layers", "lora_te1_")}  # CLIP only, as diffusers
    single_file_layout = "flux"
    max_sequence_length: ClassVar[int] = 77
    sample_kwargs = {"max_sequence_length": 77}
    weighting: ClassVar[str] = "none"  # uniform sigma, as the diffusers Flux DreamBooth example
    train_guidance: ClassVar[float] = 3.5  # FLUX.1-dev's guidance input while training (the diffusers example's default)

    def encode(self, tokenizers, encoders, prompts, device):
        """N prompts -> (N, 77, D_t5) T5 states; (N, P) CLIP's pooled output."""
        pooled = encoders[0](_ids(tokenizers[0], prompts, device)).pooler_output
        states = encoders[1](_ids(tokenizers[1], prompts, device, self.max_sequence_length))[0]
        return Conditioning(states.to(pooled.dtype), pooled)

    def predict(self, denoiser, noisy, timesteps, cond, time_ids):
        """(N, 16, h, w) -> packed (N, h/2 * w/2, 64) tokens with their (row, column) ids, the transformer, unpacked."""
        n, c, h, w = noisy.shape
        packed = noisy.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(noisy)  # (h/2 * w/2, 3)
        txt_ids = torch.zeros(cond.hidden.shape[1], 3).to(noisy)
        guidance = (torch.full((n,), self.train_guidance, device=noisy.device, dtype=noisy.dtype)
                    if denoiser.config.guidance_embeds else None)
        out = denoiser(hidden_states=packed, encoder_hidden_states=cond.hidden, pooled_projections=cond.pooled,
                       timestep=timesteps / 1000, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample
        return out.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)

    def pipeline_parts(self, parts):
        return dict(transformer=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                    text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2)


BACKBONES: dict[str, Backbone] = {b.name: b for b in (Backbone(), StableDiffusionXL(), StableDiffusion3(), Flux())}
DENOISERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}  # class name -> backbone


def backbone_of(unet: nn.Module) -> Backbone:
    """The backbone a loaded denoiser belongs to: the SD3 and Flux transformers by class; SDXL's UNet adds text-and-time
    embeddings, SD 1.x/2.x's adds none."""
    name = DENOISERS.get(type(unet).__name__)
    if name is not None:
        return BACKBONES[name]
    config = getattr(unet, "config", {})
    return BACKBONES["sdxl" if config.get("addition_embed_type") == "text_time" else "sd"]


def backbone_of_pipeline(class_name: str) -> Backbone:
    """The backbone of a diffusers pipeline class name (model_index.json's `_class_name`)."""
    if class_name.startswith("StableDiffusion3"):
        return BACKBONES["sd3"]
    if class_name.startswith("Flux"):
        return BACKBONES["flux"]
    return BACKBONES["sdxl" if "XL" in class_name else "sd"]


def _ids(tokenizer: Any, prompts: list[str], device: torch.device, length: int | None = None) -> torch.Tensor:
    """(N, L) token ids, padded and truncated to `length` (default the tokenizer's, 77 for CLIP)."""
    return tokenizer(prompts, padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)

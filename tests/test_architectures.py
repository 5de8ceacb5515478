"""Tests for dreambooth_pl.architectures: the shapes fit together and match the released models' sizes."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dreambooth_pl.architectures import ARCHITECTURES, architecture
from dreambooth_pl.tiny import TINY_MODELS


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_counts(name: str) -> dict[str, int]:
    """Parameter counts of an architecture built on the meta device (no memory, no init)."""
    arch = architecture(name)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        text = CLIPTextModel(CLIPTextConfig(**arch["text"]))
    assert next(unet.parameters()).device.type == "meta"
    return {"unet": n_params(unet), "vae": n_params(vae), "text": n_params(text)}


def test_sd15_parameter_counts():
    """SD 1.5 shapes: UNet ~859.5M, CLIP ViT-L/14 text encoder ~123.1M, VAE ~83.7M parameters."""
    counts = meta_counts("sd15")
    assert counts["unet"] == pytest.approx(859_520_964, rel=0.01)
    assert counts["text"] == pytest.approx(123_060_480, rel=0.01)
    assert counts["vae"] == pytest.approx(83_653_863, rel=0.01)


def test_sd21_architecture():
    """SD 2.1: v-prediction, 1024-d cross-attention; UNet ~865.9M, OpenCLIP ViT-H text ~340.4M parameters."""
    arch = architecture("sd21")
    assert arch["scheduler"]["prediction_type"] == "v_prediction"
    assert arch["unet"]["cross_attention_dim"] == 1024
    counts = meta_counts("sd21")
    assert counts["unet"] == pytest.approx(865_910_724, rel=0.01)
    assert counts["text"] == pytest.approx(340_387_840, rel=0.01)


def test_sdxl_parameter_counts():
    """SDXL base 1.0 shapes: UNet ~2567.5M, CLIP ViT-L ~123.1M + OpenCLIP bigG ~694.7M text encoders, VAE ~83.7M."""
    arch = architecture("sdxl")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch["unet"])
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_2"]))
    assert n_params(unet) == pytest.approx(2_567_463_684, rel=0.01)
    assert n_params(text_2) == pytest.approx(694_659_840, rel=0.01)
    assert meta_counts("sdxl")["text"] == pytest.approx(123_060_480, rel=0.01)


UNET_MODELS = [m for m in TINY_MODELS if "unet" in ARCHITECTURES[m]]


@pytest.mark.parametrize("name", [*UNET_MODELS, "sd15", "sd21", "sdxl"])
def test_architecture_parts_fit_together(name):
    """Text width(s) = UNet cross-attention width, 77 positions, CLIP vocab, VAE latents = UNet channels; SDXL's
    added embedding takes the pooled projection plus six size/crop ids."""
    arch = architecture(name)
    widths = arch["text"]["hidden_size"] + (arch["text_2"]["hidden_size"] if "text_2" in arch else 0)
    assert widths == arch["unet"]["cross_attention_dim"]
    if "text_2" in arch:
        u = arch["unet"]
        assert u["addition_embed_type"] == "text_time"
        assert u["projection_class_embeddings_input_dim"] == arch["text_2"]["projection_dim"] + 6 * u["addition_time_embed_dim"]
    assert arch["text"]["max_position_embeddings"] == 77
    assert arch["text"]["vocab_size"] == 49408
    assert arch["vae"]["latent_channels"] == arch["unet"]["out_channels"] == 4


def test_unknown_architecture_raises():
    """An unknown architecture name is a ValueError naming it."""
    with pytest.raises(ValueError, match="sd4"):
        architecture("sd4")


def test_every_tiny_model_has_an_architecture():
    """Each tiny model name is an architecture; the table offers the tiny models, SD 1.5, SD 2.1 and SDXL."""
    assert set(TINY_MODELS) <= set(ARCHITECTURES)
    assert set(ARCHITECTURES) == {*TINY_MODELS, "sd15", "sd21", "sdxl", "sd35-medium", "flux-dev"}


def test_tiny_variants_differ_only_where_stated():
    """tiny-v differs from tiny in prediction type only; tiny-ip2p in its 8 UNet input channels only."""
    tiny, v, ip2p = architecture("tiny"), architecture("tiny-v"), architecture("tiny-ip2p")
    assert {**v, "scheduler": tiny["scheduler"]} == tiny
    assert v["scheduler"] == {**tiny["scheduler"], "prediction_type": "v_prediction"}
    assert {**ip2p, "unet": tiny["unet"]} == tiny
    assert ip2p["unet"] == {**tiny["unet"], "in_channels": 8}


def test_architecture_returns_fresh_dicts():
    """Changing a returned config does not change the tables."""
    arch = architecture("sd15")
    arch["unet"]["sample_size"] = 1
    arch["scheduler"]["prediction_type"] = "sample"
    assert architecture("sd15")["unet"]["sample_size"] == 64
    assert architecture("sd15")["scheduler"]["prediction_type"] == "epsilon"


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_flow_architecture_parts_fit_together(name):
    """What diffusers' SD3 / Flux pipelines need of the parts: SD3's caption projection = heads x head dim, its T5 at
    least as wide as both CLIPs (they are zero-padded up to it), pooled = both projections; Flux's rope axes sum to the
    head dim, its input is 2 x 2 packed 16-channel latents, T5 = its text width, CLIP's width = its pooled input."""
    a = architecture(name)
    t = a["transformer"]
    assert a["vae"]["latent_channels"] == 16 and a["vae"]["shift_factor"] and not a["vae"]["use_quant_conv"]
    if name == "tiny-sd3":
        assert t["caption_projection_dim"] == t["num_attention_heads"] * t["attention_head_dim"]
        assert a["t5"]["d_model"] == t["joint_attention_dim"] >= a["text"]["hidden_size"] + a["text_2"]["hidden_size"]
        assert t["pooled_projection_dim"] == a["text"]["projection_dim"] + a["text_2"]["projection_dim"]
        assert t["in_channels"] == 16 and a["scheduler"]["shift"] == 3.0
    else:
        assert sum(t["axes_dims_rope"]) == t["attention_head_dim"] and t["in_channels"] == 4 * 16
        assert a["t5"]["d_model"] == t["joint_attention_dim"] and a["text"]["hidden_size"] == t["pooled_projection_dim"]
        assert t["guidance_embeds"] and a["scheduler"]["use_dynamic_shifting"]


def test_public_flow_transformers_have_their_published_sizes():
    """SD3.5 medium's MMDiT-X (Stability: "2.5B parameters"; the transformer alone counts 2.24B here) and
    FLUX.1-dev's transformer (about 11.9B), built on the meta device from the tables."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        sd35 = SD3Transformer2DModel(**architecture("sd35-medium")["transformer"])
        flux = FluxTransformer2DModel(**architecture("flux-dev")["transformer"])
    assert sum(p.numel() for p in sd35.parameters()) == pytest.approx(2.5e9, rel=0.12)
    assert sum(p.numel() for p in flux.parameters()) == pytest.approx(11.9e9, rel=0.01)

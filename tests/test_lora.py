"""Tests for dreambooth_pl.lora: adapter injection, and LoRA export in the diffusers and kohya / A1111
formats (SD 1.x and SDXL), read back by diffusers' `load_lora_weights`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from dreambooth_pl import components
from dreambooth_pl.architectures import architecture
from dreambooth_pl.lora import (
    TEXT_LORA_TARGETS,
    UNET_LORA_TARGETS,
    add_lora,
    export_lora,
    export_lora_diffusers,
    export_lora_kohya,
    has_lora,
    kohya_unet_namer,
    lora_kohya_state_dict,
)
from dreambooth_pl.module import DreamBoothModule, LoraSettings, Optimization

from .conftest import make_datamodule, make_trainer


def randomise_lora(seed: int, *modules) -> None:
    """peft zero-initialises lora_B: give every LoRA factor random values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def sample(pipe) -> np.ndarray:
    gen = torch.Generator().manual_seed(7)
    return pipe("a sks dog", num_inference_steps=2, height=64, width=64, generator=gen, output_type="np").images


def fresh_pipeline(tiny_dir) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_layers(module) -> dict:
    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def set_text_lora_enabled(text_encoder, enabled: bool) -> None:
    for layer in lora_layers(text_encoder).values():
        layer.enable_adapters(enabled)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def lora_parts(tiny_dir) -> components.SDComponents:
    """The tiny model (its own copy) with a UNet LoRA (rank 4, alpha 4) and a text-encoder LoRA (rank 4, alpha 8)."""
    parts = components.load_components(str(tiny_dir))
    parts.unet.requires_grad_(False)
    add_lora(parts.unet, rank=4)
    add_lora(parts.text_encoder, rank=4, alpha=8)
    randomise_lora(0, parts.unet, parts.text_encoder)
    return parts


@pytest.fixture(scope="module")
def lora_images(lora_parts, tiny_dir) -> dict[str, np.ndarray]:
    """Reference images: the adapted pipeline, the same without its text-encoder LoRA, and the base model."""
    pipe = components.pipeline(lora_parts)
    images = {"lora": sample(pipe)}
    set_text_lora_enabled(lora_parts.text_encoder, False)
    try:
        images["unet_only"] = sample(pipe)
    finally:
        set_text_lora_enabled(lora_parts.text_encoder, True)
    images["base"] = sample(fresh_pipeline(tiny_dir))
    return images


@pytest.fixture(scope="module")
def lora_files(lora_parts, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora")
    files = export_lora(lora_parts, folder)
    files["kohya32"] = export_lora_kohya(lora_parts.unet, lora_parts.text_encoder,
                                         path=tmp_path_factory.mktemp("lora32") / "k.safetensors", dtype=torch.float32)
    return files


def test_reference_images_depend_on_both_adapters(lora_images):
    assert max_diff(lora_images["lora"], lora_images["base"]) > 1e-2
    # The text-encoder LoRA alone moves the image, so matching images below also check that part of the file.
    assert max_diff(lora_images["lora"], lora_images["unet_only"]) > 1e-3


def test_has_lora(lora_parts, tiny_parts):
    assert has_lora(lora_parts.unet) and has_lora(lora_parts.text_encoder)
    assert not has_lora(tiny_parts.unet) and not has_lora(tiny_parts.text_encoder) and not has_lora(None)


def test_export_lora_writes_both_files_and_nothing_else(lora_files):
    folder = lora_files["diffusers"].parent
    assert lora_files["kohya"].parent == folder
    assert sorted(os.listdir(folder)) == ["lora_kohya.safetensors", "pytorch_lora_weights.safetensors"]
    assert os.listdir(lora_files["kohya32"].parent) == ["k.safetensors"]
    assert all(oct(p.stat().st_mode & 0o777) == oct(0o644) for p in lora_files.values())


def test_diffusers_format_matches_the_library_state_dict(lora_parts, lora_files):
    written = load_file(lora_files["diffusers"])
    unet_keys = {f"unet.{k}" for k in convert_state_dict_to_diffusers(get_peft_model_state_dict(lora_parts.unet))}
    text_keys = {k for k in written if k.startswith("text_encoder.")}
    assert {k for k in written if k.startswith("unet.")} == unet_keys and len(unet_keys) == 64
    assert len(text_keys) == 16 and len(written) == 80  # only LoRA factors: 2 per adapted module
    assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_linear_layer.up.weight" in text_keys
    assert torch.equal(
        written["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.lora.down.weight"],
        lora_parts.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_v.lora_A["default"].weight,
    )
    with safe_open(str(lora_files["diffusers"]), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["unet.r"], meta["unet.lora_alpha"], meta["text_encoder.lora_alpha"]) == (4, 4, 8)
    # The loader adapts exactly the exported modules; text-encoder names fit CLIP with or without `text_model.`.
    assert meta["unet.target_modules"] == sorted(n for n in lora_layers(lora_parts.unet))
    assert "encoder.layers.0.self_attn.q_proj" in meta["text_encoder.target_modules"]
    assert len(meta["text_encoder.target_modules"]) == 8


def test_diffusers_format_loads_into_a_fresh_pipeline(tiny_dir, lora_files, lora_images):
    pipe = fresh_pipeline(tiny_dir)
    pipe.load_lora_weights(str(lora_files["diffusers"].parent))
    assert has_lora(pipe.unet) and has_lora(pipe.text_encoder)
    image = sample(pipe)
    assert np.allclose(image, lora_images["lora"], atol=1e-4), max_diff(image, lora_images["lora"])
    assert max_diff(image, lora_images["base"]) > 1e-3


def test_kohya_keys_alphas_and_metadata(lora_parts, lora_files):
    written = load_file(lora_files["kohya"])
    n_modules = len(lora_layers(lora_parts.unet)) + len(lora_layers(lora_parts.text_encoder))
    assert n_modules == 32 + 8  # 4 transformer blocks x 2 attentions x 4 projections; 2 CLIP layers x 4
    assert len(written) == 3 * n_modules  # lora_down, lora_up, alpha per module: no base weights
    for key in (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
        "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha",
    ):
        assert key in written, key
    downs = [k for k in written if k.endswith(".lora_down.weight")]
    assert len(downs) == n_modules
    for key in downs:
        base = key.removesuffix(".lora_down.weight")
        assert {f"{base}.lora_up.weight", f"{base}.alpha"} <= written.keys(), base
        assert written[f"{base}.alpha"].ndim == 0
        assert float(written[f"{base}.alpha"]) == (4.0 if base.startswith("lora_unet_") else 8.0)
    assert {v.dtype for v in written.values()} == {torch.float16}
    q = lora_parts.text_encoder.encoder.layers[0].self_attn.q_proj
    assert torch.equal(written["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"],
                       q.lora_B["default"].weight.half())
    with safe_open(str(lora_files["kohya"]), "pt") as f:
        meta = f.metadata()
    # One rank; UNet and text encoder alphas differ, which kohya records as `Dynamic`.
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "Dynamic")
    assert meta["ss_network_module"] == "networks.lora"


def test_kohya_file_loads_like_the_diffusers_format(tiny_dir, lora_files, lora_images):
    images = {}
    for name in ("kohya32", "kohya"):
        pipe = fresh_pipeline(tiny_dir)
        pipe.load_lora_weights(str(lora_files[name]))  # diffusers converts kohya keys and alphas on load
        images[name] = sample(pipe)
    assert np.allclose(images["kohya32"], lora_images["lora"], atol=1e-4), max_diff(images["kohya32"], lora_images["lora"])
    assert np.allclose(images["kohya"], lora_images["lora"], atol=1e-3), max_diff(images["kohya"], lora_images["lora"])
    assert max_diff(images["kohya"], lora_images["base"]) > 1e-3
    ratio = lora_files["kohya"].stat().st_size / lora_files["kohya32"].stat().st_size
    assert 0.45 < ratio < 0.6, ratio


def test_alpha_rank_patterns_and_rslora_survive_both_formats(tiny_dir, tmp_path):
    """alpha != rank, a per-module rank and rsLoRA scaling (alpha / sqrt(rank)) must all reach the reader."""
    parts = components.load_components(str(tiny_dir))
    parts.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, use_rslora=True, rank_pattern={"to_k": 2},
                                      target_modules=UNET_LORA_TARGETS))
    randomise_lora(1, parts.unet)
    want = sample(components.pipeline(parts))
    folder = export_lora_diffusers(parts.unet, folder=tmp_path / "d").parent
    pipe = fresh_pipeline(tiny_dir)
    pipe.load_lora_weights(str(folder))  # rank, alpha, rank_pattern and use_rslora come from the metadata
    image = sample(pipe)
    assert np.allclose(image, want, atol=1e-4), max_diff(image, want)

    kohya = export_lora_kohya(parts.unet, path=tmp_path / "k.safetensors", dtype=torch.float32)
    written = load_file(kohya)
    assert not any(k.startswith("lora_te_") for k in written)
    q, k = (f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_{p}" for p in ("to_q", "to_k"))
    assert written[f"{k}.lora_down.weight"].shape[0] == 2
    # A1111 scales by alpha / rank: rsLoRA's alpha / sqrt(rank) becomes alpha' = alpha * sqrt(rank).
    assert float(written[f"{q}.alpha"]) == pytest.approx(2 * 4**0.5)
    assert float(written[f"{k}.alpha"]) == pytest.approx(2 * 2**0.5)
    with safe_open(str(kohya), "pt") as f:
        assert (f.metadata()["ss_network_dim"], f.metadata()["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    # Every module's weight delta as A1111 / ComfyUI compute it equals peft's. (diffusers 0.42's kohya reader
    # is not used here: it builds alpha_pattern keys that match no module, so it applies the most common alpha
    # everywhere whenever UNet alphas differ per module.)
    for name, layer in lora_layers(parts.unet).items():
        key = "lora_unet_" + name.replace(".", "_")
        down, up, alpha = (written[f"{key}.{p}"] for p in ("lora_down.weight", "lora_up.weight", "alpha"))
        delta = alpha / down.shape[0] * up @ down
        assert torch.allclose(delta, layer.get_delta_weight("default"), atol=1e-6), name


def test_lora_export_errors(tiny_parts, lora_parts, tmp_path):
    with pytest.raises(ValueError, match="LoRA layers to export"):
        export_lora(tiny_parts, tmp_path)
    with pytest.raises(ValueError, match="LoRA layers to export"):
        export_lora_kohya(tiny_parts.unet, tiny_parts.text_encoder, path=tmp_path / "k.safetensors")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_lora_kohya(lora_parts.unet, path=tmp_path / "k.pt")
    with pytest.raises(TypeError, match="folder"):
        export_lora_diffusers(lora_parts.unet, tmp_path)  # a folder passed where the text encoder goes
    with pytest.raises(ValueError, match="adapter"):
        export_lora_kohya(lora_parts.unet, path=tmp_path / "k.safetensors", adapter_name="other")
    with pytest.raises(ValueError, match="dtype"):
        export_lora_kohya(lora_parts.unet, path=tmp_path / "k.safetensors", dtype=torch.int8)
    assert os.listdir(tmp_path) == []


def test_lora_writes_are_atomic_and_leave_no_temp_files(lora_parts, tmp_path, monkeypatch):
    files = export_lora(lora_parts, tmp_path)
    inodes = {name: p.stat().st_ino for name, p in files.items()}
    files = export_lora(lora_parts, tmp_path)  # a second export replaces both files by renames
    assert all(p.stat().st_ino != inodes[name] for name, p in files.items())
    assert sorted(os.listdir(tmp_path)) == ["lora_kohya.safetensors", "pytorch_lora_weights.safetensors"]
    before = {name: p.read_bytes() for name, p in files.items()}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    # diffusers' writer and ours (`files.write_tensors`) both end in safetensors' save_file: a crash in either
    # keeps the old files.
    monkeypatch.setattr("safetensors.torch.save_file", crash)
    monkeypatch.setattr("dreambooth_pl.files.save_file", crash)
    for name in ("diffusers", "kohya"):
        with pytest.raises(OSError, match="disk full"):
            if name == "diffusers":
                export_lora_diffusers(lora_parts.unet, lora_parts.text_encoder, tmp_path)
            else:
                export_lora_kohya(lora_parts.unet, lora_parts.text_encoder, tmp_path / "lora_kohya.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["lora_kohya.safetensors", "pytorch_lora_weights.safetensors"]
    assert all(files[name].read_bytes() == data for name, data in before.items())


def test_add_lora_adapts_the_attention_projections(tiny_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    targets = [m for n, m in unet.named_modules()
               if isinstance(m, nn.Linear) and n.endswith(tuple(f".{t}" for t in UNET_LORA_TARGETS))]
    rank = 4
    # lora_A is (rank, in), lora_B is (out, rank); peft adds no LoRA bias by default.
    expected = sum(rank * (m.in_features + m.out_features) for m in targets)
    add_lora(unet, rank=rank)
    assert len(targets) == 32
    assert sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n) == expected
    layers = lora_layers(unet)
    assert len(layers) == len(targets)
    assert all(layer.scaling["default"] == 1.0 for layer in layers.values())  # alpha=None means alpha = rank


def test_add_lora_on_the_text_encoder_and_bad_rank(tiny_dir):
    text = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder")
    add_lora(text, rank=2, alpha=8)  # not a diffusers model: TEXT_LORA_TARGETS through peft directly
    layers = lora_layers(text)
    assert len(layers) == 4 * text.config.num_hidden_layers
    assert all(n.endswith(tuple(TEXT_LORA_TARGETS)) and layer.scaling["default"] == 4.0
               for n, layer in layers.items())
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        add_lora(text, rank=0)


# ------------------------------------------------------------------------------------------------ SDXL

XL_TEXT = ("text_encoder", "text_encoder_2")
XL_ALPHAS = {"lora_unet_": 4.0, "lora_te1_": 8.0, "lora_te2_": 1.0}  # kohya prefix -> the part's alpha below


def fresh_xl_pipeline(tiny_xl_dir) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_xl_dir), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def xl_lora_parts(tiny_xl_dir) -> components.SDComponents:
    """tiny-xl (its own copy) with LoRA on the UNet (rank 4, alpha 4) and on both text encoders (rank 4, alpha 8;
    rank 2, alpha 1)."""
    parts = components.load_components(str(tiny_xl_dir))
    add_lora(parts.unet, rank=4)
    add_lora(parts.text_encoder, rank=4, alpha=8)
    add_lora(parts.text_encoder_2, rank=2, alpha=1)
    randomise_lora(3, parts.unet, parts.text_encoder, parts.text_encoder_2)
    return parts


@pytest.fixture(scope="module")
def xl_lora_images(xl_lora_parts, tiny_xl_dir) -> dict[str, np.ndarray]:
    """The adapted pipeline's image, the same with one text encoder's LoRA off, and the base model's."""
    pipe = components.pipeline(xl_lora_parts)
    images = {"lora": sample(pipe)}
    for name in XL_TEXT:
        set_text_lora_enabled(getattr(xl_lora_parts, name), False)
        try:
            images[f"without_{name}"] = sample(pipe)
        finally:
            set_text_lora_enabled(getattr(xl_lora_parts, name), True)
    images["base"] = sample(fresh_xl_pipeline(tiny_xl_dir))
    return images


@pytest.fixture(scope="module")
def xl_lora_files(xl_lora_parts, tmp_path_factory) -> dict[str, Path]:
    files = export_lora(xl_lora_parts, tmp_path_factory.mktemp("xl_lora"))
    files["kohya32"] = export_lora_kohya(xl_lora_parts.unet, xl_lora_parts.text_encoder,
                                         text_encoder_2=xl_lora_parts.text_encoder_2, dtype=torch.float32,
                                         path=tmp_path_factory.mktemp("xl_lora32") / "k.safetensors")
    return files


@pytest.mark.integration
def test_sdxl_reference_images_depend_on_all_three_adapters(xl_lora_images):
    assert max_diff(xl_lora_images["lora"], xl_lora_images["base"]) > 1e-2
    # Each text encoder's LoRA alone moves the image, so matching images below check both encoders' parts.
    for name in XL_TEXT:
        assert max_diff(xl_lora_images["lora"], xl_lora_images[f"without_{name}"]) > 1e-3, name


def test_sdxl_diffusers_format_keys_and_metadata(xl_lora_parts, xl_lora_files):
    assert sorted(os.listdir(xl_lora_files["diffusers"].parent)) == ["lora_kohya.safetensors",
                                                                    "pytorch_lora_weights.safetensors"]
    written = load_file(xl_lora_files["diffusers"])
    unet_keys = {f"unet.{k}" for k in convert_state_dict_to_diffusers(get_peft_model_state_dict(xl_lora_parts.unet))}
    assert {k for k in written if k.startswith("unet.")} == unet_keys and len(unet_keys) == 64
    per_part = {name: {k for k in written if k.startswith(f"{name}.")} for name in XL_TEXT}
    assert all(len(keys) == 16 for keys in per_part.values()) and len(written) == 64 + 32
    assert ("text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj.lora_linear_layer.up.weight"
            in per_part["text_encoder_2"])
    q = xl_lora_parts.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj
    assert torch.equal(written["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight"],
                       q.lora_A["default"].weight)
    with safe_open(str(xl_lora_files["diffusers"]), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["unet.r"], meta["text_encoder.r"], meta["text_encoder_2.r"]) == (4, 4, 2)
    assert (meta["unet.lora_alpha"], meta["text_encoder.lora_alpha"], meta["text_encoder_2.lora_alpha"]) == (4, 8, 1)
    assert "encoder.layers.0.self_attn.q_proj" in meta["text_encoder_2.target_modules"]


def test_sdxl_diffusers_format_loads_into_a_fresh_pipeline(tiny_xl_dir, xl_lora_files, xl_lora_images):
    pipe = fresh_xl_pipeline(tiny_xl_dir)
    pipe.load_lora_weights(str(xl_lora_files["diffusers"].parent))
    assert has_lora(pipe.unet) and has_lora(pipe.text_encoder) and has_lora(pipe.text_encoder_2)
    image = sample(pipe)
    assert np.allclose(image, xl_lora_images["lora"], atol=1e-4), max_diff(image, xl_lora_images["lora"])
    assert max_diff(image, xl_lora_images["base"]) > 1e-2


def test_sdxl_kohya_keys_alphas_and_metadata(xl_lora_parts, xl_lora_files):
    written = load_file(xl_lora_files["kohya"])
    n_modules = sum(len(lora_layers(getattr(xl_lora_parts, name))) for name in ("unet", *XL_TEXT))
    assert n_modules == 32 + 8 + 8
    assert len(written) == 3 * n_modules
    # kohya's SDXL names: the SGM UNet's paths (tiny XL: input_blocks.3 holds down_blocks.1's attention,
    # output_blocks.0-1 up_blocks.0's) and lora_te1_ / lora_te2_ with transformers' CLIP paths.
    for key in (
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
        "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_k.alpha",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.alpha",
    ):
        assert key in written, key
    assert all(k.startswith(tuple(XL_ALPHAS)) for k in written)
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block_" in k for k in written)
    for key in (k for k in written if k.endswith(".alpha")):
        assert float(written[key]) == XL_ALPHAS[next(p for p in XL_ALPHAS if key.startswith(p))], key
    unet = xl_lora_parts.unet
    to_q = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert torch.equal(written["lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight"],
                       to_q.lora_A["default"].weight.half())
    to_k = unet.up_blocks[0].attentions[1].transformer_blocks[0].attn2.to_k
    assert torch.equal(written["lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight"],
                       to_k.lora_B["default"].weight.half())
    out_proj = xl_lora_parts.text_encoder_2.text_model.encoder.layers[1].self_attn.out_proj
    assert torch.equal(written["lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight"],
                       out_proj.lora_B["default"].weight.half())
    with safe_open(str(xl_lora_files["kohya"]), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"  # A1111 lists the LoRA for SDXL models


@pytest.mark.integration
def test_sdxl_kohya_file_loads_like_the_diffusers_format(tiny_xl_dir, xl_lora_files, xl_lora_images):
    images = {}
    for name in ("kohya32", "kohya"):
        pipe = fresh_xl_pipeline(tiny_xl_dir)
        pipe.load_lora_weights(str(xl_lora_files[name]))  # diffusers maps SGM blocks back with the UNet's config
        assert has_lora(pipe.unet) and has_lora(pipe.text_encoder) and has_lora(pipe.text_encoder_2)
        images[name] = sample(pipe)
    want = xl_lora_images["lora"]
    assert np.allclose(images["kohya32"], want, atol=1e-4), max_diff(images["kohya32"], want)
    assert np.allclose(images["kohya"], want, atol=1e-3), max_diff(images["kohya"], want)
    assert max_diff(images["kohya"], xl_lora_images["base"]) > 1e-2


@pytest.mark.integration
@pytest.mark.parametrize("adapted", [("unet",), ("text_encoder_2",), ("text_encoder", "text_encoder_2")])
def test_sdxl_exports_whichever_parts_have_lora(tiny_xl_dir, tmp_path, adapted):
    parts = components.load_components(str(tiny_xl_dir))
    for name in adapted:
        add_lora(getattr(parts, name), rank=2, alpha=4)
    randomise_lora(5, *(getattr(parts, name) for name in adapted))
    want = sample(components.pipeline(parts))
    files = export_lora(parts, tmp_path)
    prefixes = {"unet": ("unet.", "lora_unet_"), "text_encoder": ("text_encoder.", "lora_te1_"),
                "text_encoder_2": ("text_encoder_2.", "lora_te2_")}
    for kind, column in (("diffusers", 0), ("kohya", 1)):
        keys = load_file(files[kind])
        written = {k.split(".")[0] + "." if kind == "diffusers" else "_".join(k.split("_")[:2]) + "_" for k in keys}
        assert written == {prefixes[name][column] for name in adapted}, kind
    for kind in ("diffusers", "kohya"):
        pipe = fresh_xl_pipeline(tiny_xl_dir)
        pipe.load_lora_weights(str(files[kind].parent if kind == "diffusers" else files[kind]))
        assert [has_lora(getattr(pipe, name)) for name in prefixes] == [name in adapted for name in prefixes]
        image = sample(pipe)
        assert np.allclose(image, want, atol=1e-3), (kind, max_diff(image, want))


def test_sdxl_lora_export_errors(tiny_xl_dir, tiny_parts, xl_lora_parts, tmp_path):
    with pytest.raises(ValueError, match="none of unet, text_encoder, text_encoder_2 has LoRA layers to export"):
        export_lora(components.load_components(str(tiny_xl_dir)), tmp_path)
    # A second text encoder belongs to SDXL: with an SD 1.x UNet it is refused, not silently dropped.
    with pytest.raises(ValueError, match="text_encoder_2 given"):
        export_lora_diffusers(tiny_parts.unet, folder=tmp_path, text_encoder_2=xl_lora_parts.text_encoder_2)
    with pytest.raises(ValueError, match="text_encoder_2 given"):
        lora_kohya_state_dict(tiny_parts.unet, text_encoder_2=xl_lora_parts.text_encoder_2)
    assert os.listdir(tmp_path) == []


def test_full_size_sdxl_kohya_names_read_back_by_diffusers():
    """kohya names of every linear and convolution layer of the public SDXL UNet (meta device: shapes only) go
    through diffusers' SDXL kohya reader back to the same modules: the default attention targets, and whatever
    `lora.targets` (resnets, samplers, embeddings, proj_in/out, feed-forward) a run adapts."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**architecture("sdxl")["unet"])
    names = sorted(n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    attention = [n for n in names if n.endswith(tuple(f".{t}" for t in UNET_LORA_TARGETS))]
    assert len(attention) == 70 * 2 * 4  # 70 transformer layers (2 + 2, 10 + 10, 3 x 10, 3 x 2, 10 mid), 2 attentions
    assert len(names) == 794
    namer = kohya_unet_namer(unet)
    state = {}
    for name in names:
        key = "lora_unet_" + namer(name).replace(".", "_")
        state.update({f"{key}.lora_down.weight": torch.zeros(1, 1), f"{key}.lora_up.weight": torch.zeros(1, 1),
                      f"{key}.alpha": torch.tensor(1.0)})
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0.lora_up.weight" in state
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_v.alpha" in state
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k.alpha" in state
    assert "lora_unet_input_blocks_6_0_op.alpha" in state and "lora_unet_output_blocks_2_2_conv.alpha" in state
    assert "lora_unet_label_emb_0_0.alpha" in state and "lora_unet_output_blocks_0_0_skip_connection.alpha" in state
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert sorted(k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith(".lora_A.weight")) == names
    assert len(alphas) == len(names)


def test_add_lora_on_the_projected_text_encoder(tiny_xl_dir):
    text = CLIPTextModelWithProjection.from_pretrained(tiny_xl_dir / "text_encoder_2")
    add_lora(text, rank=2)  # TEXT_LORA_TARGETS: the attention projections, not the pooled text_projection
    layers = lora_layers(text)
    assert len(layers) == 4 * text.config.num_hidden_layers
    assert all(n.startswith("text_model.encoder.layers.") and n.endswith(tuple(TEXT_LORA_TARGETS)) for n in layers)


# ------------------------------------------------------------------------------------------------ SD3, Flux, DoRA


def _trained(model: str, photos, tmp_path, **lora) -> DreamBoothModule:
    """A module of `model` with LoRA adapters moved away from zero by a few steps."""
    m = DreamBoothModule(pretrained=model, optim=Optimization(learning_rate=1e-2), lora=LoraSettings(**lora))
    make_trainer(tmp_path / "fit", 3).fit(m, datamodule=make_datamodule(photos))
    return m.eval()


def _image(pipe, **kw):
    return pipe(prompt="a sks can", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), max_sequence_length=77, **kw).images


@pytest.mark.integration
@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_flow_lora_exports_load_into_a_fresh_pipeline_and_give_the_trained_image(model, photos, tmp_path, tiny_sd3_dir,
                                                                                  tiny_flux_dir):
    """The transformer's and the CLIP text encoder's LoRA in the diffusers format (peft keys, with its config):
    `load_lora_weights` into the base pipeline reproduces the fine-tuned module's image exactly."""
    m = _trained(model, photos, tmp_path, rank=4, alpha=8, text_encoder_rank=4)
    paths = export_lora(m, tmp_path / "lora")
    base = tiny_sd3_dir if model == "tiny-sd3" else tiny_flux_dir
    cls = m.backbone.pipeline_class("text2img")
    pipe = cls.from_pretrained(base)
    before = _image(pipe)
    tuned = _image(cls(**m.backbone.pipeline_parts(m.parts()), scheduler=pipe.scheduler))
    pipe.load_lora_weights(tmp_path / "lora")
    after = _image(pipe)
    assert abs(before - tuned).max() > 1e-3 and abs(after - tuned).max() < 1e-5
    keys = set(load_file(paths["diffusers"]))
    assert any(k.startswith("transformer.") and k.endswith("lora_A.weight") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys)


@pytest.mark.integration
def test_flux_kohya_file_fuses_qkv_as_the_original_and_diffusers_reads_it(photos, tmp_path, tiny_flux_dir):
    """`lora_unet_double_blocks_0_img_attn_qkv`: the q, k, v adapters stacked (down) and block-diagonal (up), a part
    without LoRA zero; diffusers' reader of kohya Flux files gives the fine-tuned image. (Its reader fixes the single
    blocks' sizes at FLUX.1's, so the tiny check adapts the double block only.)"""
    from diffusers import FluxPipeline

    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
               "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_out.0"]
    m = _trained("tiny-flux", photos, tmp_path, rank=4, alpha=2, targets=targets)
    path = export_lora(m, tmp_path / "lora")["kohya"]
    state = load_file(path)
    q = "lora_unet_double_blocks_0_img_attn_qkv"
    assert state[f"{q}.lora_down.weight"].shape == (12, 32) and state[f"{q}.lora_up.weight"].shape == (96, 12)
    assert state[f"{q}.alpha"].item() == 2 * 3  # alpha / rank kept: 2 / 4 = 6 / 12
    up = state[f"{q}.lora_up.weight"].float()
    assert not up[:32, 4:].any() and not up[32:64, :4].any()  # block-diagonal
    txt = state["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"].float()
    assert txt[:32].abs().sum() == 0 and txt[64:].abs().sum() == 0 and txt[32:64].abs().sum() > 0  # only k adapted
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    tuned = _image(FluxPipeline(**m.backbone.pipeline_parts(m.parts()), scheduler=pipe.scheduler))
    pipe.load_lora_weights(path)
    assert abs(_image(pipe) - tuned).max() < 1e-4  # the kohya file is fp16


@pytest.mark.integration
def test_sd3_kohya_file_holds_each_parts_update_in_its_rows(photos, tmp_path, tiny_sd3_dir):
    """SD3's kohya names are the original joint blocks' (`lora_unet_joint_blocks_0_x_block_attn_qkv`, which ComfyUI
    reads; diffusers has no reader): the fused file's up @ down x alpha / rank is each part's update, stacked."""
    m = _trained("tiny-sd3", photos, tmp_path, rank=4, alpha=8)
    state = {k: v.float() for k, v in load_file(export_lora(m, tmp_path / "lora")["kohya"]).items()}
    key = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    fused = state[f"{key}.lora_up.weight"] @ state[f"{key}.lora_down.weight"] * state[f"{key}.alpha"] / 12
    parts = [m.unet.transformer_blocks[0].attn.get_submodule(n) for n in ("to_q", "to_k", "to_v")]
    each = torch.cat([p.lora_B["default"].weight @ p.lora_A["default"].weight * 2 for p in parts])  # alpha / r = 2
    assert torch.allclose(fused, each, atol=1e-3)
    assert "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_down.weight" in state  # last block: k, v only


@pytest.mark.integration
@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_dora_trains_magnitudes_and_exports_them_in_the_diffusers_format_only(model, photos, tmp_path, capsys,
                                                                             tiny_dir, tiny_flux_dir):
    m = _trained(model, photos, tmp_path, rank=4, use_dora=True)
    assert any("lora_magnitude_vector" in n for n, p in m.named_parameters() if p.requires_grad)
    paths = export_lora(m, tmp_path / "lora")
    assert set(paths) == {"diffusers"} and "DoRA" in capsys.readouterr().out
    assert any("lora_magnitude_vector" in k for k in load_file(paths["diffusers"]))
    cls = m.backbone.pipeline_class("text2img")
    pipe = cls.from_pretrained(tiny_dir if model == "tiny" else tiny_flux_dir)
    tuned = cls(**m.backbone.pipeline_parts(m.parts()), scheduler=pipe.scheduler)
    kw = m.backbone.sample_kwargs
    run = lambda p: p(prompt="a sks can", num_inference_steps=2, height=64, width=64, output_type="np",  # noqa: E731
                      generator=torch.Generator().manual_seed(0), **kw).images
    want = run(tuned)
    pipe.load_lora_weights(tmp_path / "lora")
    assert abs(run(pipe) - want).max() < 1e-5

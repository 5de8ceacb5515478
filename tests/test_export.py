"""Tests for dreambooth_pl.export: diffusers -> original LDM single-file checkpoint, read back by diffusers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from dreambooth_pl import components
from dreambooth_pl.export import diffusers_to_ldm_state_dict, export_single_file, text_layout_of

PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core box OpenMP spinning made sampling 20-80x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_parts(tiny_dir) -> components.SDComponents:
    return components.load_components(str(tiny_dir))


@pytest.fixture(scope="module")
def fp32_file(tiny_parts, tmp_path_factory) -> Path:
    return export_single_file(tiny_parts, tmp_path_factory.mktemp("export") / "m.safetensors", dtype=torch.float32)


def assert_same_weights(expected, loaded, cast: torch.dtype | None = None) -> None:
    for name in PARTS:
        want, got = getattr(expected, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        for key, value in want.items():
            value = value if cast is None else value.to(cast).to(value.dtype)
            assert torch.equal(value, got[key]), f"{name}.{key}"


def meta_model(name: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """Full-size UNet, VAE and text encoder with no storage: shapes and keys only."""
    arch = components.architecture(name)
    with torch.device("meta"):
        return (
            UNet2DConditionModel(**arch["unet"]),
            AutoencoderKL(**arch["vae"]),
            CLIPTextModel(CLIPTextConfig(**arch["text"])),
        )


def test_round_trip_through_load_components(tiny_parts, tiny_dir, fp32_file):
    loaded = components.load_components(str(fp32_file), single_file_config=str(tiny_dir))
    assert_same_weights(tiny_parts, loaded)
    assert loaded.prediction_type == "epsilon" and loaded.source == str(fp32_file)


def test_tiny_name_resolves_as_single_file_config(tiny_parts, fp32_file):
    assert_same_weights(tiny_parts, components.load_components(str(fp32_file), single_file_config="tiny"))


def test_from_single_file_samples_the_same_image(tiny_parts, tiny_dir, fp32_file):
    pipe = StableDiffusionPipeline.from_single_file(str(fp32_file), config=str(tiny_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    original = components.pipeline(tiny_parts)
    images = [
        p("a sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="np").images
        for p in (original, pipe)
    ]
    assert images[0].shape == (1, 64, 64, 3)
    assert np.allclose(images[0], images[1], atol=1e-5)


def test_file_is_original_layout(fp32_file):
    with safe_open(str(fp32_file), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["format"] == "pt" and meta["dtype"] == "float32"
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    # Tiny: input_blocks 0 conv_in, 1 resnet, 2 downsampler, 3 resnet+attention; output_blocks 0-3, upsampler
    # after the attention of row 1; the VAE decoder levels count up from the latent side.
    for key in (
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "first_stage_model.decoder.up.3.block.1.conv1.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
    ):
        assert key in keys, key
    # Without SD 1.5's key set diffusers guesses `v1` (and would fetch SD 1.5 configs): `config=` is needed.
    assert sfu.infer_diffusers_model_type(load_file(fp32_file)) == "v1"


def test_fp16_export_halves_the_file_and_loads(tiny_parts, tiny_dir, fp32_file, tmp_path):
    path = export_single_file(tiny_parts, tmp_path / "half.safetensors")  # fp16 is the default
    ratio = path.stat().st_size / fp32_file.stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    assert {t.dtype for t in load_file(path).values()} == {torch.float16}
    loaded = components.load_components(str(path), single_file_config=str(tiny_dir))
    assert_same_weights(tiny_parts, loaded, cast=torch.float16)


def test_exports_a_trained_module(tmp_path):
    from dreambooth_pl.module import DreamBoothModule

    module = DreamBoothModule(pretrained="tiny")
    with torch.no_grad():  # stand-in for fine-tuning: the export must carry the module's current weights
        module.unet.conv_in.weight.add_(1.0)
    path = export_single_file(module, tmp_path / "ft.safetensors", dtype=torch.float32, metadata={"step": 3})
    written = load_file(path)
    assert torch.equal(written["model.diffusion_model.input_blocks.0.0.weight"], module.unet.conv_in.weight)
    expected = diffusers_to_ldm_state_dict(module.unet, module.vae, module.text_encoder)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], v) for k, v in expected.items())
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["step"]) == 3


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_keys_parse_back_with_diffusers(name):
    unet, vae, text = meta_model(name)
    state = diffusers_to_ldm_state_dict(unet, vae, text)
    sizes = {m: len(x.state_dict()) for m, x in zip(PARTS, (unet, vae, text), strict=True)}
    if name == "sd15":
        assert sizes == {"unet": 686, "vae": 248, "text_encoder": 196}
        # Nothing dropped or duplicated (the `position_ids` buffer is not in transformers' state dict).
        assert len(state) == sum(sizes.values())
        assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
                   for k in state)
    else:
        # OpenCLIP fuses each layer's q/k/v weight and bias into one `in_proj` pair: 4 keys fewer per layer.
        assert len(state) == sum(sizes.values()) - 4 * text.config.num_hidden_layers
        assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in state
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    assert len(unet_keys) == sizes["unet"]
    for key in (
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.out.2.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
    ):
        assert key in state, key
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sfu.infer_diffusers_model_type(state) == ("v1" if name == "sd15" else "v2")
    # diffusers' own reverse converters must give back every weight with its shape.
    back = {
        "unet": sfu.convert_ldm_unet_checkpoint(state, dict(unet.config)),
        "vae": sfu.convert_ldm_vae_checkpoint(state, dict(vae.config)),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(state)
        if name == "sd15"
        else sfu.convert_open_clip_checkpoint(text, state, prefix="cond_stage_model.model."),
    }
    back["text_encoder"] = {k.removeprefix("text_model."): v for k, v in back["text_encoder"].items()}
    for part, module in zip(PARTS, (unet, vae, text), strict=True):
        ref = module.state_dict()
        ref = {k.removeprefix("text_model."): v for k, v in ref.items()}
        assert ref.keys() == back[part].keys(), part
        assert all(ref[k].shape == back[part][k].shape for k in ref), part


@pytest.fixture
def tiny_open_clip_dir(tiny_dir, tmp_path) -> Path:
    """The tiny model with an exact-GELU text encoder, i.e. an SD 2.x-style (OpenCLIP) text tower."""
    folder = shutil.copytree(tiny_dir, tmp_path / "tiny-openclip")
    cfg_path = folder / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hidden_act"] = "gelu"
    cfg_path.write_text(json.dumps(cfg))
    return folder


def test_open_clip_layout_round_trips(tiny_open_clip_dir, tmp_path):
    parts = components.load_components(str(tiny_open_clip_dir))
    assert text_layout_of(parts.text_encoder) == "open_clip"
    path = export_single_file(parts, tmp_path / "v2.safetensors", dtype=torch.float32)
    keys = set(load_file(path))
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    assert_same_weights(parts, components.load_components(str(path), single_file_config=str(tiny_open_clip_dir)))


def test_open_clip_layout_matches_open_clip_text_tower(tiny_open_clip_dir):
    from open_clip.transformer import TextTransformer

    text = CLIPTextModel.from_pretrained(tiny_open_clip_dir / "text_encoder")
    unet, vae, _ = meta_model("sd15")  # only the text part is used here
    prefix = "cond_stage_model.model."
    state = {k.removeprefix(prefix): v for k, v in diffusers_to_ldm_state_dict(unet, vae, text).items()
             if k.startswith(prefix)}
    cfg = text.config
    tower = TextTransformer(width=cfg.hidden_size, heads=cfg.num_attention_heads, layers=cfg.num_hidden_layers,
                            mlp_ratio=cfg.intermediate_size / cfg.hidden_size, output_dim=32, output_tokens=True)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("text_projection") for k in missing)
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    with torch.no_grad():
        _, tokens = tower.eval()(ids)
        ref = text(ids).last_hidden_state
    assert torch.allclose(tokens, ref, atol=1e-5)


def test_unmappable_weights_raise_instead_of_dropping():
    arch = components.architecture("tiny")
    unet = UNet2DConditionModel(**arch["unet"], encoder_hid_dim=16)  # adds `encoder_hid_proj`: no LDM slot
    vae, text = AutoencoderKL(**arch["vae"]), CLIPTextModel(CLIPTextConfig(**arch["text"]))
    with pytest.raises(ValueError, match="encoder_hid_proj"):
        diffusers_to_ldm_state_dict(unet, vae, text)
    with pytest.raises(ValueError, match="text_layout"):
        diffusers_to_ldm_state_dict(unet, vae, text, text_layout="t5")


def test_write_is_atomic_and_leaves_no_temp_files(tiny_parts, tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old export")
    old_inode = target.stat().st_ino
    export_single_file(tiny_parts, target)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert target.stat().st_ino != old_inode  # replaced by a rename, not rewritten in place
    assert len(load_file(target)) == 428

    # A crash while writing keeps the previous file whole and removes the partial temp file.
    before = target.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_single_file(tiny_parts, target)
    assert os.listdir(tmp_path) == ["m.safetensors"] and target.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# LoRA export (diffusers format and kohya / A1111 format), read back by diffusers' `load_lora_weights`

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_text_lora(text_encoder, config) -> None:
    """transformers' `add_adapter`; where its PEFT version gate refuses the installed peft (transformers 5.24
    wants peft >= 0.22), peft's `inject_adapter_in_model`, which is what `add_adapter` runs after the gate."""
    from peft import inject_adapter_in_model

    try:
        text_encoder.add_adapter(config)
    except ValueError as err:
        if "PEFT" not in str(err):
            raise
        inject_adapter_in_model(config, text_encoder)


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
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def set_text_lora_enabled(text_encoder, enabled: bool) -> None:
    for layer in lora_layers(text_encoder).values():
        layer.enable_adapters(enabled)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def lora_parts(tiny_dir) -> components.SDComponents:
    """The tiny model (its own copy) with a UNet LoRA (rank 4, alpha 4) and a text-encoder LoRA (rank 4, alpha 8)."""
    from peft import LoraConfig

    parts = components.load_components(str(tiny_dir))
    parts.unet.requires_grad_(False)
    parts.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, init_lora_weights="gaussian",
                                      target_modules=UNET_TARGETS))
    add_text_lora(parts.text_encoder, LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_TARGETS))
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
    from dreambooth_pl.export import export_lora, export_lora_kohya

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
    from dreambooth_pl.export import has_lora

    assert has_lora(lora_parts.unet) and has_lora(lora_parts.text_encoder)
    assert not has_lora(tiny_parts.unet) and not has_lora(tiny_parts.text_encoder) and not has_lora(None)


def test_export_lora_writes_both_files_and_nothing_else(lora_files):
    folder = lora_files["diffusers"].parent
    assert lora_files["kohya"].parent == folder
    assert sorted(os.listdir(folder)) == ["lora_kohya.safetensors", "pytorch_lora_weights.safetensors"]
    assert os.listdir(lora_files["kohya32"].parent) == ["k.safetensors"]
    assert all(oct(p.stat().st_mode & 0o777) == oct(0o644) for p in lora_files.values())


def test_diffusers_format_matches_the_library_state_dict(lora_parts, lora_files):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

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
    from dreambooth_pl.export import has_lora

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
    from peft import LoraConfig

    from dreambooth_pl.export import export_lora_diffusers, export_lora_kohya

    parts = components.load_components(str(tiny_dir))
    parts.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, use_rslora=True, rank_pattern={"to_k": 2},
                                      target_modules=UNET_TARGETS))
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
    from dreambooth_pl.export import export_lora, export_lora_diffusers, export_lora_kohya

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
    from dreambooth_pl.export import export_lora

    files = export_lora(lora_parts, tmp_path)
    inodes = {name: p.stat().st_ino for name, p in files.items()}
    files = export_lora(lora_parts, tmp_path)  # a second export replaces both files by renames
    assert all(p.stat().st_ino != inodes[name] for name, p in files.items())
    assert sorted(os.listdir(tmp_path)) == ["lora_kohya.safetensors", "pytorch_lora_weights.safetensors"]
    before = {name: p.read_bytes() for name, p in files.items()}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    # diffusers' writer and ours both end in safetensors' save_file: a crash in either keeps the old files.
    monkeypatch.setattr("safetensors.torch.save_file", crash)
    for name in ("diffusers", "kohya"):
        with pytest.raises(OSError, match="disk full"):
            if name == "diffusers":
                from dreambooth_pl.export import export_lora_diffusers

                export_lora_diffusers(lora_parts.unet, lora_parts.text_encoder, tmp_path)
            else:
                from dreambooth_pl.export import export_lora_kohya

                export_lora_kohya(lora_parts.unet, lora_parts.text_encoder, tmp_path / "lora_kohya.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["lora_kohya.safetensors", "pytorch_lora_weights.safetensors"]
    assert all(files[name].read_bytes() == data for name, data in before.items())

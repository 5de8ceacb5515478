"""Tests for dreambooth_pl.single_file: diffusers -> original LDM / SGM (SDXL) single-file checkpoint, read back by
diffusers."""

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
from open_clip.transformer import TextTransformer
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dreambooth_pl import components
from dreambooth_pl.architectures import architecture
from dreambooth_pl.module import DreamBoothModule
from dreambooth_pl.single_file import diffusers_to_ldm_state_dict, export_single_file, text_layout_of

PARTS = ("unet", "vae", "text_encoder")
XL_PARTS = (*PARTS, "text_encoder_2")
SGM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model.")
IDS = torch.tensor([[49406, 320, 1125, 539, 49407] + [0] * 72])  # "<start> a photo of <end>", padded with "!" (id 0)


@pytest.fixture(scope="module")
def fp32_file(tiny_parts, tmp_path_factory) -> Path:
    return export_single_file(tiny_parts, tmp_path_factory.mktemp("export") / "m.safetensors", dtype=torch.float32)


def assert_same_weights(expected, loaded, cast: torch.dtype | None = None, parts=PARTS) -> None:
    for name in parts:
        want, got = getattr(expected, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        for key, value in want.items():
            value = value if cast is None else value.to(cast).to(value.dtype)
            assert torch.equal(value, got[key]), f"{name}.{key}"


def meta_model(name: str) -> dict[str, torch.nn.Module]:
    """Full-size UNet, VAE and text encoder(s) with no storage: shapes and keys only."""
    arch = architecture(name)
    with torch.device("meta"):
        model = {
            "unet": UNet2DConditionModel(**arch["unet"]),
            "vae": AutoencoderKL(**arch["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**arch["text"])),
        }
        if "text_2" in arch:
            model["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_2"]))
    return model


def to_ldm(model: dict[str, torch.nn.Module], **kw) -> dict[str, torch.Tensor]:
    return diffusers_to_ldm_state_dict(model["unet"], model["vae"], model["text_encoder"],
                                       text_encoder_2=model.get("text_encoder_2"), **kw)


def sample(parts) -> np.ndarray:
    gen = torch.Generator().manual_seed(7)
    pipe = components.pipeline(parts)
    return pipe("a sks dog", num_inference_steps=2, height=64, width=64, generator=gen, output_type="np").images


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


FULL_SIZE_KEYS = {
    "sd15": ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
             "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
             "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"),
    "sd21": ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
             "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
             "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"),
    # SDXL: three levels (input_blocks 0-8, output_blocks 0-8), no attention on the first, 2 and 10 transformer
    # layers on the others; the upsamplers follow an attention (output_blocks.2.2, 5.2).
    "sdxl": ("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
             "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
             "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight",
             "model.diffusion_model.output_blocks.2.2.conv.weight",
             "model.diffusion_model.output_blocks.5.2.conv.weight",
             "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
             "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight",
             "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"),
}


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_full_size_keys_parse_back_with_diffusers(name):
    model = meta_model(name)
    state = to_ldm(model)
    sizes = {m: len(x.state_dict()) for m, x in model.items()}
    # OpenCLIP fuses each layer's q/k/v weight and bias into one `in_proj` pair: 4 keys fewer per layer.
    open_clip = {"sd15": None, "sd21": "text_encoder", "sdxl": "text_encoder_2"}[name]
    fused = 4 * model[open_clip].config.num_hidden_layers if open_clip else 0
    # Nothing dropped or duplicated (the `position_ids` buffer is not in transformers' state dict).
    assert len(state) == sum(sizes.values()) - fused
    if name == "sd15":
        assert sizes == {"unet": 686, "vae": 248, "text_encoder": 196}
        assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
                   for k in state)
    if name == "sdxl":
        assert sizes == {"unet": 1680, "vae": 248, "text_encoder": 196, "text_encoder_2": 517}
        assert all(k.startswith(SGM_PREFIXES) for k in state)
        assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
        assert state["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    assert len(unet_keys) == sizes["unet"]
    for key in ("model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.out.2.weight",
                *FULL_SIZE_KEYS[name]):
        assert key in state, key
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    # With these keys diffusers recognises the model (and would fetch the matching configs without `config=`).
    assert sfu.infer_diffusers_model_type(state) == {"sd15": "v1", "sd21": "v2", "sdxl": "xl_base"}[name]
    # diffusers' own reverse converters must give back every weight with its shape.
    back = {
        "unet": sfu.convert_ldm_unet_checkpoint(state, dict(model["unet"].config)),
        "vae": sfu.convert_ldm_vae_checkpoint(state, dict(model["vae"].config)),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(state) if name != "sd21"
        else sfu.convert_open_clip_checkpoint(model["text_encoder"], state, prefix="cond_stage_model.model."),
    }
    if name == "sdxl":
        back["text_encoder_2"] = sfu.convert_open_clip_checkpoint(model["text_encoder_2"], state,
                                                                  prefix="conditioner.embedders.1.model.")
    assert back.keys() == model.keys()
    for part, module in model.items():
        ref = {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}
        got = {k.removeprefix("text_model."): v for k, v in back[part].items()}
        assert ref.keys() == got.keys(), part
        assert all(ref[k].shape == got[k].shape for k in ref), part


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
    text = CLIPTextModel.from_pretrained(tiny_open_clip_dir / "text_encoder")
    model = {**meta_model("sd15"), "text_encoder": text}  # only the text part is used here
    prefix = "cond_stage_model.model."
    state = {k.removeprefix(prefix): v for k, v in to_ldm(model).items() if k.startswith(prefix)}
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
    arch = architecture("tiny")
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

    monkeypatch.setattr("dreambooth_pl.files.save_file", crash)  # the project's one safetensors writer
    with pytest.raises(OSError, match="disk full"):
        export_single_file(tiny_parts, target)
    assert os.listdir(tmp_path) == ["m.safetensors"] and target.read_bytes() == before


# ------------------------------------------------------------------------------------------ SDXL (SGM layout)


@pytest.fixture(scope="module")
def xl_fp32_file(tiny_xl_parts, tmp_path_factory) -> Path:
    return export_single_file(tiny_xl_parts, tmp_path_factory.mktemp("xl") / "xl.safetensors", dtype=torch.float32)


def test_sdxl_file_is_sgm_layout(tiny_xl_parts, xl_fp32_file):
    written = load_file(xl_fp32_file)
    with safe_open(str(xl_fp32_file), "pt") as f:
        meta = f.metadata()
    assert meta["dreambooth_pl"] == "sdxl-sgm-single-file" and meta["dtype"] == "float32"
    assert all(k.startswith(SGM_PREFIXES) for k in written)
    sizes = {name: len(getattr(tiny_xl_parts, name).state_dict()) for name in XL_PARTS}
    layers = tiny_xl_parts.text_encoder_2.config.num_hidden_layers
    assert len(written) == sum(sizes.values()) - 4 * layers  # the second encoder's q/k/v fused per layer
    unet, text_2 = tiny_xl_parts.unet, tiny_xl_parts.text_encoder_2
    # Tiny XL: input_blocks 0 conv_in, 1 resnet, 2 downsampler, 3 resnet + attention; output_blocks 0-1 with
    # attention (upsampler after row 1's attention), 2-3 resnets only.
    for key in (
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",
        "model.diffusion_model.output_blocks.3.0.in_layers.2.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.ln_final.weight",
        "conditioner.embedders.1.model.positional_embedding",
    ):
        assert key in written, key
    # SDXL's added (text + size/crop) embedding is the original UNet's `label_emb`.
    assert torch.equal(written["model.diffusion_model.label_emb.0.0.weight"], unet.add_embedding.linear_1.weight)
    assert torch.equal(written["model.diffusion_model.label_emb.0.2.bias"], unet.add_embedding.linear_2.bias)
    # OpenCLIP: stacked q/k/v, and the pooled projection as a (width, output) matrix.
    attn = text_2.text_model.encoder.layers[0].self_attn
    assert torch.equal(written["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"],
                       torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(written["conditioner.embedders.1.model.text_projection"], text_2.text_projection.weight.T)


def test_sdxl_file_converts_back_with_diffusers(tiny_xl_parts, xl_fp32_file):
    """diffusers' own converters read every weight of all four parts back unchanged."""
    state = load_file(xl_fp32_file)
    back = {
        "unet": sfu.convert_ldm_unet_checkpoint(state, dict(tiny_xl_parts.unet.config)),
        "vae": sfu.convert_ldm_vae_checkpoint(state, dict(tiny_xl_parts.vae.config)),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(state),
        "text_encoder_2": sfu.convert_open_clip_checkpoint(tiny_xl_parts.text_encoder_2, state,
                                                           prefix="conditioner.embedders.1.model."),
    }
    for name in XL_PARTS:
        ref = {k.removeprefix("text_model."): v for k, v in getattr(tiny_xl_parts, name).state_dict().items()}
        got = {k.removeprefix("text_model."): v for k, v in back[name].items()}
        assert ref.keys() == got.keys(), name
        assert all(torch.equal(ref[k], got[k]) for k in ref), name


def test_sdxl_second_encoder_matches_open_clip_text_tower(tiny_xl_parts, xl_fp32_file):
    """The `conditioner.embedders.1.model.` weights load strictly into open_clip's own text tower (what SGM, A1111
    and ComfyUI run) and give the encoder's hidden states and pooled, projected embedding."""
    prefix = "conditioner.embedders.1.model."
    state = {k.removeprefix(prefix): v for k, v in load_file(xl_fp32_file).items() if k.startswith(prefix)}
    text_2 = tiny_xl_parts.text_encoder_2
    cfg = text_2.config
    tower = TextTransformer(width=cfg.hidden_size, heads=cfg.num_attention_heads, layers=cfg.num_hidden_layers,
                            mlp_ratio=cfg.intermediate_size / cfg.hidden_size, output_dim=cfg.projection_dim,
                            output_tokens=True)
    tower.load_state_dict(state, strict=True)
    with torch.no_grad():
        pooled, tokens = tower.eval()(IDS)
        ref = text_2(IDS)
    assert torch.allclose(tokens, ref.last_hidden_state, atol=1e-5)
    assert torch.allclose(pooled, ref.text_embeds, atol=1e-5)


def test_sdxl_round_trip_through_load_components(tiny_xl_dir, tmp_path):
    parts = components.load_components(str(tiny_xl_dir))
    path = export_single_file(parts, tmp_path / "xl.safetensors", dtype=torch.float32)
    loaded = components.load_components(str(path), single_file_config=str(tiny_xl_dir))
    assert isinstance(loaded.text_encoder_2, CLIPTextModelWithProjection) and loaded.backbone.name == "sdxl"
    assert_same_weights(parts, loaded, parts=XL_PARTS)
    want, got = sample(parts), sample(loaded)
    assert want.shape == (1, 64, 64, 3)
    assert np.allclose(want, got, atol=1e-5), float(np.abs(want - got).max())


def test_sdxl_layout_errors(tiny_xl_parts, tiny_parts):
    xl = {name: getattr(tiny_xl_parts, name) for name in XL_PARTS}
    with pytest.raises(ValueError, match="text_encoder_2"):
        to_ldm({**xl, "text_encoder_2": None})
    with pytest.raises(ValueError, match="text_layout"):
        to_ldm(xl, text_layout="open_clip")
    sd = {name: getattr(tiny_parts, name) for name in PARTS}
    with pytest.raises(ValueError, match="not an SDXL UNet"):
        to_ldm({**sd, "text_encoder_2": tiny_xl_parts.text_encoder_2})
    # The SD 1.x layout has no place for a projection: the second encoder as SD's text encoder is refused.
    with pytest.raises(ValueError, match="text_projection"):
        to_ldm({**sd, "text_encoder": tiny_xl_parts.text_encoder_2}, text_layout="clip")


# ------------------------------------------------------------------------------------------------ SD3, Flux


def test_sd3_single_file_is_read_back_whole_by_diffusers(tiny_sd3_dir, tmp_path):
    """The whole SD3 model as one file (transformer, VAE, both CLIPs, T5): StableDiffusion3Pipeline.from_single_file
    reads every weight back exactly."""
    from diffusers import StableDiffusion3Pipeline

    parts = components.load_components(str(tiny_sd3_dir))
    path = export_single_file(parts, tmp_path / "sd3.safetensors", dtype=torch.float32)
    pipe = StableDiffusion3Pipeline.from_single_file(str(path), config=str(tiny_sd3_dir), torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder_2", "text_encoder_3"):
        mine = getattr(parts, name).state_dict()
        back = getattr(pipe, "transformer" if name == "unet" else name).state_dict()
        assert set(mine) == set(back) and all(torch.equal(mine[k], back[k]) for k in mine), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["dreambooth_pl"] == "sd3-single-file"
        assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in f.keys()


@pytest.mark.parametrize("kind", ["flux", "sd35"])
def test_public_size_transformer_layouts_are_what_diffusers_reads(kind):
    """At the released widths (one or a few blocks, on the meta device): every original key our export writes is one
    diffusers' single-file converter turns back into exactly the transformer's keys and shapes."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from dreambooth_pl.single_file import transformer_to_original

    with torch.device("meta"):
        if kind == "flux":
            model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
        else:
            model = SD3Transformer2DModel(num_layers=3, num_attention_heads=3, caption_projection_dim=192,
                                          dual_attention_layers=(0,), qk_norm="rms_norm")
    original = transformer_to_original(model, "flux" if kind == "flux" else "sd3")
    convert = (sfu.convert_flux_transformer_checkpoint_to_diffusers if kind == "flux"
               else sfu.convert_sd3_transformer_checkpoint_to_diffusers)
    back, mine = convert(dict(original)), model.state_dict()
    assert set(back) == set(mine) and all(back[k].shape == mine[k].shape for k in mine)


def test_flux_single_file_fuses_its_parts_in_the_readers_order(tiny_flux_dir, tmp_path):
    """Flux's transformer file: q, k, v (and the single blocks' MLP input) stacked in that order, the final
    modulation's halves swapped, no key left out (values checked here, the layout at full size above)."""
    parts = components.load_components(str(tiny_flux_dir))
    path = export_single_file(parts, tmp_path / "flux.safetensors", dtype=torch.float32)
    state, t = load_file(path), parts.unet
    single = t.single_transformer_blocks[0]
    assert torch.equal(state["single_blocks.0.linear1.weight"], torch.cat(
        [single.attn.to_q.weight, single.attn.to_k.weight, single.attn.to_v.weight, single.proj_mlp.weight]))
    double = t.transformer_blocks[0].attn
    assert torch.equal(state["double_blocks.0.txt_attn.qkv.bias"],
                       torch.cat([double.add_q_proj.bias, double.add_k_proj.bias, double.add_v_proj.bias]))
    shift, scale = t.norm_out.linear.weight.chunk(2)
    assert torch.equal(state["final_layer.adaLN_modulation.1.weight"], torch.cat([scale, shift]))
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in t.parameters())

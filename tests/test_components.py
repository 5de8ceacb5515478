"""Tests for dreambooth_pl.components: loading, errors, samplers and the pipeline builder."""

from __future__ import annotations

import json
import shutil
import time

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from dreambooth_pl import components
from dreambooth_pl.components import ModelLoadError, SDComponents


def sd_alphas_cumprod() -> np.ndarray:
    betas = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def parts(tiny_dir) -> SDComponents:
    """The tiny epsilon model loaded from its folder."""
    return components.load_components(str(tiny_dir))


@pytest.fixture(scope="module")
def parts_v(tiny_v_dir) -> SDComponents:
    """The tiny v-prediction model loaded by name."""
    return components.load_components("tiny-v")


# ------------------------------------------------------------------------------------------ loading


def test_load_components_by_folder_and_by_name_agree(parts, tiny_dir):
    """Folder and `tiny` name give the same weights, those stored in the folder's safetensors files."""
    by_name = components.load_components("tiny")
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(parts, name), getattr(by_name, name))
    stored = load_file(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors")
    unet_sd = parts.unet.state_dict()
    assert stored.keys() == unet_sd.keys()
    assert all(torch.equal(stored[k], unet_sd[k]) for k in stored)
    assert by_name.source == "tiny"
    assert isinstance(by_name.tokenizer, CLIPTokenizer)


def test_load_components_training_scheduler(parts):
    """Training uses DDPM with eps prediction, no clipping and SD's schedule; sampling config stays PNDM."""
    sched = parts.noise_scheduler
    assert isinstance(sched, DDPMScheduler)
    assert sched.config.prediction_type == parts.prediction_type == "epsilon"
    assert sched.config.clip_sample is False
    assert parts.scheduler_config["_class_name"] == "PNDMScheduler"
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), sd_alphas_cumprod(), rtol=1e-5)


def test_load_components_tiny_v_is_v_prediction(parts_v):
    """`tiny-v` trains with v-prediction."""
    assert isinstance(parts_v.noise_scheduler, DDPMScheduler)
    assert parts_v.noise_scheduler.config.prediction_type == parts_v.prediction_type == "v_prediction"


def test_vae_downsamples_8x(parts):
    """A 64 px image encodes to 8x8 latents with 4 channels and decodes back to 64 px."""
    with torch.no_grad():
        latents = parts.vae.encode(torch.randn(1, 3, 64, 64)).latent_dist.sample()
        image = parts.vae.decode(latents).sample
    assert latents.shape == (1, 4, 8, 8)
    assert image.shape == (1, 3, 64, 64)
    assert parts.vae_scale_factor == 64 // latents.shape[-1] == 8


def test_pipeline_from_pretrained_offline_and_components_pipeline_agree(tiny_dir, parts):
    """diffusers loads the folder offline (no safety checker) and samples 64 px; `pipeline` shares modules."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    ours = components.pipeline(parts)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(ours, name) is getattr(parts, name)
    assert type(ours.scheduler) is type(pipe.scheduler)
    kw = dict(num_inference_steps=2, output_type="np")
    img = pipe("a sks can", generator=torch.Generator().manual_seed(0), **kw).images
    img2 = ours("a sks can", generator=torch.Generator().manual_seed(0), **kw).images
    assert img.shape == (1, 64, 64, 3) and img.dtype == np.float32
    assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    np.testing.assert_allclose(img2, img, atol=1e-5)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("path", ["./no/such/folder", "/nonexistent/model.safetensors", "no/such/folder"])
def test_missing_path_is_model_load_error(path):
    """A path that does not exist fails at once, naming it and saying there is no such file."""
    with pytest.raises(ModelLoadError, match="no such") as err:
        components.load_components(path)
    assert path in str(err.value)


def test_folder_without_model_index(tmp_path):
    """An existing folder that is not a diffusers pipeline names the missing model_index.json."""
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json") as err:
        components.load_components(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_sdxl_folder_without_its_second_text_encoder_is_refused(tiny_xl_dir, tmp_path):
    """An SDXL UNet in a folder whose model_index.json lists no text_encoder_2 is one clear error, not a crash later."""
    broken = shutil.copytree(tiny_xl_dir, tmp_path / "xl")
    index = json.loads((broken / "model_index.json").read_text())
    index.pop("text_encoder_2"), index.pop("tokenizer_2")
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="text_encoder_2") as err:
        components.load_components(str(broken))
    assert "SDXL" in str(err.value)


def test_broken_diffusers_folder_names_it(tiny_dir, tmp_path):
    """A diffusers folder missing its UNet is a ModelLoadError naming the folder."""
    broken = shutil.copytree(tiny_dir, tmp_path / "broken", ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(ModelLoadError) as err:
        components.load_components(str(broken))
    assert str(broken) in str(err.value)


def test_diffusers_folder_without_tokenizer_is_an_error(tiny_dir, tmp_path):
    """A diffusers folder missing its tokenizer is a ModelLoadError, not a silently empty tokenizer."""
    broken = shutil.copytree(tiny_dir, tmp_path / "broken", ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(ModelLoadError, match="tokenizer"):
        components.load_components(str(broken))


def test_unreachable_hub_id_fails_fast_offline(parts):
    """With HF_HUB_OFFLINE=1 an unknown hub id fails within seconds, pointing at network and MODEL=tiny."""
    name = "some-org/not-a-real-model-xyz"
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        components.load_components(name)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert name in msg and "network" in msg and "MODEL=tiny" in msg


# ------------------------------------------------------------------------------------------ samplers

SAMPLER_CLASSES = {
    "default": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}


def test_sampler_table_covers_samplers():
    """Every advertised sampler is checked below."""
    assert set(components.SAMPLERS) == set(SAMPLER_CLASSES)


@pytest.mark.parametrize("sampler", components.SAMPLERS)
def test_sampling_scheduler_keeps_model_schedule(parts_v, sampler):
    """Every sampler keeps the model's betas and prediction type (v-prediction for tiny-v)."""
    sched = components.sampling_scheduler(parts_v, sampler)
    assert type(sched).__name__ == SAMPLER_CLASSES[sampler]
    cfg = sched.config
    assert cfg.beta_start == 0.00085 and cfg.beta_end == 0.012 and cfg.beta_schedule == "scaled_linear"
    assert cfg.num_train_timesteps == 1000
    assert cfg.prediction_type == "v_prediction"
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), sd_alphas_cumprod(), rtol=1e-5)


def test_unknown_sampler_raises(parts):
    """An unknown sampler is a ValueError naming it."""
    with pytest.raises(ValueError, match="heun"):
        components.sampling_scheduler(parts, "heun")


def test_pipeline_uses_requested_sampler(parts):
    """`pipeline(parts, 'ddim')` samples with DDIM."""
    assert type(components.pipeline(parts, "ddim").scheduler).__name__ == "DDIMScheduler"


def test_instruct_pix2pix_pipeline_shares_parts(model_cache):
    """`kind="instruct_pix2pix"`: an InstructPix2Pix pipeline on the same modules, Euler a by default."""
    parts = components.load_components("tiny-ip2p")
    pipe = components.pipeline(parts, kind="instruct_pix2pix")
    assert isinstance(pipe, StableDiffusionInstructPix2PixPipeline)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(pipe, name) is getattr(parts, name)
    assert pipe.unet.config.in_channels == 8 and pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    ddim = components.pipeline(parts, "ddim", kind="instruct_pix2pix")
    assert type(ddim.scheduler).__name__ == "DDIMScheduler"


def test_unknown_pipeline_kind_raises(parts):
    """An unknown pipeline kind is a ValueError naming it."""
    with pytest.raises(ValueError, match="inpaint"):
        components.pipeline(parts, kind="inpaint")


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_world_model_with_a_bad_weight_file_names_it_and_make_world(tiny_dir, tmp_path, monkeypatch, damage):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_dir, folder)
    weights = next((folder / "unet").glob("*.safetensors"))
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setitem(components.WORLD_MODELS, "world", folder)
    with pytest.raises(components.ModelLoadError, match="make world") as err:
        components.load_components("world")
    assert str(folder / "unet") in str(err.value)


def test_unreachable_hub_fails_in_seconds_with_one_sentence(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(components, "hub_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(components.ModelLoadError, match="cannot be reached and the model is not in the local cache"):
        components.load_components("nobody/not-a-cached-model")
    assert time.perf_counter() - start < 5  # no download retries


def test_hub_reachable_says_no_for_a_closed_port(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    components.hub_reachable.cache_clear()
    try:
        assert components.hub_reachable(timeout=1.0) is False
    finally:
        components.hub_reachable.cache_clear()

"""Tests for dreambooth_pl.components: tokenizer, tiny model builder, loading, errors, samplers, architectures."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from open_clip.tokenizer import SimpleTokenizer, basic_clean, whitespace_clean
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dreambooth_pl import components
from dreambooth_pl.components import ModelLoadError, SDComponents

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)
# Prompts on which HF's CLIPTokenizer and open_clip agree as given (punctuation, case, whitespace, unicode).
AGREE = [
    "a sks can",
    "a photo of a sks dog, 4k!",
    "A cube shaped sks backpack on top of a mirror",
    "it's a dog's life, isn't it? hello...world!!! 3.14",
    "  Multiple   spaces\tand\nnewlines  ",
    "café 🐶 naïve Ünïcödé ÀÉÎ 日本語 🎉🚀",
]
# open_clip runs ftfy.fix_text + html.unescape first (its `basic_clean`); HF's CLIPTokenizer does not.
NEEDS_FTFY = [
    "“curly” quotes — dash",
    "&amp; html &lt;tag&gt;",
    "ﬁne ligature",
    "ＦＵＬＬ width",
    "mojibake: schÃ¶n",
]


def sd_alphas_cumprod() -> np.ndarray:
    betas = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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


@pytest.fixture(scope="module")
def tokenizer(tiny_dir) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")


@pytest.fixture(scope="module")
def oc_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def oc_ids(oc: SimpleTokenizer, text: str) -> list[int]:
    return [oc.sot_token_id, *oc.encode(text), oc.eot_token_id]


# ------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("text", AGREE)
def test_tokenizer_matches_open_clip(tokenizer, oc_tokenizer, text):
    """The rebuilt CLIPTokenizer gives open_clip's ids (with start/end tokens)."""
    assert tokenizer(text).input_ids == oc_ids(oc_tokenizer, text)


@pytest.mark.parametrize("text", NEEDS_FTFY)
def test_tokenizer_matches_open_clip_after_its_text_cleaning(tokenizer, oc_tokenizer, text):
    """Where they differ it is only open_clip's ftfy/html pre-cleaning: on cleaned text the ids agree."""
    cleaned = whitespace_clean(basic_clean(text))
    assert cleaned != text
    assert tokenizer(cleaned).input_ids == oc_ids(oc_tokenizer, text)


def test_tokenizer_vocabulary_is_open_clips(tokenizer, oc_tokenizer):
    """Same 49408 tokens at the same ids as open_clip (special tokens spelled the OpenAI/HF way)."""
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    expected = {rename.get(tok, tok): i for tok, i in oc_tokenizer.encoder.items()}
    assert tokenizer.get_vocab() == expected


def test_tokenizer_special_tokens_and_padding(tokenizer, oc_tokenizer):
    """vocab 49408, bos 49406, eos = pad 49407, max length 77; max_length padding pads with eos."""
    assert tokenizer.vocab_size == len(tokenizer) == 49408
    assert tokenizer.bos_token_id == oc_tokenizer.sot_token_id == 49406
    assert tokenizer.eos_token_id == oc_tokenizer.eot_token_id == 49407
    assert tokenizer.model_max_length == 77
    enc = tokenizer("a sks can", padding="max_length")
    n = len(oc_ids(oc_tokenizer, "a sks can"))
    assert len(enc.input_ids) == 77
    assert enc.input_ids[:n] == oc_ids(oc_tokenizer, "a sks can")
    assert enc.input_ids[n:] == [49407] * (77 - n)
    assert enc.attention_mask == [1] * n + [0] * (77 - n)


def test_tokenizer_truncates_to_77_ending_with_eos(tokenizer):
    """A long prompt truncates to 77 ids that still end with the end-of-text token."""
    ids = tokenizer("a photo " * 100, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


# ------------------------------------------------------------------------------------------ builder


def test_build_random_is_deterministic(tmp_path):
    """Same seed -> byte-identical weight files; another seed -> a different UNet; no temp folders left."""
    a = components.build_random("tiny", tmp_path / "a", seed=0)
    b = components.build_random("tiny", tmp_path / "b", seed=0)
    c = components.build_random("tiny", tmp_path / "c", seed=1)
    for rel in WEIGHT_FILES:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    ua, uc = load_file(a / WEIGHT_FILES[0]), load_file(c / WEIGHT_FILES[0])
    assert ua.keys() == uc.keys()
    assert not all(torch.equal(ua[k], uc[k]) for k in ua)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_tiny_cache_matches_seed_zero_build(tiny_dir, tmp_path):
    """The cached `tiny` model is the seed-0 build (same weights as a fresh build)."""
    fresh = components.build_random("tiny", tmp_path / "fresh", seed=0)
    for rel in WEIGHT_FILES:
        assert (fresh / rel).read_bytes() == (tiny_dir / rel).read_bytes(), rel


def test_vae_downsamples_8x(parts):
    """A 64 px image encodes to 8x8 latents with 4 channels and decodes back to 64 px."""
    with torch.no_grad():
        latents = parts.vae.encode(torch.randn(1, 3, 64, 64)).latent_dist.sample()
        image = parts.vae.decode(latents).sample
    assert latents.shape == (1, 4, 8, 8)
    assert image.shape == (1, 3, 64, 64)
    assert parts.vae_scale_factor == 64 // latents.shape[-1] == 8


# ------------------------------------------------------------------------------------------ loading


def test_load_components_by_folder_and_by_name_agree(parts, tiny_dir):
    """Folder and `tiny` name give the same weights, those stored in the folder's safetensors files."""
    by_name = components.load_components("tiny")
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(parts, name), getattr(by_name, name))
    stored = load_file(tiny_dir / WEIGHT_FILES[0])
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


# ------------------------------------------------------------------------------------------ architectures


def meta_counts(name: str) -> dict[str, int]:
    """Parameter counts of an architecture built on the meta device (no memory, no init)."""
    arch = components.architecture(name)
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
    arch = components.architecture("sd21")
    assert arch["scheduler"]["prediction_type"] == "v_prediction"
    assert arch["unet"]["cross_attention_dim"] == 1024
    counts = meta_counts("sd21")
    assert counts["unet"] == pytest.approx(865_910_724, rel=0.01)
    assert counts["text"] == pytest.approx(340_387_840, rel=0.01)


@pytest.mark.parametrize("name", [*components.TINY_MODELS, "sd15", "sd21"])
def test_architecture_parts_fit_together(name):
    """Text width = UNet cross-attention width, 77 positions, CLIP vocab, VAE latents = UNet channels."""
    arch = components.architecture(name)
    assert arch["text"]["hidden_size"] == arch["unet"]["cross_attention_dim"]
    assert arch["text"]["max_position_embeddings"] == 77
    assert arch["text"]["vocab_size"] == 49408
    assert arch["vae"]["latent_channels"] == arch["unet"]["out_channels"] == 4


def test_unknown_architecture_raises():
    """An unknown architecture name is a ValueError naming it."""
    with pytest.raises(ValueError, match="sdxl"):
        components.architecture("sdxl")


# ------------------------------------------------------------------------------------------ CLI


def test_tiny_model_subcommand(tmp_path, tiny_dir, capsys):
    """`tiny-model DIR` writes a loadable seed-0 pipeline and leaves no temp folders behind."""
    from dreambooth_pl.cli import main

    out = tmp_path / "m"
    main(["tiny-model", str(out)])
    assert str(out) in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, UNet2DConditionModel) and pipe.safety_checker is None
    assert (out / WEIGHT_FILES[0]).read_bytes() == (tiny_dir / WEIGHT_FILES[0]).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_tiny_model_subcommand_arch_and_seed(tmp_path):
    """`--arch tiny-v --seed 3` writes a v-prediction model stamped with its seed."""
    from dreambooth_pl.cli import main

    out = tmp_path / "v"
    main(["tiny-model", str(out), "--arch", "tiny-v", "--seed", "3"])
    assert components.load_components(str(out)).prediction_type == "v_prediction"
    assert (out / "TINY_VERSION").read_text().split() == ["tiny-v", str(components.TINY_VERSION), "seed=3"]


def test_tiny_model_subcommand_keeps_unrelated_files(tmp_path):
    """Pointing `tiny-model` at a folder with user files refuses or keeps them; it never deletes them."""
    from dreambooth_pl.cli import main

    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model built by dreambooth_pl"):
        main(["tiny-model", str(target)])
    assert (target / "notes.txt").read_text() == "keep me"

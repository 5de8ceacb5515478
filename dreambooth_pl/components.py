"""Stable Diffusion parts: the only module that calls `from_pretrained` / `from_single_file`."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

TINY = "tiny"  # epsilon-prediction tiny random SD (SD 1.x layout)
TINY_V = "tiny-v"  # v-prediction tiny random SD (SD 2.x layout)
TINY_IP2P = "tiny-ip2p"  # tiny InstructPix2Pix: 8-channel UNet input (noisy latents ++ image latents)
TINY_MODELS = (TINY, TINY_V, TINY_IP2P)
# Bump when the tiny builder changes so caches made by older code are rebuilt, never silently reused.
TINY_VERSION = 1
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says which and what to do."""


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model that training and sampling need."""

    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: Any  # DDPMScheduler for training (add_noise, alphas_cumprod)
    scheduler_config: dict = field(default_factory=dict)  # the model's own sampling scheduler config
    source: str = ""

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def cache_root() -> Path:
    """Project cache folder: `$DREAMBOOTH_PL_CACHE` or `./cache`."""
    return Path(os.environ.get("DREAMBOOTH_PL_CACHE", "cache"))


# ---------------------------------------------------------------------------------------------
# Tokenizer rebuilt offline from the BPE vocabulary shipped inside the open_clip wheel


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte->printable-unicode table: printable latin-1 bytes map to themselves,
    # the other 68 bytes to code points from 256 up, so every byte sequence is a string.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_tokenizer(folder: str | Path) -> Path:
    """Write CLIP's `vocab.json` + `merges.txt` (49408 tokens) built from open_clip's BPE file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with bpe.open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    # Same slice as CLIP: skip the version header, keep 49152 - 256 - 2 merges.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # ids 49406, 49407 as in openai/clip-vit-large-patch14
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def build_tokenizer(folder: str | Path):
    """A real CLIP BPE tokenizer (max length 77) saved in `folder` in transformers layout."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder)
    # Positional: transformers 4 names these vocab_file/merges_file, transformers 5 vocab/merges.
    tok = CLIPTokenizer(
        str(Path(folder) / "vocab.json"),
        str(Path(folder) / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
    tok.save_pretrained(folder)
    return tok


# ---------------------------------------------------------------------------------------------
# Random-initialised architectures: tiny (tests, demo) and the public SD 1.5 / SD 2.1 shapes


def architecture(name: str) -> dict[str, dict]:
    """UNet, VAE, text-encoder and scheduler configs for `tiny`, `tiny-v`, `tiny-ip2p`, `sd15` or `sd21`."""
    sched = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    if name in TINY_MODELS:
        unet = dict(
            sample_size=8, in_channels=8 if name == TINY_IP2P else 4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8,
        )
        # Four encoder blocks -> three 2x downsamples: 8x like the real VAE (64 px -> 8x8 latents).
        vae = dict(
            sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, scaling_factor=0.18215,
        )
        text = dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
        if name == TINY_V:
            sched["prediction_type"] = "v_prediction"
        return dict(unet=unet, vae=vae, text=text, scheduler=sched)
    vae = dict(
        sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215,
    )
    unet = dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )
    if name == "sd15":  # runwayml/stable-diffusion-v1-5: CLIP ViT-L/14 text tower
        text = dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        )
        return dict(unet=unet, vae=vae, text=text, scheduler=sched)
    if name == "sd21":  # stabilityai/stable-diffusion-2-1: OpenCLIP ViT-H text tower (23 layers), v-prediction
        unet.update(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
        text = dict(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, max_position_embeddings=77, projection_dim=512, hidden_act="gelu",
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )
        sched["prediction_type"] = "v_prediction"
        return dict(unet=unet, vae=vae, text=text, scheduler=sched)
    raise ValueError(f"unknown architecture {name!r}: choose tiny, tiny-v, tiny-ip2p, sd15 or sd21")


def build_random(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Build a random-initialised SD of architecture `name`, saved in diffusers layout in `folder`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = architecture(name)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / "TINY_VERSION").is_file():
        raise FileExistsError(f"{folder} exists and is not a model built by dreambooth_pl: choose a new or empty folder")
    # Build in a sibling temp folder and rename: a crash never leaves a half-written model behind.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; the result is a normal shared folder
    try:
        build_tokenizer(tmp / "tokenizer")
        torch.manual_seed(seed)
        CLIPTextModel(CLIPTextConfig(**arch["text"])).save_pretrained(tmp / "text_encoder")
        torch.manual_seed(seed + 1)
        AutoencoderKL(**arch["vae"]).save_pretrained(tmp / "vae")
        torch.manual_seed(seed + 2)
        UNet2DConditionModel(**arch["unet"]).save_pretrained(tmp / "unet")
        # SD 1.x ships PNDM for sampling and a config that also carries DDPM/DDIM keys (clip_sample...),
        # from which training builds its DDPM; written as JSON like the released file.
        # timbrooks/instruct-pix2pix samples with Euler ancestral.
        sched_name = "EulerAncestralDiscreteScheduler" if name == TINY_IP2P else "PNDMScheduler"
        (tmp / "scheduler").mkdir()
        sched_cfg = {"_class_name": sched_name, "_diffusers_version": _diffusers_version(), "skip_prk_steps": True, **arch["scheduler"]}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2))
        pipe_cls = "StableDiffusionInstructPix2PixPipeline" if name == TINY_IP2P else "StableDiffusionPipeline"
        index = {
            "_class_name": pipe_cls,
            "_diffusers_version": _diffusers_version(),
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", sched_name],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        if pipe_cls == "StableDiffusionPipeline":
            index["image_encoder"] = [None, None]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / "TINY_VERSION").write_text(f"{name} {TINY_VERSION} seed={seed}\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def tiny_model_path(name: str = TINY, root: str | Path | None = None) -> Path:
    """Folder of the cached tiny model `name`, built (seeded, deterministic) on first use."""
    folder = Path(root) if root is not None else cache_root() / "models" / name
    stamp = folder / "TINY_VERSION"
    if not (stamp.is_file() and stamp.read_text().split()[:2] == [name, str(TINY_VERSION)]):
        build_random(name, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Loading: hub id, local diffusers folder, single-file checkpoint


def resolve(pretrained: str) -> str:
    """Map the tiny model names to their cached folders; anything else passes through."""
    return str(tiny_model_path(pretrained)) if pretrained in TINY_MODELS else pretrained


def _is_pathlike(s: str) -> bool:
    # Hub ids are `name` or `org/name`; anything with more slashes or a path prefix is a path.
    return s.startswith((".", "/", "~")) or s.endswith(SINGLE_FILE_SUFFIXES) or s.strip("/").count("/") > 1


def _unreachable(pretrained: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"Cannot load model '{pretrained}': it is not a local folder or checkpoint, and fetching it from the "
        f"Hugging Face hub failed ({type(err).__name__}); it needs network access or a local path "
        f"(a diffusers folder or a .safetensors/.ckpt file), and MODEL=tiny runs offline."
    )


def load_components(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    single_file_config: str | None = None,
) -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM training scheduler.

    `pretrained`: `tiny`/`tiny-v`, a hub id, a local diffusers folder, or a `.safetensors`/`.ckpt` file
    (then `single_file_config` names the diffusers folder or hub id whose configs describe it).
    """
    from diffusers import DDPMScheduler

    path = resolve(pretrained)
    local = Path(path).expanduser()
    if local.is_file() or path.endswith(SINGLE_FILE_SUFFIXES):
        if not local.is_file():
            raise ModelLoadError(f"Cannot load model '{pretrained}': no such checkpoint file.")
        return _load_single_file(local, pretrained, single_file_config, dtype)
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelLoadError(
                f"Cannot load model '{pretrained}': {local} is a folder but not a diffusers pipeline "
                f"(no model_index.json); pass a diffusers folder, a hub id or a .safetensors file."
            )
        path = str(local)
    elif _is_pathlike(path):
        raise ModelLoadError(f"Cannot load model '{pretrained}': no such file or folder.")

    kw = dict(revision=revision) if revision else {}
    wkw = dict(kw, variant=variant) if variant else kw
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if local.is_dir():
            absent = [d for d in ("tokenizer", "text_encoder", "vae", "unet", "scheduler") if not (local / d).is_dir()]
            if absent:
                raise ModelLoadError(f"Cannot load model '{pretrained}': {local} lacks {', '.join(absent)}/ (a diffusers "
                                     f"Stable Diffusion folder has tokenizer, text_encoder, vae, unet and scheduler).")
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype, **wkw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **wkw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **wkw)
        scheduler_config = dict(DDPMScheduler.load_config(path, subfolder="scheduler", **kw))
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        if local.is_dir():
            raise ModelLoadError(f"Cannot load model '{pretrained}' from {local}: {err}") from err
        raise _unreachable(pretrained, err) from err
    # transformers 5 returns an empty 2-token tokenizer for a broken tokenizer/ folder instead of raising.
    if len(tokenizer) < 1000:
        raise ModelLoadError(f"Cannot load model '{pretrained}': its tokenizer has {len(tokenizer)} tokens; "
                             f"the tokenizer/ folder is incomplete (needs vocab.json and merges.txt).")
    return SDComponents(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        scheduler_config=scheduler_config,
        source=pretrained,
    )


def _load_single_file(path: Path, pretrained: str, config: str | None, dtype: torch.dtype) -> SDComponents:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    kw: dict[str, Any] = {"torch_dtype": dtype}
    if config is not None:
        kw["config"] = resolve(config)
        kw["local_files_only"] = Path(kw["config"]).is_dir()
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), **kw)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"Cannot load checkpoint '{pretrained}': {err}. Single files hold weights only; the architecture "
            f"comes from a diffusers config, fetched from the hub unless `single_file_config` names a local "
            f"diffusers folder (or `tiny` for files exported from the tiny model)."
        ) from err
    scheduler_config = dict(pipe.scheduler.config)
    return SDComponents(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        scheduler_config=scheduler_config,
        source=pretrained,
    )


SAMPLERS = ("default", "ddim", "dpm++", "euler", "euler_a", "pndm", "ddpm")


def sampling_scheduler(parts: SDComponents, sampler: str = "default"):
    """The model's own sampling scheduler (`default`) or another one built from its config."""
    import diffusers

    classes = {
        "ddim": diffusers.DDIMScheduler,
        "dpm++": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "euler_a": diffusers.EulerAncestralDiscreteScheduler,
        "pndm": diffusers.PNDMScheduler,
        "ddpm": diffusers.DDPMScheduler,
    }
    if sampler == "default":
        cls = getattr(diffusers, parts.scheduler_config.get("_class_name", "PNDMScheduler"), diffusers.PNDMScheduler)
    elif sampler in classes:
        cls = classes[sampler]
    else:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    return cls.from_config(parts.scheduler_config)


def pipeline(parts: SDComponents, sampler: str = "default"):
    """A `StableDiffusionPipeline` sharing `parts`' modules (no copies); no safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=sampling_scheduler(parts, sampler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def instruct_pix2pix_pipeline(parts: SDComponents, sampler: str = "default"):
    """A `StableDiffusionInstructPix2PixPipeline` sharing `parts`' modules; no safety checker."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=sampling_scheduler(parts, sampler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

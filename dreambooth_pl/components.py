"""Stable Diffusion parts (SD 1.x/2.x, SDXL, SD3/3.5, Flux.1): the only module that calls `from_pretrained` /
`from_single_file`.

Loads a hub id, a local diffusers folder, a single-file checkpoint or a tiny model name (`tiny.TINY_MODELS`),
and builds the sampling schedulers and pipelines that share the loaded modules.
"""

from __future__ import annotations

import functools
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlparse

import diffusers
import huggingface_hub
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .backbones import BACKBONES, Backbone, backbone_of, backbone_of_pipeline
from .tiny import TINY_MODELS, tiny_model_path

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # what training and priors load unless told
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# The toy world's pretrained models, trained by `make world` and committed beside the package.
WORLD_ROOT = Path(__file__).resolve().parents[1] / "models" / "world"
WORLD_MODELS = {"world": WORLD_ROOT / "sd", "world-ip2p": WORLD_ROOT / "ip2p"}


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
    tokenizer_2: Any = None  # SDXL's / SD3's second tokenizer and text encoder, Flux's T5; else None
    text_encoder_2: nn.Module | None = None
    tokenizer_3: Any = None  # SD3's T5 (None also when an SD3 pipeline was saved without it)
    text_encoder_3: nn.Module | None = None

    @property
    def backbone(self) -> Backbone:
        return backbone_of(self.unet)

    @property
    def text_encoder_modules(self) -> list[nn.Module]:
        """The text encoders in the backbone's order (one for SD 1.x/2.x, two for SDXL)."""
        return [getattr(self, name) for name in self.backbone.text_encoders]

    @property
    def prediction_type(self) -> str:
        """epsilon / v_prediction (the UNets' DDPM schedule), or flow (the transformers' rectified flow)."""
        return "flow" if self.backbone.objective == "flow" else self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: what `load_components` takes, and part of the class-image cache key.

    Args:
        pretrained: hub id, local diffusers folder, single .safetensors/.ckpt file, or tiny / tiny-v (offline)
        revision: hub revision (branch, tag or commit)
        variant: hub weight variant, e.g. fp16
        single_file_config: for a single-file `pretrained`: the diffusers folder or hub id describing it
    """

    pretrained: str = DEFAULT_MODEL
    revision: str | None = None
    variant: str | None = None
    single_file_config: str | None = None

    def load(self, dtype: torch.dtype = torch.float32) -> SDComponents:
        """The model's parts, loaded through `load_components`."""
        return load_components(self.pretrained, revision=self.revision, variant=self.variant, dtype=dtype,
                               single_file_config=self.single_file_config)


# ---------------------------------------------------------------------------------------------
# Loading: hub id, local diffusers folder, single-file checkpoint


def world_model_path(name: str) -> Path:
    """The committed toy-world model folder of `world` / `world-ip2p`; one clear error when it is missing."""
    folder = WORLD_MODELS[name]
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"Cannot load model '{name}': {folder} holds no trained world model "
                             f"(no model_index.json); `make world` trains it (and the repository ships it).")
    return folder


def rebuild_hint(pretrained: str) -> str:
    """For the world models: how to get a good copy back."""
    return " `make world` rebuilds the world models (or `git checkout models/world`)." if pretrained in WORLD_MODELS else ""


def check_weight_files(local: Path, pretrained: str, parts: tuple[str, ...] = ("text_encoder", "vae", "unet")) -> None:
    """Each part folder of a local pipeline holds a weight file; the error names the folder that does not."""
    for part in parts:
        folder = local / part
        if folder.is_dir() and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise ModelLoadError(f"Cannot load model '{pretrained}': {folder} has no weight file (*.safetensors)."
                                 + rebuild_hint(pretrained))


def resolve(pretrained: str) -> str:
    """Map the tiny and world model names to their folders; anything else passes through."""
    if pretrained in TINY_MODELS:
        return str(tiny_model_path(pretrained))
    return str(world_model_path(pretrained)) if pretrained in WORLD_MODELS else pretrained


def _is_pathlike(s: str) -> bool:
    # Hub ids are `name` or `org/name`; anything with more slashes or a path prefix is a path.
    return s.startswith((".", "/", "~")) or s.endswith(SINGLE_FILE_SUFFIXES) or s.strip("/").count("/") > 1


def _unreachable(pretrained: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"Cannot load model '{pretrained}': it is not a local folder or checkpoint, and fetching it from the "
        f"Hugging Face hub failed ({type(err).__name__}); it needs network access or a local path "
        f"(a diffusers folder or a .safetensors/.ckpt file), and MODEL=tiny runs offline."
    )


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers a TCP connection within `timeout` s (checked once per process)."""
    url = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_access(pretrained: str, kw: dict) -> dict:
    """`from_pretrained` kwargs for a hub id: the local cache only when the Hub cannot be reached, so an offline
    machine fails (or loads from its cache) in seconds instead of minutes of download retries."""
    if huggingface_hub.constants.HF_HUB_OFFLINE or hub_reachable():
        return kw
    cached = huggingface_hub.try_to_load_from_cache(pretrained, "model_index.json", revision=kw.get("revision"))
    if isinstance(cached, str):
        return {**kw, "local_files_only": True}
    raise ModelLoadError(
        f"Cannot load model '{pretrained}': the Hugging Face Hub ({huggingface_hub.constants.ENDPOINT}) cannot be "
        f"reached and the model is not in the local cache ({huggingface_hub.constants.HF_HUB_CACHE}); connect to the "
        f"network, or pass a local diffusers folder or .safetensors file (MODEL=path), or MODEL=world / MODEL=tiny "
        f"offline.")


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
    if not local.is_dir():
        kw = hub_access(pretrained, kw)
    wkw = dict(kw, variant=variant) if variant else kw
    try:
        index = dict(DiffusionPipeline.load_config(path, **kw))  # model_index.json: which parts the pipeline has
        flow = backbone_of_pipeline(index.get("_class_name", ""))
        if flow.objective == "flow":
            return _load_flow_pipeline(flow, path, pretrained, dtype, wkw)
        xl = "text_encoder_2" in index
        if local.is_dir():
            needed = ("tokenizer", "text_encoder", "vae", "unet", "scheduler") + (("tokenizer_2", "text_encoder_2") if xl else ())
            absent = [d for d in needed if not (local / d).is_dir()]
            if absent:
                raise ModelLoadError(f"Cannot load model '{pretrained}': {local} lacks {', '.join(absent)}/ (a diffusers "
                                     f"Stable Diffusion folder has tokenizer, text_encoder, vae, unet and scheduler)."
                                     + rebuild_hint(pretrained))
            check_weight_files(local, pretrained, ("text_encoder", "vae", "unet") + (("text_encoder_2",) if xl else ()))
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype, **wkw)
        second = {}
        if xl:  # SDXL: OpenCLIP-bigG-style second encoder whose projection gives the pooled embedding
            second = dict(
                tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw),
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                           torch_dtype=dtype, **wkw))
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **wkw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **wkw)
        scheduler_config = dict(DDPMScheduler.load_config(path, subfolder="scheduler", **kw))
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        if local.is_dir():
            raise ModelLoadError(f"Cannot load model '{pretrained}' from {local}: {err}{rebuild_hint(pretrained)}") from err
        raise _unreachable(pretrained, err) from err
    if backbone_of(unet).name == "sdxl" and not xl:
        raise ModelLoadError(f"Cannot load model '{pretrained}': its UNet is SDXL's (text and size/crop embeddings) but "
                             f"its model_index.json lists no text_encoder_2 / tokenizer_2; an SDXL pipeline folder "
                             f"has both (save it with StableDiffusionXLPipeline.save_pretrained).")
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
        **second,
    )


def _load_flow_pipeline(backbone: Backbone, path: str, pretrained: str, dtype: torch.dtype, kw: dict) -> SDComponents:
    """An SD3 or Flux pipeline folder (or hub id) through its diffusers pipeline class: its parts, and the rectified-
    flow scheduler that sets its training noise table."""
    pipe = backbone.pipeline_class("text2img").from_pretrained(path, torch_dtype=dtype, **kw)
    scheduler_config = dict(pipe.scheduler.config)
    return SDComponents(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, unet=pipe.transformer,
        noise_scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
        scheduler_config=scheduler_config, source=pretrained, tokenizer_2=pipe.tokenizer_2,
        text_encoder_2=pipe.text_encoder_2, tokenizer_3=getattr(pipe, "tokenizer_3", None),
        text_encoder_3=getattr(pipe, "text_encoder_3", None))


def _index_class(model: str) -> str | None:
    """model_index.json's `_class_name` of a local diffusers folder or a hub id already in the cache; None if
    neither can be read here (no network is touched)."""
    path = Path(resolve(model)).expanduser()
    index = path / "model_index.json"
    if not index.is_file() and not _is_pathlike(model):
        cached = huggingface_hub.try_to_load_from_cache(model, "model_index.json")
        index = Path(cached) if isinstance(cached, str) else index
    try:
        return json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError):
        return None


def single_file_backbone(path: Path, config: str | None) -> Backbone:
    """SD or SDXL for a single-file checkpoint: from its config's pipeline class (a local folder or a cached hub id),
    else from its keys (SDXL files hold `conditioner.embedders.*`, SD ones `cond_stage_model.*`)."""
    name = _index_class(config) if config is not None else None
    if name is not None:
        return backbone_of_pipeline(name)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            if any(k.startswith("conditioner.embedders.") for k in f.keys()):
                return BACKBONES["sdxl"]
    return BACKBONES["sd"]


def backbone_of_model(pretrained: str, single_file_config: str | None = None) -> Backbone:
    """The backbone of a model from its model_index.json (or a single file's keys) alone, no weights loaded; a
    model that cannot be read here (an uncached hub id offline) counts as SD 1.x/2.x."""
    path = Path(resolve(pretrained)).expanduser()
    if path.is_file():
        return single_file_backbone(path, single_file_config)
    return backbone_of_pipeline(_index_class(pretrained) or "")


def _load_single_file(path: Path, pretrained: str, config: str | None, dtype: torch.dtype) -> SDComponents:
    kw: dict[str, Any] = {"torch_dtype": dtype}
    if config is not None:
        kw["config"] = resolve(config)
        kw["local_files_only"] = Path(kw["config"]).is_dir()
    cls = single_file_backbone(path, kw.get("config")).pipeline_class("text2img")
    try:
        pipe = cls.from_single_file(str(path), **kw)
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
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
    )


Sampler = Literal["default", "ddim", "dpm++", "euler", "euler_a", "pndm", "ddpm"]
SAMPLERS = get_args(Sampler)


def sampling_scheduler(parts: SDComponents, sampler: str = "default"):
    """The model's own sampling scheduler (`default`) or another one built from its config. The flow-matching
    models (SD3, Flux) always sample with their own (the DDPM-family samplers do not apply to a rectified flow)."""
    if parts.backbone.objective == "flow":
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler_config)
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


PipelineKind = Literal["text2img", "instruct_pix2pix"]


def pipeline(parts: SDComponents, sampler: str = "default", kind: PipelineKind = "text2img"):
    """The backbone's text-to-image pipeline (or, `kind="instruct_pix2pix"`, its InstructPix2Pix pipeline) sharing
    `parts`' modules (no copies), sampling with `sampler`; no safety checker, no watermark."""
    backbone = parts.backbone
    pipe = backbone.pipeline_class(kind)(**backbone.pipeline_parts(parts), scheduler=sampling_scheduler(parts, sampler))
    pipe.set_progress_bar_config(disable=True)
    return pipe

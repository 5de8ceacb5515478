"""Tiny random Stable Diffusion models (tests, demo): built offline, seeded, cached, in diffusers layout.

The tokenizer is CLIP's real BPE tokenizer, rebuilt from the vocabulary shipped inside the open_clip wheel;
the weights are random (`architectures` gives the shapes, also those of the public SD 1.5 / SD 2.1).
"""

from __future__ import annotations

import gzip
import json
import string
from importlib import resources
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .architectures import architecture
from .files import atomic_path, cache_root

TINY = "tiny"  # epsilon-prediction tiny random SD (SD 1.x layout)
TINY_V = "tiny-v"  # v-prediction tiny random SD (SD 2.x layout)
TINY_IP2P = "tiny-ip2p"  # tiny InstructPix2Pix: 8-channel UNet input (noisy latents ++ image latents)
TINY_XL = "tiny-xl"  # SDXL layout: two text encoders, size/crop conditioning
TINY_XL_IP2P = "tiny-xl-ip2p"  # SDXL InstructPix2Pix layout
TINY_SD3 = "tiny-sd3"  # SD3 layout: MMDiT transformer, two CLIPs + T5, 16-channel VAE, rectified flow
TINY_FLUX = "tiny-flux"  # FLUX.1-dev layout: double + single stream transformer, CLIP + T5, guidance embedding
TINY_MODELS = (TINY, TINY_V, TINY_IP2P, TINY_XL, TINY_XL_IP2P, TINY_SD3, TINY_FLUX)
# Bump when the tiny builder changes so caches made by older code are rebuilt, never silently reused.
TINY_VERSION = 1
STAMP = "TINY_VERSION"  # file in every folder build_random writes: "<arch> <TINY_VERSION> seed=<seed>"

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


def build_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A real CLIP BPE tokenizer (max length 77) saved in `folder` in transformers layout (SDXL's second pads with
    "!")."""
    write_clip_tokenizer(folder)
    # Positional: transformers 4 names these vocab_file/merges_file, transformers 5 vocab/merges.
    tok = CLIPTokenizer(
        str(Path(folder) / "vocab.json"),
        str(Path(folder) / "merges.txt"),
        model_max_length=77,
        pad_token=pad_token,
    )
    tok.save_pretrained(folder)
    return tok


def build_t5_tokenizer(folder: str | Path, clip_vocab: str | Path, words: int = 2000) -> T5Tokenizer:
    """A T5-style tokenizer built offline (a Unigram model with sentencepiece's "▁" word marks, T5's ids <pad> 0,
    </s> 1, <unk> 2): single characters, and CLIP's first `words` whole words as "▁word" pieces (`clip_vocab`:
    a vocab.json from `write_clip_tokenizer`). Saved in `folder` in transformers layout."""
    vocab = json.loads(Path(clip_vocab).read_text())
    whole = [t[:-4] for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])
             if t.endswith("</w>") and t[:-4].isalpha() and len(t) > 5][:words]
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -3.0}
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces.setdefault("▁" + c, -7.0)
        pieces.setdefault(c, -8.0)
    for i, w in enumerate(whole):  # earlier (more frequent) words score higher
        pieces.setdefault("▁" + w, -4.0 - i * 1e-4)
    tok = T5Tokenizer(vocab=list(pieces.items()), extra_ids=0, model_max_length=512)
    tok.save_pretrained(folder)
    return tok


# ---------------------------------------------------------------------------------------------
# Random-initialised models in diffusers layout


def build_random(name: str, folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Build a random-initialised SD of architecture `name`, saved in diffusers layout in `folder` (weights stored
    as `dtype`: fp16 halves the public-size models' disk).

    `folder` is replaced whole and atomically (a crash never leaves a half-written model behind); a non-empty
    folder that is not a model built here is refused, never deleted.
    """
    arch = architecture(name)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / STAMP).is_file():
        raise FileExistsError(f"{folder} exists and is not a model built by dreambooth_pl: choose a new or empty folder")
    if "transformer" in arch:
        return _build_flow(name, arch, folder, seed, dtype)
    # Seeding inside a fork leaves the caller's random stream alone: a fit that builds `tiny` on first use makes
    # the same steps as one that finds it cached.
    with atomic_path(folder, folder=True) as tmp, torch.random.fork_rng(devices=[]):
        build_tokenizer(tmp / "tokenizer")
        torch.manual_seed(seed)
        CLIPTextModel(CLIPTextConfig(**arch["text"])).to(dtype).save_pretrained(tmp / "text_encoder")
        torch.manual_seed(seed + 1)
        AutoencoderKL(**arch["vae"]).to(dtype).save_pretrained(tmp / "vae")
        torch.manual_seed(seed + 2)
        UNet2DConditionModel(**arch["unet"]).to(dtype).save_pretrained(tmp / "unet")
        if "text_2" in arch:  # SDXL: a second tokenizer and text encoder (with the pooled projection)
            build_tokenizer(tmp / "tokenizer_2", pad_token="!")
            torch.manual_seed(seed + 3)
            CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_2"])).to(dtype).save_pretrained(tmp / "text_encoder_2")
        _write_index(name, tmp, arch["scheduler"], xl="text_2" in arch)
        (tmp / STAMP).write_text(f"{name} {TINY_VERSION} seed={seed}\n")
    return folder


def _build_flow(name: str, arch: dict, folder: Path, seed: int, dtype: torch.dtype) -> Path:
    """A tiny SD3 or Flux pipeline (`arch` has a transformer and a T5), random and seeded, saved by its pipeline."""
    sd3 = "text_2" in arch
    with atomic_path(folder, folder=True) as tmp, torch.random.fork_rng(devices=[]):
        tokenizer = build_tokenizer(tmp / "tokenizer")
        t5_tokenizer = build_t5_tokenizer(tmp / ("tokenizer_3" if sd3 else "tokenizer_2"), tmp / "tokenizer" / "vocab.json")
        clip = CLIPTextModelWithProjection if sd3 else CLIPTextModel  # Flux reads CLIP's pooled output, no projection
        torch.manual_seed(seed)
        text_encoder = clip(CLIPTextConfig(**arch["text"]))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**arch["vae"])
        torch.manual_seed(seed + 2)
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **arch["t5"]))
        torch.manual_seed(seed + 3)
        scheduler = FlowMatchEulerDiscreteScheduler(**arch["scheduler"])
        if sd3:
            transformer = SD3Transformer2DModel(**arch["transformer"])
            torch.manual_seed(seed + 4)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_2"]))
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=build_tokenizer(tmp / "tokenizer_2", pad_token="!"),
                text_encoder_3=t5, tokenizer_3=t5_tokenizer)
        else:
            transformer = FluxTransformer2DModel(**arch["transformer"])
            pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)
        pipe.to(dtype).save_pretrained(tmp)
        (tmp / STAMP).write_text(f"{name} {TINY_VERSION} seed={seed}\n")
    return folder


def _write_index(name: str, folder: Path, scheduler: dict, xl: bool = False) -> None:
    """`scheduler/scheduler_config.json` and `model_index.json`, as in the released models."""
    # SD 1.x ships PNDM for sampling and a config that also carries DDPM/DDIM keys (clip_sample...),
    # from which training builds its DDPM; written as JSON like the released file.
    # timbrooks/instruct-pix2pix samples with Euler ancestral, SDXL with Euler.
    sched_name = "EulerAncestralDiscreteScheduler" if name == TINY_IP2P else "EulerDiscreteScheduler" if xl else "PNDMScheduler"
    (folder / "scheduler").mkdir()
    sched_cfg = {
        "_class_name": sched_name, "_diffusers_version": diffusers.__version__, "skip_prk_steps": True, **scheduler,
    }
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2))
    pipe_cls = {TINY_IP2P: "StableDiffusionInstructPix2PixPipeline", TINY_XL_IP2P: "StableDiffusionXLInstructPix2PixPipeline"
                }.get(name, "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline")
    if xl:
        index = {
            "_class_name": pipe_cls,
            "_diffusers_version": diffusers.__version__,
            "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", sched_name],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        return
    index = {
        "_class_name": pipe_cls,
        "_diffusers_version": diffusers.__version__,
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
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def tiny_model_path(name: str = TINY, root: str | Path | None = None) -> Path:
    """Folder of the cached tiny model `name`, built (seeded, deterministic) on first use."""
    folder = Path(root) if root is not None else cache_root() / "models" / name
    stamp = folder / STAMP
    if not (stamp.is_file() and stamp.read_text().split()[:2] == [name, str(TINY_VERSION)]):
        build_random(name, folder)
    return folder

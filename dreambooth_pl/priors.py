"""Class-prior images: generated once with the base model, cached by content, resumable, sharded by Lightning."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import components
from .components import ModelSource, Sampler
from .files import cache_root, write_image, write_text

MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"
# Images are PNG: lossless and byte-deterministic, so a resumed run equals an uninterrupted one.
SUFFIX = ".png"


class PriorCacheError(ValueError):
    """A class-image folder was made with other settings than the ones asked for."""


@dataclass(frozen=True)
class PriorSampling:
    """How the class-prior images are sampled (the `data.prior:` group); all but `batch_size` key the cache.

    Args:
        sampler: sampling scheduler; `default` = the model's own (PNDM for SD 1.5, as the paper did)
        steps: sampling steps (the `default` sampler: 50)
        guidance_scale: classifier-free guidance scale
        negative_prompt: negative prompt ("" for none)
        seed: image i comes from seed + i alone
        batch_size: images per batch; null = as large as GPU memory allows (4 on CPU)
    """

    sampler: Sampler = "dpm++"
    steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    seed: int = 0
    batch_size: int | None = None


@dataclass(frozen=True)
class PriorSettings:
    """Everything that decides what the class images look like; its hash is the cache key."""

    model: ModelSource
    prompt: str
    resolution: int
    sampling: PriorSampling = PriorSampling()

    def identity(self) -> dict:
        """The settings as one flat record, the model also as its fingerprint (hub id + revision, or content hash)."""
        m, s = self.model, self.sampling
        return dict(model=m.pretrained, prompt=self.prompt, negative_prompt=s.negative_prompt, sampler=s.sampler,
                    steps=s.steps, guidance_scale=s.guidance_scale, resolution=self.resolution, revision=m.revision,
                    variant=m.variant, single_file_config=m.single_file_config, base_seed=s.seed,
                    model_fingerprint=model_fingerprint(m.pretrained, m.revision))

    def key(self) -> str:
        # Variant (fp16 weights) and the single-file config do not change what the model is.
        ident = {k: v for k, v in self.identity().items() if k not in ("model", "variant", "single_file_config")}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(model: str, revision: str | None = None) -> str:
    """Hub id@revision, or a hash of a local folder/file (names, sizes, configs, weight heads and tails)."""
    path = Path(components.resolve(model)).expanduser()
    if not path.exists():
        return f"hub:{model}@{revision or 'main'}"
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if f != path else f.name}:{size}\n".encode())
        with f.open("rb") as fh:
            if size <= 2 << 20:
                h.update(fh.read())
            else:  # weights: the first and last MiB tell different checkpoints apart without reading GBs
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return f"sha256:{h.hexdigest()[:24]}"


def default_folder(settings: PriorSettings) -> Path:
    return cache_root() / "priors" / settings.key()


def image_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"{index:05d}{SUFFIX}"


def is_valid_image(path: Path, resolution: int) -> bool:
    """True when the file decodes completely at the expected size (truncated files fail)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.size == (resolution, resolution)
    except (OSError, ValueError, SyntaxError):
        return False


def check_folder(folder: Path, settings: PriorSettings) -> None:
    """Refuse a folder whose recorded settings differ from `settings`, naming each difference."""
    f = Path(folder) / SETTINGS
    if not f.is_file():
        return
    recorded = json.loads(f.read_text())
    if recorded.get("key") == settings.key():
        return
    want = settings.identity()
    have = recorded.get("settings", {})
    diffs = [f"{k}: folder has {have.get(k)!r}, this run asks {want[k]!r}" for k in want if have.get(k) != want[k]
             and k not in ("model", "variant", "single_file_config")]
    raise PriorCacheError(
        f"class-image folder {folder} was made with other settings ({'; '.join(diffs) or 'different key'}); "
        f"images made with other settings are never mixed into a run: choose another folder "
        f"(or leave data.class_dir unset to use the content-keyed cache) or delete {folder}."
    )


def scan(folder: Path, settings: PriorSettings, num_images: int) -> tuple[list[int], list[int]]:
    """(valid indices, missing indices) below num_images; removes temp leftovers and corrupt files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for tmp in folder.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)  # a killed writer's partial file; its image is simply remade
    valid, missing = [], []
    for i in range(num_images):
        p = image_path(folder, i)
        if p.is_file() and is_valid_image(p, settings.resolution):
            valid.append(i)
        else:
            p.unlink(missing_ok=True)
            missing.append(i)
    return valid, missing


def write_settings(folder: Path, settings: PriorSettings) -> None:
    write_text(Path(folder) / SETTINGS, json.dumps({"key": settings.key(), "settings": settings.identity()}, indent=2))


def made_on(dev: torch.device) -> str:
    """Where images are made, for the manifest: on the CPU the thread count changes the kernels' sums, so the pixels
    can differ by a grey level between 1 and 2 threads (measured on the toy world)."""
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"{dev.type} ({torch.get_num_threads()} threads)"


def write_manifest(folder: Path, settings: PriorSettings, indices: list[int], made: dict[int, str] | None = None) -> None:
    """One JSON line per image: index, file, seed, the settings key and where it was made (`made`: this run's
    images; the others keep what the folder's manifest said)."""
    s, path = settings.sampling, Path(folder) / MANIFEST
    old = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                record = json.loads(line)
                old[record["index"]] = record.get("made_on")
    where = {**old, **(made or {})}
    lines = [json.dumps({"index": i, "file": image_path(folder, i).name, "seed": s.seed + i,
                         "key": settings.key(), "prompt": settings.prompt, "sampler": s.sampler,
                         "steps": s.steps, "guidance_scale": s.guidance_scale,
                         "resolution": settings.resolution, "made_on": where.get(i)}) for i in sorted(indices)]
    write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def auto_batch_size(resolution: int, device: torch.device) -> int:
    """Largest batch that comfortably fits: ~0.6 GiB per 512 px image (CFG doubles the UNet batch) on CUDA."""
    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    per_image = 0.6 * (1 << 30) * (resolution / 512) ** 2
    return int(max(1, min(64, (free - (4 << 30)) // per_image)))


class _Blocks(Dataset):
    """Block ids to (re)generate. A block is a fixed, index-aligned run of `batch_size` images, so a
    resumed run batches every image exactly as an uninterrupted run does (identical numerics)."""

    def __init__(self, blocks: list[int]):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> int:
        return self.blocks[i]


class PriorGenerator(pl.LightningModule):
    """Makes class images as Lightning prediction: one `predict_step` per block of seeds."""

    def __init__(self, settings: PriorSettings, folder: str | Path, num_images: int, batch_size: int, missing: list[int]):
        super().__init__()
        self.settings = settings
        self.folder = Path(folder)
        self.num_images = num_images
        self.batch_size = batch_size
        self.missing = set(missing)
        parts = settings.model.load()
        self.pipe = components.pipeline(parts, sampler=settings.sampling.sampler)
        self.pipe_kwargs = parts.backbone.sample_kwargs  # SD3 / Flux: T5's length, as training encodes prompts
        # Registered as children so Lightning moves them to the device and applies its precision.
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.text_encoder_2 = parts.text_encoder_2  # SDXL's / SD3's second encoder, Flux's T5; None for SD 1.x/2.x
        self.text_encoder_3 = parts.text_encoder_3  # SD3's T5
        self.requires_grad_(False).eval()

    def blocks(self) -> list[int]:
        return sorted({i // self.batch_size for i in self.missing})

    def predict_dataloader(self) -> DataLoader:
        # batch_size=None: each item is one block id; Lightning's distributed sampler shards blocks over ranks.
        return DataLoader(_Blocks(self.blocks()), batch_size=None, shuffle=False)

    def generate_block(self, block: int) -> list[int]:
        """Render every image of the block (same batch as an uninterrupted run), write the missing ones."""
        s, sampling = self.settings, self.settings.sampling
        indices = list(range(block * self.batch_size, min((block + 1) * self.batch_size, self.num_images)))
        # Image i comes from seed base_seed + i alone: its own generator for latents and sampler noise.
        # CPU generators: the same initial noise on any device.
        gens = [torch.Generator("cpu").manual_seed(sampling.seed + i) for i in indices]
        images = self.pipe(
            prompt=[s.prompt] * len(indices),
            negative_prompt=[sampling.negative_prompt] * len(indices) if sampling.negative_prompt else None,
            num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            height=s.resolution,
            width=s.resolution,
            generator=gens,
            output_type="pil",
            **self.pipe_kwargs,
        ).images
        written = []
        for i, img in zip(indices, images, strict=True):
            if i in self.missing:
                write_image(img, image_path(self.folder, i))
                written.append(i)
        return written

    def predict_step(self, batch, batch_idx: int) -> list[int]:
        return self.generate_block(int(batch))


@dataclass
class PriorResult:
    folder: Path
    reused: int
    made: int

    def __str__(self) -> str:
        return f"{self.reused + self.made} class images in {self.folder} ({self.reused} reused, {self.made} made)"


def _make(settings: PriorSettings, folder: Path, num_images: int, missing: list[int], dev: torch.device,
          trainer_kwargs: dict, use_trainer: bool) -> None:
    """Render the `missing` images: Lightning prediction (precision, progress, DDP sharding) or a plain loop on `dev`."""
    bs = settings.sampling.batch_size or auto_batch_size(settings.resolution, dev)
    gen = PriorGenerator(settings, folder, num_images, bs, missing)
    print(f"Generating {len(missing)} class images for '{settings.prompt}' in {folder} ({settings.sampling.sampler}, "
          f"{settings.sampling.steps} steps, batch {bs}, {len(gen.blocks())} batches)", file=sys.stderr)
    if use_trainer:
        tk = dict(trainer_kwargs)
        tk.setdefault("logger", False)
        tk.setdefault("enable_model_summary", False)
        tk.setdefault("precision", "bf16-mixed" if dev.type == "cuda" else "32-true")
        tk.setdefault("callbacks", [pl.callbacks.TQDMProgressBar(), ImagesPerSecond()])
        pl.Trainer(**tk).predict(gen, return_predictions=False)
        return
    gen.to(dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        for b in tqdm(gen.blocks(), desc="class images", unit="batch"):
            gen.generate_block(b)


def generate(
    settings: PriorSettings,
    num_images: int,
    folder: str | Path | None = None,
    trainer_kwargs: dict | None = None,
    device: torch.device | str | None = None,
) -> PriorResult:
    """Ensure `folder` (default: the content-keyed cache) holds images 0..num_images-1 for `settings`.

    Runs `Trainer.predict` (precision, progress bar, DDP sharding from Lightning) unless `device` is
    given: then a plain loop on that device, for use inside another run (fit's `prepare_data`).
    """
    folder = Path(folder) if folder is not None else default_folder(settings)
    check_folder(folder, settings)
    valid, missing = scan(folder, settings, num_images)
    write_settings(folder, settings)
    made: dict[int, str] = {}
    if missing:
        tk = dict(trainer_kwargs or {})
        if device is not None:
            dev = torch.device(device)
        else:
            gpu = torch.cuda.is_available() and tk.get("accelerator", "auto") in ("auto", "gpu", "cuda")
            dev = torch.device("cuda" if gpu else "cpu")
        # Loading and sampling draw from the global random stream: fork it, so that a fit makes the same
        # steps whether its class images were made now or found in the cache.
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            _make(settings, folder, num_images, missing, dev, tk, use_trainer=device is None)
        made = dict.fromkeys(missing, made_on(dev))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    valid_now, still_missing = scan(folder, settings, num_images)
    write_manifest(folder, settings, valid_now, made)
    if still_missing:
        raise RuntimeError(f"class-image generation left {len(still_missing)} images missing in {folder}; rerun to make them")
    return PriorResult(folder=folder, reused=len(valid), made=len(valid_now) - len(valid))


class ImagesPerSecond(pl.Callback):
    """Shows images/s in the prediction progress bar and prints the total at the end."""

    def __init__(self):
        self.count = 0
        self.start = 0.0

    def on_predict_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.count += len(outputs)
        rate = self.count / max(1e-9, time.perf_counter() - self.start)
        bar = getattr(trainer.progress_bar_callback, "predict_progress_bar", None)
        if bar is not None and hasattr(bar, "set_postfix"):
            bar.set_postfix({"images/s": f"{rate:.2f}"})

    def on_predict_end(self, trainer, pl_module):
        dt = time.perf_counter() - self.start
        if self.count:
            print(f"Made {self.count} images in {dt:.1f} s ({self.count / dt:.2f} images/s)", file=sys.stderr)

"""Class-prior images: generated once with the base model, cached by content, resumable, sharded by Lightning."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import components

MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"
# Images are PNG: lossless and byte-deterministic, so a resumed run equals an uninterrupted one.
SUFFIX = ".png"


class PriorCacheError(ValueError):
    """A class-image folder was made with other settings than the ones asked for."""


@dataclass(frozen=True)
class PriorSettings:
    """Everything that decides what the class images look like; its hash is the cache key."""

    model: str
    prompt: str
    negative_prompt: str = ""
    sampler: str = "dpm++"
    steps: int = 25
    guidance_scale: float = 7.5
    resolution: int = 512
    revision: str | None = None
    variant: str | None = None
    single_file_config: str | None = None
    base_seed: int = 0

    def identity(self) -> dict:
        """The settings with the model replaced by its fingerprint (hub id + revision, or content hash)."""
        d = dataclasses.asdict(self)
        d["model_fingerprint"] = model_fingerprint(self.model, self.revision)
        return d

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
    return components.cache_root() / "priors" / settings.key()


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
    atomic_write_text(Path(folder) / SETTINGS, json.dumps({"key": settings.key(), "settings": settings.identity()}, indent=2))


def write_manifest(folder: Path, settings: PriorSettings, indices: list[int]) -> None:
    """One JSON line per image: index, file, seed and the settings key."""
    lines = [json.dumps({"index": i, "file": image_path(folder, i).name, "seed": settings.base_seed + i,
                         "key": settings.key(), "prompt": settings.prompt, "sampler": settings.sampler,
                         "steps": settings.steps, "guidance_scale": settings.guidance_scale,
                         "resolution": settings.resolution}) for i in sorted(indices)]
    atomic_write_text(Path(folder) / MANIFEST, "\n".join(lines) + ("\n" if lines else ""))


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name beside `path`, then rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_image_atomic(img: Image.Image, path: Path) -> None:
    """Write to a temporary name, fsync, rename: a kill leaves either no file or a whole one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as fh:
        img.save(fh, format="PNG")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
        parts = components.load_components(settings.model, revision=settings.revision, variant=settings.variant,
                                           single_file_config=settings.single_file_config)
        self.pipe = components.pipeline(parts, sampler=settings.sampler)
        # Registered as children so Lightning moves them to the device and applies its precision.
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.requires_grad_(False).eval()

    def blocks(self) -> list[int]:
        return sorted({i // self.batch_size for i in self.missing})

    def predict_dataloader(self) -> DataLoader:
        # batch_size=None: each item is one block id; Lightning's distributed sampler shards blocks over ranks.
        return DataLoader(_Blocks(self.blocks()), batch_size=None, shuffle=False)

    def generate_block(self, block: int) -> list[int]:
        """Render every image of the block (same batch as an uninterrupted run), write the missing ones."""
        s = self.settings
        indices = list(range(block * self.batch_size, min((block + 1) * self.batch_size, self.num_images)))
        # Image i comes from seed base_seed + i alone: its own generator for latents and sampler noise.
        # CPU generators: the same initial noise on any device.
        gens = [torch.Generator("cpu").manual_seed(s.base_seed + i) for i in indices]
        images = self.pipe(
            prompt=[s.prompt] * len(indices),
            negative_prompt=[s.negative_prompt] * len(indices) if s.negative_prompt else None,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale,
            height=s.resolution,
            width=s.resolution,
            generator=gens,
            output_type="pil",
        ).images
        written = []
        for i, img in zip(indices, images, strict=True):
            if i in self.missing:
                save_image_atomic(img, image_path(self.folder, i))
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


def generate(
    settings: PriorSettings,
    num_images: int,
    folder: str | Path | None = None,
    batch_size: int | None = None,
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
    if missing:
        tk = dict(trainer_kwargs or {})
        if device is not None:
            dev = torch.device(device)
        else:
            gpu = torch.cuda.is_available() and tk.get("accelerator", "auto") in ("auto", "gpu", "cuda")
            dev = torch.device("cuda" if gpu else "cpu")
        bs = batch_size or auto_batch_size(settings.resolution, dev)
        gen = PriorGenerator(settings, folder, num_images, bs, missing)
        print(f"Generating {len(missing)} class images for '{settings.prompt}' in {folder} "
              f"({settings.sampler}, {settings.steps} steps, batch {bs}, {len(gen.blocks())} batches)", file=sys.stderr)
        if device is None:
            tk.setdefault("logger", False)
            tk.setdefault("enable_model_summary", False)
            tk.setdefault("precision", "bf16-mixed" if dev.type == "cuda" else "32-true")
            tk.setdefault("callbacks", [pl.callbacks.TQDMProgressBar(), ImagesPerSecond()])
            pl.Trainer(**tk).predict(gen, return_predictions=False)
        else:
            from tqdm.auto import tqdm

            gen.to(dev)
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
            with torch.inference_mode(), amp:
                for b in tqdm(gen.blocks(), desc="class images", unit="batch"):
                    gen.generate_block(b)
        del gen
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    valid_now, still_missing = scan(folder, settings, num_images)
    write_manifest(folder, settings, valid_now)
    if still_missing:
        raise RuntimeError(f"class-image generation left {len(still_missing)} images missing in {folder}; rerun to make them")
    return PriorResult(folder=folder, reused=len(valid), made=len(valid_now) - len(valid))


class ImagesPerSecond(pl.Callback):
    """Shows images/s in the prediction progress bar and prints the total at the end."""

    def __init__(self):
        self.count = 0
        self.start = 0.0

    def on_predict_start(self, trainer, pl_module):
        import time

        self.start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        import time

        self.count += len(outputs)
        rate = self.count / max(1e-9, time.perf_counter() - self.start)
        bar = getattr(trainer.progress_bar_callback, "predict_progress_bar", None)
        if bar is not None and hasattr(bar, "set_postfix"):
            bar.set_postfix({"images/s": f"{rate:.2f}"})

    def on_predict_end(self, trainer, pl_module):
        import time

        dt = time.perf_counter() - self.start
        if self.count:
            print(f"Made {self.count} images in {dt:.1f} s ({self.count / dt:.2f} images/s)", file=sys.stderr)


def image_grid(paths_or_images: list, cols: int = 4, size: int = 128) -> Image.Image:
    """Tile images (paths or PIL) into one grid image, each resized to `size` px square."""
    imgs = [Image.open(p).convert("RGB") if not isinstance(p, Image.Image) else p for p in paths_or_images]
    rows = max(1, math.ceil(len(imgs) / cols))
    grid = Image.new("RGB", (cols * size, rows * size), "white")
    for k, img in enumerate(imgs):
        grid.paste(img.resize((size, size)), ((k % cols) * size, (k // cols) * size))
    return grid

"""The files a run writes: one atomic writer (text, JSON, images, tensors, folders) and the image grids."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save_file

# Temporary names start with a dot and contain `.tmp`: readers that list a folder skip them, and a
# resumed job removes the ones a killed writer left (`priors.scan`).
TMP_MARK = ".tmp"


def cache_root() -> Path:
    """Project cache folder: `$DREAMBOOTH_PL_CACHE` or `./cache`."""
    return Path(os.environ.get("DREAMBOOTH_PL_CACHE", "cache"))


def as_record(value):
    """Config values as plain data (dataclass groups become dicts): what YAML, W&B and safe checkpoints hold."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return as_record(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: as_record(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_record(v) for v in value)
    return value


def _fsync_tree(path: Path) -> None:
    """Flush a file, or every file below a folder, to disk before it is renamed into place."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


@contextmanager
def atomic_path(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it onto `path`.

    Readers see the old file (or folder) or the new one, never half of one; a failure leaves the old one as
    it was and removes the temporary. `folder=True` yields an empty temporary folder and swaps whole folders.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_MARK, dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp makes 0700; the result is a normal shared folder
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_MARK, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if not folder:
            tmp.chmod(0o644)  # after the block: writers that replace the file (safetensors >= 0.8) leave 0600
        _fsync_tree(tmp)
        if folder and path.exists():
            # Folders cannot be replaced in one rename: move the old one aside, then drop it.
            old = path.with_name(f".{path.name}.old{TMP_MARK}")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Text file, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, payload: dict) -> Path:
    """JSON file (indented), atomically."""
    return write_text(path, json.dumps(payload, indent=2, default=str))


def write_image(img: Image.Image, path: str | Path) -> Path:
    """PNG (lossless, byte-deterministic: a resumed job equals an uninterrupted one), atomically."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def write_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """One `.safetensors` file (string metadata), atomically."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


# ------------------------------------------------------------------------------------------------- images


def square(img: Image.Image, size: int) -> Image.Image:
    """Center crop to a square and resize: a photo as the models and the grids see it."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def image_grid(paths_or_images: list, cols: int = 4, size: int = 128) -> Image.Image:
    """Tile images (paths or PIL) into one grid image, each resized to `size` px square."""
    imgs = [Image.open(p).convert("RGB") if not isinstance(p, Image.Image) else p for p in paths_or_images]
    rows = max(1, math.ceil(len(imgs) / cols))
    grid = Image.new("RGB", (cols * size, rows * size), "white")
    for k, img in enumerate(imgs):
        grid.paste(img.resize((size, size)), ((k % cols) * size, (k // cols) * size))
    return grid


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font, readable labels
    except TypeError:
        return ImageFont.load_default()


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], title: str, path: str | Path, size: int = 128,
                  label_w: int = 130) -> Path:
    """Rows of images with a label each and a title on top (stages of a prompt; real | DreamBooth | IP2P)."""
    head = 24
    cols = max(len(imgs) for _, imgs in rows)
    grid = Image.new("RGB", (label_w + cols * size, head + len(rows) * size), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), title, fill="black", font=_font())
    for r, (label, imgs) in enumerate(rows):
        draw.text((4, head + r * size + size // 2 - 8), label, fill="black", font=_font())
        for c, img in enumerate(imgs):
            grid.paste(img.convert("RGB").resize((size, size)), (label_w + c * size, head + r * size))
    return write_image(grid, path)

"""dreambooth_pl.files: the atomic writers (files and folders), as_record, the image grids, cache_root."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth_pl import files
from dreambooth_pl.files import (
    as_record,
    atomic_path,
    cache_root,
    image_grid,
    labelled_grid,
    square,
    write_image,
    write_json,
    write_tensors,
    write_text,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def names(folder: Path) -> list[str]:
    """Everything in `folder`, hidden temporaries included."""
    return sorted(p.name for p in folder.iterdir())


def solid(color: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return img.convert("RGB").getpixel(xy)


# ------------------------------------------------------------------------------------------ the writers


def test_write_text_and_json(tmp_path):
    p = write_text(tmp_path / "sub" / "notes.txt", "héllo\nwörld\n")  # the parent folder is made
    assert p == tmp_path / "sub" / "notes.txt"
    assert p.read_text(encoding="utf-8") == "héllo\nwörld\n"
    assert mode(p) == 0o644
    write_text(p, "second")  # replaces the file
    assert p.read_text() == "second"
    payload = {"loss": 0.25, "steps": [1, 2], "run": {"name": "x"}, "folder": Path("a/b")}
    j = write_json(tmp_path / "sub" / "m.json", payload)
    assert json.loads(j.read_text()) == {**payload, "folder": "a/b"}  # paths and the like as strings
    assert j.read_text() == json.dumps({**payload, "folder": "a/b"}, indent=2)
    assert mode(j) == 0o644
    assert names(tmp_path / "sub") == ["m.json", "notes.txt"]  # no temporary left


def test_write_image_is_lossless_png(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    p = write_image(Image.fromarray(arr), tmp_path / "img.png")
    with Image.open(p) as back:
        assert back.format == "PNG" and back.size == (30, 20)
        assert np.array_equal(np.asarray(back), arr)
    assert mode(p) == 0o644
    first = p.read_bytes()
    write_image(Image.fromarray(arr), p)
    assert p.read_bytes() == first  # byte-deterministic
    assert names(tmp_path) == ["img.png"]


def test_write_tensors_round_trip_with_metadata(tmp_path):
    tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.tensor([1, 2], dtype=torch.int64)}
    p = write_tensors(tensors, tmp_path / "lora.safetensors", metadata={"rank": "4", "format": "pt"})
    back = load_file(p)
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"rank": "4", "format": "pt"}
    assert mode(p) == 0o644  # not the 0600 some safetensors versions leave
    assert names(tmp_path) == ["lora.safetensors"]


# ------------------------------------------------------------------------------------------ atomic_path


def test_atomic_path_temporary_is_hidden_beside_the_target(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.") and files.TMP_MARK in tmp.name
        assert tmp.match(".*.tmp*")  # the pattern priors.scan removes after a killed writer
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers see the old file until the block ends
    assert target.read_text() == "new"
    assert names(tmp_path) == ["out.txt"]


def test_atomic_path_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    target.chmod(0o600)
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and mode(target) == 0o600  # untouched
    assert names(tmp_path) == ["out.txt"]  # the temporary is gone
    # With no old file, a failure leaves nothing at all.
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "new.txt") as tmp:
        tmp.write_text("x")
        raise RuntimeError("boom")
    assert names(tmp_path) == ["out.txt"]


def test_atomic_folder_replaces_the_folder_whole(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, folder=True) as tmp:
        assert tmp.is_dir() and list(tmp.iterdir()) == [] and tmp.parent == tmp_path
        (tmp / "a.txt").write_text("a1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b1")
    assert (target / "a.txt").read_text() == "a1" and (target / "sub" / "b.txt").read_text() == "b1"
    assert mode(target) == 0o755
    with atomic_path(target, folder=True) as tmp:
        (tmp / "c.txt").write_text("c2")
        assert (target / "a.txt").read_text() == "a1"  # the old folder stays until the block ends
    assert sorted(p.name for p in target.rglob("*")) == ["c.txt"]  # nothing of the old folder is kept
    assert (target / "c.txt").read_text() == "c2"
    assert names(tmp_path) == ["model"]  # no temporary, no set-aside old folder


def test_atomic_folder_failure_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "a.txt").write_text("a1")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target, folder=True) as tmp:
        (tmp / "a.txt").write_text("a2")
        (tmp / "b.txt").write_text("b2")
        raise RuntimeError("boom")
    assert names(target) == ["a.txt"] and (target / "a.txt").read_text() == "a1"
    assert names(tmp_path) == ["model"]


# ------------------------------------------------------------------------------------------ as_record


@dataclasses.dataclass
class Inner:
    rank: int = 4
    targets: tuple[str, ...] = ("to_q", "to_v")


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    many: list = dataclasses.field(default_factory=lambda: [Inner(rank=1), 2.5])
    path: Path = Path("a/b")
    name: str | None = None


def test_as_record_turns_dataclasses_into_dicts():
    record = as_record({"model": Outer(), "lr": 1e-4, "kind": Inner, "none": None})
    assert record == {
        "model": {
            "inner": {"rank": 4, "targets": ("to_q", "to_v")},
            "many": [{"rank": 1, "targets": ("to_q", "to_v")}, 2.5],
            "path": Path("a/b"),
            "name": None,
        },
        "lr": 1e-4,
        "kind": Inner,  # a class is a value, not an instance to convert
        "none": None,
    }
    assert type(record["model"]["many"]) is list and type(record["model"]["inner"]["targets"]) is tuple
    assert as_record(Inner(rank=8)) == {"rank": 8, "targets": ("to_q", "to_v")}
    assert as_record([Inner(), (Inner(rank=2),)]) == [{"rank": 4, "targets": ("to_q", "to_v")},
                                                       ({"rank": 2, "targets": ("to_q", "to_v")},)]
    for value in (3, "x", None, Path("p"), 0.5):
        assert as_record(value) == value and type(as_record(value)) is type(value)


# ------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("size", [(120, 80), (80, 120)])
def test_square_takes_the_centre(size):
    # A blue centre square with red bands on the long sides: the crop keeps only the blue.
    w, h = size
    img = solid(RED, size)
    side = min(size)
    left, top = (w - side) // 2, (h - side) // 2
    img.paste(solid(BLUE, (side, side)), (left, top))
    out = square(img, 48)
    assert out.size == (48, 48)
    assert np.array_equal(np.asarray(out), np.broadcast_to(np.array(BLUE, np.uint8), (48, 48, 3)))


def test_image_grid_layout(tmp_path):
    colors = [RED, GREEN, BLUE, RED, GREEN]
    paths = []
    for k, c in enumerate(colors[:2]):  # paths and PIL images mix
        paths.append(tmp_path / f"{k}.png")
        solid(c, (10, 14)).save(paths[-1])
    grid = image_grid([*paths, *(solid(c, (40, 20)) for c in colors[2:])], cols=4, size=32)
    assert grid.size == (4 * 32, 2 * 32)
    for k, c in enumerate(colors):
        x, y = (k % 4) * 32, (k // 4) * 32
        assert pixel(grid, (x + 1, y + 1)) == c and pixel(grid, (x + 30, y + 30)) == c
    assert pixel(grid, (1 * 32 + 16, 32 + 16)) == WHITE  # the empty cells stay white
    assert pixel(grid, (3 * 32 + 16, 32 + 16)) == WHITE
    assert image_grid([], cols=3, size=16).size == (48, 16)


def test_labelled_grid_layout(tmp_path):
    rows = [("real", [solid(RED)] * 3), ("dreambooth", [solid(GREEN), solid(BLUE)])]
    p = labelled_grid(rows, "a sks can", tmp_path / "grids" / "g.png", size=32, label_w=50)
    assert p == tmp_path / "grids" / "g.png" and mode(p) == 0o644
    with Image.open(p) as grid:
        assert grid.format == "PNG" and grid.size == (50 + 3 * 32, 24 + 2 * 32)  # label column, title row
        for r, (_, imgs) in enumerate(rows):
            for c, img in enumerate(imgs):
                x, y = 50 + c * 32, 24 + r * 32
                assert pixel(grid, (x + 1, y + 1)) == pixel(img, (0, 0))
                assert pixel(grid, (x + 30, y + 30)) == pixel(img, (0, 0))
        assert pixel(grid, (50 + 2 * 32 + 16, 24 + 32 + 16)) == WHITE  # the short row's missing cell
        title = np.asarray(grid.crop((0, 0, 50 + 3 * 32, 24)))
        label = np.asarray(grid.crop((0, 24, 50, 24 + 32)))
        assert (title < 128).any() and (label < 128).any()  # dark text on white
    assert names(tmp_path / "grids") == ["g.png"]


# ------------------------------------------------------------------------------------------ cache_root


def test_cache_root_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_PL_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("DREAMBOOTH_PL_CACHE")
    assert cache_root() == Path("cache")

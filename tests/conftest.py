"""Shared fixtures: the tiny random Stable Diffusion (seeded, once per session), photos, W&B reader."""

from __future__ import annotations

import os
import struct
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.pop("WANDB_API_KEY", None)

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_flush_denormal(True)  # as the CLI does: denormals in random weights slow CPU kernels 30x

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "dreambooth"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Point the project cache at a session folder so `tiny` builds there, not in ./cache."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("DREAMBOOTH_PL_CACHE")
    os.environ["DREAMBOOTH_PL_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("DREAMBOOTH_PL_CACHE", None)
    else:
        os.environ["DREAMBOOTH_PL_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(model_cache) -> Path:
    """The tiny epsilon-prediction model in diffusers layout (what `pretrained: tiny` loads)."""
    from dreambooth_pl.components import tiny_model_path

    torch.manual_seed(0)
    return tiny_model_path("tiny")


@pytest.fixture(scope="session")
def tiny_v_dir(model_cache) -> Path:
    from dreambooth_pl.components import tiny_model_path

    return tiny_model_path("tiny-v")


def make_photos(folder: Path, n: int, size: tuple[int, int] = (80, 96), seed: int = 0, kind: str = "pattern") -> Path:
    """Write n deterministic RGB JPEGs: smooth coloured patterns (learnable) or noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    for i in range(n):
        if kind == "noise":
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            f = rng.uniform(1, 4, 3)
            arr = np.stack([np.sin(2 * np.pi * (f[c] * xx + (c + 1) * yy) + i) for c in range(3)], -1)
            arr = ((arr + 1) * 127.5).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:02d}.jpg", quality=95)
    return folder


@pytest.fixture
def photos(tmp_path) -> dict[str, Path]:
    """4 instance photos and 6 class photos in tmp_path."""
    return {
        "instance": make_photos(tmp_path / "instance", 4, seed=1),
        "class": make_photos(tmp_path / "class", 6, seed=2, kind="noise"),
    }


def read_wandb_run(run_dir: Path) -> dict:
    """Parse an offline W&B run's `.wandb` log: {'history': [{key: value}], 'config': {key: json}}."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = list(Path(run_dir).glob("run-*.wandb"))
    assert files, f"no .wandb log in {run_dir}"
    data = files[0].read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    # LevelDB-style log: 32 KiB blocks of records (crc32, length, type); FIRST/MIDDLE/LAST chunks join.
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, typ = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if typ == 1:
            records.append(payload)
        elif typ == 2:
            buf = payload
        elif typ == 3:
            buf += payload
        elif typ == 4:
            records.append(buf + payload)
    out: dict = {"history": [], "config": {}, "kinds": set()}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        out["kinds"].add(kind)
        if kind == "history":
            out["history"].append({it.key or "/".join(it.nested_key): it.value_json for it in rec.history.item})
        elif kind == "config":
            for it in rec.config.update:
                out["config"][it.key or "/".join(it.nested_key)] = it.value_json
    return out


@pytest.fixture
def wandb_run():
    return read_wandb_run

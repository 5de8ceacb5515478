"""Shared fixtures: the tiny random Stable Diffusion (seeded, once per session), photos, W&B reader."""

from __future__ import annotations

import importlib.util
import os
import struct
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.pop("WANDB_API_KEY", None)

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from dreambooth_pl import components
from dreambooth_pl.data import DreamBoothDataModule
from dreambooth_pl.tiny import tiny_model_path

torch.set_flush_denormal(True)  # as the CLI does: denormals in random weights slow CPU kernels 30x

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "dreambooth"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole session: the tiny models' kernels run 20-100x slower with more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """A cache of the test's own (`DREAMBOOTH_PL_CACHE`): class images start from none whatever ran before in this
    worker; the tiny model is rebuilt there, seeded, on first use."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DREAMBOOTH_PL_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_dir(model_cache) -> Path:
    """The tiny epsilon-prediction model in diffusers layout (what `pretrained: tiny` loads)."""
    torch.manual_seed(0)
    return tiny_model_path("tiny")


@pytest.fixture(scope="session")
def tiny_parts(tiny_dir):
    """The tiny model's parts, loaded once; tests only read them."""
    return components.load_components(str(tiny_dir))


@pytest.fixture(scope="session")
def tiny_v_dir(model_cache) -> Path:
    return tiny_model_path("tiny-v")


@pytest.fixture(scope="session")
def tiny_xl_dir(model_cache) -> Path:
    """The tiny SDXL-layout model (two text encoders, size/crop conditioning) that `pretrained: tiny-xl` loads."""
    return tiny_model_path("tiny-xl")


@pytest.fixture(scope="session")
def tiny_sd3_dir(model_cache) -> Path:
    """The tiny SD3-layout model (MMDiT transformer, two CLIPs + T5, 16-channel VAE) that `pretrained: tiny-sd3` loads."""
    return tiny_model_path("tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux_dir(model_cache) -> Path:
    """The tiny FLUX.1-dev-layout model (double + single stream transformer, CLIP + T5, guidance input)."""
    return tiny_model_path("tiny-flux")


@pytest.fixture(scope="session")
def tiny_xl_parts(tiny_xl_dir):
    """The tiny SDXL model's parts, loaded once; tests only read them."""
    return components.load_components(str(tiny_xl_dir))


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is not a package), to call its functions and `main`."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def make_datamodule(photos: dict[str, Path], **kw):
    """The tests' DreamBoothDataModule: the `photos` fixture's folders, 64 px, batch 2; `kw` overrides."""
    args = dict(subject="t", class_noun="can", instance_dir=str(photos["instance"]), class_dir=str(photos["class"]),
                resolution=64, batch_size=2, min_image_size=64)
    return DreamBoothDataModule(**{**args, **kw})


def make_trainer(root: Path, steps: int, callbacks=(), **kw):
    """The tests' CPU Trainer: `steps` optimizer steps, no logger, checkpoints, progress bar, summary or validation;
    `kw` overrides."""
    args = dict(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, limit_val_batches=0)
    return pl.Trainer(callbacks=list(callbacks), **{**args, **kw})


@pytest.fixture
def photos(tmp_path) -> dict[str, Path]:
    """4 instance photos and 6 class photos in tmp_path."""
    return {
        "instance": make_photos(tmp_path / "instance", 4, seed=1),
        "class": make_photos(tmp_path / "class", 6, seed=2, kind="noise"),
    }


def read_wandb_run(run_dir: Path, timeout: float = 30.0) -> dict:
    """Parse a finished offline W&B run's `.wandb` log: {'history': [{key: value}], 'config': {key: json}}.

    wandb's service writes the log in the background and `finish()` can return before the last records are on
    disk (seen on a loaded CI machine): read again until the run's `exit` record is there.
    """
    deadline = time.monotonic() + timeout
    while True:
        run = _parse_wandb_log(run_dir)
        if "exit" in run["kinds"] or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _parse_wandb_log(run_dir: Path) -> dict:
    """One read of the `.wandb` log, whatever part of it is written."""
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
        if pos + 7 + length > len(data):  # a record still being written (a loaded machine): read_wandb_run reads again
            break
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

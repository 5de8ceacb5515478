"""Class-prior images: exact counts, content-keyed cache, resume after kill -9, corrupt files, wiring into fit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
from PIL import Image

from dreambooth_pl import priors
from dreambooth_pl.data import DataError, DreamBoothDataModule
from dreambooth_pl.priors import PriorCacheError, PriorSettings, generate

from .conftest import make_photos

REPO = Path(__file__).resolve().parents[1]


def settings(**kw) -> PriorSettings:
    return PriorSettings(**{**dict(model="tiny", prompt="a can", resolution=64, steps=8), **kw})


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".png"}


def test_exact_count_manifest_and_no_temp_files(tiny_dir, tmp_path):
    r = generate(settings(), 6, folder=tmp_path / "p", batch_size=4, trainer_kwargs=dict(accelerator="cpu"))
    assert (r.reused, r.made) == (0, 6)
    assert sorted(files(tmp_path / "p")) == [f"{i:05d}.png" for i in range(6)]
    lines = [json.loads(x) for x in (tmp_path / "p" / priors.MANIFEST).read_text().splitlines()]
    assert [(x["index"], x["seed"]) for x in lines] == [(i, i) for i in range(6)]
    assert {x["key"] for x in lines} == {settings().key()}
    assert not [p for p in (tmp_path / "p").iterdir() if p.name.startswith(".")]
    assert all(Image.open(p).size == (64, 64) for p in (tmp_path / "p").glob("*.png"))


def test_rerun_makes_only_missing_and_remakes_corrupt(tiny_dir, tmp_path):
    folder = tmp_path / "p"
    generate(settings(), 6, folder=folder, batch_size=2, device="cpu")
    before = files(folder)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    (folder / "00001.png").unlink()
    (folder / "00004.png").write_bytes(before["00004.png"][: len(before["00004.png"]) // 2])  # truncated
    (folder / ".00005.png.tmp999").write_bytes(b"partial")  # a killed writer's leftover
    r = generate(settings(), 6, folder=folder, batch_size=2, device="cpu")
    assert (r.reused, r.made) == (4, 2)
    assert files(folder) == before  # remade files are byte-identical
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    for name in ("00000.png", "00002.png", "00003.png", "00005.png"):
        assert (folder / name).stat().st_mtime_ns == mtimes[name]  # untouched
    r = generate(settings(), 8, folder=folder, batch_size=2, device="cpu")
    assert (r.reused, r.made) == (6, 2)


def test_mismatched_folder_is_refused_naming_the_setting(tiny_dir, tmp_path):
    generate(settings(), 2, folder=tmp_path / "p", batch_size=2, device="cpu")
    with pytest.raises(PriorCacheError, match=r"steps: folder has 8, this run asks 4.*") as err:
        generate(settings(steps=4, sampler="ddim"), 2, folder=tmp_path / "p", batch_size=2, device="cpu")
    assert "sampler: folder has 'dpm++', this run asks 'ddim'" in str(err.value)
    assert str(tmp_path / "p") in str(err.value)


def test_cache_key_covers_every_setting(tiny_dir, tmp_path):
    base = settings()
    assert base.key() == settings().key()
    assert base.key() == settings(model=str(tiny_dir)).key()  # the name and its folder are the same model
    changed = [settings(prompt="a dog"), settings(negative_prompt="blurry"), settings(sampler="ddim"),
               settings(steps=9), settings(guidance_scale=5.0), settings(resolution=128), settings(base_seed=1)]
    assert len({s.key() for s in changed} | {base.key()}) == len(changed) + 1
    # Other weights in a folder of the same layout -> another key.
    from dreambooth_pl.components import build_random

    other = build_random("tiny", tmp_path / "other", seed=1)
    assert settings(model=str(other)).key() != base.key()
    assert default_folder_is_under_cache(base)


def default_folder_is_under_cache(s: PriorSettings) -> bool:
    return priors.default_folder(s).parent == Path(os.environ["DREAMBOOTH_PL_CACHE"]) / "priors"


def test_resume_after_kill_equals_uninterrupted_run(tiny_dir, tmp_path):
    """kill -9 mid-run, rerun: the same bytes as a run never interrupted."""
    args = [sys.executable, "-m", "dreambooth_pl", "priors", "--model", str(tiny_dir), "--class-prompt", "a can",
            "--num-images", "16", "--resolution", "64", "--steps", "50", "--batch-size", "2",
            "--accelerator", "cpu", "--out", str(tmp_path / "killed")]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((tmp_path / "killed").glob("*.png"))) >= 4:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    made_before_kill = len(list((tmp_path / "killed").glob("*.png")))
    assert 4 <= made_before_kill < 16, "the run must be killed mid-way"
    s = settings(model=str(tiny_dir), steps=50)
    r = generate(s, 16, folder=tmp_path / "killed", batch_size=2, device="cpu")
    assert r.reused == made_before_kill and r.reused + r.made == 16
    generate(s, 16, folder=tmp_path / "clean", batch_size=2, device="cpu")
    assert files(tmp_path / "killed") == files(tmp_path / "clean")
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")]


def datamodule(instance: Path, **kw) -> DreamBoothDataModule:
    args = dict(subject="t", class_noun="can", instance_dir=str(instance), resolution=64, batch_size=2,
                min_image_size=64, prior_model="tiny", prior_steps=4, prior_batch_size=4)
    return DreamBoothDataModule(**{**args, **kw})


def test_fit_generates_missing_class_images_first(tiny_dir, tmp_path):
    from dreambooth_pl.module import DreamBoothModule

    instance = make_photos(tmp_path / "inst", 3)
    folder = tmp_path / "cls"
    dm = datamodule(instance, class_dir=str(folder), num_class_images=3)
    dm.prepare_data()  # an earlier, smaller run left 3 images
    assert len(files(folder)) == 3
    dm = datamodule(instance, class_dir=str(folder), num_class_images=6)
    pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(DreamBoothModule(pretrained="tiny"), datamodule=dm)
    assert len(files(folder)) == 6 and dm.num_class_images == 6
    lines = (folder / priors.MANIFEST).read_text().splitlines()
    assert len(lines) == 6


def test_default_class_folder_is_content_keyed_cache(tiny_dir, tmp_path):
    dm = datamodule(make_photos(tmp_path / "inst", 2), num_class_images=2)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_folder() == priors.default_folder(dm.prior_settings())
    assert [p.name for p in dm.class_images] == ["00000.png", "00001.png"]
    # A run asking for fewer uses the first N of a larger folder.
    dm2 = datamodule(make_photos(tmp_path / "inst", 2), num_class_images=1)
    dm2.setup("fit")
    assert [p.name for p in dm2.class_images] == ["00000.png"]


def test_user_class_photos_are_used_and_validated(tiny_dir, tmp_path):
    instance = make_photos(tmp_path / "inst", 2)
    real = make_photos(tmp_path / "real", 5, seed=3)
    dm = datamodule(instance, class_dir=str(real), num_class_images=200)
    dm.prepare_data()  # real photos: nothing generated
    assert not (real / priors.SETTINGS).exists()
    dm.setup("fit")
    assert dm.num_class_images == 5
    Image.new("RGB", (20, 20)).save(real / "tiny.png")
    with pytest.raises(DataError, match=r"tiny\.png.*20x20"):
        dm.setup("fit")


def test_class_grid_is_logged(tiny_dir, tmp_path):
    logged = {}

    class FakeLogger:
        def log_image(self, key, images, caption=None):
            logged[key] = (images, caption)

    dm = datamodule(make_photos(tmp_path / "inst", 2), class_dir=str(make_photos(tmp_path / "real", 6)))
    dm.trainer = type("T", (), {"loggers": [FakeLogger()]})()
    dm.setup("fit")
    images, caption = logged["priors/class_images"]
    assert images[0].size == (4 * 128, 2 * 128) and "a can" in caption[0]

"""Class-prior images: exact counts, content-keyed cache, resume after kill -9, corrupt files, wiring into fit."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth_pl import priors
from dreambooth_pl.components import ModelSource
from dreambooth_pl.data import DataError
from dreambooth_pl.priors import PriorCacheError, PriorSampling, PriorSettings, generate

from .conftest import make_datamodule, make_trainer

REPO = Path(__file__).resolve().parents[1]
# The identity fields of the pre-refactor flat PriorSettings: cache keys and settings.json depend on them.
OLD_IDENTITY = ("model", "prompt", "negative_prompt", "sampler", "steps", "guidance_scale", "resolution", "revision",
                "variant", "single_file_config", "base_seed", "model_fingerprint")


def settings(model: str = "tiny", prompt: str = "a can", resolution: int = 64, **sampling) -> PriorSettings:
    """The tests' settings: the tiny model, 64 px, 8 steps; `sampling` overrides PriorSampling fields."""
    return PriorSettings(ModelSource(model), prompt, resolution, PriorSampling(**{"steps": 8, **sampling}))


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".png"}


def test_exact_count_manifest_and_no_temp_files(tiny_dir, tmp_path):
    r = generate(settings(batch_size=4), 6, folder=tmp_path / "p", trainer_kwargs=dict(accelerator="cpu"))
    assert (r.reused, r.made) == (0, 6)
    assert sorted(files(tmp_path / "p")) == [f"{i:05d}.png" for i in range(6)]
    lines = [json.loads(x) for x in (tmp_path / "p" / priors.MANIFEST).read_text().splitlines()]
    assert [(x["index"], x["seed"]) for x in lines] == [(i, i) for i in range(6)]
    assert {x["key"] for x in lines} == {settings().key()}
    assert {x["made_on"] for x in lines} == {f"cpu ({torch.get_num_threads()} threads)"}
    assert not [p for p in (tmp_path / "p").iterdir() if p.name.startswith(".")]
    assert all(Image.open(p).size == (64, 64) for p in (tmp_path / "p").glob("*.png"))


@pytest.mark.integration
def test_rerun_makes_only_missing_and_remakes_corrupt(tiny_dir, tmp_path):
    folder = tmp_path / "p"
    generate(settings(batch_size=2), 6, folder=folder, device="cpu")
    before = files(folder)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    (folder / "00001.png").unlink()
    (folder / "00004.png").write_bytes(before["00004.png"][: len(before["00004.png"]) // 2])  # truncated
    (folder / ".00005.png.tmp999").write_bytes(b"partial")  # a killed writer's leftover
    r = generate(settings(batch_size=2), 6, folder=folder, device="cpu")
    assert (r.reused, r.made) == (4, 2)
    assert files(folder) == before  # remade files are byte-identical
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    for name in ("00000.png", "00002.png", "00003.png", "00005.png"):
        assert (folder / name).stat().st_mtime_ns == mtimes[name]  # untouched
    r = generate(settings(batch_size=2), 8, folder=folder, device="cpu")
    assert (r.reused, r.made) == (6, 2)


def test_manifest_keeps_where_earlier_images_were_made(tmp_path):
    s = settings()
    priors.write_manifest(tmp_path, s, [0, 1], {0: "cpu (1 threads)", 1: "cpu (1 threads)"})
    priors.write_manifest(tmp_path, s, [0, 1, 2], {1: "cpu (2 threads)", 2: "cpu (2 threads)"})  # 1 remade, 2 new
    lines = [json.loads(x) for x in (tmp_path / priors.MANIFEST).read_text().splitlines()]
    assert [x["made_on"] for x in lines] == ["cpu (1 threads)", "cpu (2 threads)", "cpu (2 threads)"]
    (tmp_path / priors.MANIFEST).write_text('{"index": 0}\nnot json\n')  # an older manifest: no record, no crash
    priors.write_manifest(tmp_path, s, [0], {})
    assert json.loads((tmp_path / priors.MANIFEST).read_text())["made_on"] is None


def test_mismatched_folder_is_refused_naming_the_setting(tiny_dir, tmp_path):
    generate(settings(batch_size=2), 2, folder=tmp_path / "p", device="cpu")
    with pytest.raises(PriorCacheError, match=r"steps: folder has 8, this run asks 4.*") as err:
        generate(settings(steps=4, sampler="ddim", batch_size=2), 2, folder=tmp_path / "p", device="cpu")
    assert "sampler: folder has 'dpm++', this run asks 'ddim'" in str(err.value)
    assert str(tmp_path / "p") in str(err.value)


def test_cache_key_covers_every_setting(tiny_dir, tmp_path):
    base = settings()
    assert base.key() == settings().key() == old_key(**old_identity())
    assert base.key() == settings(model=str(tiny_dir)).key()  # the name and its folder are the same model
    changes = [dict(prompt="a dog"), dict(negative_prompt="blurry"), dict(sampler="ddim"), dict(steps=9),
               dict(guidance_scale=5.0), dict(resolution=128), dict(seed=1)]
    changed = [settings(**c) for c in changes]
    assert len({s.key() for s in changed} | {base.key()}) == len(changed) + 1
    for c, s in zip(changes, changed, strict=True):  # each lands in its old field (seed was base_seed)
        field = "base_seed" if "seed" in c else next(iter(c))
        assert s.key() == old_key(**old_identity(**{field: next(iter(c.values()))})), c
    # Other weights in a folder of the same layout -> another key.
    from dreambooth_pl.tiny import build_random

    other = build_random("tiny", tmp_path / "other", seed=1)
    assert settings(model=str(other)).key() != base.key()
    assert priors.model_fingerprint(str(other)) == folder_fingerprint(other) != folder_fingerprint(tiny_dir)
    assert settings(model=str(other)).key() == old_key(**old_identity(model_fingerprint=folder_fingerprint(other)))
    assert default_folder_is_under_cache(base)


def folder_fingerprint(folder: Path) -> str:
    """A model folder's fingerprint by hand: sha256 of 'relative/name:size' lines and file bytes (the first and
    last MiB of files over 2 MiB), over the sorted non-hidden files."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        data = f.read_bytes()
        h.update(f"{f.relative_to(folder)}:{len(data)}\n".encode())
        h.update(data if len(data) <= 2 << 20 else data[: 1 << 20] + data[-(1 << 20) :])
    return f"sha256:{h.hexdigest()[:24]}"


def default_folder_is_under_cache(s: PriorSettings) -> bool:
    return priors.default_folder(s).parent == Path(os.environ["DREAMBOOTH_PL_CACHE"]) / "priors"


@pytest.mark.integration
def test_resume_after_kill_equals_uninterrupted_run(tiny_dir, tmp_path):
    """kill -9 mid-run, rerun: the same bytes as a run never interrupted."""
    args = [sys.executable, "-m", "dreambooth_pl", "priors", "--model.pretrained", str(tiny_dir), "--data.class_noun",
            "can", "--data.num_class_images", "16", "--data.val_class_images", "0", "--data.resolution", "64",
            "--data.prior.steps", "50", "--data.prior.batch_size", "2", "--trainer.accelerator", "cpu",
            "--data.class_dir", str(tmp_path / "killed")]
    log = tmp_path / "priors.log"
    # As many intra-op threads as this process (conftest: 1): the thread count changes float sums, so pixels.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((tmp_path / "killed").glob("*.png"))) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the priors command ended before it was killed:\n{log.read_text()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    made_before_kill = len(list((tmp_path / "killed").glob("*.png")))
    assert 4 <= made_before_kill < 16, "the run must be killed mid-way"
    s = settings(model=str(tiny_dir), steps=50, batch_size=2)
    r = generate(s, 16, folder=tmp_path / "killed", device="cpu")
    assert r.reused == made_before_kill and r.reused + r.made == 16
    generate(s, 16, folder=tmp_path / "clean", device="cpu")
    assert files(tmp_path / "killed") == files(tmp_path / "clean")
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")]


# The class images come from the tiny model in 4 steps, 4 a batch.
TINY_PRIOR = dict(model=ModelSource("tiny"), prior=PriorSampling(steps=4, batch_size=4), val_class_images=0)


@pytest.mark.integration
def test_fit_generates_missing_class_images_first(tiny_dir, photos, tmp_path):
    from dreambooth_pl.module import DreamBoothModule

    folder = tmp_path / "cls"
    dm = make_datamodule(photos, class_dir=str(folder), num_class_images=3, **TINY_PRIOR)
    dm.prepare_data()  # an earlier, smaller run left 3 images
    assert len(files(folder)) == 3
    dm = make_datamodule(photos, class_dir=str(folder), num_class_images=6, **TINY_PRIOR)
    make_trainer(tmp_path, 1).fit(DreamBoothModule(pretrained="tiny"), datamodule=dm)
    assert len(files(folder)) == 6 and len(dm.class_images) == 6
    lines = (folder / priors.MANIFEST).read_text().splitlines()
    assert len(lines) == 6


def test_default_class_folder_is_content_keyed_cache(tiny_dir, photos):
    dm = make_datamodule(photos, class_dir=None, num_class_images=2, **TINY_PRIOR)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_folder() == priors.default_folder(dm.prior_settings())
    assert [p.name for p in dm.class_images] == ["00000.png", "00001.png"]
    # A run asking for fewer uses the first N of a larger folder.
    dm2 = make_datamodule(photos, class_dir=None, num_class_images=1, **TINY_PRIOR)
    dm2.setup("fit")
    assert [p.name for p in dm2.class_images] == ["00000.png"]


def test_user_class_photos_are_used_and_validated(tiny_dir, photos):
    real = photos["class"]  # 6 photos of the user's own
    dm = make_datamodule(photos, num_class_images=200, **TINY_PRIOR)
    dm.prepare_data()  # real photos: nothing generated
    assert not (real / priors.SETTINGS).exists()
    dm.setup("fit")
    assert len(dm.class_images) == 6
    Image.new("RGB", (20, 20)).save(real / "tiny.png")
    with pytest.raises(DataError, match=r"tiny\.png.*20x20"):
        dm.setup("fit")


def test_class_grid_is_logged(tiny_dir, photos):
    logged = {}

    class FakeLogger:
        def log_image(self, key, images, caption=None):
            logged[key] = (images, caption)

    dm = make_datamodule(photos, **TINY_PRIOR)  # 6 class photos
    dm.trainer = type("T", (), {"loggers": [FakeLogger()]})()
    dm.setup("fit")
    images, caption = logged["priors/class_images"]
    assert images[0].size == (4 * 128, 2 * 128) and "a can" in caption[0]


# ------------------------------------------------------------------------------------- cache keys


def test_identity_has_exactly_the_old_fields(tiny_dir):
    s = PriorSettings(ModelSource("tiny"), "a can", 64, PriorSampling())
    ident = s.identity()
    assert tuple(ident) == OLD_IDENTITY
    assert ident == {
        "model": "tiny", "prompt": "a can", "negative_prompt": "", "sampler": "dpm++", "steps": 25,
        "guidance_scale": 7.5, "resolution": 64, "revision": None, "variant": None, "single_file_config": None,
        "base_seed": 0, "model_fingerprint": folder_fingerprint(tiny_dir),  # a local folder: hashed by content
    }


def old_key(**fields) -> str:
    """The pre-refactor key, by hand: sha256 of the flat identity without model, variant, single_file_config."""
    ident = {k: v for k, v in fields.items() if k not in ("model", "variant", "single_file_config")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def old_identity(**changes) -> dict:
    """The old flat identity of `settings()` (tiny, 'a can', 64 px, 8 steps, other defaults), with `changes`."""
    base = dict(model="tiny", prompt="a can", negative_prompt="", sampler="dpm++", steps=8, guidance_scale=7.5,
                resolution=64, revision=None, variant=None, single_file_config=None, base_seed=0,
                model_fingerprint=folder_fingerprint(Path(os.environ["DREAMBOOTH_PL_CACHE"]) / "models" / "tiny"))
    return {**base, **changes}


def test_cache_key_is_unchanged_by_the_refactor(tiny_dir):
    fingerprint = folder_fingerprint(tiny_dir)
    s = PriorSettings(ModelSource("tiny"), "a can", 64, PriorSampling())
    # The old PriorSettings(model="tiny", prompt="a can", resolution=64) with its defaults, field by field.
    assert s.key() == old_key(
        model="tiny", prompt="a can", negative_prompt="", sampler="dpm++", steps=25, guidance_scale=7.5,
        resolution=64, revision=None, variant=None, single_file_config=None, base_seed=0,
        model_fingerprint=fingerprint,
    )
    # Every non-default value lands in the same old field.
    other = PriorSettings(ModelSource("tiny", revision="v2", variant="fp16", single_file_config="cfg"), "a dog", 128,
                          PriorSampling(sampler="ddim", steps=9, guidance_scale=5.0, negative_prompt="blurry", seed=3))
    assert other.key() == old_key(
        model="tiny", prompt="a dog", negative_prompt="blurry", sampler="ddim", steps=9, guidance_scale=5.0,
        resolution=128, revision="v2", variant="fp16", single_file_config="cfg", base_seed=3,
        model_fingerprint=fingerprint,  # a local folder: the revision does not enter its fingerprint
    )
    # The weight variant and single-file config do not change what the model is, so neither changes the key.
    assert other.key() == dataclasses.replace(other, model=ModelSource("tiny", revision="v2")).key()


def test_batch_size_does_not_change_the_key(tiny_dir):
    base = PriorSettings(ModelSource("tiny"), "a can", 64, PriorSampling())
    for bs in (1, 4, 64):
        s = PriorSettings(ModelSource("tiny"), "a can", 64, PriorSampling(batch_size=bs))
        assert s.key() == base.key() and s.identity() == base.identity()
        assert priors.default_folder(s) == priors.default_folder(base)


@pytest.mark.parametrize("device", [None, "cpu"])  # Trainer.predict (the command) and the plain loop (inside fit)
def test_generation_leaves_the_global_random_stream_alone(tiny_dir, tmp_path, device):
    # A fit must make the same steps whether its class images were made in it or found in the cache.
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    generate(settings(batch_size=2), 2, folder=tmp_path / "p", device=device,
             trainer_kwargs=dict(accelerator="cpu"))
    assert torch.equal(torch.rand(4), expected)

"""Tests for dreambooth_pl.data: folders, image loading, dataset transforms, collation, DataModule."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from dreambooth_pl.components import ModelSource
from dreambooth_pl.data import (
    IMAGE_EXTENSIONS,
    SETTINGS,
    DataError,
    DreamBoothDataModule,
    DreamBoothDataset,
    benchmark_prompts,
    class_prompt,
    collate,
    instance_prompt,
    list_images,
    load_image,
    load_mask,
)
from dreambooth_pl.module import DreamBoothModule
from dreambooth_pl.priors import PriorSampling

from .conftest import make_datamodule, make_photos, make_trainer

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared/data/dreambooth"
RED = (255, 0, 0)
BLUE = (0, 0, 255)


def _photo(
    path: Path, size: tuple[int, int] = (80, 96), color: tuple[int, int, int] | None = None, seed: int = 0
) -> Path:
    """Write a random-noise (or solid `color`) RGB image of `size` = (W, H); format from the suffix."""
    w, h = size
    if color is None:
        arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    else:
        arr = np.broadcast_to(np.array(color, dtype=np.uint8), (h, w, 3)).copy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **({"quality": 95} if path.suffix.lower() in {".jpg", ".jpeg"} else {}))
    return path


def _folder(
    root: Path, n: int, color: tuple[int, int, int] | None = None, seed: int = 0, size=(80, 96)
) -> list[Path]:
    """n photos 00.jpg.. in `root`."""
    return [_photo(root / f"{i:02d}.jpg", size=size, color=color, seed=seed + i) for i in range(n)]


def _asymmetric(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    """Lossless image whose left half is a gradient and right half dark, so flips are visible."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2, 0] = np.linspace(50, 250, w // 2, dtype=np.uint8)
    arr[: h // 2, :, 1] = 200
    Image.fromarray(arr).save(path)
    return path


# ---------------------------------------------------------------- prompts


def test_prompt_builders():
    assert instance_prompt("sks", "dog") == "a sks dog"
    assert class_prompt("dog") == "a dog"


def test_benchmark_prompts_formats_and_collapses_spaces(tmp_path):
    tpl = tmp_path / "prompts.txt"
    tpl.write_text("a {0} {1} in the jungle\n\n  \na red {0} {1}\n{0} {1} on the beach\n")
    assert benchmark_prompts(tpl, "sks", "backpack") == [
        "a sks backpack in the jungle",
        "a red sks backpack",
        "sks backpack on the beach",
    ]
    plain = benchmark_prompts(tpl, "", "backpack")
    assert plain == ["a backpack in the jungle", "a red backpack", "backpack on the beach"]
    assert all("  " not in p and p == p.strip() for p in plain)


def test_benchmark_prompts_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match="nope.txt"):
        benchmark_prompts(tmp_path / "nope.txt", "sks", "dog")


# ---------------------------------------------------------------- load_image


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    Image.new("RGB", (80, 40), (10, 200, 30)).save(path, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (80, 40)  # stored landscape
    img = load_image(path)
    assert img.size == (40, 80)
    assert img.mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK"])
def test_modes_converted_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    img = rgb.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.size == (48, 40)


def test_transparent_pixels_become_white(tmp_path):
    arr = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    out = np.asarray(load_image(tmp_path / "t.png"))
    assert (out == 255).all()


def test_non_image_jpg_raises_with_path(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a jpeg")
    with pytest.raises(DataError, match="cannot read image") as e:
        load_image(bad)
    assert str(bad) in str(e.value)
    assert "remove or replace" in str(e.value)


def test_truncated_jpeg_raises_with_path(tmp_path):
    good = _photo(tmp_path / "good.jpg")
    data = good.read_bytes()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        load_image(bad)
    assert str(bad) in str(e.value)
    # ...and a folder holding it fails listing, naming the file.
    with pytest.raises(DataError, match="cut.jpg"):
        list_images(tmp_path)


def test_small_image_raises_with_size(tmp_path):
    small = _photo(tmp_path / "small.jpg", size=(32, 40))
    load_image(small, min_size=32)  # exactly the minimum is fine
    with pytest.raises(DataError) as e:
        load_image(small, min_size=64)
    msg = str(e.value)
    assert str(small) in msg and "32x40" in msg and "64 px" in msg and "data.min_image_size" in msg
    with pytest.raises(DataError, match="32x40"):
        list_images(tmp_path, min_size=64)


# ---------------------------------------------------------------- list_images


def test_list_images_sorted_filtered(tmp_path):
    _photo(tmp_path / "b.JPG", seed=1)
    _photo(tmp_path / "a.png", seed=2)
    _photo(tmp_path / "c.webp", seed=3)
    _photo(tmp_path / ".hidden.jpg", seed=4)
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "sub.jpg").mkdir()  # a folder named like an image is skipped
    with pytest.warns(UserWarning, match=r"not using readme\.txt \(not an image") as w:
        assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.webp"]
    assert str(tmp_path) in str(w[0].message)


@pytest.mark.parametrize("suffix", [".gif", ".tif", ".tiff", ".heic", ".HEIF"])
def test_phone_and_other_formats_are_read(tmp_path, suffix):
    pixels = (np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8)
    fmt = {".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF", ".heic": "HEIF", ".heif": "HEIF"}[suffix.lower()]
    Image.fromarray(pixels).save(tmp_path / f"photo{suffix}", format=fmt)
    (path,) = list_images(tmp_path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (96, 80)


def test_class_cache_files_are_not_warned_about(tmp_path):
    _photo(tmp_path / "00000.png")
    (tmp_path / "settings.json").write_text("{}")
    (tmp_path / "manifest.jsonl").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list_images(tmp_path, what="class")) == 1


def test_list_images_missing_folder(tmp_path):
    missing = tmp_path / "data" / "x"
    with pytest.raises(DataError) as e:
        list_images(missing)
    msg = str(e.value)
    assert str(missing) in msg and "does not exist" in msg and "data.instance_dir" in msg
    with pytest.raises(DataError, match="data.class_dir"):
        list_images(missing, what="class")


def test_list_images_path_is_file(tmp_path):
    f = _photo(tmp_path / "one.jpg")
    with pytest.raises(DataError, match="not a folder") as e:
        list_images(f)
    assert str(f) in str(e.value)


def test_list_images_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images") as e:
        list_images(empty)
    assert str(empty) in str(e.value)
    assert all(ext in str(e.value) for ext in IMAGE_EXTENSIONS)


def test_list_images_only_non_images(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    (d / "scan.pdf").write_bytes(b"%PDF-1.4")
    _photo(d / ".DS_Store.jpg")
    with pytest.raises(DataError, match="no images") as e, pytest.warns(UserWarning, match="notes.txt, scan.pdf"):
        list_images(d)
    assert str(d) in str(e.value)


# ---------------------------------------------------------------- dataset


@pytest.mark.parametrize(
    ("n_instance", "repeats", "n_class", "expected"),
    [(3, 2, 10, 10), (3, 2, 4, 6), (3, 2, None, 6), (2, 1, 2, 2)],
)
def test_dataset_length(tmp_path, n_instance, repeats, n_class, expected):
    inst = _folder(tmp_path / "inst", n_instance)
    cls = _folder(tmp_path / "cls", n_class, seed=100) if n_class else None
    ds = DreamBoothDataset(inst, "a sks dog", cls, "a dog" if cls else None, resolution=32, repeats=repeats)
    assert len(ds) == expected
    ex = ds[len(ds) - 1]
    assert ex["instance_index"] == (len(ds) - 1) % n_instance
    if n_class:
        assert ex["class_index"] == (len(ds) - 1) % n_class
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_collate_instance_rows_then_class_rows(tmp_path):
    inst = _folder(tmp_path / "inst", 2, color=RED)
    cls = _folder(tmp_path / "cls", 5, color=BLUE)
    ds = DreamBoothDataset(inst, "a sks dog", cls, "a dog", resolution=32)
    b = 3
    batch = collate([ds[i] for i in range(b)])
    px = batch["pixel_values"]
    assert px.shape == (2 * b, 3, 32, 32)
    assert batch["num_instance"] == b
    red = px[:b].mean(dim=(2, 3))  # (B, 3) per-channel means
    blue = px[b:].mean(dim=(2, 3))
    assert (red[:, 0] > 0.9).all() and (red[:, 2] < -0.9).all()
    assert (blue[:, 2] > 0.9).all() and (blue[:, 0] < -0.9).all()
    assert batch["prompts"] == ["a sks dog"] * b + ["a dog"] * b
    assert batch["image_index"].dtype == torch.long
    assert batch["image_index"].tolist() == [0, 1, 0, 0, 1, 2]
    assert batch["flipped"].dtype == torch.bool and batch["flipped"].shape == (2 * b,)


def test_collate_without_class_images(tmp_path):
    inst = _folder(tmp_path / "inst", 3)
    ds = DreamBoothDataset(inst, "a sks dog", class_prompt="a dog", resolution=32)
    ex = ds[0]
    # No class rows; the class prompt still travels (prior_loss: teacher prompts with it).
    assert [k for k in ex if k.startswith("class_")] == ["class_prompt"] and ex["class_prompt"] == "a dog"
    batch = collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["prompts"] == ["a sks dog"] * 2 and batch["class_prompt"] == "a dog"
    assert batch["num_instance"] == 2
    assert batch["image_index"].tolist() == [0, 1]


def test_output_shape_dtype_range(tmp_path):
    # Lossless black and white instance photos pin the ends of the [-1, 1] mapping.
    inst = [
        _photo(tmp_path / "black.png", color=(0, 0, 0)),
        _photo(tmp_path / "white.png", color=(255, 255, 255)),
    ]
    cls = _folder(tmp_path / "cls", 2, seed=50)
    ds = DreamBoothDataset(inst, "p", cls, "q", resolution=48)
    batch = collate([ds[0], ds[1]])
    px = batch["pixel_values"]
    assert px.shape == (4, 3, 48, 48)
    assert px.dtype == torch.float32
    assert px.is_contiguous()
    assert px.min() >= -1.0 and px.max() <= 1.0
    assert (px[0] == -1.0).all() and (px[1] == 1.0).all()


def test_center_crop_deterministic_random_crop_varies(tmp_path):
    inst = _folder(tmp_path / "inst", 1)  # 80x96 -> resized 32x38, so crops can differ
    center = DreamBoothDataset(inst, "p", resolution=32, center_crop=True, random_flip=False)
    torch.manual_seed(0)
    a = center[0]["instance_pixel_values"]
    torch.manual_seed(1)
    b = center[0]["instance_pixel_values"]
    assert torch.equal(a, b)
    # The resized photo by hand: shorter side 80 -> 32, so 32 wide and 96 * 32 / 80 = 38 high.
    with Image.open(inst[0]) as img:
        full = TF.resize(TF.pil_to_tensor(img.convert("RGB")), 32, interpolation=InterpolationMode.BILINEAR,
                         antialias=True).float().div(127.5).sub(1.0)
    assert full.shape == (3, 38, 32)
    assert torch.equal(a, full[:, 3:35])  # center: (38 - 32) // 2 = 3 rows off the top
    rand = DreamBoothDataset(inst, "p", resolution=32, center_crop=False, random_flip=False)
    torch.manual_seed(0)
    crops = [rand[0]["instance_pixel_values"] for _ in range(10)]
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    torch.manual_seed(0)
    assert all(torch.equal(c, rand[0]["instance_pixel_values"]) for c in crops)  # torch RNG drives it
    # Each crop is the window the torch RNG picks: top in [0, 6], left in [0, 0].
    torch.manual_seed(0)
    tops = []
    for _ in range(10):
        tops.append(int(torch.randint(0, 7, (1,))))
        assert int(torch.randint(0, 1, (1,))) == 0
    assert len(set(tops)) > 1
    for top, c in zip(tops, crops, strict=True):
        assert torch.equal(c, full[:, top : top + 32])


def test_random_flip_flag_matches_pixels(tmp_path):
    path = _asymmetric(tmp_path / "asym.png")
    ref = DreamBoothDataset([path], "p", resolution=32, center_crop=True, random_flip=False)[0]
    ref_px = ref["instance_pixel_values"]
    assert not ref["instance_flipped"]
    assert not torch.equal(ref_px, ref_px.flip(-1))  # the image really is asymmetric
    ds = DreamBoothDataset([path], "p", [path], "q", resolution=32, center_crop=True, random_flip=True)
    torch.manual_seed(0)
    flags = []
    for _ in range(30):
        ex = ds[0]
        for prefix in ("instance", "class"):
            flipped = ex[f"{prefix}_flipped"]
            assert isinstance(flipped, bool)
            expected = ref_px.flip(-1) if flipped else ref_px
            assert torch.equal(ex[f"{prefix}_pixel_values"], expected)
            flags.append(flipped)
    assert any(flags) and not all(flags)
    # Center crops draw no random numbers: one torch.rand per image decides each flip, instance then class.
    torch.manual_seed(0)
    assert flags == [bool(torch.rand(()).item() < 0.5) for _ in range(60)]


def test_dataset_rejects_bad_arguments(tmp_path):
    inst = _folder(tmp_path / "inst", 1)
    with pytest.raises(DataError):
        DreamBoothDataset([], "p")
    with pytest.raises(DataError):
        DreamBoothDataset(inst, "p", inst, None)
    with pytest.raises(DataError):
        DreamBoothDataset(inst, "p", repeats=0)


# ---------------------------------------------------------------- DataModule


def _first_batch(dm: DreamBoothDataModule) -> dict:
    return next(iter(dm.train_dataloader()))


def test_datamodule_end_to_end(photos):
    dm = make_datamodule(photos)
    dm.setup("fit")
    assert len(dm.instance_images) == 4 and len(dm.class_images) == 6
    assert len(dm.dataset) == 6
    assert dm.instance_prompt == "a sks can" and dm.class_prompt == "a can"
    assert dm.hparams.instance_dir == str(photos["instance"])
    batch = _first_batch(dm)
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["num_instance"] == 2
    assert batch["prompts"] == ["a sks can", "a sks can", "a can", "a can"]


def test_datamodule_same_seed_same_batches(photos):
    dm = make_datamodule(photos)
    dm.setup("fit")
    torch.manual_seed(123)  # what seed_everything does for the in-process crop/flip RNG
    a = _first_batch(dm)
    torch.manual_seed(123)
    b = _first_batch(dm)
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert torch.equal(a["image_index"], b["image_index"]) and torch.equal(a["flipped"], b["flipped"])

    def order(seed: int) -> list[int]:
        dm.hparams.seed = seed
        return [i for bt in dm.train_dataloader() for i in bt["image_index"][: bt["num_instance"]].tolist()]

    def expected(seed: int) -> list[int]:
        # The loader's generator, seeded with `seed`, first gives the iterator its base seed (one int64 draw),
        # then the sampler's permutation of the 6 examples; example k shows instance photo k % 4.
        g = torch.Generator().manual_seed(seed)
        torch.empty((), dtype=torch.int64).random_(generator=g)
        perm = torch.randperm(len(dm.dataset), generator=g)
        return [k % len(dm.instance_images) for k in perm.tolist()]

    assert order(0) == order(0) == expected(0)
    assert order(1) == expected(1)
    assert order(0) != order(1)  # seed drives the shuffle


def test_datamodule_worker_seeding_reproducible(photos):
    # With workers, crop/flip RNG is seeded from the loader's generator, so no global seeding is needed.
    dm = make_datamodule(photos, num_workers=1)
    dm.setup("fit")
    a = _first_batch(dm)
    b = _first_batch(dm)
    assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_datamodule_without_prior_preservation(photos):
    dm = make_datamodule(photos, with_prior_preservation=False, class_dir=None, repeats=2)
    dm.setup("fit")
    assert len(dm.class_images) == 0
    assert len(dm.dataset) == 8
    batch = _first_batch(dm)
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["num_instance"] == 2
    assert batch["prompts"] == ["a sks can"] * 2


def test_datamodule_missing_class_dir(photos):
    dm = make_datamodule(photos, class_dir=None)
    with pytest.raises(DataError, match="data.class_dir"):
        dm.setup("fit")


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_datamodule_bad_instance_dir_raises_at_setup(photos, tmp_path, kind):
    bad = tmp_path / "nobody"
    if kind == "empty":
        bad.mkdir()
    dm = make_datamodule(photos, instance_dir=str(bad))
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    assert str(bad) in str(e.value)


def test_datamodule_small_instance_image_raises_at_setup(photos):
    dm = make_datamodule(photos)
    small = _photo(photos["instance"] / "99.jpg", size=(48, 60))
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    assert str(small) in str(e.value) and "48x60" in str(e.value)


def test_datamodule_bad_subject_type():
    # jsonargparse checks the Literal from the config; built directly, the module still refuses it by name.
    with pytest.raises(DataError, match="subject_type") as e:
        DreamBoothDataModule(subject_type="animal")
    assert "'animal'" in str(e.value) and "'object', 'live' or 'world'" in str(e.value)


def _center_crop(path: Path, resolution: int) -> torch.Tensor:
    """The dataset's own center crop of one photo, unflipped: (3, R, R)."""
    return DreamBoothDataset([path], "p", resolution=resolution, center_crop=True, random_flip=False)[0][
        "instance_pixel_values"
    ]


@pytest.mark.parametrize("split", ["instance", "class"])
def test_fixed_views_with_random_flip(photos, split):
    dm = make_datamodule(photos, random_flip=True)
    dm.setup("fit")
    paths = dm.instance_images if split == "instance" else dm.class_images
    torch.manual_seed(0)
    before = torch.rand(4)
    torch.manual_seed(0)
    views = list(dm.fixed_views(split))
    assert torch.equal(torch.rand(4), before)  # no augmentation draw: the views are the same every call
    assert len(views) == len(paths) == (4 if split == "instance" else 6)
    for path, v in zip(paths, views, strict=True):
        assert v.shape == (2, 3, 64, 64) and v.dtype == torch.float32
        assert v.min() >= -1.0 and v.max() <= 1.0
        assert torch.equal(v[0], _center_crop(path, 64))  # as is
        assert torch.equal(v[1], v[0].flip(-1))  # then mirrored
    limited = list(dm.fixed_views(split, limit=2))
    assert len(limited) == 2
    assert all(torch.equal(a, b) for a, b in zip(limited, views[:2], strict=True))


def test_fixed_views_without_random_flip(photos):
    dm = make_datamodule(photos, random_flip=False)
    dm.setup("fit")
    views = list(dm.fixed_views("instance"))
    assert len(views) == 4
    for path, v in zip(dm.instance_images, views, strict=True):
        assert v.shape == (1, 3, 64, 64)
        assert torch.equal(v[0], _center_crop(path, 64))
    assert [v.shape for v in dm.fixed_views("class", limit=3)] == [(1, 3, 64, 64)] * 3


def test_describe(photos):
    dm = make_datamodule(photos, identifier="zwx")
    assert dm.describe() == {
        "subject": "t",
        "class_noun": "can",
        "identifier": "zwx",
        "instance_prompt": "a zwx can",
        "class_prompt": "a can",
    }


def test_hparams_are_plain_values(photos):
    prior = PriorSampling(sampler="ddim", steps=7, batch_size=3)
    source = ModelSource("tiny", revision="r1")
    dm = make_datamodule(photos, prior=prior, model=source)
    assert dm.prior is prior and dm.model_source is source  # the dataclasses stay on the module
    assert type(dm.hparams.prior) is dict and dm.hparams.prior == dataclasses.asdict(dm.prior)
    assert type(dm.hparams.model) is dict and dm.hparams.model == dataclasses.asdict(dm.model_source)
    assert dm.hparams.prior["steps"] == 7 and dm.hparams.model["pretrained"] == "tiny"
    assert dm.hparams.resolution == 64 and dm.hparams.subject == "t" and dm.hparams.seed == 0
    # Plain data only: safe YAML (W&B config, weights_only checkpoints) round-trips it unchanged.
    assert yaml.safe_load(yaml.safe_dump(dict(dm.hparams))) == dict(dm.hparams)


# ---------------------------------------------------------------- DreamBench (optional)


@pytest.mark.skipif(not (DREAMBENCH / "dataset" / "can").is_dir(), reason="DreamBench data not present")
def test_dreambench_can():
    can = DREAMBENCH / "dataset" / "can"
    images = list_images(can, min_size=64)
    assert len(images) >= 1 and all(p.parent == can for p in images)
    ds = DreamBoothDataset(images, instance_prompt("sks", "can"), resolution=64, center_crop=True)
    batch = collate([ds[0], ds[len(ds) - 1]])
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    prompts = benchmark_prompts(DREAMBENCH / "prompts_object.txt", "sks", "can")
    assert len(prompts) == 25
    assert prompts[0] == "a sks can in the jungle"


def test_benchmark_files_rebuilt_from_public_layout(tmp_path):
    """`make data` after a git clone rebuilds subjects.csv and the prompt lists exactly as the shared copy has them."""
    from dreambooth_pl.data import write_benchmark_files

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"
    if not (shared / "dataset" / "prompts_and_classes.txt").is_file():
        pytest.skip("DreamBench data absent")
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "prompts_and_classes.txt").write_bytes((shared / "dataset" / "prompts_and_classes.txt").read_bytes())
    write_benchmark_files(tmp_path)
    for name in ("subjects.csv", "prompts_object.txt", "prompts_live.txt"):
        assert (tmp_path / name).read_text().split() == (shared / name).read_text().split(), name
    with pytest.raises(DataError, match="not a clone"):
        write_benchmark_files(tmp_path / "nowhere")


def test_a_phone_folder_with_heic_gif_and_a_text_file_trains_and_warns(photos, tmp_path):
    folder = tmp_path / "phone"
    folder.mkdir()
    for k, (name, fmt) in enumerate((("IMG_0001.HEIC", "HEIF"), ("party.gif", "GIF"), ("desk.png", "PNG"))):
        pixels = (np.random.default_rng(k).random((80, 96, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name, format=fmt)
    (folder / "notes.txt").write_text("taken on my phone")
    dm = make_datamodule({**photos, "instance": folder})
    with pytest.warns(UserWarning, match="not using notes.txt"):
        make_trainer(tmp_path / "run", 2).fit(DreamBoothModule(pretrained="tiny"), datamodule=dm)
    assert sorted(p.name for p in dm.dataset.instance_images) == ["IMG_0001.HEIC", "desk.png", "party.gif"]


# ---------------------------------------------------------------- per-image captions


def test_captions_from_txt_and_jsonl_reach_the_batch_and_class_rows_keep_the_class_prompt(photos, tmp_path):
    folder = photos["instance"]
    names = sorted(p.name for p in list_images(folder))  # 4 photos
    (folder / names[0]).with_suffix(".txt").write_text("a sks can on a wooden table\n")
    (folder / "captions.jsonl").write_text(json.dumps({"file": names[1], "caption": "a sks can in the snow"}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # caption files are not "unused files"
        dm = make_datamodule(photos)
        dm.setup("fit")
    assert dm.instance_captions == ["a sks can on a wooden table", "a sks can in the snow", "a sks can", "a sks can"]
    batch = collate([dm.dataset[i] for i in range(4)])
    assert batch["prompts"][:4] == dm.instance_captions  # the prompts the text encoder gets
    assert batch["prompts"][4:] == ["a can"] * 4
    off = make_datamodule(photos, captions=False)  # the paper's recipe: one instance prompt for every photo
    off.setup("fit")
    assert off.instance_captions == ["a sks can"] * 4


def test_a_caption_without_the_identifier_is_refused_naming_the_photo(photos):
    folder = photos["instance"]
    photo = sorted(list_images(folder))[0]
    photo.with_suffix(".txt").write_text("a can on a table")
    with pytest.raises(DataError, match=rf"caption of {re.escape(str(photo))} .* does not contain the identifier 'sks'"):
        make_datamodule(photos).setup("fit")


# ------------------------------------------------------------------------------ buckets, several subjects


def _mixed_photos(root):
    """Photos of three aspect ratios (5:3 landscape, square, 3:5 portrait), 2 each, and square class images."""
    inst = root / "mixed"
    for k, size in enumerate([(120, 72), (96, 96), (72, 120)]):
        for i, p in enumerate(sorted(make_photos(root / f"m{k}", 2, size=size, seed=k).iterdir())):
            inst.mkdir(exist_ok=True)
            p.rename(inst / f"{k}_{i}.jpg")
    return {"instance": inst, "class": make_photos(root / "cls", 3, size=(96, 96), seed=9)}


def test_buckets_keep_each_photos_aspect_ratio_and_never_mix_in_a_batch(tmp_path):
    from dreambooth_pl.buckets import ASPECT_TOLERANCE, aspect_error

    dm = make_datamodule(_mixed_photos(tmp_path), buckets=True, bucket_step=16, batch_size=2, repeats=3)
    dm.setup("fit")
    ds = dm.dataset
    for j, path in enumerate(ds.instance_images):  # every photo in the bucket nearest its shape, within tolerance
        with load_image(path) as img:
            assert aspect_error(*img.size, ds.buckets[ds.bucket_of_photo[j]]) <= ASPECT_TOLERANCE
    assert len({ds.bucket_of_photo[j] for j in range(6)}) == 3  # three shapes -> three buckets
    seen = []
    for batch in dm.train_dataloader():
        assert len(set(batch["bucket"].tolist())) == 1  # instance and class rows of one bucket
        w, h = ds.buckets[int(batch["bucket"][0])]
        assert batch["pixel_values"].shape[-2:] == (h, w) and w * h <= 64 * 64
        ids = batch["time_ids"]  # (2B, 6): original (H, W), crop (top, left), target (h, w) = the bucket
        assert (ids[:, 4:] == torch.tensor([float(h), float(w)])).all()
        n = batch["num_instance"]
        for r in range(n):  # the photo's own size; its crop stays within the resized photo
            with load_image(ds.instance_images[int(batch["image_index"][r])]) as img:
                assert ids[r, :2].tolist() == [img.height, img.width]
        seen += batch["image_index"][:n].tolist()
    assert sorted(seen) == sorted(list(range(6)) * 3)  # every item once per epoch


def test_buckets_default_by_backbone_and_square_without(tmp_path, photos, tiny_xl_dir, tiny_dir):
    from dreambooth_pl.components import ModelSource

    assert make_datamodule(photos, model=ModelSource(str(tiny_xl_dir))).use_buckets
    assert not make_datamodule(photos, model=ModelSource(str(tiny_dir))).use_buckets
    dm = make_datamodule(photos, buckets=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape[-2:] == (64, 64) and (batch["bucket"] == -1).all()
    with pytest.raises(DataError, match="data.bucket_step"):
        make_datamodule(photos, buckets=True, bucket_step=12).setup("fit")


def test_cached_latent_views_follow_the_bucket(tmp_path):
    dm = make_datamodule(_mixed_photos(tmp_path), buckets=True, bucket_step=16, center_crop=True,
                         cache_latents=True, batch_size=1)
    dm.setup("fit")
    ds, views = dm.dataset, {key: (v, ids) for key, v, ids in dm.cache_views()}
    for (_split, _i, b), (v, ids) in views.items():
        w, h = ds.buckets[b]
        assert v.shape == (1, 3, h, w) and ids[0, 4:].tolist() == [h, w]
    # every (photo, bucket) and (class image, bucket) pair an epoch can draw is cached
    pairs = {(s, i, ds.bucket(k)) for k in range(len(ds)) for s, i in zip(("instance", "class"), ds.pair(k), strict=True)}
    assert pairs == set(views)


def _two_subjects(root):
    return [dict(subject="ball", class_noun="toy", instance_dir=str(make_photos(root / "a", 3, seed=1)),
                 identifier="sks", class_dir=str(make_photos(root / "ca", 4, seed=3, kind="noise"))),
            dict(subject="mug", class_noun="cup", instance_dir=str(make_photos(root / "b", 2, seed=2)),
                 identifier="zwx", class_dir=str(make_photos(root / "cb", 3, seed=4, kind="noise")))]


def test_several_subjects_keep_their_instance_class_pairing(tmp_path, photos):
    dm = make_datamodule(photos, subject="pair", subjects=_two_subjects(tmp_path), batch_size=1, class_dir=None)
    dm.setup("fit")
    ds = dm.dataset
    assert [s.subject for s in dm.subjects] == ["ball", "mug"] and len(ds.instance_images) == 5
    assert len(ds) >= len(ds.class_images)
    for k in range(len(ds)):
        e = ds[k]
        s = ds.subject_of[e["instance_index"]]
        assert e["class_index"] in ds.class_members[s]  # each photo with a class image of its own subject
        assert e["instance_prompt"] == ["a sks toy", "a zwx cup"][s] and e["class_prompt"] == ["a toy", "a cup"][s]
    used = {ds[k]["class_index"] for k in range(len(ds))}
    assert used == set(range(len(ds.class_images)))  # an epoch covers every class image of every subject
    assert dm.describe(dm.subjects[1])["instance_prompt"] == "a zwx cup"
    # The run's own description (its exports' metadata and model card) names every trigger phrase.
    assert dm.describe() == {"subject": "pair", "class_noun": "toy, cup", "identifier": "sks, zwx",
                             "instance_prompt": "a sks toy, a zwx cup", "class_prompt": "a toy, a cup"}


def test_subjects_of_one_class_share_their_class_images_once(tmp_path, photos):
    subjects = _two_subjects(tmp_path)
    subjects[1].update(class_noun="toy", class_dir=subjects[0]["class_dir"])
    dm = make_datamodule(photos, subjects=subjects, class_dir=None)
    dm.setup("fit")
    ds = dm.dataset
    assert len(ds.class_images) == 4 and ds.class_members == [[0, 1, 2, 3], [0, 1, 2, 3]]  # listed (and cached) once
    assert [len(v) for v in dm.fixed_views("class", subject="mug")] == [1] * 4


def test_several_subjects_need_distinct_identifiers(tmp_path, photos):
    subjects = _two_subjects(tmp_path)
    subjects[1]["identifier"] = "SKS"  # CLIP lowercases: the same token
    with pytest.raises(DataError, match="identifier 'sks'.*its own identifier"):
        make_datamodule(photos, subjects=subjects, class_dir=None)
    subjects[1]["identifier"] = "zwx"
    with pytest.raises(DataError, match="data.class_dir .* each subject has its own"):
        make_datamodule(photos, subjects=subjects)  # the flat class_dir would be ignored: refused instead
    subjects[1].update(subject="ball")
    with pytest.raises(DataError, match="subject 'ball'"):
        make_datamodule(photos, subjects=subjects, class_dir=None)


def test_a_flipped_crop_is_the_mirror_and_its_left_offset_counts_in_the_mirrored_photo():
    """SDXL's crop conditioning must describe the pixels the model sees: after a flip, the crop's left offset is
    measured in the mirrored (resized) photo; the square path draws its offsets before the flip, as it always did."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from dreambooth_pl.data import crop_image

    x = torch.randint(0, 256, (3, 72, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    a, fa, ida = crop_image(x, 64, None, center=False, flip=lambda: False)
    torch.manual_seed(3)
    b, fb, idb = crop_image(x, 64, None, center=False, flip=lambda: True)
    assert (fa, fb) == (False, True) and torch.equal(b, a.flip(-1))
    resized = TF.resize(x, 64, interpolation=InterpolationMode.BILINEAR, antialias=True)  # (3, 64, 106)
    top, left = int(idb[2]), int(idb[3])
    assert left == resized.shape[-1] - 64 - int(ida[3]) and left != int(ida[3])
    mirrored_crop = resized.flip(-1)[:, top : top + 64, left : left + 64].float() / 127.5 - 1
    assert torch.allclose(b, mirrored_crop)
    # A bucket's crop is taken from the mirrored photo itself.
    c, fc, idc = crop_image(x, 64, (80, 48), center=True, flip=lambda: True)
    d, _, idd = crop_image(x.flip(-1), 64, (80, 48), center=True)
    assert fc and torch.equal(c, d) and torch.equal(idc, idd)


def _generated(root: Path, n: int) -> Path:
    """A class folder as the generator leaves it: images 00.jpg.. and its settings file."""
    _folder(root, n, seed=50)
    (root / SETTINGS).write_text("{}")
    return root


def test_held_out_class_images_follow_the_trained_ones_and_never_train(photos, tmp_path):
    gen = _generated(tmp_path / "gen", 7)
    dm = make_datamodule(photos, class_dir=str(gen), num_class_images=4, val_class_images=2)
    dm.setup("fit")
    assert [p.name for p in dm.class_images] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]
    items = dm.validation_items()
    assert [(s, p.name, c) for s, p, c in items if s == "prior"] == [("prior", "04.jpg", "a can"), ("prior", "05.jpg", "a can")]
    # Without held-out photos, val/loss_instance scores the training photos with their prompts.
    assert [(s, p, c) for s, p, c in items if s == "instance"] == [("instance", p, "a sks can") for p in dm.instance_images]
    assert dm.num_generated == 6  # what prepare_data makes: the trained ones, then the held-out ones
    # A user's folder of real class photos (no settings file) is trained on whole: nothing held out of it.
    user = make_datamodule(photos, val_class_images=2)
    user.setup("fit")
    assert len(user.class_images) == 6 and all(s == "instance" for s, _, _ in user.validation_items())


def test_val_photos_holds_out_each_subjects_last_photos(photos):
    dm = make_datamodule(photos, val_photos=1)
    dm.setup("fit")
    every = list_images(photos["instance"])
    assert dm.instance_images == every[:3] and dm.images_of["t"] == every  # evaluation still compares with all
    assert [(s, p) for s, p, _ in dm.validation_items() if s == "instance"] == [("instance", every[3])]
    assert all(dm.dataset.instance_images[dm.dataset.pair(i)[0]] != every[3] for i in range(len(dm.dataset)))
    with pytest.raises(DataError, match=r"data.val_photos=4 holds out every photo of 't' \(4 in "):
        make_datamodule(photos, val_photos=4).setup("fit")
    with pytest.raises(DataError, match="data.val_class_images must be >= 0"):
        make_datamodule(photos, val_class_images=-1)


def test_validation_batches_hold_one_split_each_and_repeat_exactly(photos, tmp_path):
    gen = _generated(tmp_path / "gen", 6)
    dm = make_datamodule(photos, class_dir=str(gen), num_class_images=3, val_class_images=3, batch_size=1)
    rng = torch.get_rng_state()
    first, again = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert torch.equal(torch.get_rng_state(), rng)  # validation draws nothing from the training random stream
    # 3 held-out class images then 4 photos, at most 2 rows (one training step's worth) a batch, one split each.
    assert [(b["split"], b["seeds"].tolist()) for b in first] == [("prior", [0, 1]), ("prior", [2]),
                                                                  ("instance", [3, 4]), ("instance", [5, 6])]
    assert first[0]["pixel_values"].shape == (2, 3, 64, 64) and first[0]["prompts"] == ["a can", "a can"]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, again, strict=True))


# ------------------------------------------------------------------------------------------------ masks


def _two_tone(path: Path, size=(80, 96)) -> Path:
    """A photo red on its left half, blue on its right."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = RED
    arr[:, w // 2 :] = BLUE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def test_a_mask_beside_a_photo_is_read_not_listed_and_rides_along_every_crop_and_flip(tmp_path, photos):
    """`01_mask.png` (white = counts) is the photo's mask, not a photo; it is cropped and flipped with the photo, so
    after random crops and flips it still covers exactly the red half."""
    folder = tmp_path / "masked"
    photo = _two_tone(folder / "01.png")
    arr = np.zeros((96, 80), np.uint8)
    arr[:, :40] = 255
    Image.fromarray(arr).save(folder / "01_mask.png")
    assert list_images(folder) == [photo] and load_mask(photo).size == (80, 96)
    ds = DreamBoothDataset([photo], "a sks can", resolution=64, center_crop=False, random_flip=True)
    flips = set()
    for _ in range(12):
        e = ds[0]
        red = (e["instance_pixel_values"][0] > 0.5) & (e["instance_pixel_values"][2] < 0)  # (64, 64)
        assert torch.equal(e["instance_loss_mask"][0] > 0.5, red)
        flips.add(e["instance_flipped"])
    assert flips == {True, False}
    batch = collate([ds[0], DreamBoothDataset(list_images(photos["instance"]), "a sks can", resolution=64)[0]])
    assert batch["loss_mask"].shape == (2, 1, 64, 64) and batch["loss_mask"][1].min() == 1  # no mask: all 1


def test_an_alpha_channel_is_a_mask_and_a_wrong_size_mask_is_named(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0], rgba[:32, :, 3] = 200, 255  # opaque top half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    m = np.asarray(load_mask(tmp_path / "cut.png"))
    assert (m[:32] == 255).all() and (m[32:] == 0).all()
    _photo(tmp_path / "plain.jpg", size=(64, 64))
    assert load_mask(tmp_path / "plain.jpg") is None
    Image.new("L", (32, 32), 255).save(tmp_path / "plain_mask.png")
    with pytest.raises(DataError, match=r"plain_mask.png is 32x32 px but its photo .*plain.jpg is 64x64"):
        load_mask(tmp_path / "plain.jpg")
    assert DreamBoothDataset([tmp_path / "cut.png"], "a sks can", resolution=64, masks=False)[0]["instance_loss_mask"] is None

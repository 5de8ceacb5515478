"""Subject/class image folders, DreamBooth dataset, batch collation and the Lightning DataModule."""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pytorch_lightning as pl
import torch
from PIL import Image, ImageOps
from pillow_heif import register_heif_opener
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .buckets import BucketBatchSampler, fit_to_bucket, make_buckets, nearest_bucket
from .components import ModelSource, backbone_of_model
from .files import as_record, image_grid
from .priors import MANIFEST, SETTINGS, PriorResult, PriorSampling, PriorSettings, default_folder, generate

# Phone photos come as .heic (pillow-heif reads them); GIFs give their first frame.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif"}
register_heif_opener()
CAPTIONS_FILE = "captions.jsonl"  # optional, beside the photos: {"file": "01.jpg", "caption": "a sks dog on a sofa"}
NOT_PHOTOS = {SETTINGS, MANIFEST, CAPTIONS_FILE}  # the cache's and the captions' own files, never warned about
MASK_SUFFIX = "_mask"  # <photo stem>_mask.<image extension> beside a photo: where its loss counts (white) and not
SubjectType = Literal["object", "live", "world"]  # which prompts_<type>.txt evaluates it (world: the toy world)


class DataError(ValueError):
    """Bad training data or data config; the message names the path and the fix."""


@dataclass(frozen=True)
class Subject:
    """One subject of a run: its photos and how prompts name it (an item of `data.subjects:`).

    Args:
        subject: the subject's name (its evaluation folder, outputs/<run>/subjects/<subject>, in several-subject runs)
        class_noun: the class it belongs to ("dog"); prompts are "a <identifier> <class_noun>"
        instance_dir: folder of its photos
        identifier: the rare token that names it; every subject of a run needs its own
        subject_type: which prompt list evaluates it (object, live; world for the toy world)
        class_dir: folder of its class images; null = generated (shared by the subjects of one class noun)
    """

    subject: str
    class_noun: str
    instance_dir: str
    identifier: str = "sks"
    subject_type: SubjectType = "object"
    class_dir: str | None = None

    @property
    def instance_prompt(self) -> str:
        return instance_prompt(self.identifier, self.class_noun)

    @property
    def class_prompt(self) -> str:
        return class_prompt(self.class_noun)


def instance_prompt(identifier: str, class_noun: str) -> str:
    """Prompt for the subject's own photos, e.g. 'a sks dog'."""
    return f"a {identifier} {class_noun}"


def class_prompt(class_noun: str) -> str:
    """Prompt for prior-preservation class images, e.g. 'a dog'."""
    return f"a {class_noun}"


def describe_subject(subject: str, class_noun: str, identifier: str) -> dict[str, str]:
    """Who a run is about: subject, class noun, identifier and both prompts (for exports and reports)."""
    return dict(subject=subject, class_noun=class_noun, identifier=identifier,
                instance_prompt=instance_prompt(identifier, class_noun), class_prompt=class_prompt(class_noun))


def describe_subjects(run: str, subjects: list[Subject]) -> dict[str, str]:
    """`describe_subject` of a run named `run`; a run of several subjects lists each one's identifier, class noun
    and prompts (joined by ", "), so its exports name every trigger phrase."""
    if len(subjects) == 1:
        s = subjects[0]
        return describe_subject(run, s.class_noun, s.identifier)
    parts = [describe_subject(s.subject, s.class_noun, s.identifier) for s in subjects]
    joined = {k: ", ".join(dict.fromkeys(p[k] for p in parts)) for k in parts[0] if k != "subject"}
    return {"subject": run, **joined}


def benchmark_prompts(template_file: str | Path, identifier: str, class_noun: str) -> list[str]:
    """DreamBench prompts from a template file ('{0}' = identifier, '{1}' = class noun)."""
    path = Path(template_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read prompt template file {path}: {e}; check the path") from e
    prompts = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            text = line.format(identifier, class_noun)
        except (IndexError, KeyError, ValueError) as e:
            raise DataError(
                f"bad template on line {lineno} of {path}: {line!r} ({e}); use only {{0}} and {{1}}"
            ) from e
        # Collapse runs of spaces so an empty identifier gives 'a dog in the snow', not 'a  dog ...'.
        prompts.append(re.sub(r"\s+", " ", text).strip())
    if not prompts:
        raise DataError(f"prompt template file {path} holds no templates: add one per line")
    return prompts


def load_image(path: Path, min_size: int = 0) -> Image.Image:
    """Open an image upright (EXIF applied) as fully-loaded RGB; raise DataError if unusable."""
    path = Path(path)
    try:
        with Image.open(path) as f:
            # exif_transpose returns a new image (a copy when no rotation), decoupled from the file.
            img = ImageOps.exif_transpose(f)
            img.load()  # decode now so truncated files fail here, not inside a worker
        img = _to_rgb(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(f"cannot read image {path}: {e}; remove or replace it") from e
    if min(img.size) < min_size:
        w, h = img.size
        raise DataError(
            f"image {path} is {w}x{h} px, smaller than the {min_size} px minimum "
            f"(data.min_image_size): use a larger photo"
        )
    return img


def mask_file(photo: Path) -> Path | None:
    """The photo's mask file beside it (`<stem>_mask.<ext>`, any image extension), if there is one."""
    found = [p for p in sorted(photo.parent.glob(f"{photo.stem}{MASK_SUFFIX}.*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    return found[0] if found else None


def load_mask(photo: Path) -> Image.Image | None:
    """Where a photo's loss counts, as an 8-bit L image of the photo's size: its mask file (white = counts, black =
    does not, grey between), else its alpha channel when it has transparent pixels; None = everywhere. A mask of
    another size than the photo is refused, naming both."""
    mask = mask_file(photo)
    try:
        if mask is not None:
            with Image.open(mask) as f:
                m = ImageOps.exif_transpose(f).convert("L")
            with Image.open(photo) as f:
                size = ImageOps.exif_transpose(f).size
            if m.size != size:
                raise DataError(f"mask {mask} is {m.size[0]}x{m.size[1]} px but its photo {photo} is {size[0]}x{size[1]}: "
                                f"give the mask the photo's size")
            return m
        with Image.open(photo) as f:
            img = ImageOps.exif_transpose(f)
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                alpha = img.convert("RGBA").getchannel("A")
                return alpha if alpha.getextrema()[0] < 255 else None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read the mask of {photo}: {e}; fix or remove {mask or photo}") from e
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB, compositing transparency onto white."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def read_captions(images: list[Path], identifier: str, default: str) -> list[str]:
    """One training prompt per photo: `<photo stem>.txt` beside it, else its line in captions.jsonl, else `default`
    ("a sks dog"). A caption must name the identifier, or the photo would teach nothing about it."""
    by_file: dict[str, str] = {}
    for folder in sorted({p.parent for p in images}):
        jsonl = folder / CAPTIONS_FILE
        for lineno, line in enumerate(jsonl.read_text().splitlines() if jsonl.is_file() else [], start=1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as e:
                raise DataError(f"{jsonl} line {lineno} is not JSON ({e}): write {{\"file\": ..., \"caption\": ...}}") from e
            if row is not None and not (isinstance(row, dict) and {"file", "caption"} <= set(row)):
                raise DataError(f"{jsonl} line {lineno} lacks \"file\" or \"caption\": write {{\"file\": \"01.jpg\", "
                                f"\"caption\": \"a sks dog on a sofa\"}}")
            if row is not None:
                by_file[str(folder / row["file"])] = row["caption"]
    captions = []
    for p in images:
        txt = p.with_suffix(".txt")
        text = (txt.read_text().strip() if txt.is_file() else by_file.get(str(p), default)).strip()
        if not re.search(rf"\b{re.escape(identifier)}\b", text):
            raise DataError(f"the caption of {p} ({text!r}) does not contain the identifier {identifier!r}: "
                            f"put it in the caption (\"a {identifier} dog on a sofa\") or set data.identifier")
        captions.append(text)
    return captions


def list_images(folder: str | Path, min_size: int = 0, what: str = "instance") -> list[Path]:
    """Sorted, validated image files directly inside `folder` (hidden files ignored)."""
    folder = Path(folder)
    # `what` is 'instance' or 'class' and maps to the config key data.<what>_dir.
    key = f"data.{what}_dir"
    fill = "put your photos there" if what == "instance" else "put images there"
    if not folder.exists():
        raise DataError(f"{what} folder {folder} does not exist: {fill} or set {key}")
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} is not a folder: set {key} to a folder of photos")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
    masks = {p for p in files if p.stem.endswith(MASK_SUFFIX) and p.suffix.lower() in IMAGE_EXTENSIONS}
    paths = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and p not in masks]
    exts = ", ".join(sorted(IMAGE_EXTENSIONS))
    stems = {p.stem for p in paths}  # <photo>.txt is that photo's caption
    unused = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS and p.name not in NOT_PHOTOS
              and not (p.suffix == ".txt" and p.stem in stems)]
    unused += [p.name for p in sorted(masks) if p.stem.removesuffix(MASK_SUFFIX) not in stems]  # a mask of no photo
    if unused:
        warnings.warn(f"{what} folder {folder}: not using {', '.join(unused)} (not an image: accepted extensions "
                      f"are {exts}; convert them or move them out)", stacklevel=2)
    if not paths:
        raise DataError(
            f"{what} folder {folder} holds no images (accepted extensions: {exts}): "
            f"add photos there or set {key}"
        )
    for p in paths:
        load_image(p, min_size=min_size).close()
    return paths


class DreamBoothDataset(Dataset):
    """Instance photos (repeated) paired with prior-preservation class images, loaded lazily.

    Several subjects: `subject_of[j]` is photo j's subject, `class_groups[s]` subject s's class images (subjects of
    one class noun may share them), and every photo is
    paired with a class image of its own subject (whose prompt is `class_prompts[subject]`). With `buckets`, each
    photo goes to the bucket nearest its aspect ratio and its class image is fitted to the same bucket, so a batch
    of examples from one bucket stacks into one tensor.
    """

    def __init__(
        self,
        instance_images: list[Path],
        instance_prompt: str,
        class_images: list[Path] | None = None,
        class_prompt: str | None = None,
        resolution: int = 512,
        center_crop: bool = False,
        random_flip: bool = True,
        repeats: int = 1,
        min_image_size: int = 0,
        load_pixels: bool = True,
        instance_prompts: list[str] | None = None,
        subject_of: list[int] | None = None,
        class_groups: list[list[int]] | None = None,
        class_prompts: list[str] | None = None,
        buckets: list[tuple[int, int]] | None = None,
        masks: bool = True,
    ) -> None:
        if not instance_images:
            raise DataError("DreamBoothDataset got no instance images: check data.instance_dir")
        if class_images is not None and not class_images:
            raise DataError("DreamBoothDataset got an empty class image list: check data.class_dir")
        if class_images is not None and class_prompt is None:
            raise DataError("DreamBoothDataset got class images but no class_prompt: pass class_prompt")
        if resolution < 1:
            raise DataError(f"resolution must be positive, got {resolution}: set data.resolution")
        if repeats < 1:
            raise DataError(f"repeats must be >= 1, got {repeats}: set data.repeats")
        self.instance_images = [Path(p) for p in instance_images]
        self.instance_prompt = instance_prompt
        # One prompt per photo (its caption); None: every photo is `instance_prompt`.
        self.instance_prompts = instance_prompts
        if instance_prompts is not None and len(instance_prompts) != len(self.instance_images):
            raise DataError(f"{len(instance_prompts)} captions for {len(self.instance_images)} photos: one each")
        self.class_images = [Path(p) for p in class_images] if class_images is not None else None
        self.class_prompt = class_prompt
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.repeats = repeats
        self.min_image_size = min_image_size
        # False with cached VAE latents: examples carry (index, flip) only and no image is decoded.
        self.load_pixels = load_pixels
        n = len(self.instance_images)
        self.subject_of = list(subject_of) if subject_of is not None else [0] * n
        n_subjects = max(self.subject_of) + 1
        self.class_prompts = list(class_prompts) if class_prompts is not None else [class_prompt] * n_subjects
        # Each subject's photos and class images, as indices into the flat lists.
        self.members = [[j for j in range(n) if self.subject_of[j] == s] for s in range(n_subjects)]
        self.rank = {j: r for group in self.members for r, j in enumerate(group)}
        self.class_members: list[list[int]] = [[] for _ in range(n_subjects)]
        if self.class_images is not None:
            self.class_members = ([list(g) for g in class_groups] if class_groups is not None
                                  else [list(range(len(self.class_images)))])
            empty = [s for s in range(n_subjects) if self.members[s] and not self.class_members[s]]
            if empty:
                raise DataError(f"subject {empty[0]} has photos but no class images: give every subject class images")
        # Photo j's mask (its mask file or alpha channel) weights its loss; None = every pixel counts.
        self.has_mask = [masks and load_mask(p) is not None for p in self.instance_images]
        # (width, height) buckets and photo j's bucket index; None = square crops at `resolution`.
        self.buckets = buckets
        self.bucket_of_photo = [nearest_bucket(*load_image(p).size, buckets) for p in self.instance_images] if buckets else []

    def __len__(self) -> int:
        n = len(self.instance_images) * self.repeats
        if self.class_images is not None:
            # An epoch covers every class image of every subject at least once; instances cycle to fill it: a
            # subject's C-th class image comes with its photo of rank (C-1) % n_s in cycle (C-1) // n_s (see `pair`).
            n = max(n, *((len(c) - 1) // len(m) * len(self.instance_images) + m[(len(c) - 1) % len(m)] + 1
                         for m, c in zip(self.members, self.class_members, strict=True) if m))
        return n

    def pair(self, i: int) -> tuple[int, int | None]:
        """Item i -> (photo index, class image index or None): the k-th time a subject's photos come round they
        take its class images k * n_s.. in turn (one subject: photo i % N with class image i % C)."""
        j = i % len(self.instance_images)
        if self.class_images is None:
            return j, None
        s = self.subject_of[j]
        occurrence = (i // len(self.instance_images)) * len(self.members[s]) + self.rank[j]
        group = self.class_members[s]
        return j, group[occurrence % len(group)]

    def bucket(self, i: int) -> int:
        """Item i's bucket index (its photo's); -1 without buckets."""
        return self.bucket_of_photo[i % len(self.instance_images)] if self.buckets else -1

    def transform(self, img: Image.Image, bucket: int = -1,
                  center: bool | None = None) -> tuple[torch.Tensor, bool, torch.Tensor]:
        """Maybe flip, resize and crop (to the square `resolution`, or to `buckets[bucket]`); returns ((3, h, w) in
        [-1, 1], flipped, (6,) size/crop ids: original (H, W), crop (top, left) in resized pixels, target (h, w))."""
        size = self.buckets[bucket] if bucket >= 0 else None
        return crop_image(TF.pil_to_tensor(img), self.resolution, size, self.center_crop if center is None else center,
                          self._draw_flip)

    def _draw_flip(self) -> bool:
        return bool(self.random_flip and torch.rand(()).item() < 0.5)

    def _load(self, path: Path, bucket: int) -> tuple[torch.Tensor | None, bool, torch.Tensor | None]:
        if not self.load_pixels:  # the cache holds latents and size/crop ids per (image, bucket, flip)
            return None, self._draw_flip(), None  # the same draw as transform() (center crops draw no offsets)
        with load_image(path, min_size=self.min_image_size) as img:
            return self.transform(img, bucket)

    def _load_instance(self, j: int, bucket: int) -> tuple[torch.Tensor | None, bool, torch.Tensor | None,
                                                           torch.Tensor | None]:
        """Photo j as `_load`, and its mask (1, h, w) in [0, 1] cropped and flipped with it (None without a mask)."""
        path = self.instance_images[j]
        if not self.has_mask[j]:
            return (*self._load(path, bucket), None)
        mask = TF.pil_to_tensor(load_mask(path))  # (1, H, W) uint8
        size = self.buckets[bucket] if bucket >= 0 else None
        if not self.load_pixels:  # cached latents: center crops, so the mask needs only the flip the loader draws
            flipped = self._draw_flip()
            m, _, _ = crop_image(mask, self.resolution, size, True, lambda: flipped)
            return None, flipped, None, (m + 1) / 2
        with load_image(path, min_size=self.min_image_size) as img:
            x = torch.cat([TF.pil_to_tensor(img), mask])  # (4, H, W): the mask rides along every crop and flip
        both, flipped, ids = crop_image(x, self.resolution, size, self.center_crop, self._draw_flip)
        return both[:3], flipped, ids, (both[3:] + 1) / 2

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for dataset of length {len(self)}")
        idx, cidx = self.pair(i)
        bucket = self.bucket(i)
        pixels, flipped, ids, mask = self._load_instance(idx, bucket)
        example: dict[str, Any] = {
            "instance_loss_mask": mask,
            "instance_pixel_values": pixels,
            "instance_prompt": self.instance_prompts[idx] if self.instance_prompts else self.instance_prompt,
            "instance_index": idx,
            "instance_flipped": flipped,
            "instance_time_ids": ids,
            "bucket": bucket,
            # Also without class images: `prior_loss: teacher` prompts with it.
            "class_prompt": self.class_prompts[self.subject_of[idx]],
        }
        if cidx is not None:
            pixels, flipped, ids = self._load(self.class_images[cidx], bucket)
            example.update(
                class_pixel_values=pixels,
                class_index=cidx,
                class_flipped=flipped,
                class_time_ids=ids,
            )
        return example


def crop_image(x: torch.Tensor, resolution: int, bucket: tuple[int, int] | None, center: bool,
               flip: Callable[[], bool] = bool) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """(3, H, W) uint8 -> ((3, h, w) in [-1, 1], flipped, (6,) size/crop ids: original (H, W), crop (top, left) in
    resized pixels, target (h, w)): resized and cropped to the square `resolution`, or to `bucket` (width, height).

    `flip()` decides the mirror image: asked before a bucket's crop, after the square's random offsets (the draw
    order of runs made before buckets existed); either way the crop's left offset counts in the mirrored image.
    """
    if bucket is not None:
        flipped = flip()
        x, original, (top, left) = fit_to_bucket(x.flip(-1) if flipped else x, bucket, center=center)
    else:
        r, original = resolution, tuple(x.shape[-2:])
        x = TF.resize(x, r, interpolation=InterpolationMode.BILINEAR, antialias=True)  # shorter side = R
        h, w = x.shape[-2:]
        if center:
            top, left = (h - r) // 2, (w - r) // 2
        else:
            # torch RNG (not python random) so seed_everything / DataLoader worker seeding reproduce it.
            top = int(torch.randint(0, h - r + 1, (1,)).item())
            left = int(torch.randint(0, w - r + 1, (1,)).item())
        x = x[:, top : top + r, left : left + r]
        flipped = flip()
        if flipped:
            x, left = x.flip(-1), w - left - r
    ids = torch.tensor([*original, top, left, *x.shape[-2:]], dtype=torch.float32)
    return x.to(torch.float32).div_(127.5).sub_(1.0).contiguous(), flipped, ids  # (3, h, w) in [-1, 1]


def collate(examples: list[dict]) -> dict[str, Any]:
    """Batch examples: instance rows [0, B) then class rows [B, 2B) when class images are present."""
    rows = ["instance"] + (["class"] if examples and "class_pixel_values" in examples[0] else [])
    pixels = [e[f"{r}_pixel_values"] for r in rows for e in examples]
    ids = [e[f"{r}_time_ids"] for r in rows for e in examples]
    buckets = {e["bucket"] for e in examples}
    if len(buckets) > 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)}: bucketed data needs the bucket batch sampler")
    batch = {
        "prompts": [e["instance_prompt"] for e in examples] + [e["class_prompt"] for e in examples] * (len(rows) - 1),
        "class_prompts": [e["class_prompt"] for e in examples],  # each instance row's class prompt, "a dog"
        "class_prompt": examples[0]["class_prompt"] if examples else None,
        "image_index": torch.tensor([e[f"{r}_index"] for r in rows for e in examples], dtype=torch.long),  # own list
        "flipped": torch.tensor([e[f"{r}_flipped"] for r in rows for e in examples], dtype=torch.bool),
        "bucket": torch.tensor([e["bucket"] for _ in rows for e in examples], dtype=torch.long),  # -1: no buckets
        "num_instance": len(examples),
    }
    if pixels[0] is not None:  # absent with cached latents
        # (2B, 3, h, w) with class images, else (B, 3, h, w); plain layout so the VAE sees NCHW.
        batch["pixel_values"] = torch.stack(pixels).contiguous(memory_format=torch.contiguous_format)
        batch["time_ids"] = torch.stack(ids)  # (2B or B, 6) SDXL size/crop conditioning
    masks = [e.get("instance_loss_mask") for e in examples]
    if any(m is not None for m in masks):  # (B, 1, h, w) in [0, 1] for the instance rows; a photo without one: all 1
        shape = next(m for m in masks if m is not None).shape
        batch["loss_mask"] = torch.stack([m if m is not None else torch.ones(shape) for m in masks])
    return batch


class BucketBatches(Dataset):
    """A dataset whose items are whole batches, each from one bucket: a DataLoader (batch_size=None) over it
    shuffles the batches, and Lightning's distributed sampler shards them over DDP ranks as it does any dataset."""

    def __init__(self, dataset: DreamBoothDataset, batch_size: int, seed: int) -> None:
        self.dataset = dataset
        sampler = BucketBatchSampler([dataset.bucket(i) for i in range(len(dataset))], batch_size, seed=seed)
        self.batches = list(sampler)  # grouped once; the loader reshuffles their order every epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict[str, Any]:
        return collate([self.dataset[i] for i in self.batches[b]])


def _check_config(c: dict) -> None:
    """Refuse a data config that cannot work, naming the key and the fix."""
    if c["subject_type"] not in get_args(SubjectType):
        raise DataError(
            f"data.subject_type is {c['subject_type']!r} for subject {c['subject']!r}: set it to 'object', 'live' or 'world'"
        )
    for name in ("resolution", "repeats", "batch_size"):
        if c[name] < 1:
            raise DataError(f"data.{name} must be >= 1, got {c[name]}: fix it in the config")
    for name in ("val_class_images", "val_photos"):
        if c[name] < 0:
            raise DataError(f"data.{name} must be >= 0, got {c[name]}: fix it in the config (0 = none)")
    if c["cache_latents"] and not c["center_crop"]:
        raise DataError("cached VAE latents (model.speed.cache_latents) need data.center_crop: true, since a "
                        "random crop changes the image every step; set data.center_crop: true or turn the cache off")


class DreamBoothDataModule(pl.LightningDataModule):
    """Subject photos + optional class images for one DreamBooth run (the `data:` config section)."""

    def __init__(
        self,
        subject: str = "subject",
        class_noun: str = "object",
        subject_type: SubjectType = "object",
        instance_dir: str = "data/subjects/subject",
        identifier: str = "sks",
        with_prior_preservation: bool = True,
        class_dir: str | None = None,
        num_class_images: int = 200,
        prior: PriorSampling = PriorSampling(),
        model: ModelSource = ModelSource(),
        cache_latents: bool = False,
        resolution: int = 512,
        center_crop: bool = False,
        random_flip: bool = False,
        repeats: int = 1,
        batch_size: int = 1,
        num_workers: int = 0,
        min_image_size: int = 64,
        seed: int = 0,
        subjects: list[Subject] | None = None,
        buckets: bool | None = None,
        bucket_step: int = 64,
        max_aspect_ratio: float = 2.0,
        val_class_images: int = 8,
        val_photos: int = 0,
        masks: bool = True,
        captions: bool = True,
    ) -> None:
        """The photos, the class images and how batches are made (the `data:` section).

        Args:
            subject: the subject's name (run folder outputs/<subject>, W&B run name)
            class_noun: the class the subject belongs to ("dog"); prompts are "a <identifier> <class_noun>"
            subject_type: which prompt list evaluates it (DreamBench: object or live; the toy world: world)
            instance_dir: folder of the subject's photos (3-6 are typical)
            identifier: the rare token that names the subject in prompts
            with_prior_preservation: pair every photo with a class image (the prior-preservation loss)
            class_dir: folder of class images; null = generated once into cache/priors/<content key>/
            num_class_images: class images to use (this project's default 200; diffusers' example defaults to 100)
            prior: how the class images are sampled
            model: the model the class images come from (set from model.*, not in the config)
            cache_latents: the model caches VAE latents, so examples carry no pixels (set from model.speed)
            resolution: training resolution in px (square crops)
            center_crop: center crops instead of random crops (cached latents need it)
            random_flip: flip photos horizontally at random (off by default, as in the paper and diffusers' script:
                subjects with text or logos would learn mirrored lettering)
            repeats: how often each photo appears per epoch
            batch_size: instance images per step (plus as many class images)
            num_workers: DataLoader worker processes
            min_image_size: photos with a shorter side are refused
            seed: shuffling and augmentation seed (set from seed_everything)
            subjects: several subjects learnt by one model in one run (each with its photos, identifier, class noun
                and optional class folder; identifiers must differ); null = the one subject above. `subject` then
                names the run, and evaluation and the report are per subject
            buckets: aspect-ratio buckets of about resolution^2 pixels instead of square crops (batches never mix
                buckets; class images are fitted to their photo's bucket); null = on for SDXL, off for SD 1.x/2.x
            bucket_step: bucket sides are multiples of this (px; a multiple of 8)
            max_aspect_ratio: the most elongated bucket (longer / shorter side)
            val_class_images: generated class images held out of training (the class folder's images after the
                num_class_images trained on, same settings and cache) for val/loss_prior; 0 = none
            val_photos: photos of each subject held out of training (its last ones by name) for val/loss_instance;
                0 = val/loss_instance scores the training photos (how well they are fitted, not generalisation)
            masks: weight a photo's loss by its mask, `<photo>_mask.png` beside it (white counts, black does not) or
                its alpha channel; false = every pixel counts
            captions: train each photo on its caption (`<photo>.txt` or captions.jsonl beside it) when it has one;
                false = every photo on the instance prompt, as in the paper
        """
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        _check_config(config)
        self.save_hyperparameters(as_record(config))  # plain values: YAML, W&B and weights_only checkpoints
        self.prior, self.model_source = prior, model
        self.subjects = _subjects(config)
        self.instance_images: list[Path] = []
        self.class_images: list[Path] = []
        self.images_of: dict[str, list[Path]] = {}  # subject name -> its photos
        self.class_images_of: dict[str, list[Path]] = {}  # subject name -> its class images
        self.val_photos_of: dict[str, list[tuple[Path, str]]] = {}  # subject -> (photo, caption) to validate on
        # subject name -> held-out class images (listed for the first subject of a shared class folder only)
        self.val_class_of: dict[str, list[Path]] = {}
        self.dataset: DreamBoothDataset | None = None

    @property
    def instance_prompt(self) -> str:
        """Prompt paired with the (first) subject's photos."""
        return self.subjects[0].instance_prompt

    @property
    def class_prompt(self) -> str:
        """Prompt paired with the (first) subject's class images."""
        return self.subjects[0].class_prompt

    @property
    def use_buckets(self) -> bool:
        """`buckets` as set, or on for an SDXL base model (read from its model_index.json)."""
        if self.hparams.buckets is not None:
            return self.hparams.buckets
        return backbone_of_model(self.model_source.pretrained, self.model_source.single_file_config).name == "sdxl"

    def bucket_sizes(self) -> list[tuple[int, int]] | None:
        """The (width, height) buckets, or None for square crops."""
        hp = self.hparams
        if not self.use_buckets:
            return None
        try:
            return make_buckets(hp.resolution, hp.bucket_step, hp.max_aspect_ratio)
        except ValueError as e:
            raise DataError(str(e)) from e

    def describe(self, subject: Subject | None = None) -> dict[str, str]:
        """Who the run (or one of its subjects) is about: subject, class noun, identifier and both prompts."""
        if subject is not None:
            return describe_subject(subject.subject, subject.class_noun, subject.identifier)
        return describe_subjects(self.hparams.subject, self.subjects)

    def prior_settings(self, subject: Subject | None = None) -> PriorSettings:
        """What the generated class images (of `subject`, default the first) depend on (their cache key)."""
        prompt = (subject or self.subjects[0]).class_prompt
        return PriorSettings(model=self.model_source, prompt=prompt, resolution=self.hparams.resolution,
                             sampling=self.prior)

    def class_folder(self, subject: Subject | None = None) -> Path:
        """`class_dir` when set, else the content-keyed cache folder cache/priors/<key>/."""
        s = subject or self.subjects[0]
        return Path(s.class_dir) if s.class_dir is not None else default_folder(self.prior_settings(s))

    def _user_photos(self, folder: Path) -> bool:
        # A folder the user filled with real class photos: images present, no generator settings file.
        return folder.is_dir() and not (folder / SETTINGS).exists() and any(
            p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir()
        )

    def prepare_data(self) -> None:
        """Make the missing class images (once, on local rank zero) before fitting."""
        if not self.hparams.with_prior_preservation:
            return
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        for prompt, result in self.make_class_images(device=device):
            print(f"Class images ({prompt}): {result}", file=sys.stderr)

    def make_class_images(self, device: torch.device | None = None,
                          trainer_kwargs: dict | None = None) -> list[tuple[str, PriorResult]]:
        """Make every generated class folder's missing images (training ones, then held-out ones), each folder once
        (subjects of one class noun share it): a plain loop on `device` (inside fit), else Lightning prediction with
        `trainer_kwargs` (the priors and experiment commands). A user's folder of real class photos is left as is.
        Returns (class prompt, what was made) per folder."""
        results, done = [], set()
        for s in self.subjects:
            folder = self.class_folder(s)
            if folder in done or self._user_photos(folder):
                continue  # a user's folder is validated like instance photos in setup()
            done.add(folder)
            results.append((s.class_prompt, generate(self.prior_settings(s), self.num_generated, folder=folder,
                                                     trainer_kwargs=trainer_kwargs, device=device)))
        return results

    @property
    def num_generated(self) -> int:
        """Class images a generated folder holds: the ones trained on, then the held-out validation ones."""
        return self.hparams.num_class_images + self.hparams.val_class_images

    def _list_class_images(self, subject: Subject | None = None) -> list[Path]:
        s = subject or self.subjects[0]
        folder = self.class_folder(s)
        if not folder.is_dir():
            raise DataError(
                f"class-image folder {folder} does not exist for subject {s.subject!r}: run "
                f"`python -m dreambooth_pl priors` (or fit, which makes them in prepare_data), point "
                f"data.class_dir at a folder of '{s.class_prompt}' photos, or set data.with_prior_preservation: false"
            )
        images = list_images(folder, min_size=self.hparams.min_image_size, what="class")
        # Generated folders can hold more images than asked for (an earlier, larger run): train on 0..N-1 and
        # validate on the next val_class_images; a user's folder of real class photos is all trained on.
        if self._user_photos(folder):
            return images
        n = self.hparams.num_class_images
        self.val_class_of[s.subject] = images[n : n + self.hparams.val_class_images]
        return images[:n]

    def setup(self, stage: str | None = None) -> None:
        """List and validate every subject's image folders, then build `self.dataset`."""
        hp = self.hparams
        prior = hp.with_prior_preservation
        self.instance_images, self.instance_captions, self.class_images = [], [], []
        subject_of, class_groups, listed = [], [], {}
        for k, s in enumerate(self.subjects):
            photos = list_images(s.instance_dir, min_size=hp.min_image_size, what="instance")
            if hp.val_photos and len(photos) <= hp.val_photos:
                raise DataError(f"data.val_photos={hp.val_photos} holds out every photo of {s.subject!r} "
                                f"({len(photos)} in {s.instance_dir}): hold out fewer (0 = none) or add photos")
            self.images_of[s.subject] = photos  # all of them: evaluation compares with every photo
            texts = read_captions(photos, s.identifier, s.instance_prompt) if hp.captions else \
                [s.instance_prompt] * len(photos)
            captions = list(zip(photos, texts, strict=True))
            keep = len(photos) - hp.val_photos
            # Held-out photos, or the training ones: (photo, caption) pairs val/loss_instance scores.
            self.val_photos_of[s.subject] = captions[keep:] or captions
            self.instance_images += photos[:keep]
            self.instance_captions += [c for _, c in captions[:keep]]
            subject_of += [k] * keep
            if prior:
                # Subjects of one class noun share a generated folder: list (and cache) it once, pair it with each.
                folder = self.class_folder(s).resolve()
                if folder not in listed:
                    classes = self._list_class_images(s)
                    listed[folder] = list(range(len(self.class_images), len(self.class_images) + len(classes)))
                    self.class_images += classes
                class_groups.append(listed[folder])
                self.class_images_of[s.subject] = [self.class_images[c] for c in listed[folder]]
        self._log_class_grid()
        self.dataset = DreamBoothDataset(
            instance_images=self.instance_images,
            instance_prompt=self.instance_prompt,
            instance_prompts=self.instance_captions,
            class_images=self.class_images if prior else None,
            class_prompt=self.class_prompt,
            resolution=hp.resolution,
            center_crop=hp.center_crop,
            random_flip=hp.random_flip,
            repeats=hp.repeats,
            min_image_size=hp.min_image_size,
            load_pixels=not hp.cache_latents,
            subject_of=subject_of,
            class_groups=class_groups if prior else None,
            class_prompts=[s.class_prompt for s in self.subjects],
            buckets=self.bucket_sizes(),
            masks=hp.masks,
        )

    def cache_views(self) -> Iterator[tuple[tuple[str, int, int], torch.Tensor, torch.Tensor]]:
        """What the latent cache encodes: every (split, image index, bucket) the loader can show, with its views
        (F, 3, h, w) in [-1, 1] (F = 2 with random_flip: as is, then flipped) and their (F, 6) size/crop ids."""
        ds = self.dataset
        if ds is None:
            self.setup("fit")
            ds = self.dataset
        seen = set()
        for i in range(len(ds)):
            j, c = ds.pair(i)
            b = ds.bucket(i)
            for key, path in ((("instance", j, b), ds.instance_images[j]),
                              (("class", c, b), ds.class_images[c] if c is not None else None)):
                if path is None or key in seen:
                    continue
                seen.add(key)
                with load_image(path) as img:
                    views, ids = _fixed_views(img, ds.resolution, ds.buckets[b] if b >= 0 else None,
                                              self.hparams.random_flip)
                yield key, views, ids

    def fixed_views(self, split: Literal["instance", "class"], limit: int | None = None,
                    subject: str | None = None) -> Iterator[torch.Tensor]:
        """Every view the loader can show of each `split` image, unaugmented otherwise: (F, 3, R, R) in [-1, 1].

        Square center crops; F = 2 (as is, then the mirrored photo's) with `random_flip`, else 1. What the learning
        probe scores (and, without buckets, what the latent cache encodes), so neither depends on a step's crop.
        `subject`: that subject's photos only.
        """
        if subject is not None:  # one subject's photos or class images (several-subject runs)
            paths = (self.images_of if split == "instance" else self.class_images_of)[subject][:limit]
        else:
            paths = (self.instance_images if split == "instance" else self.class_images)[:limit]
        for path in paths:
            with load_image(path) as img:
                yield _fixed_views(img, self.hparams.resolution, None, self.hparams.random_flip)[0]

    def _log_class_grid(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None or not self.class_images:
            return
        grid = image_grid(self.class_images[:16], cols=4)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("priors/class_images", [grid], caption=[f"{self.class_prompt} ({len(self.class_images)} images)"])

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader; order (and worker RNG seeds) come from a generator seeded with `seed`. With buckets its
        items are whole one-bucket batches (`BucketBatches`)."""
        if self.dataset is None:
            self.setup("fit")
        hp = self.hparams
        batched = self.dataset.buckets is not None
        return DataLoader(
            BucketBatches(self.dataset, hp.batch_size, hp.seed) if batched else self.dataset,
            batch_size=None if batched else hp.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(hp.seed),
            drop_last=False,
            collate_fn=_identity if batched else collate,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            pin_memory=False,
        )


    def validation_items(self) -> list[tuple[str, Path, str]]:
        """(split, image, prompt) of every validation image: each subject's held-out class images ("prior", with its
        class prompt; subjects sharing a class folder share them) and its held-out photos, or with data.val_photos
        0 its training photos ("instance", with its caption)."""
        if self.dataset is None:
            self.setup("fit")
        prior = [("prior", path, s.class_prompt) for s in self.subjects for path in self.val_class_of.get(s.subject, [])]
        return prior + [("instance", path, c) for s in self.subjects for path, c in self.val_photos_of[s.subject]]

    def val_dataloader(self) -> DataLoader:
        """Fixed batches of one split each (square center crops, no flip), in a fixed order; see `validation_items`."""
        hp = self.hparams
        return DataLoader(ValidationBatches(self.validation_items(), hp.resolution, 2 * hp.batch_size, hp.min_image_size),
                          batch_size=None, shuffle=False, num_workers=hp.num_workers,
                          # Its own generator: iterating this loader draws nothing from the training random stream.
                          generator=torch.Generator().manual_seed(0))


class ValidationBatches(Dataset):
    """The validation set as whole batches of one split each: {"pixel_values": (n, 3, R, R), "prompts",
    "split", "seeds": (n,)}; an image's seed (its place in the list) fixes its noise and timesteps."""

    def __init__(self, items: list[tuple[str, Path, str]], resolution: int, batch_size: int, min_image_size: int = 0):
        self.items, self.resolution, self.min_image_size = items, resolution, min_image_size
        # Consecutive runs of one split, cut into batches: a batch never mixes the splits' losses.
        self.batches: list[list[int]] = []
        for i, (split, _, _) in enumerate(items):
            last = self.batches[-1] if self.batches else None
            if last is None or items[last[0]][0] != split or len(last) == batch_size:
                self.batches.append([])
            self.batches[-1].append(i)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict[str, Any]:
        rows = self.batches[b]
        pixels = []
        for i in rows:
            with load_image(self.items[i][1], self.min_image_size) as img:
                pixels.append(_fixed_views(img, self.resolution, None, random_flip=False)[0][0])
        return {"pixel_values": torch.stack(pixels), "prompts": [self.items[i][2] for i in rows],
                "split": self.items[rows[0]][0], "seeds": torch.tensor(rows)}


def _identity(batch: dict) -> dict:
    """The collate of a loader whose items are batches already (picklable for worker processes)."""
    return batch


def _fixed_views(img: Image.Image, resolution: int, bucket: tuple[int, int] | None,
                 random_flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The unaugmented, center-cropped views of an image the loader can show (as is, and mirrored with
    `random_flip`) in `bucket` (None: the square): ((F, 3, h, w) in [-1, 1], (F, 6) size/crop ids)."""
    x = TF.pil_to_tensor(img)  # (3, H, W) uint8
    views = [crop_image(x, resolution, bucket, center=True, flip=lambda f=f: f) for f in
             ([False, True] if random_flip else [False])]
    return torch.stack([v for v, _, _ in views]), torch.stack([ids for _, _, ids in views])


def _subjects(c: dict) -> list[Subject]:
    """The run's subjects: `subjects` when given (distinct names and identifiers), else the one of the flat keys."""
    if not c.get("subjects"):
        return [Subject(c["subject"], c["class_noun"], c["instance_dir"], c["identifier"], c["subject_type"],
                        c["class_dir"])]
    if c.get("class_dir") is not None:
        raise DataError(f"data.class_dir ({c['class_dir']}) is set with data.subjects, where each subject has its own: "
                        f"move it into the subjects (class_dir: ...) that use it")
    subjects = [s if isinstance(s, Subject) else Subject(**s) for s in c["subjects"]]
    for key in ("identifier", "subject"):
        # CLIP's tokenizer lowercases: "sks" and "SKS" are one token, so identifiers differ only if lowercased ones do.
        values = [getattr(s, key).strip().lower() if key == "identifier" else getattr(s, key) for s in subjects]
        dup = next((v for v in values if values.count(v) > 1), None)
        if dup is not None:
            raise DataError(f"data.subjects: two subjects have the {key} {dup!r}: give each subject its own {key} "
                            f"(one model must tell them apart by it)")
    for s in subjects:
        if s.subject_type not in get_args(SubjectType):
            raise DataError(f"data.subjects: subject {s.subject!r} has subject_type {s.subject_type!r}: set it to "
                            f"'object', 'live' or 'world'")
    return subjects


def write_benchmark_files(root: str | Path) -> list[Path]:
    """From a clone of the DreamBooth dataset repo, write subjects.csv and prompts_{object,live}.txt.

    The public repo keeps classes and both prompt lists in `dataset/prompts_and_classes.txt`; the
    project reads them as three plain files (`{0}` identifier, `{1}` class noun), as the shared copy has.
    """
    root = Path(root)
    src = root / "dataset" / "prompts_and_classes.txt"
    if not src.is_file():
        raise DataError(f"{src} not found: {root} is not a clone of the DreamBooth dataset repository")
    text = src.read_text(encoding="utf-8")
    classes = re.findall(r"^([a-z0-9_]+),([a-z ]+)$", text.split("Prompts")[0], flags=re.M)
    rows = [(name, cls) for name, cls in classes if name != "subject_name"]
    lists = [re.findall(r"'(a .*?)'\.format", part) for part in re.split(r"prompt_list = \[", text)[1:]]
    if len(rows) != 30 or len(lists) != 2 or any(len(x) != 25 for x in lists):
        raise DataError(f"unexpected layout in {src}: found {len(rows)} subjects and prompt lists of {[len(x) for x in lists]}")
    live = {"cat", "dog"}
    out = [root / "subjects.csv", root / "prompts_object.txt", root / "prompts_live.txt"]
    out[0].write_text("subject_name,class,type\n" + "".join(
        f"{n},{c},{'live' if c in live else 'object'}\n" for n, c in rows))
    out[1].write_text("\n".join(lists[0]) + "\n")
    out[2].write_text("\n".join(lists[1]) + "\n")
    return out

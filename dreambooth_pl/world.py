"""The toy world: scenes, their 64 px renders, captions, edits and subjects, all from `world_vocabulary.json`.

A scene is one object (a shape that is the class noun, a body colour, an optional marking in a second colour, a
size and a position) on a background (a flat palette colour or a scene such as "at night"). Everything is
deterministic from the scene (and the scene from a seed), so every generated image can be checked against the
attributes it was asked for.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .files import write_image, write_text

SIZE = 64  # px, square
VOCAB: dict = json.loads(resources.files("dreambooth_pl").joinpath("world_vocabulary.json").read_text())
PALETTE: dict[str, tuple[int, int, int]] = {k: tuple(v) for k, v in VOCAB["palette"].items()}
BACKGROUNDS: list[str] = VOCAB["flat_backgrounds"] + list(VOCAB["scenes"])
SUBJECTS: dict[str, dict] = VOCAB["subjects"]  # the reported subjects (world-claims, the demo)
VALIDATION_SUBJECTS: dict[str, dict] = VOCAB["validation_subjects"]  # what the DreamBooth defaults are tuned on
ALL_SUBJECTS: dict[str, dict] = {**SUBJECTS, **VALIDATION_SUBJECTS}
TEMPLATES: list[dict] = VOCAB["templates"]
NO_OP = VOCAB["no_op_instruction"]  # InstructPix2Pix's "change nothing": it must give the photo back (a check)
SUBJECT_TYPE = "world"  # prompts_world.txt, as DreamBench has prompts_object.txt / prompts_live.txt
# Judge heads: attribute -> its classes (marking colour "none" when there is no marking).
ATTRIBUTES: dict[str, list[str]] = {
    "shape": VOCAB["shapes"], "color": VOCAB["object_colors"], "marking": VOCAB["markings"],
    "marking_color": ["none", *VOCAB["marking_colors"]], "background": BACKGROUNDS,
    "size": list(VOCAB["sizes"]), "position": VOCAB["positions"],
}


@dataclass(frozen=True)
class Scene:
    """One object on a background; `x`, `y`, `radius` (px) and `seed` (specks) make the render exact."""

    shape: str
    color: str
    marking: str
    marking_color: str  # "none" without a marking
    background: str
    size: str
    position: str
    x: float
    y: float
    radius: float
    seed: int = 0

    def attributes(self) -> dict[str, str]:
        """The named attributes (what captions say and the judge reads)."""
        return {k: getattr(self, k) for k in ATTRIBUTES}

    def identity(self) -> tuple[str, str, str, str]:
        """What makes a subject a subject: shape, body colour, marking and its colour (`IDENTITY`)."""
        return tuple(getattr(self, k) for k in IDENTITY)


IDENTITY = ("shape", "color", "marking", "marking_color")  # what makes a subject itself (Scene.identity)
# Never in pretraining (VAE, text-to-image, InstructPix2Pix's inputs and edit targets): the reported subjects and the
# validation subjects, so that tuning on the latter is as blind as reporting on the former.
HELD_OUT = {(s["shape"], s["color"], s["marking"]) for s in ALL_SUBJECTS.values()}


def place(size: str, position: str, rng: np.random.Generator) -> tuple[float, float, float]:
    """(x, y, radius) in px: a radius in the size's range, the position cell's centre jittered, kept in frame."""
    lo, hi = VOCAB["sizes"][size]
    r = float(rng.uniform(lo, hi)) * SIZE
    row, col = divmod(VOCAB["positions"].index(position), 3)
    cx, cy = (col + 0.5) * SIZE / 3 + rng.uniform(-3, 3), (row + 0.5) * SIZE / 3 + rng.uniform(-3, 3)
    return float(np.clip(cx, r, SIZE - r)), float(np.clip(cy, r, SIZE - r)), r


def random_scene(rng: np.random.Generator, held_out: set = HELD_OUT, **fixed) -> Scene:
    """A random scene (attributes in `fixed` kept), never a held-out shape/colour/marking combination."""
    while True:
        a = {k: fixed.get(k) or str(rng.choice(VOCAB[{"shape": "shapes", "color": "object_colors",
                                                     "marking": "markings"}[k]]))
             for k in ("shape", "color", "marking")}
        if (a["shape"], a["color"], a["marking"]) not in held_out:
            break
    if "marking_color" in fixed:
        mc = fixed["marking_color"]
    else:
        mc = "none" if a["marking"] == "none" else str(rng.choice([c for c in VOCAB["marking_colors"] if c != a["color"]]))
    bg = fixed.get("background") or str(rng.choice([b for b in BACKGROUNDS if b != a["color"]]))
    size = fixed.get("size") or str(rng.choice(list(VOCAB["sizes"])))
    pos = fixed.get("position") or str(rng.choice(VOCAB["positions"]))
    x, y, r = place(size, pos, rng)
    return Scene(a["shape"], a["color"], a["marking"], mc, bg, size, pos, x, y, r, int(rng.integers(2**31)))


def subject_scene(subject: str, rng: np.random.Generator, **fixed) -> Scene:
    """A scene of a world subject (reported or validation): its shape, colours and marking, other attributes random
    (or `fixed`)."""
    return random_scene(rng, held_out=set(), **{**ALL_SUBJECTS[subject], **fixed})


def photo_scene(subject: str, index: int, rng: np.random.Generator) -> Scene:
    """Photo `index` of a subject: a background (cycling through the photo backgrounds, never the body colour) and a
    position that no template asks for, a random size, so every template's context is new to the fine-tune."""
    body = ALL_SUBJECTS[subject]["color"]
    backgrounds = [b for b in VOCAB["photo_backgrounds"] if b != body]
    return subject_scene(subject, rng, background=backgrounds[index % len(backgrounds)],
                         position=str(rng.choice(VOCAB["photo_positions"])))


# ------------------------------------------------------------------------------------------------ rendering


def _shape_points(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Polygon outline of a star or heart centred at (x, y) with outer radius r."""
    if shape == "star":
        return [(x + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                 y - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
    t = np.linspace(0, 2 * math.pi, 60)  # the heart curve, about 17 x 17 units before scaling
    hx, hy = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    s = r / 17
    return list(zip((x + s * hx).tolist(), (y - s * hy + 0.1 * r).tolist(), strict=True))


def shape_mask(shape: str, x: float, y: float, r: float) -> np.ndarray:
    """(SIZE, SIZE) bool: the pixels of the object."""
    img = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(img)
    if shape in ("ball", "ring"):
        d.ellipse((x - r, y - r, x + r, y + r), fill=255)
        if shape == "ring":
            d.ellipse((x - 0.55 * r, y - 0.55 * r, x + 0.55 * r, y + 0.55 * r), fill=0)
    elif shape == "box":
        h = 0.85 * r
        d.rectangle((x - h, y - h, x + h, y + h), fill=255)
    else:
        d.polygon(_shape_points(shape, x, y, r), fill=255)
    return np.asarray(img) > 127


def marking_mask(marking: str, x: float, y: float, r: float) -> np.ndarray:
    """(SIZE, SIZE) bool: where the marking's colour goes (before clipping to the object)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    if marking == "stripe":  # vertical
        return np.abs(xx - x) < 0.2 * r
    if marking == "band":  # horizontal
        return np.abs(yy - y) < 0.2 * r
    if marking == "dots":
        step, rad = 0.5 * r, 0.14 * r + 0.6
        gx, gy = (xx - x) / step, (yy - y) / step
        return np.hypot(gx - np.round(gx), gy - np.round(gy)) * step < rad
    return np.zeros((SIZE, SIZE), bool)


def background(name: str, seed: int) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: a flat palette colour, or a scene (sky, ground, specks)."""
    if name in PALETTE:
        return np.broadcast_to(np.array(PALETTE[name], np.uint8), (SIZE, SIZE, 3)).copy()
    sc = VOCAB["scenes"][name]
    out = np.empty((SIZE, SIZE, 3), np.uint8)
    h = int(round(sc["horizon"] * SIZE))
    out[:h], out[h:] = PALETTE[sc["top"]], PALETTE[sc["bottom"]]
    if sc["specks"]:  # stars at night, snowflakes: 1-px specks from the scene's seed
        rng = np.random.default_rng(seed)
        pts = rng.integers(0, SIZE, (24, 2))
        out[pts[:, 1], pts[:, 0]] = PALETTE[sc["specks"]]
    return out


def render(scene: Scene) -> Image.Image:
    """The scene as a 64 x 64 RGB image: flat colours, no anti-aliasing (exact masks)."""
    img = background(scene.background, scene.seed)
    body = shape_mask(scene.shape, scene.x, scene.y, scene.radius)
    img[body] = PALETTE[scene.color]
    if scene.marking != "none":
        img[body & marking_mask(scene.marking, scene.x, scene.y, scene.radius)] = PALETTE[scene.marking_color]
    return Image.fromarray(img, "RGB")


# ------------------------------------------------------------------------------------------------ captions, edits


def marking_phrase(marking: str, color: str) -> str:
    """A marking as captions say it: "plain" (none), "with white dots", "with a yellow band"."""
    return "plain" if marking == "none" else f"with {color} dots" if marking == "dots" else f"with a {color} {marking}"


def phrases(scene: Scene) -> dict[str, str]:
    """Each attribute as the words a caption uses for it; no marking is said ("plain"), so a caption that drops the
    marking leaves it to the prior instead of implying "plain"."""
    mark = marking_phrase(scene.marking, scene.marking_color)
    bg = f"on a {scene.background} background" if scene.background in PALETTE else scene.background
    return {"size": scene.size, "color": scene.color, "shape": scene.shape, "marking": mark, "background": bg,
            "position": f"in the {scene.position}"}


CAPTION_ORDER = ("size", "color", "shape", "marking", "background", "position")
PLAIN_ORDER = ("size", "marking", "color", "shape", "background", "position")  # "a small plain red star"


def caption(scene: Scene, rng: np.random.Generator | None = None, keep: float = 0.5) -> str:
    """'a [size] [plain] [colour] shape [marking] [background] [position]'; each bracket kept with probability `keep`
    (all of them without `rng`), so partial prompts sample the prior over the attributes left out."""
    p = phrases(scene)
    use = {k: rng is None or k == "shape" or rng.random() < keep for k in p}
    order = PLAIN_ORDER if scene.marking == "none" else CAPTION_ORDER
    return " ".join(["a"] + [p[k] for k in order if use[k]])


EDITS = ("background", "color", "pose")


def random_edit(scene: Scene, rng: np.random.Generator, no_op: float = 0.0,
                held_out: set = HELD_OUT) -> tuple[str, Scene]:
    """An instruction and the scene it asks for: one attribute changed, everything else (the seed too) kept; with
    probability `no_op` the no-op instruction and the scene itself. A colour change never makes a `held_out`
    subject."""
    if no_op and rng.random() < no_op:
        return NO_OP, scene
    kind = str(rng.choice(EDITS))
    if kind == "background":
        bg = str(rng.choice([b for b in BACKGROUNDS if b not in (scene.background, scene.color)]))
        text = f"make the background {bg}" if bg in PALETTE else f"put it {bg}"
        return text, dataclasses.replace(scene, background=bg)
    if kind == "color":
        c = str(rng.choice([c for c in VOCAB["object_colors"] if c not in (scene.color, scene.marking_color, scene.background)
                            and (scene.shape, c, scene.marking) not in held_out]))
        return f"make it {c}", dataclasses.replace(scene, color=c)
    size = str(rng.choice(list(VOCAB["sizes"])))
    pos = str(rng.choice([p for p in VOCAB["positions"] if p != scene.position]))
    x, y, r = place(size, pos, rng)
    return f"make it {size} and move it to the {pos}", dataclasses.replace(scene, size=size, position=pos, x=x, y=y, radius=r)


def apply_change(scene: Scene, change: dict, rng: np.random.Generator) -> Scene:
    """The scene a benchmark template asks for (its `change`), placed anew when size or position change."""
    new = dataclasses.replace(scene, **change)
    if "size" in change or "position" in change:
        x, y, r = place(new.size, new.position, rng)
        new = dataclasses.replace(new, x=x, y=y, radius=r)
    return new


def photo_caption(scene: Scene, identifier: str = "sks") -> str:
    """A subject photo's training caption: the identifier, the class noun and the photo's background ("a sks star on
    a gray background"), so the fine-tune can put the background on the words that name it instead of on the
    identifier (left uncaptioned, the photos' gray leaks into every context)."""
    return f"a {identifier} {scene.shape} {phrases(scene)['background']}"


# ------------------------------------------------------------------------------------------------ subjects on disk


def write_dataset(root: str | Path = "data/world", photos: int = 5, seed: int = 0) -> Path:
    """The world subjects (reported, then validation) in the DreamBench layout: dataset/<subject>/NN.png with their
    captions.jsonl (`photo_caption`; `data.captions: false` trains on "a sks <shape>" instead), subjects.csv (with a
    `split` column: reported or validation), prompts_world.txt."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for name in ALL_SUBJECTS:
        rows = []
        for i in range(photos):  # varied size, position and background, none of them a template's
            scene = photo_scene(name, i, rng)
            write_image(render(scene), root / "dataset" / name / f"{i:02d}.png")
            rows.append(json.dumps({"file": f"{i:02d}.png", "caption": photo_caption(scene)}) + "\n")
        write_text(root / "dataset" / name / "captions.jsonl", "".join(rows))
    rows = [["subject_name", "class", "type", "split"]] + [
        [n, s["shape"], SUBJECT_TYPE, "reported" if n in SUBJECTS else "validation"] for n, s in ALL_SUBJECTS.items()]
    write_text(root / "subjects.csv", "".join(",".join(r) + "\n" for r in rows))
    write_text(root / f"prompts_{SUBJECT_TYPE}.txt", "".join(t["template"] + "\n" for t in TEMPLATES))
    return root


def read_subjects(root: str | Path) -> list[dict]:
    """subjects.csv of a DreamBench-layout folder as dicts."""
    with open(Path(root) / "subjects.csv", newline="") as f:
        return list(csv.DictReader(f))

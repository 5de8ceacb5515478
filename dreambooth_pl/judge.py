"""The toy world's judge: a small CNN that reads every attribute of a 64 px render, and the prompt parser.

The judge is the world's ground truth for generated images: `Judge.read` names each attribute of an image
(shape, body colour, marking, marking colour, background, size, position), `parse_prompt` names the
attributes a prompt asks for, and `agreement` compares the two. `encoders.load_encoders("world")` wraps it
in the DINO / CLIP / LPIPS roles so the metric code runs unchanged. `python -m dreambooth_pl.judge`
trains it from scratch (deterministic, CPU) and writes models/world/judge/.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import world
from .files import write_json, write_tensors
from .loggers import git_sha

WORLD_MODELS = Path(__file__).resolve().parents[1] / "models" / "world"  # committed world weights (repo root)
JUDGE_DIR = WORLD_MODELS / "judge"
WEIGHTS, CONFIG, MANIFEST = "model.safetensors", "config.json", "manifest.json"
# The recipe `make world` runs; the committed manifest records it (tests check they agree).
RECIPE: dict = {"steps": 3000, "batch_size": 64, "seed": 0, "lr": 6e-3, "weight_decay": 1e-4,
                "subject_share": 0.2, "eval_size": 1000, "widths": [32, 32, 64, 64, 64, 64], "embed_dim": 64}


class JudgeLoadError(RuntimeError):
    """The judge's weights are missing or unreadable; the message names the file and `make world`."""


# ------------------------------------------------------------------------------------------------ the network


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Judge(nn.Module):
    """A 6-conv CNN on 64 x 64 RGB -> an `embed_dim` embedding -> one linear head per attribute in `classes`."""

    # The last 4 x 4 feature map is flattened, not pooled: position and size live in where the features are.

    STRIDES = (2, 1, 2, 1, 2, 2)  # 64 -> 32 -> 32 -> 16 -> 16 -> 8 -> 4 px

    def __init__(self, classes: dict[str, list[str]], widths: Sequence[int] = (32, 32, 64, 64, 64, 64),
                 embed_dim: int = 64) -> None:
        super().__init__()
        if len(widths) != len(self.STRIDES):
            raise ValueError(f"the judge has {len(self.STRIDES)} conv layers, got {len(widths)} widths")
        self.classes = {k: list(v) for k, v in classes.items()}
        self.widths, self.embed_dim = list(widths), embed_dim
        chans = [3, *widths]
        self.features = nn.Sequential(*[_block(chans[i], chans[i + 1], s) for i, s in enumerate(self.STRIDES)])
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * 16, embed_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(embed_dim, len(v)) for k, v in self.classes.items()})

    def config(self) -> dict:
        """What `load_judge` needs to rebuild the network: architecture and attribute classes."""
        return {"architecture": "world-judge-cnn", "widths": self.widths, "strides": list(self.STRIDES),
                "embed_dim": self.embed_dim, "image_size": world.SIZE, "attributes": self.classes}

    def forward(self, pixels: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """(B, 3, 64, 64) pixels in [0, 1] -> ({attribute: (B, classes) logits}, (B, embed_dim) features)."""
        h = self.embed(self.features(pixels * 2 - 1))  # (B, embed_dim), non-negative (after ReLU)
        return {k: head(h) for k, head in self.heads.items()}, h

    @torch.inference_mode()
    def _eval(self, images: Sequence[Image.Image]) -> tuple[dict[str, Tensor], Tensor]:
        """Logits and features of PIL images in eval mode (the caller's train/eval mode restored)."""
        was = self.training
        self.eval()
        try:
            x = to_pixels(images).to(next(self.parameters()).device)
            return self(x)
        finally:
            self.train(was)

    def predict(self, images: Sequence[Image.Image]) -> dict[str, Tensor]:
        """{attribute: (N,) class index} for PIL images."""
        return {k: v.argmax(-1) for k, v in self._eval(images)[0].items()}

    def read(self, images: Sequence[Image.Image]) -> list[dict[str, str]]:
        """Each image's attributes as class names: [{attribute: class name}]."""
        idx = {k: v.tolist() for k, v in self.predict(images).items()}
        return [{k: self.classes[k][idx[k][i]] for k in self.classes} for i in range(len(images))]


def to_pixels(images: Sequence[Image.Image]) -> Tensor:
    """PIL images -> (N, 3, 64, 64) float32 in [0, 1]; other sizes are center-cropped square and resized."""
    out = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (world.SIZE, world.SIZE):
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((world.SIZE, world.SIZE), Image.BICUBIC)
        out.append(np.asarray(im))
    if not out:
        return torch.empty(0, 3, world.SIZE, world.SIZE)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


# ------------------------------------------------------------------------------------------------ training


def scenes(rng: np.random.Generator, n: int, subject_share: float) -> list[world.Scene]:
    """`n` random scenes, a `subject_share` of them of the world subjects (the judge must read those too)."""
    names = list(world.SUBJECTS)
    return [world.subject_scene(str(rng.choice(names)), rng) if rng.random() < subject_share
            else world.random_scene(rng) for _ in range(n)]


def batch(scene_list: Sequence[world.Scene]) -> tuple[Tensor, dict[str, Tensor]]:
    """Rendered pixels (N, 3, 64, 64) in [0, 1] and {attribute: (N,) class index} targets."""
    pixels = to_pixels([world.render(s) for s in scene_list])
    targets = {k: torch.tensor([v.index(getattr(s, k)) for s in scene_list]) for k, v in world.ATTRIBUTES.items()}
    return pixels, targets


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """(B, 3, 64, 64) -> same: half blurred (binomial 3 x 3), all with pixel noise of std U(0, 0.03)."""
    # Generated images are softer and noisier than renders; the judge must read them too.
    k1 = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (k1[:, None] * k1[None, :]).expand(3, 1, 3, 3)  # (3, 1, 3, 3) depthwise
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    pick = (torch.rand(x.shape[0], 1, 1, 1, generator=gen) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    std = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * 0.03
    return (x + std * torch.randn(x.shape, generator=gen)).clamp(0, 1)


@torch.inference_mode()
def evaluate(judge: Judge, scene_list: Sequence[world.Scene], batch_size: int = 250) -> dict[str, float]:
    """Share of scenes whose attribute the judge reads right, per attribute (eval mode, clean renders)."""
    was = judge.training
    judge.eval()
    right = {k: 0 for k in judge.classes}
    for i in range(0, len(scene_list), batch_size):
        pixels, targets = batch(scene_list[i : i + batch_size])
        logits, _ = judge(pixels)
        for k in right:
            right[k] += int((logits[k].argmax(-1) == targets[k]).sum())
    judge.train(was)
    return {k: v / max(1, len(scene_list)) for k, v in right.items()}


def eval_scenes(seed: int, n: int, subject_share: float) -> list[world.Scene]:
    """The held-out evaluation scenes: another random stream than training's (seed entropy [seed, 1])."""
    return scenes(np.random.default_rng([seed, 1]), n, subject_share)


def train_judge(steps: int = RECIPE["steps"], batch_size: int = RECIPE["batch_size"], seed: int = RECIPE["seed"], *,
                lr: float = RECIPE["lr"], weight_decay: float = RECIPE["weight_decay"],
                subject_share: float = RECIPE["subject_share"], eval_size: int = RECIPE["eval_size"],
                widths: Sequence[int] = tuple(RECIPE["widths"]), embed_dim: int = RECIPE["embed_dim"],
                progress: bool = True) -> tuple[Judge, dict[str, float]]:
    """A judge trained on fresh renders (AdamW, one-cycle LR, seeded) and its accuracy on held-out renders."""
    # The returned weights are rounded to fp16, as save_judge stores them: the accuracy is the saved model's.
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        judge = Judge(world.ATTRIBUTES, widths, embed_dim)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 0])
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    judge.train()
    bar = tqdm(range(steps), desc="judge", unit="step", disable=not progress)
    for _ in bar:
        pixels, targets = batch(scenes(rng, batch_size, subject_share))
        logits, _ = judge(augment(pixels, gen))
        loss = sum(F.cross_entropy(logits[k], targets[k]) for k in logits)  # one term per attribute
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    with torch.no_grad():
        for t in judge.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    judge.eval()
    return judge, evaluate(judge, eval_scenes(seed, eval_size, subject_share))


# ------------------------------------------------------------------------------------------------ files


def save_judge(judge: Judge, folder: str | Path, manifest: dict) -> Path:
    """model.safetensors (floating tensors in fp16), config.json and manifest.json in `folder`."""
    folder = Path(folder)
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in judge.state_dict().items()}
    write_tensors(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    write_json(folder / CONFIG, judge.config())
    write_json(folder / MANIFEST, manifest)
    return folder


def _load_error(path: Path, reason: str) -> JudgeLoadError:
    """One sentence naming the file and the command that makes it."""
    return JudgeLoadError(f"Cannot load the world judge: {path} is {reason}; run `make world` to train the world "
                          f"models (or restore the committed file with git checkout).")


def load_judge(folder: str | Path | None = None, device: str | torch.device = "cpu") -> Judge:
    """The judge saved in `folder` (default: the committed JUDGE_DIR), float32, in eval mode."""
    folder = Path(JUDGE_DIR if folder is None else folder)
    cfg_path, weights = folder / CONFIG, folder / WEIGHTS
    for path in (cfg_path, weights):
        if not path.is_file():
            raise _load_error(path, "missing")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        judge = Judge(cfg["attributes"], cfg["widths"], cfg["embed_dim"])
    except (ValueError, KeyError, TypeError) as err:
        raise _load_error(cfg_path, f"corrupt ({type(err).__name__}: {err})") from err
    try:
        state = load_file(str(weights))
        judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:
        raise _load_error(weights, f"corrupt ({type(err).__name__})") from err
    if judge.classes != world.ATTRIBUTES:
        raise _load_error(cfg_path, "out of date (its attribute classes differ from world_vocabulary.json)")
    return judge.to(device).eval()


def build(folder: str | Path = JUDGE_DIR, recipe: dict | None = None, progress: bool = True) -> dict:
    """Train the judge with `recipe` (default RECIPE), save it with its manifest in `folder`; the manifest."""
    recipe = {**RECIPE, **(recipe or {})}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as measured; deterministic kernels
    start = time.perf_counter()
    try:
        judge, accuracy = train_judge(**recipe, progress=progress)
    finally:
        torch.set_num_threads(threads)
    manifest = {"model": "world judge", "recipe": recipe, "seeds": {"init_and_augment": recipe["seed"],
                "train_scenes": [recipe["seed"], 0], "eval_scenes": [recipe["seed"], 1]},
                "steps": recipe["steps"], "accuracy": accuracy, "min_accuracy": min(accuracy.values()),
                "params": sum(p.numel() for p in judge.parameters()), "wall_time_s": round(time.perf_counter() - start, 1),
                "device": "cpu", "threads": 1, "torch": torch.__version__, "git_sha": git_sha()}
    save_judge(judge, folder, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------ prompts


def _alternation(words: Sequence[str]) -> str:
    """A regex group matching any of `words`, longest first ("top left" before "top")."""
    return "(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


def parse_prompt(text: str) -> dict[str, str]:
    """The attributes a prompt names, as judge class names; words it does not know ("sks") are ignored.

    Grammar (world.phrases): '[size] [plain] [colour] shape', 'with a <c> <stripe|band>' / 'with <c> dots',
    'on a <c> background' or a scene name, 'in the <position>'; "plain" is no marking.
    """
    t = " " + " ".join(re.findall(r"[a-z]+", text.lower())) + " "
    out: dict[str, str] = {}
    for scene in world.VOCAB["scenes"]:  # before positions: "in the snow" is a scene, not a place
        if f" {scene} " in t:
            out["background"] = scene
            t = t.replace(f" {scene} ", " ")
    m = re.search(r" on an? (\w+) background ", t)
    if m and m.group(1) in world.ATTRIBUTES["background"]:
        out["background"] = m.group(1)
    t = re.sub(r" on an? \w+ background ", " ", t)
    if " plain " in t:  # no marking, said ("a plain red star")
        out["marking"], out["marking_color"] = "none", "none"
        t = t.replace(" plain ", " ")
    m = re.search(r" with (?:an? )?(\w+) (stripe|band|dots?) ", t)
    if m and m.group(1) in world.VOCAB["marking_colors"]:
        out["marking"] = "dots" if m.group(2).startswith("dot") else m.group(2)
        out["marking_color"] = m.group(1)
    t = re.sub(r" with (?:an? )?\w+ (?:stripe|band|dots?) ", " ", t)
    m = re.search(r" in the " + _alternation(world.VOCAB["positions"]) + " ", t)
    if m:
        out["position"] = m.group(1)
        t = t.replace(m.group(0), " ")
    words = t.split()
    shape_at = next((i for i, w in enumerate(words) if w in world.VOCAB["shapes"]), None)
    if shape_at is not None:
        out["shape"] = words[shape_at]
    before = words[:shape_at] if shape_at is not None else words
    for key, vocab in (("size", world.VOCAB["sizes"]), ("color", world.VOCAB["object_colors"])):
        named = [w for w in before if w in vocab]
        if named:
            out[key] = named[-1]  # the word nearest the noun
    return {k: out[k] for k in world.ATTRIBUTES if k in out}


def agreement(read: dict[str, str], wanted: dict[str, str]) -> dict[str, bool]:
    """For each attribute in `wanted` (e.g. a parsed prompt): does the judge's reading match it?"""
    return {k: read.get(k) == v for k, v in wanted.items()}


if __name__ == "__main__":
    print(json.dumps(build(), indent=2))

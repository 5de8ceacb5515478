"""Class-prior generation throughput: our generator vs the plain diffusers loop of the DreamBooth example.

    python benchmarks/priors.py                       # tiny model, CPU (smoke figures)
    python benchmarks/priors.py --arch sd15 --num-images 200 --resolution 512   # on a GPU

Both sides use the same model folder and make the same number of images; model loading and one
warm-up batch are excluded from both timings. The reference does what diffusers'
train_dreambooth.py does for class images: batch 4, the model's default scheduler and steps, fp16 on
GPU (fp32 on CPU), images saved as JPEG one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from diffusers import StableDiffusionPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dreambooth_pl import components, priors, tiny  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_ours(settings, n: int, batch_size: int | None, device: torch.device, out: Path) -> tuple[float, int]:
    bs = batch_size or priors.auto_batch_size(settings.resolution, device)
    gen = priors.PriorGenerator(settings, out, n + bs, bs, missing=list(range(n + bs)))
    trainer = pl.Trainer(accelerator=device.type if device.type == "cuda" else "cpu", devices=1, logger=False,
                         enable_model_summary=False, enable_progress_bar=False,
                         precision="bf16-mixed" if device.type == "cuda" else "32-true")
    # Warm-up: the last block (indices n..n+bs-1) outside the timed set.
    gen.missing = set(range(n, n + bs))
    trainer.predict(gen, return_predictions=False)
    gen.missing = set(range(n))
    sync(device)
    t = time.perf_counter()
    trainer.predict(gen, return_predictions=False)
    sync(device)
    return n / (time.perf_counter() - t), bs


def bench_reference(folder: str, prompt: str, n: int, resolution: int, device: torch.device, out: Path) -> float:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    bs = 4  # --sample_batch_size default of the example

    def batch(k: int) -> None:
        for j, img in enumerate(pipe([prompt] * k, height=resolution, width=resolution).images):
            img.save(out / f"{time.perf_counter_ns()}-{j}.jpg")

    with torch.inference_mode():
        batch(bs)  # warm-up
        sync(device)
        t = time.perf_counter()
        done = 0
        while done < n:
            k = min(bs, n - done)
            batch(k)
            done += k
        sync(device)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", help="tiny (offline smoke) or sd15/sd21 random-initialised full size")
    p.add_argument("--model", default=None, help="a diffusers folder instead of a random architecture")
    p.add_argument("--num-images", type=int, default=24)
    p.add_argument("--resolution", type=int, default=None, help="default 64 for tiny, 512 otherwise")
    p.add_argument("--batch-size", type=int, default=None, help="ours; default: fill memory")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args()
    torch.set_flush_denormal(True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    res = a.resolution or (64 if a.arch.startswith("tiny") else 512)
    work = Path(tempfile.mkdtemp(prefix="bench-priors-"))
    try:
        folder = a.model or str(tiny.tiny_model_path(a.arch) if a.arch.startswith("tiny")
                                else tiny.build_random(a.arch, work / a.arch))
        settings = priors.PriorSettings(model=components.ModelSource(folder), prompt="a can", resolution=res)
        (work / "ours").mkdir()
        (work / "ref").mkdir()
        ours, bs = bench_ours(settings, a.num_images, a.batch_size, device, work / "ours")
        ref = bench_reference(folder, "a can", a.num_images, res, device, work / "ref")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    smoke = " (random tiny model: smoke figures, not quality)" if a.arch.startswith("tiny") else ""
    print(f"class-prior generation, {a.num_images} images at {res} px on {name}{smoke}")
    print(f"  ours      : {ours:8.2f} images/s  (DPM-Solver++ 25 steps, batch {bs}, {'bf16' if device.type == 'cuda' else 'fp32'})")
    print(f"  reference : {ref:8.2f} images/s  (diffusers example: default scheduler, 50 steps, batch 4, "
          f"{'fp16' if device.type == 'cuda' else 'fp32'})")
    print(f"  ratio     : {ours / ref:8.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=name, arch=a.arch, resolution=res, num_images=a.num_images,
                                                ours_images_per_s=ours, reference_images_per_s=ref,
                                                ratio=ours / ref, batch_size=bs), indent=2))


if __name__ == "__main__":
    main()

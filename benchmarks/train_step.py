"""Training-step throughput, memory and MFU: the project's presets vs the diffusers DreamBooth example loop.

    python benchmarks/train_step.py                                  # tiny model, CPU (smoke figures)
    python benchmarks/train_step.py --arch sd15 --resolution 512     # on a GPU (benchmarks/gpu.sh)
    python benchmarks/train_step.py --steps 2 --warmup 1 --configs full_fp32_uncached,lora_8gb   # quickest

Every configuration is a row of ROWS: memory presets and command-line overrides layered on
experiments/base.yaml + experiments/subjects/can.yaml, parsed by the project's own parser
(`dreambooth_pl.config.parse_config`, so a preset edit shows here), plus `--model.pretrained <model>`.
The parsed `model:` section builds the DreamBoothModule, `trainer.precision` sets the autocast and
`trainer.gradient_clip_val` the clipping. Each trains the same model folder on the same fixed batch
(1 instance + 1 class image, prior preservation); model loading, latent caching, FLOP counting and
warm-up steps are outside the timings.

Ours: one step is what Lightning's automatic optimisation runs, without its loop (and without
`self.log`): `module.compute_loss(batch)` (under bf16 autocast for bf16-mixed), backward, gradient
clipping, the optimizer from `module.make_optimizer()`, the configured LR schedule, zero_grad. Cached
configurations fill the latent cache with `module.cache_latents` (what on_fit_start does).

Reference: what diffusers' train_dreambooth.py does per step with its defaults (written out here, not
imported): tokenizer + text encoder and VAE encode + posterior sample every step, fp32 UNet under bf16
autocast on CUDA (VAE and text encoder in bf16; everything fp32 on CPU), `add_noise`, chunked MSE with
the prior term, clip_grad_norm_ 1.0, plain (for-each) AdamW, zero_grad(set_to_none=False), loss.item().

FLOPs come from torch.utils.flop_counter.FlopCounterMode around one (eager) step per configuration;
"useful" FLOPs are the UNet forward+backward alone, counted without activation recomputation, so cached,
uncached and checkpointed configurations share one yardstick. MFU divides by a matmul peak measured in
the same run (bf16 8192^3 on CUDA, fp32 2048^3 on CPU).

The presets are used as written on every device (the 24gb preset: foreach AdamW, since a fused optimizer cannot
clip gradients and base.yaml clips at 1.0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dreambooth_pl import components, tiny  # noqa: E402
from dreambooth_pl.config import parse_config  # noqa: E402
from dreambooth_pl.module import DreamBoothModule, LoraSettings, Optimization, SpeedSettings  # noqa: E402

INSTANCE_PROMPT, CLASS_PROMPT = "a sks can", "a can"  # base.yaml's identifier + subjects/can.yaml's class noun
BASE_FILES = ("experiments/base.yaml", "experiments/subjects/can.yaml")  # under every row
GRAD_CLIP_REFERENCE = 1.0  # the example's --max_grad_norm default
TARGETS = "targets (one H100, sd15 at 512 px, batch 1+1): >= 2x reference steps/s, >= 35% MFU, full_16gb <= 16 GB, LoRA <= 8 GB"


class Row(NamedTuple):
    """One benchmarked configuration: experiments/memory/<preset>.yaml files and overrides on the base files."""

    name: str
    presets: tuple[str, ...]
    overrides: str
    on: str = "any"  # run by default on "any" device, or only on "cpu" / "cuda" (--configs runs it anywhere)
    priority: int = 9  # run order under --budget-s (lower first); the table keeps the listed order


FP32 = "--trainer.precision 32-true"
UNCACHED = "--model.speed.cache_latents false --model.speed.cache_text_embeddings false"
NHWC = "--model.speed.channels_last true"
ROWS = (
    Row("full_fp32_uncached", (), f"{FP32} {UNCACHED}", priority=7),
    # Caches alone, without the precision change (bf16 autocast is a slowdown on most CPUs).
    Row("full_fp32_cached", (), f"{FP32} --model.speed.cache_latents true", on="cpu", priority=8),
    Row("full_bf16_uncached", (), UNCACHED, priority=6),
    Row("full_bf16_cached", ("24gb",), NHWC, priority=0),
    # torch.compile on CPU takes minutes for nothing the GPU figures need.
    Row("full_bf16_cached_compiled", ("24gb",), f"{NHWC} --model.speed.compile_unet true", on="cuda", priority=5),
    Row("full_16gb", ("16gb",), "", priority=1),
    Row("lora_bf16_cached", ("24gb",), f"{NHWC} --model.lora.rank 16 --model.lora.alpha 16", priority=3),
    Row("lora_8gb", ("8gb",), "", priority=2),  # what the "LoRA <= 8 GB" target is about
)
ROWS_BY_NAME = {r.name: r for r in ROWS}
NOT_HERE = {"cuda": "CUDA only (torch.compile on CPU is minutes of compiling for no figure that matters)",
            "cpu": "CPU only by default (pass --configs to run it)"}
PRECISIONS = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16-mixed"}  # Lightning's name -> ours


@dataclass
class Config:
    """A row parsed: the `model:` section (plain values), trainer precision and clipping."""

    row: Row
    model: dict
    precision: str  # "fp32" or "bf16-mixed"
    grad_clip: float | None

    @property
    def name(self) -> str:
        return self.row.name

    def describe(self) -> str:
        files = [f"experiments/memory/{p}.yaml" for p in self.row.presets]
        return " ".join([*files, self.row.overrides]).strip() or "(base files only)"

    def module(self) -> DreamBoothModule:
        m = self.model
        return DreamBoothModule(**dict(m, optim=Optimization(**m["optim"]), lora=LoraSettings(**m["lora"]),
                                       speed=SpeedSettings(**m["speed"])))


def make_config(row: Row, pretrained: str) -> Config:
    """Parse the row's files and overrides as `python -m dreambooth_pl fit` would."""
    files = [*BASE_FILES, *(f"experiments/memory/{p}.yaml" for p in row.presets)]
    args = [x for f in files for x in ("--config", str(ROOT / f))]
    cfg = parse_config([*args, *row.overrides.split(), "--model.pretrained", pretrained])
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise ValueError(f"{row.name}: trainer.precision {precision} is not benchmarked (use 32-true or bf16-mixed)")
    return Config(row, cfg.model.as_dict(), PRECISIONS[precision], cfg.trainer.gradient_clip_val)


def importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def select_configs(names: list[str], explicit: bool, pretrained: str, device: torch.device) -> tuple[list[Config], dict]:
    """The rows to run on this device, parsed, and why the others are skipped."""
    run, skipped = [], {}
    have_bnb = importable("bitsandbytes")
    for row in map(ROWS_BY_NAME.__getitem__, names):
        if row.on not in ("any", device.type) and not explicit:
            skipped[row.name] = NOT_HERE[row.on]
            continue
        cfg = make_config(row, pretrained)
        if cfg.model["optim"]["optimizer"] == "adamw_8bit" and not have_bnb:
            skipped[row.name] = "bitsandbytes not importable (adamw_8bit)"
        else:
            run.append(cfg)
    return run, skipped


@dataclass
class Result:
    """Figures of one configuration (or the reference loop)."""

    name: str
    precision: str
    step_times_s: list[float]
    flops_per_step: float
    useful_flops_per_step: float
    peak_mem_bytes: int
    extra: dict = field(default_factory=dict)

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_times_s)

    @property
    def steps_per_s(self) -> float:
        return 1.0 / self.step_s


# ------------------------------------------------------------------------------------------- devices


def sync(device: torch.device) -> None:
    """Wait for queued kernels so host timers see the work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def choose_device(name: str, threads: int) -> torch.device:
    torch.set_flush_denormal(True)  # random tiny weights produce denormals that stall CPU math
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          "cpu" if name == "auto" else name)
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    return device


def device_name(device: torch.device) -> str:
    """The card's name, or the CPU with the cores this process may use and the threads torch runs."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {platform.processor() or platform.machine()} ({cores} cores, {torch.get_num_threads()} torch threads)"


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Measured dense-matmul FLOP/s (median of repeats after warm-up): bf16 8192^3 on CUDA, fp32 2048^3 on CPU."""
    n, dtype, reps = (8192, torch.bfloat16, 20) if device.type == "cuda" else (2048, torch.float32, 5)
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    times = time_steps(lambda: a @ b, reps, device)
    return 2 * n**3 / statistics.median(times), f"{str(dtype).removeprefix('torch.')} {n}^3 matmul"


class MemoryMeter:
    """Per-configuration peak memory: CUDA allocator peak, or on CPU the peak RSS (VmHWM) above a baseline."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.kind = "CUDA max_memory_allocated" if device.type == "cuda" else "CPU peak RSS above pre-config RSS"

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        """Baseline before the configuration's module is built (RSS on CPU)."""
        if self.device.type != "cuda":
            self.base = self._status("VmRSS")

    def reset_peak(self) -> None:
        """Forget the peak so far (warm-up, FLOP counting); the state kept across steps stays counted."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return max(0, self._status("VmHWM") - self.base)


def free(device: torch.device) -> None:
    """Release the last configuration's tensors (and compiled graphs) so the next one's peak is its own."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def set_tf32(on: bool) -> None:
    """TF32 matmuls/convolutions on CUDA: the module's allow_tf32 turns them on, the example leaves them off."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """Lightning's bf16-mixed forward context (the loss only; backward runs outside it)."""
    if precision == "bf16-mixed":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


# ------------------------------------------------------------------------------------------- FLOPs


@contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly: FlopCounterMode counts dispatched ops, which a compiled graph hides."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    with set_stance("force_eager") if set_stance else nullcontext():
        yield


def _cpu_flash_fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_flash_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# The counter knows the CUDA attention kernels but not the CPU flash one: without these, CPU counts
# would leave attention out while CUDA counts include it.
_CPU_SDPA = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd}


def count_flops(step: Callable[[], None], unet: torch.nn.Module) -> tuple[float, float]:
    """(all FLOPs, UNet-only FLOPs) of one step, forward and backward."""
    with eager(), FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        step()
    unet_counts = counter.get_flop_counts().get(type(unet).__name__, {})
    return float(counter.get_total_flops()), float(sum(unet_counts.values()))


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class Bench:
    """What every configuration shares: the device, the model, the batch's pixels, the step counts."""

    device: torch.device
    folder: str  # `--model.pretrained`: a diffusers folder or `tiny`
    pixels: torch.Tensor  # (2, 3, R, R) in [-1, 1]: row 0 the instance image, row 1 the class image
    steps: int
    warmup: int
    mem: MemoryMeter


def synthetic_pixels(resolution: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(0)
    return (torch.rand(2, 3, resolution, resolution, generator=g) * 2 - 1).to(device)


def time_steps(step: Callable[[], object], steps: int, device: torch.device) -> list[float]:
    """Wall time of each of `steps` calls, synchronised on both sides."""
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def measure(step: Callable[[], None], unet: torch.nn.Module, b: Bench, recomputes: bool = False):
    """(step times, FLOPs, useful FLOPs, peak memory of the timed steps) after the untimed first steps."""
    step()  # fills the text-embedding cache (and compiles): one-off work the count must not include
    flops, useful = count_flops(step, unet)
    if recomputes:
        # Recomputed forwards are work, not progress: count the UNet once more without them.
        unet.disable_gradient_checkpointing()
        _, useful = count_flops(step, unet)
        unet.enable_gradient_checkpointing()
    for _ in range(max(0, b.warmup - 1)):
        step()
    sync(b.device)
    b.mem.reset_peak()
    times = time_steps(step, b.steps, b.device)
    return times, flops, useful, b.mem.peak()


def our_batch(pixels: torch.Tensor, cached: bool) -> dict:
    """The data module's batch contract for batch size 1 + 1; without pixel_values when latents are cached."""
    batch = {
        "prompts": [INSTANCE_PROMPT, CLASS_PROMPT],
        "image_index": torch.tensor([0, 0], device=pixels.device),  # each row indexes its own split's list
        "flipped": torch.tensor([False, False], device=pixels.device),
        "num_instance": 1,
    }
    if not cached:
        batch["pixel_values"] = pixels
    return batch


def our_step(module: DreamBoothModule, cfg: Config, b: Bench) -> Callable[[], None]:
    """One optimisation step as Lightning's automatic optimisation runs it (without logging)."""
    cached = module.speed.cache_latents
    if cached:  # on_fit_start's work, outside the timings as in training; one view (no flip) per image
        r = b.pixels.shape[-1]
        ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32)  # (1 view, 6) size/crop ids: uncropped squares
        module.cache_latents([(("instance", 0, -1), b.pixels[:1], ids), (("class", 0, -1), b.pixels[1:], ids)],
                             progress=False)
    batch = our_batch(b.pixels, cached)
    opt = module.make_optimizer()
    sched = module.make_scheduler(opt, b.warmup + b.steps + 3)  # total: what estimated_stepping_batches would be
    params, ctx = module.trainable_parameters(), autocast_for(cfg.precision, b.device)

    def step() -> None:
        with ctx():
            loss, _ = module.compute_loss(batch)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_ours(cfg: Config, b: Bench) -> Result:
    """Build the configuration's module as `fit` would and time its training step."""
    torch.manual_seed(0)
    b.mem.start()
    set_tf32(False)
    module = cfg.module().to(b.device)
    module.setup("fit")  # turns TF32 on when allow_tf32 (the default)
    step = our_step(module, cfg, b)
    times, flops, useful, peak = measure(step, module.unet, b, recomputes=module.speed.gradient_checkpointing)
    precision = cfg.precision
    if precision == "fp32" and b.device.type == "cuda" and module.speed.allow_tf32:
        precision = "fp32 (TF32)"
    extra = {"config": cfg.describe(), "trainable_params": sum(p.numel() for p in module.trainable_parameters()),
             **{k: asdict(getattr(module, k)) for k in ("optim", "lora", "speed")}}
    return Result(cfg.name, precision, times, flops, useful, peak, extra)


def reference_step(folder: str, b: Bench) -> tuple[Callable[[], None], torch.nn.Module]:
    """The diffusers train_dreambooth.py step with its defaults, written out (see the module docstring)."""
    device, cuda = b.device, b.device.type == "cuda"
    weight_dtype = torch.bfloat16 if cuda else torch.float32  # --mixed_precision bf16 on GPU, "no" on CPU
    parts = components.load_components(folder)
    tokenizer, scheduler = parts.tokenizer, parts.noise_scheduler
    vae = parts.vae.requires_grad_(False).to(device, dtype=weight_dtype)
    text_encoder = parts.text_encoder.requires_grad_(False).to(device, dtype=weight_dtype)
    unet = parts.unet.to(device).train()  # trainable weights stay fp32; accelerate autocasts its forward
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # get_scheduler("constant")
    unet_ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    mse = torch.nn.functional.mse_loss

    def step() -> None:
        # DreamBoothDataset tokenizes each example's prompt in __getitem__; collate concatenates.
        ids = torch.cat([tokenizer(p, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                                   return_tensors="pt").input_ids for p in (INSTANCE_PROMPT, CLASS_PROMPT)]).to(device)
        latents = vae.encode(b.pixels.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = scheduler.add_noise(latents, noise, t)
        cond = text_encoder(ids)[0]
        with unet_ctx():
            pred = unet(noisy, t, cond, return_dict=False)[0]
        target = scheduler.get_velocity(latents, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        loss = mse(pred.float(), target.float()) + 1.0 * mse(pred_prior.float(), target_prior.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), GRAD_CLIP_REFERENCE)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=False)  # --set_grads_to_none is off by default
        loss.detach().item()  # the example logs the loss to the progress bar every step

    return step, unet


def bench_reference(b: Bench) -> Result:
    torch.manual_seed(0)
    b.mem.start()
    set_tf32(False)  # --allow_tf32 is off by default in the example
    step, unet = reference_step(b.folder, b)
    times, flops, useful, peak = measure(step, unet, b)
    precision = "bf16-mixed" if b.device.type == "cuda" else "fp32"
    return Result("reference (diffusers example)", precision, times, flops, useful, peak,
                  extra={"optimizer": "adamw (for-each)", "tf32": False})


def run_all(configs: list[Config], b: Bench, reference: bool, budget_s: float | None,
            skipped: dict) -> dict[str, Result]:
    """The reference, then the configurations by priority while the time budget lasts; the table's order."""
    results: dict[str, Result] = {}
    if b.device.type == "cpu":
        # One throwaway load: lazy imports and first-use allocations would otherwise land in the first row's RSS.
        components.load_components(b.folder)
        free(b.device)
    if reference:
        results["ref"] = r = bench_reference(b)
        free(b.device)
        print(f"  {r.name}: {r.steps_per_s:.2f} steps/s", file=sys.stderr)
    start, last = time.perf_counter(), 0.0
    for c in sorted(configs, key=lambda c: c.row.priority):
        elapsed = time.perf_counter() - start
        # A compile costs a minute or two more than the last configuration took.
        expect = last + (120 if c.model["speed"]["compile_unet"] and b.device.type == "cuda" else 0)
        if budget_s is not None and elapsed + expect > budget_s:
            skipped[c.name] = f"time budget ({elapsed:.0f} s used of --budget-s {budget_s:.0f})"
            continue
        t0 = time.perf_counter()
        results[c.name] = r = bench_ours(c, b)
        free(b.device)  # the module and optimizer went out of scope with bench_ours' frame
        last = time.perf_counter() - t0
        print(f"  {r.name}: {r.steps_per_s:.2f} steps/s ({last:.0f} s with loading)", file=sys.stderr)
    order = ["ref", *(c.name for c in configs)]
    return {n: results[n] for n in order if n in results}


# ------------------------------------------------------------------------------------------- report


def fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def fmt_flops(x: float) -> str:
    """FLOP/s in TFLOP/s, with enough digits for the tiny model's GFLOP/s-scale numbers."""
    t = x / 1e12
    return f"{t:.1f}" if t >= 10 else f"{t:.2f}" if t >= 0.1 else f"{t:.4f}"


def table(results: list[Result], ref: Result | None, peak: float) -> list[str]:
    """The printed table, one row per configuration, the reference first."""
    head = ("config", "precision", "steps/s", "vs ref", "peak mem", "TFLOP/s", "MFU", "useful TFLOP/s", "useful MFU")
    rows = []
    for r in results:
        achieved, useful = r.flops_per_step / r.step_s, r.useful_flops_per_step / r.step_s
        ratio = f"{r.steps_per_s / ref.steps_per_s:.2f}x" if ref else "-"
        rows.append((r.name, r.precision, f"{r.steps_per_s:.2f}", ratio, fmt_bytes(r.peak_mem_bytes),
                     fmt_flops(achieved), f"{achieved / peak:.1%}", fmt_flops(useful), f"{useful / peak:.1%}"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return [line(head), line(["-" * w for w in widths]), *map(line, rows)]


def target_checks(results: dict[str, Result], ref: Result | None, peak: float) -> list[str]:
    """PASS/FAIL against the issue's H100 targets for the rows that were measured."""
    out = []
    # The reference is a full fine-tune: hold full fine-tunes (not LoRA) to the speed and MFU targets.
    full = [r for n, r in results.items() if r is not ref and n.startswith("full")]
    if ref and full:
        best = max(full, key=lambda r: r.steps_per_s)
        ratio = best.steps_per_s / ref.steps_per_s
        out.append(f"  {'steps/s >= 2x reference':<26}: {'PASS' if ratio >= 2 else 'FAIL'} ({best.name}: {ratio:.2f}x)")
    if full:
        # MFU in the usual sense: model FLOPs (UNet fwd+bwd, no recompute) per second over the peak.
        best = max(full, key=lambda r: r.useful_flops_per_step / r.step_s)
        mfu = best.useful_flops_per_step / best.step_s / peak
        out.append(f"  {'MFU >= 35%':<26}: {'PASS' if mfu >= 0.35 else 'FAIL'} ({best.name}: useful MFU {mfu:.1%})")
    for name, limit in (("full_16gb", 16e9), ("lora_8gb", 8e9), ("lora_bf16_cached", 8e9)):
        if name in results:
            r = results[name]
            ok = r.peak_mem_bytes <= limit
            label = f"{name} <= {limit / 1e9:.0f} GB"
            out.append(f"  {label:<26}: {'PASS' if ok else 'FAIL'} ({fmt_bytes(r.peak_mem_bytes)})")
    return out


@dataclass
class Report:
    """What the printout and the JSON say about the run as a whole."""

    device: str
    cuda: bool
    arch: str
    resolution: int
    steps: int
    warmup: int
    matmul_peak_flops: float
    matmul_peak_what: str
    memory_kind: str
    configs: dict[str, str]  # row name -> its presets and overrides
    skipped: dict[str, str]
    target_checks: list[str] = field(default_factory=list)

    @property
    def targets_apply(self) -> bool:
        return self.arch == "sd15" and self.cuda and self.resolution == 512


def print_report(rep: Report, results: dict[str, Result]) -> None:
    ref = results.get("ref")
    smoke = "; random tiny model: smoke figures" if rep.arch == "tiny" else "; random-initialised weights"
    print(f"training step, batch 1 instance + 1 class at {rep.resolution} px, arch {rep.arch}, on {rep.device}, "
          f"torch {torch.__version__}{smoke}")
    print(f"matmul peak (measured, {rep.matmul_peak_what}): {rep.matmul_peak_flops / 1e12:.2f} TFLOP/s; median of "
          f"{rep.steps} steps after {rep.warmup} warm-up; peak mem = {rep.memory_kind}\n")
    print("\n".join(table(list(results.values()), ref, rep.matmul_peak_flops)))
    for n, why in rep.skipped.items():
        print(f"skipped {n}: {why}")
    print(f"\nconfigs: {' + '.join(BASE_FILES)} + --model.pretrained <the model above>, then:")
    width = max(map(len, rep.configs), default=0)
    print("\n".join(f"  {n:<{width}}  {how}" for n, how in rep.configs.items()))
    print("\nTFLOP/s: all counted FLOPs of a step (VAE encode and text encoder when uncached, checkpoint recompute) "
          "/ median step time; useful: UNet fwd+bwd only, no recompute; MFU: / the matmul peak above")
    if rep.targets_apply:
        print("\n".join([TARGETS, *rep.target_checks]))
    else:
        print(f"{TARGETS}: not checked here (needs sd15 at 512 px on CUDA)")


def write_json(path: str, rep: Report, results: dict[str, Result]) -> None:
    ref, peak = results.get("ref"), rep.matmul_peak_flops
    rows = [dict(
        name=r.name, precision=r.precision, steps_per_s=r.steps_per_s, median_step_s=r.step_s,
        step_times_s=r.step_times_s, ratio_vs_reference=r.steps_per_s / ref.steps_per_s if ref else None,
        peak_mem_bytes=r.peak_mem_bytes, flops_per_step=r.flops_per_step,
        useful_flops_per_step=r.useful_flops_per_step, tflops=r.flops_per_step / r.step_s / 1e12,
        useful_tflops=r.useful_flops_per_step / r.step_s / 1e12, mfu=r.flops_per_step / r.step_s / peak,
        useful_mfu=r.useful_flops_per_step / r.step_s / peak, **r.extra,
    ) for r in results.values()]
    out = dict(asdict(rep), torch=torch.__version__, smoke=rep.arch == "tiny", results=rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2, default=str))


# ------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", choices=["tiny", "sd15", "sd21"],
                   help="tiny (offline smoke) or sd15/sd21 random-initialised full size")
    p.add_argument("--resolution", type=int, default=None, help="default 64 for tiny, 512 otherwise")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (plus one or two FLOP-counting steps)")
    p.add_argument("--configs", default=None, help=f"comma list of {', '.join(ROWS_BY_NAME)}; default: all that "
                                                   f"apply to the device")
    p.add_argument("--no-reference", action="store_true", help="skip the diffusers-example loop")
    p.add_argument("--model", default=None, help="a diffusers folder to use instead of building --arch")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no configuration past this many seconds (most important ones run first)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on a shared small machine OpenMP spin-waits make 2 threads "
                        "up to 100x slower on the tiny model's small ops); 0 keeps torch's default")
    a = p.parse_args()
    a.names = [n.strip() for n in (a.configs or "").split(",") if n.strip()] or list(ROWS_BY_NAME)
    unknown = [n for n in a.names if n not in ROWS_BY_NAME]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(ROWS_BY_NAME)}")
    a.resolution = a.resolution or (64 if a.arch == "tiny" else 512)
    return a


def main() -> None:
    a = parse_args()
    device = choose_device(a.device, a.threads)
    with tempfile.TemporaryDirectory(prefix="bench-train-step-", ignore_cleanup_errors=True) as work:
        folder = a.model or ("tiny" if a.arch == "tiny" else str(tiny.build_random(a.arch, Path(work) / a.arch)))
        configs, skipped = select_configs(a.names, a.configs is not None, folder, device)
        peak, peak_what = matmul_peak(device)
        b = Bench(device, folder, synthetic_pixels(a.resolution, device), a.steps, a.warmup, MemoryMeter(device))
        results = run_all(configs, b, not a.no_reference, a.budget_s, skipped)
    rep = Report(device_name(device), device.type == "cuda", a.arch, a.resolution, a.steps, a.warmup, peak, peak_what, b.mem.kind,
                 {c.name: c.describe() for c in configs}, skipped)
    rep.target_checks = target_checks(results, results.get("ref"), peak)
    print_report(rep, results)
    if a.json:
        write_json(a.json, rep, results)


if __name__ == "__main__":
    main()

"""Training-step throughput, memory and MFU: our configurations vs the diffusers DreamBooth example loop.

    python benchmarks/train_step.py                                  # tiny model, CPU (smoke figures)
    python benchmarks/train_step.py --arch sd15 --resolution 512     # on a GPU (benchmarks/gpu.sh)

Every configuration trains the same model folder on the same fixed batch (1 instance + 1 class image,
prior preservation), with model loading, FLOP counting and warm-up steps excluded from the timings.

Ours: one step is what Lightning's automatic optimisation runs, without its loop: `training_step`
(under bf16 autocast for bf16-mixed), backward, gradient clipping at 1.0 (base.yaml's
gradient_clip_val), optimizer step, LR-scheduler step, zero_grad. `training_step` itself is called:
outside a Trainer `self.log` only warns, and `self.optimizers()` is answered with the config's optimizer.

Reference: what diffusers' train_dreambooth.py does per step with its defaults (written out here, not
imported): tokenizer + text encoder and VAE encode + posterior sample every step, fp32 UNet under bf16
autocast on CUDA (VAE and text encoder in bf16; everything fp32 on CPU), `add_noise`, chunked MSE with
the prior term, clip_grad_norm_ 1.0, plain (for-each) AdamW, zero_grad(set_to_none=False), loss.item().

FLOPs come from torch.utils.flop_counter.FlopCounterMode around one (eager) step per configuration;
"useful" FLOPs are the UNet forward+backward alone, counted without activation recomputation, so cached,
uncached and checkpointed configurations share one yardstick. MFU divides by a matmul peak measured in
the same run (bf16 8192^3 on CUDA, fp32 2048^3 on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dreambooth_pl import components  # noqa: E402
from dreambooth_pl.module import DreamBoothModule  # noqa: E402

INSTANCE_PROMPT, CLASS_PROMPT = "a sks can", "a can"
GRAD_CLIP = 1.0  # experiments/base.yaml trainer.gradient_clip_val; the example's --max_grad_norm default
TARGETS = "targets (one H100, sd15 at 512 px, batch 1+1): >= 2x reference steps/s, >= 35% MFU, full_16gb <= 16 GB, LoRA <= 8 GB"


@dataclass
class Config:
    """One benchmarked configuration: DreamBoothModule kwargs and the trainer precision."""

    name: str
    precision: str  # "fp32" (Lightning 32-true) or "bf16-mixed"
    kwargs: dict
    cuda_only: bool = False  # torch.compile on CPU takes minutes for nothing the GPU figures need
    cpu_only: bool = False  # default on CPU only, to keep the GPU set inside its time budget
    needs_bnb: bool = False
    priority: int = 9  # run order under a time budget (lower first); the table keeps the listed order


def make_configs(device: torch.device) -> dict[str, Config]:
    """The configurations, in run order; fused AdamW only on CUDA (its point is one CUDA kernel)."""
    cuda = device.type == "cuda"
    fast = dict(cache_latents=True, cache_text_embeddings=True, frozen_dtype="bf16",
                optimizer="adamw_fused" if cuda else "adamw", channels_last=True)
    cfgs = [
        Config("full_fp32_uncached", "fp32", dict(cache_latents=False, cache_text_embeddings=False), priority=7),
        # Caches alone, without the precision change (bf16 autocast is a slowdown on most CPUs).
        Config("full_fp32_cached", "fp32", dict(cache_latents=True, cache_text_embeddings=True), cpu_only=True,
               priority=8),
        Config("full_bf16_uncached", "bf16-mixed", dict(cache_latents=False, cache_text_embeddings=False), priority=6),
        Config("full_bf16_cached", "bf16-mixed", dict(fast), priority=0),
        Config("full_bf16_cached_compiled", "bf16-mixed", dict(fast, compile_unet=True), cuda_only=True, priority=5),
        # experiments/memory/16gb.yaml, model section as written there.
        Config("full_16gb", "bf16-mixed", dict(cache_latents=True, cache_text_embeddings=True, frozen_dtype="bf16",
                                               optimizer="adamw_8bit", gradient_checkpointing=True),
               needs_bnb=True, priority=1),
        Config("lora_bf16_cached", "bf16-mixed", dict(fast, lora_rank=16, lora_alpha=16), priority=3),
        # experiments/memory/8gb.yaml, model section: what the "LoRA <= 8 GB" target is about.
        Config("lora_8gb", "bf16-mixed", dict(lora_rank=16, lora_alpha=16, cache_latents=True, cache_text_embeddings=True,
                                              frozen_dtype="bf16", optimizer="adamw", gradient_checkpointing=True),
               priority=2),
    ]
    return {c.name: c for c in cfgs}


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
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    del a, b
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
    """Release the last configuration's tensors so the next one's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def set_tf32(on: bool) -> None:
    """TF32 matmuls/convolutions on CUDA: the module's allow_tf32 turns them on, the example leaves them off."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """Lightning's bf16-mixed forward context (training_step only; backward runs outside it)."""
    if precision == "bf16-mixed":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


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


# ------------------------------------------------------------------------------------------- batch


def synthetic_pixels(resolution: int, device: torch.device) -> torch.Tensor:
    """(2, 3, R, R) in [-1, 1]: row 0 the instance image, row 1 the class image."""
    g = torch.Generator("cpu").manual_seed(0)
    return (torch.rand(2, 3, resolution, resolution, generator=g) * 2 - 1).to(device)


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


def fill_latent_cache(module: DreamBoothModule, pixels: torch.Tensor) -> None:
    """What `_fill_latent_cache` stores for these two images without flips: (1, F=1, 2, 4, h, w) per split."""
    for split, row in (("instance", 0), ("class", 1)):
        mean, std = module.latent_moments(pixels[row : row + 1])  # (1, 4, h, w) each
        module._latent_cache[split] = torch.stack([mean, std], dim=1).unsqueeze(1)


# ------------------------------------------------------------------------------------------- timing


def warm_and_time(step: Callable[[], None], warmup: int, steps: int, device: torch.device, mem) -> tuple[list[float], int]:
    """The remaining warm-up steps, then per-step times and the peak memory of the timed steps."""
    for _ in range(max(0, warmup - 1)):
        step()
    sync(device)
    mem.reset_peak()
    times = time_steps(step, steps, device)
    return times, mem.peak()


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> list[float]:
    """Wall time of each of `steps` calls, synchronised on both sides."""
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def bench_ours(cfg: Config, folder: str, pixels: torch.Tensor, device: torch.device, steps: int, warmup: int,
               mem: MemoryMeter) -> Result:
    """Build the configuration's module like `fit` would and time its training step."""
    torch.manual_seed(0)
    mem.start()
    set_tf32(False)
    module = DreamBoothModule(pretrained=folder, **cfg.kwargs).to(device)
    module.setup("fit")  # turns TF32 on when allow_tf32 (the default)
    module.train()
    cached = module.hparams.cache_latents
    if cached:
        fill_latent_cache(module, pixels)  # on_fit_start's work, outside the timings as in training
    batch = our_batch(pixels, cached)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    # training_step reads the LR through self.optimizers(), which needs a Trainer: hand it the optimizer.
    module.optimizers = lambda use_pl_optimizer=True: opt
    params = [p for group in opt.param_groups for p in group["params"]]
    ctx = autocast_for(cfg.precision, device)

    def step() -> None:
        with ctx():
            loss = module.training_step(batch, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    step()  # fills the text-embedding cache (and compiles): one-off work the count must not include
    flops, useful = count_flops(step, module.unet)
    if module.hparams.gradient_checkpointing:
        # Recomputed forwards are work, not progress: count the UNet once more without them.
        module.unet.disable_gradient_checkpointing()
        _, useful = count_flops(step, module.unet)
        module.unet.enable_gradient_checkpointing()
    times, peak = warm_and_time(step, warmup, steps, device, mem)
    precision = cfg.precision
    if precision == "fp32" and device.type == "cuda" and module.hparams.allow_tf32:
        precision = "fp32 (TF32)"
    trainable = sum(p.numel() for p in params)
    return Result(cfg.name, precision, times, flops, useful, peak, extra={"trainable_params": trainable, **cfg.kwargs})


def bench_reference(folder: str, pixels: torch.Tensor, device: torch.device, steps: int, warmup: int,
                    mem: MemoryMeter) -> Result:
    """The diffusers train_dreambooth.py step with its defaults, written out (see the module docstring)."""
    torch.manual_seed(0)
    mem.start()
    set_tf32(False)  # --allow_tf32 is off by default in the example
    cuda = device.type == "cuda"
    weight_dtype = torch.bfloat16 if cuda else torch.float32  # --mixed_precision bf16 on GPU, "no" on CPU
    parts = components.load_components(folder)
    tokenizer, scheduler = parts.tokenizer, parts.noise_scheduler
    vae = parts.vae.requires_grad_(False).to(device, dtype=weight_dtype)
    text_encoder = parts.text_encoder.requires_grad_(False).to(device, dtype=weight_dtype)
    unet = parts.unet.to(device).train()  # trainable weights stay fp32; accelerate autocasts its forward
    del parts
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # get_scheduler("constant")
    unet_ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    prompts = [INSTANCE_PROMPT, CLASS_PROMPT]

    def step() -> None:
        # DreamBoothDataset tokenizes each example's prompt in __getitem__; collate concatenates.
        ids = torch.cat([tokenizer(p, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                                   return_tensors="pt").input_ids for p in prompts]).to(device)
        latents = vae.encode(pixels.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = scheduler.add_noise(latents, noise, t)
        cond = text_encoder(ids)[0]
        with unet_ctx():
            pred = unet(noisy, t, cond, return_dict=False)[0]
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(noise, 2, dim=0)  # epsilon prediction (sd15, tiny)
        if scheduler.config.prediction_type == "v_prediction":
            v = scheduler.get_velocity(latents, noise, t)
            target, target_prior = torch.chunk(v, 2, dim=0)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss = loss + 1.0 * torch.nn.functional.mse_loss(pred_prior.float(), target_prior.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), GRAD_CLIP)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=False)  # --set_grads_to_none is off by default
        loss.detach().item()  # the example logs the loss to the progress bar every step

    step()
    flops, useful = count_flops(step, unet)
    times, peak = warm_and_time(step, warmup, steps, device, mem)
    precision = "bf16-mixed" if cuda else "fp32"
    return Result("reference (diffusers example)", precision, times, flops, useful, peak,
                  extra={"optimizer": "adamw (for-each)", "tf32": False})


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", choices=["tiny", "sd15", "sd21"],
                   help="tiny (offline smoke) or sd15/sd21 random-initialised full size")
    p.add_argument("--resolution", type=int, default=None, help="default 64 for tiny, 512 otherwise")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (plus one or two FLOP-counting steps)")
    p.add_argument("--configs", default=None, help="comma list; default: all that apply to the device")
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

    torch.set_flush_denormal(True)  # random tiny weights produce denormals that stall CPU math
    warnings.filterwarnings("ignore", message=".*self.log\\(\\)` but the `self.trainer` reference.*")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    if device.type == "cpu" and a.threads > 0:
        torch.set_num_threads(a.threads)
    res = a.resolution or (64 if a.arch == "tiny" else 512)
    all_cfgs = make_configs(device)
    explicit = a.configs is not None
    names = [n.strip() for n in a.configs.split(",") if n.strip()] if explicit else list(all_cfgs)
    unknown = [n for n in names if n not in all_cfgs]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(all_cfgs)}")
    try:
        import bitsandbytes  # noqa: F401

        have_bnb = True
    except ImportError:
        have_bnb = False
    skipped: dict[str, str] = {}
    run = []
    for n in names:
        c = all_cfgs[n]
        if c.needs_bnb and not have_bnb:
            skipped[n] = "bitsandbytes not importable (adamw_8bit)"
        elif c.cuda_only and device.type != "cuda" and not explicit:
            skipped[n] = "CUDA only (torch.compile on CPU is minutes of compiling for no figure that matters)"
        elif c.cpu_only and device.type == "cuda" and not explicit:
            skipped[n] = "CPU only by default (pass --configs to run it)"
        else:
            run.append(c)

    name = device_name(device)
    peak, peak_what = matmul_peak(device)
    mem = MemoryMeter(device)
    work = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    results: dict[str, Result] = {}
    ref = None
    start = time.perf_counter()
    try:
        folder = a.model or str(components.tiny_model_path("tiny") if a.arch == "tiny"
                                else components.build_random(a.arch, work / a.arch))
        pixels = synthetic_pixels(res, device)
        if device.type == "cpu":
            # One throwaway load: lazy imports and first-use allocations would otherwise land in the first
            # row's RSS figure.
            components.load_components(folder)
            free(device)
        if not a.no_reference:
            ref = bench_reference(folder, pixels, device, a.steps, a.warmup, mem)
            results[ref.name] = ref
            free(device)
            print(f"  {ref.name}: {ref.steps_per_s:.2f} steps/s", file=sys.stderr)
        last = 0.0
        for c in sorted(run, key=lambda c: c.priority):
            elapsed = time.perf_counter() - start
            # A compile costs a minute or two more than the last configuration took.
            expect = last + (120 if c.kwargs.get("compile_unet") and device.type == "cuda" else 0)
            if a.budget_s is not None and elapsed + expect > a.budget_s:
                skipped[c.name] = f"time budget ({elapsed:.0f} s used of --budget-s {a.budget_s:.0f})"
                continue
            t0 = time.perf_counter()
            results[c.name] = r = bench_ours(c, folder, pixels, device, a.steps, a.warmup, mem)
            if c.kwargs.get("compile_unet"):
                torch._dynamo.reset()  # drop compiled graphs (and the tensors they hold)
            free(device)  # the module and optimizer went out of scope with bench_ours' frame
            last = time.perf_counter() - t0
            print(f"  {r.name}: {r.steps_per_s:.2f} steps/s ({last:.0f} s with loading)", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    smoke = "; random tiny model: smoke figures" if a.arch == "tiny" else "; random-initialised weights"
    print(f"training step, batch 1 instance + 1 class at {res} px, arch {a.arch}, on {name}, torch {torch.__version__}{smoke}")
    print(f"matmul peak (measured, {peak_what}): {peak / 1e12:.2f} TFLOP/s; median of {a.steps} steps after "
          f"{a.warmup} warm-up; peak mem = {mem.kind}")
    print()
    order = [ref.name] if ref else []
    order += [n for n in all_cfgs if n in results]
    results = {n: results[n] for n in order}
    for line in table(list(results.values()), ref, peak):
        print(line)
    for n, why in skipped.items():
        print(f"skipped {n}: {why}")
    print()
    print("TFLOP/s: all counted FLOPs of a step (VAE encode and text encoder when uncached, checkpoint recompute) "
          "/ median step time; useful: UNet fwd+bwd only, no recompute; MFU: / the matmul peak above")
    checks = target_checks(results, ref, peak)
    if a.arch == "sd15" and device.type == "cuda" and res == 512:
        print(TARGETS)
        for line in checks:
            print(line)
    else:
        print(f"{TARGETS}: not checked here (needs sd15 at 512 px on CUDA)")

    if a.json:
        rows = []
        for r in results.values():
            rows.append(dict(
                name=r.name, precision=r.precision, steps_per_s=r.steps_per_s, median_step_s=r.step_s,
                step_times_s=r.step_times_s, ratio_vs_reference=r.steps_per_s / ref.steps_per_s if ref else None,
                peak_mem_bytes=r.peak_mem_bytes, flops_per_step=r.flops_per_step,
                useful_flops_per_step=r.useful_flops_per_step, tflops=r.flops_per_step / r.step_s / 1e12,
                useful_tflops=r.useful_flops_per_step / r.step_s / 1e12, mfu=r.flops_per_step / r.step_s / peak,
                useful_mfu=r.useful_flops_per_step / r.step_s / peak, **r.extra,
            ))
        out = dict(device=name, arch=a.arch, resolution=res, steps=a.steps, warmup=a.warmup, torch=torch.__version__,
                   smoke=a.arch == "tiny", matmul_peak_flops=peak, matmul_peak_what=peak_what, memory_kind=mem.kind,
                   results=rows, skipped=skipped, target_checks=checks)
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()

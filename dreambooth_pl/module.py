"""DreamBoothModule: frozen VAE + text encoder, trainable UNet, the two-term DreamBooth loss."""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from diffusers.utils.torch_utils import randn_tensor

from . import components
from .losses import (
    diffusion_target,
    lr_lambda,
    min_snr_weights,
    offset_noise,
    prior_preservation_loss,
    q_sample,
)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # attention projections, as in the diffusers LoRA example
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def make_optimizer(name: str, groups: list[dict], **kw) -> torch.optim.Optimizer:
    """AdamW: plain, fused (one CUDA kernel for all parameters) or 8-bit (bitsandbytes, ~75% less state)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, **kw)
    if name == "adamw_fused":
        return torch.optim.AdamW(groups, fused=True, **kw)
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("model.optimizer: adamw_8bit needs bitsandbytes (CUDA): pip install -c constraints.txt "
                              "bitsandbytes, or use adamw / adamw_fused") from e
        return bnb.optim.AdamW8bit(groups, **kw)
    raise ValueError(f"unknown model.optimizer {name!r}: choose adamw, adamw_fused or adamw_8bit")


class DreamBoothModule(pl.LightningModule):
    """Fine-tunes a Stable Diffusion UNet (and optionally its text encoder) on one subject."""

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        revision: str | None = None,
        variant: str | None = None,
        single_file_config: str | None = None,
        learning_rate: float = 5e-6,
        text_encoder_learning_rate: float | None = None,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        lr_warmup_steps: int = 0,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_weight_decay: float = 1e-2,
        adam_epsilon: float = 1e-8,
        prior_loss_weight: float = 1.0,
        train_text_encoder: bool = False,
        gradient_checkpointing: bool = False,
        cache_latents: bool = False,
        cache_text_embeddings: bool = True,
        frozen_dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
        optimizer: Literal["adamw", "adamw_fused", "adamw_8bit"] = "adamw",
        channels_last: bool = False,
        compile_unet: bool = False,
        allow_tf32: bool = True,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        lora_text_encoder: bool = False,
        lora_text_encoder_target_modules: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        parts = components.load_components(pretrained, revision=revision, variant=variant, single_file_config=single_file_config)
        self.tokenizer = parts.tokenizer
        self.text_encoder = parts.text_encoder
        self.vae = parts.vae
        self.unet = parts.unet
        self.noise_scheduler = parts.noise_scheduler
        self.scheduler_config = parts.scheduler_config
        # Frozen parts never change: no grads, eval mode (kept so by `train()` below).
        self.vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(train_text_encoder)
        if not self.text_encoder_trains:
            self.text_encoder.eval()
        # from_pretrained returns eval-mode modules and Lightning keeps modes as it finds them.
        self.unet.requires_grad_(lora_rank == 0).train()
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[frozen_dtype]
        if lora_rank > 0:
            self.unet.to(dtype)  # with LoRA the base UNet is frozen too
            self._add_lora(self.unet, lora_target_modules or UNET_LORA_TARGETS)
        if lora_text_encoder:
            self.text_encoder.to(dtype)
            self._add_lora(self.text_encoder, lora_text_encoder_target_modules or TEXT_LORA_TARGETS)
        for p in self.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapters and fine-tuned weights train in fp32 (mixed precision computes)
        if self.text_encoder_trains:
            self.text_encoder.train()
        # Frozen modules in half precision: half the memory, faster encodes; trainable weights stay fp32
        # (fp16 trainable weights are what make GradScaler fail with "unscale FP16 gradients").
        self.vae.to(dtype)
        if not self.text_encoder_trains:
            self.text_encoder.to(dtype)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.text_encoder_trains:
                self.text_encoder.gradient_checkpointing_enable()
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if compile_unet:
            self.unet.compile()  # in place: state-dict keys (checkpoints, export) stay unprefixed
        # prompt -> (77, D) hidden states; (split, index) -> (2 flips, 2 [mean, std], 4, h, w) latent moments.
        self._text_cache: dict[str, torch.Tensor] = {}
        self._latent_cache: dict[str, torch.Tensor] = {}
        # (T,) cumulative alphas of the training noise schedule; not saved (it comes from the config).
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False)
        # Checkpoints hold only the trainable weights, so loading one leaves the frozen ones as loaded.
        self.strict_loading = False

    # ----------------------------------------------------------------------------------------- parts

    def parts(self) -> components.SDComponents:
        """The current (fine-tuned) components, sharing this module's weights."""
        return components.SDComponents(
            tokenizer=self.tokenizer,
            text_encoder=self.text_encoder,
            vae=self.vae,
            unet=self.unet,
            noise_scheduler=self.noise_scheduler,
            scheduler_config=self.scheduler_config,
            source=self.hparams.pretrained,
        )

    @property
    def text_encoder_trains(self) -> bool:
        return self.hparams.train_text_encoder or self.hparams.lora_text_encoder

    def _add_lora(self, module: torch.nn.Module, targets) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        hp = self.hparams
        cfg = LoraConfig(r=hp.lora_rank or 4, lora_alpha=hp.lora_alpha or hp.lora_rank or 4,
                         lora_dropout=hp.lora_dropout, init_lora_weights="gaussian", target_modules=list(targets))
        if hasattr(module, "add_adapter") and module is self.unet:
            module.add_adapter(cfg)  # diffusers' integration: the pipeline's LoRA API then sees it
        else:
            # peft directly: transformers' own integration wants a newer peft than the registry has.
            inject_adapter_in_model(cfg, module)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        if not self.text_encoder_trains:
            self.text_encoder.eval()
        return self

    def setup(self, stage: str) -> None:
        if self.hparams.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def on_fit_start(self) -> None:
        hp = self.hparams
        if hp.lora_rank > 0 and hp.frozen_dtype != "fp32" and "mixed" not in str(self.trainer.precision):
            raise ValueError(f"model.frozen_dtype={hp.frozen_dtype} with LoRA keeps the base UNet in half precision, "
                             f"which needs autocast: set trainer.precision to bf16-mixed (or 16-mixed on GPU), "
                             f"or model.frozen_dtype: fp32")
        if self.hparams.cache_latents:
            self._fill_latent_cache()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------------- math

    @torch.no_grad()
    def latent_moments(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [-1, 1] -> VAE posterior mean and std, each (N, 4, H/8, W/8) fp32."""
        dist = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior sample, scaled: (N, 4, h, w). The same draw as diffusers' `latent_dist.sample`."""
        eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * eps) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8) scaled latents."""
        mean, std = self.latent_moments(pixel_values)
        return self.sample_latents(mean, std, generator) if sample else mean * self.vae.config.scaling_factor

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """N prompts -> (N, 77, D) text-encoder hidden states (with grad only when it trains)."""
        trains = self.text_encoder_trains and self.training
        if not trains and self.hparams.cache_text_embeddings:
            # A frozen text encoder maps the two prompts of a run to the same states every step: encode once.
            missing = sorted({p for p in prompts if p not in self._text_cache})
            if missing:
                for p, h in zip(missing, self._encode_ids(missing), strict=True):
                    self._text_cache[p] = h
            return torch.stack([self._text_cache[p] for p in prompts])
        with nullcontext() if trains else torch.no_grad():
            return self._encode_ids(prompts)

    def _encode_ids(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        # A half-precision frozen text encoder feeds an fp32 UNet: cast to the UNet's dtype.
        return self.text_encoder(ids)[0].to(self.unet.dtype)

    @torch.no_grad()
    def _fill_latent_cache(self) -> None:
        """Encode every instance and class image once (both flips when flipping is on)."""
        from tqdm.auto import tqdm

        from .data import DreamBoothDataset

        dm = self.trainer.datamodule
        flips = [False, True] if dm.hparams.random_flip else [False]
        for split, paths in (("instance", dm.instance_images), ("class", dm.class_images)):
            if not paths:
                continue
            ds = DreamBoothDataset(paths, "", resolution=dm.hparams.resolution, center_crop=True, random_flip=False)
            moments = []
            for i in tqdm(range(len(paths)), desc=f"caching {split} latents", disable=not self.trainer.is_global_zero):
                x = ds[i]["instance_pixel_values"].to(self.device)  # (3, R, R)
                views = torch.stack([x.flip(-1) if f else x for f in flips])  # (F, 3, R, R)
                moments.append(torch.stack(self.latent_moments(views), dim=1))  # (F, 2, 4, h, w)
            self._latent_cache[split] = torch.stack(moments)  # (N, F, 2, 4, h, w)

    def batch_latents(self, batch: dict) -> torch.Tensor:
        """(N, 4, h, w) scaled latents of a batch: encoded from pixels, or drawn from the cached moments."""
        if "pixel_values" in batch:
            return self.encode_images(batch["pixel_values"])
        n = batch["num_instance"]
        idx, flip = batch["image_index"].to(self.device), batch["flipped"].to(self.device).long()
        inst = self._latent_cache["instance"]
        flip = flip.clamp(max=inst.shape[1] - 1)
        m = [inst[idx[:n], flip[:n]]]
        if idx.shape[0] > n:
            m.append(self._latent_cache["class"][idx[n:], flip[n:]])
        moments = torch.cat(m)  # (N, 2, 4, h, w)
        return self.sample_latents(moments[:, 0], moments[:, 1])

    def diffusion_step(
        self,
        pixel_values: torch.Tensor,
        prompts: list[str],
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
        sample_latents: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise the images' latents at random timesteps; return (UNet prediction, target), each (N, 4, h, w)."""
        latents = self.encode_images(pixel_values, generator, sample=sample_latents)
        pred, target, _ = self.denoise(latents, prompts, generator, timesteps)
        return pred, target

    def denoise(self, latents: torch.Tensor, prompts: list[str], generator: torch.Generator | None = None,
                timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 4, h, w) clean latents -> (UNet prediction, target, timesteps) at random or given timesteps."""
        cond = self.encode_prompts(prompts)
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if self.hparams.noise_offset:
            extra = randn_tensor((*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
            noise = offset_noise(noise, self.hparams.noise_offset, extra)
        n = latents.shape[0]
        if timesteps is None:
            t_max = self.noise_scheduler.config.num_train_timesteps
            timesteps = torch.randint(0, t_max, (n,), generator=generator, device=generator.device if generator else None)
        timesteps = timesteps.to(latents.device).long()
        noisy = q_sample(latents, noise, timesteps, self.alphas_cumprod)
        if self.hparams.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=cond).sample
        target = diffusion_target(self.noise_scheduler.config.prediction_type, latents, noise, timesteps, self.alphas_cumprod)
        return pred, target, timesteps

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pred, target, t = self.denoise(self.batch_latents(batch), batch["prompts"])
        n = batch["num_instance"]
        w = None
        if self.hparams.snr_gamma:
            w = min_snr_weights(t, self.alphas_cumprod, self.hparams.snr_gamma, self.noise_scheduler.config.prediction_type)
        loss, parts = prior_preservation_loss(pred, target, n, self.hparams.prior_loss_weight, w)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"train/loss is {loss.item()} at step {self.global_step}: the weights diverged; likely causes are a "
                f"learning rate too high (model.learning_rate={self.hparams.learning_rate}) or fp16 overflow "
                f"(try trainer.precision=bf16-mixed or 32)."
            )
        self.log_dict(
            {"train/loss": loss, "train/loss_instance": parts["instance"], "train/loss_prior": parts["prior"]},
            prog_bar=True, batch_size=n,
        )
        if self._trainer is not None:  # outside a Trainer (benchmarks) there is no optimizer to read
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        return loss

    @torch.no_grad()
    def denoising_mse(self, pixel_values: torch.Tensor, prompts: list[str], seed: int = 0, repeats: int = 4) -> float:
        """Mean diffusion loss with fixed noise and timesteps: a deterministic 'has it learnt' probe."""
        was_training = self.training
        self.eval()
        g = torch.Generator("cpu").manual_seed(seed)
        total = 0.0
        for _ in range(repeats):
            pred, target = self.diffusion_step(pixel_values.to(self.device), prompts, generator=g, sample_latents=False)
            total += torch.nn.functional.mse_loss(pred.float(), target.float()).item()
        self.train(was_training)
        return total / repeats

    # ----------------------------------------------------------------------------------------- optim

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": hp.learning_rate}]
        if self.text_encoder_trains:
            te_lr = hp.text_encoder_learning_rate or hp.learning_rate
            groups.append({"params": [p for p in self.text_encoder.parameters() if p.requires_grad], "lr": te_lr})
        opt = make_optimizer(hp.optimizer, groups, betas=(hp.adam_beta1, hp.adam_beta2),
                             weight_decay=hp.adam_weight_decay, eps=hp.adam_epsilon)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        fn = partial(lr_lambda, warmup_steps=hp.lr_warmup_steps, total_steps=total, schedule=hp.lr_schedule)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- checkpoints

    def trainable_state_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Drop the frozen gigabytes: they come back from `pretrained` when the module is rebuilt.
        keep = self.trainable_state_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(self.trainable_state_names() - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} trainable weights (first: {missing[0]}): it was saved by a "
                f"run with other trainable parts (train_text_encoder, LoRA) than this one."
            )

    # ----------------------------------------------------------------------------------------- export

    def export(self, folder: str | Path, sampler: str = "default", metadata: dict | None = None) -> Path:
        """Write a complete diffusers `StableDiffusionPipeline` (safetensors) with the fine-tuned weights."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        pipe = components.pipeline(self.parts(), sampler=sampler)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        tmp.chmod(0o755)  # mkdtemp makes 0700; the result is a normal shared folder
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
            info = {"base_model": self.hparams.pretrained, "revision": self.hparams.revision, **(metadata or {})}
            (tmp / "dreambooth_pl.json").write_text(json.dumps(info, indent=2, default=str))
            # Swap in atomically; an earlier export is replaced only once the new one is complete.
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                folder.rename(old)
                tmp.rename(folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder


def learning_probe(model: DreamBoothModule, datamodule, max_images: int = 8, seed: int = 0) -> tuple[float, float]:
    """Denoising MSE on the instance photos under the instance prompt: (base model, `model`)."""
    from .data import DreamBoothDataset

    paths = datamodule.instance_images[:max_images]
    ds = DreamBoothDataset(paths, datamodule.instance_prompt, resolution=datamodule.hparams.resolution,
                           center_crop=True, random_flip=False)
    # (N, 3, R, R) in [-1, 1], center-cropped and unflipped: the probe must not depend on augmentation.
    pixels = torch.stack([ds[i]["instance_pixel_values"] for i in range(len(paths))])
    prompts = [datamodule.instance_prompt] * len(paths)
    tuned = model.denoising_mse(pixels, prompts, seed=seed)
    hp = model.hparams
    base = DreamBoothModule(pretrained=hp.pretrained, revision=hp.revision, variant=hp.variant,
                            single_file_config=hp.single_file_config).to(model.device)
    return base.denoising_mse(pixels, prompts, seed=seed), tuned

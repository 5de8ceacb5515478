"""DreamBoothModule: frozen VAE + text encoder(s), trainable UNet (or LoRA adapters), the two-term DreamBooth loss.

SD 1.x/2.x and SDXL run through the same code: `backbones` says how prompts condition the UNet."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from pytorch_lightning.strategies import FSDPStrategy
from tqdm.auto import tqdm

from . import components
from .backbones import Backbone, Conditioning, backbone_of
from .components import DEFAULT_MODEL
from .files import as_record
from .lora import adapters_off, add_lora
from .losses import (
    diffusion_target,
    fixed_draws,
    flow_loss_weights,
    flow_noised,
    flow_target,
    min_snr_weights,
    offset_noise,
    prior_preservation_loss,
    q_sample,
    timestep_density,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VAL_DRAWS = 4  # (noise, timestep) draws per validation image: the same draws at every validation


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class MissingPackageError(ImportError):
    """An option needs an optional package that is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Optimization:
    """The optimizer and learning-rate schedule (the `model.optim:` group).

    Args:
        optimizer: adamw; adamw_fused (one CUDA kernel for all parameters); adamw_8bit (bitsandbytes, ~75% less state)
        learning_rate: peak learning rate (the paper and the diffusers example: 5e-6 for a full fine-tune)
        text_encoder_learning_rate: the text encoder's rate when it trains; null = learning_rate
        lr_schedule: a diffusers `get_scheduler` schedule after the warm-up: constant, linear or cosine decay to 0,
            cosine_with_restarts, polynomial (constant with lr_warmup_steps > 0 is constant_with_warmup)
        lr_warmup_steps: linear warm-up steps (from 0, as diffusers' schedules do)
        adam_beta1: AdamW beta1
        adam_beta2: AdamW beta2
        weight_decay: AdamW decoupled weight decay
        epsilon: AdamW epsilon
        ema_decay: keep an exponential moving average of the trainable weights (diffusers' EMAModel, decay warmed up
            as (1 + step) / (10 + step)) and use it for evaluation and the exports; e.g. 0.999; null = off
    """

    optimizer: Literal["adamw", "adamw_fused", "adamw_8bit"] = "adamw"
    learning_rate: float = 5e-6
    text_encoder_learning_rate: float | None = None
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                         "polynomial"] = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    epsilon: float = 1e-8
    ema_decay: float | None = None


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters instead of a full fine-tune (the `model.lora:` group); rank 0 = off.

    Args:
        rank: denoiser (UNet or transformer) adapter rank (16 is usual); 0 = full fine-tune of the denoiser
        alpha: denoiser adapter scale numerator (scale = alpha / rank); null = rank
        dropout: adapter dropout
        targets: denoiser module names to adapt; null = the backbone's: a UNet's attention projections
            to_q/k/v/out.0, SD3's joint attention (image and text projections), Flux's attention and MLPs
        text_encoder_rank: text-encoder adapter rank (on both of SDXL's encoders); 0 = no text-encoder adapters
        text_encoder_alpha: text-encoder adapter alpha; null = text_encoder_rank
        text_encoder_targets: text-encoder module names; null = q/k/v/out_proj
        use_dora: DoRA (weight-decomposed LoRA, Liu et al. 2024: a learnt magnitude per output besides the low-rank
            direction) for every adapter; exported in the diffusers format only (kohya files have no magnitudes)
    """

    rank: int = 0
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] | None = None
    text_encoder_rank: int = 0
    text_encoder_alpha: float | None = None
    text_encoder_targets: list[str] | None = None
    use_dora: bool = False


@dataclass(frozen=True)
class SpeedSettings:
    """Speed and memory levers (the `model.speed:` group); the memory presets set these.

    Args:
        cache_latents: encode each photo and class image once (both flips with data.random_flip) and draw from
            the cached VAE posterior each step; needs data.center_crop
        cache_text_embeddings: a frozen text encoder runs once per prompt, not every step
        frozen_dtype: dtype of the frozen weights (VAE, frozen text encoder, the base UNet under LoRA);
            trainable weights stay fp32
        gradient_checkpointing: recompute UNet (and trained text-encoder) activations in backward
        channels_last: NHWC UNet convolutions
        compile_unet: torch.compile the UNet (in place: checkpoint and export keys keep their names)
        allow_tf32: TF32 matmuls and convolutions on Ampere and newer GPUs
        quantize_base: store the frozen base weights under LoRA (the denoiser's Linears, the frozen text encoders')
            quantised: int8 (torchao weight-only, any device), fp8 (torchao, a GPU with fp8: Ada / Hopper), nf4
            (bitsandbytes 4-bit, CUDA); none = as frozen_dtype says. Needs model.lora.rank > 0
    """

    cache_latents: bool = False
    cache_text_embeddings: bool = True
    frozen_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile_unet: bool = False
    allow_tf32: bool = True
    quantize_base: Literal["none", "int8", "fp8", "nf4"] = "none"


def optional_optimizer_package(name: str):
    """The optional package an optimizer needs (bitsandbytes for adamw_8bit; None for the others), or one clear
    MissingPackageError: checked before a run starts (the experiment command) and when the optimizer is made."""
    if name != "adamw_8bit":
        return None
    try:
        import bitsandbytes  # optional, CUDA only: imported where used
    except ImportError as e:
        raise MissingPackageError("model.optim.optimizer: adamw_8bit needs bitsandbytes (CUDA): pip install -c "
                                  "constraints.txt -e '.[gpu]', or use adamw / adamw_fused") from e
    return bitsandbytes


def quantize_frozen(modules: list[torch.nn.Module], kind: str) -> None:
    """Quantise, in place, the frozen nn.Linear weights of `modules` (a LoRA's base layers, frozen encoders); the
    trainable ones (the adapters) stay as they are. One sentence when this machine cannot do `kind`."""
    frozen = lambda m, name: isinstance(m, torch.nn.Linear) and not m.weight.requires_grad  # noqa: E731
    if kind == "nf4":
        raise MissingPackageError("model.speed.quantize_base: nf4 is bitsandbytes' 4-bit format, which needs a CUDA GPU "
                                  "and bitsandbytes (pip install -c constraints.txt -e '.[gpu]'); int8 (torchao) runs "
                                  "anywhere")
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise MissingPackageError(f"model.speed.quantize_base: {kind} needs torchao: pip install -c constraints.txt "
                                  f"torchao") from e
    if kind == "fp8" and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        raise MissingPackageError("model.speed.quantize_base: fp8 needs a GPU with fp8 arithmetic (Ada or Hopper, "
                                  "compute capability 8.9+); use int8 here")
    config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
    for module in modules:
        quantize_(module, config, filter_fn=frozen)


def make_optimizer(name: str, groups: list[dict], **kw) -> torch.optim.Optimizer:
    """AdamW: plain, fused (one CUDA kernel for all parameters) or 8-bit (bitsandbytes, ~75% less state)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, **kw)
    if name == "adamw_fused":
        return torch.optim.AdamW(groups, fused=True, **kw)
    if name == "adamw_8bit":
        return optional_optimizer_package(name).optim.AdamW8bit(groups, **kw)
    raise ValueError(f"unknown model.optim.optimizer {name!r}: choose adamw, adamw_fused or adamw_8bit")


class DreamBoothModule(pl.LightningModule):
    """Fine-tunes a Stable Diffusion denoiser (SD 1.x/2.x or SDXL UNet, SD3 or Flux transformer), and optionally its
    CLIP text encoder(s), on a subject."""

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        revision: str | None = None,
        variant: str | None = None,
        single_file_config: str | None = None,
        prior_loss_weight: float = 1.0,
        prior_loss: Literal["class_images", "teacher"] = "class_images",
        train_text_encoder: bool = False,
        snr_gamma: float | None = None,
        flow_weighting: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] | None = None,
        noise_offset: float = 0.0,
        optim: Optimization = Optimization(),
        lora: LoraSettings = LoraSettings(),
        speed: SpeedSettings = SpeedSettings(),
    ):
        """The model and what of it trains (the `model:` section).

        Args:
            pretrained: hub id, local diffusers folder, single .safetensors/.ckpt file, or tiny / tiny-v / tiny-xl /
                tiny-sd3 / tiny-flux (offline); SD 1.x/2.x, SDXL, SD3/3.5 or Flux.1, told apart from the loaded
                denoiser
            revision: hub revision (branch, tag or commit)
            variant: hub weight variant, e.g. fp16
            single_file_config: for a single-file `pretrained`: the diffusers folder or hub id describing it
            prior_loss_weight: lambda in L = L_instance + lambda * L_prior (the paper: 1)
            prior_loss: class_images = the paper's term on generated class images; teacher = the seed's wording: the
                difference between the fine-tuned and the frozen base model's predictions for the class prompt on the
                instance step's noisy latents, and on the class images' when data.with_prior_preservation gives some
                (none needed); the base model's text states for the class prompt; one frozen UNet copy in memory,
                none with LoRA
            train_text_encoder: fine-tune the whole text encoder too (both of SDXL's; SD3's two CLIPs and Flux's CLIP,
                never T5, as diffusers' examples)
            snr_gamma: min-SNR-gamma loss weighting (Hang et al. 2023; 5 is usual) of the UNets' DDPM loss; null =
                off. It weights both terms: the prior term is the same denoising loss on class images (diffusers'
                example weights the instance term only)
            flow_weighting: the SD3 / Flux rectified-flow loss: how sigma is drawn (logit_normal, mode) or the loss
                weighted (sigma_sqrt, cosmap), or uniform (none); null = the backbone's (SD3 logit_normal, Flux none,
                as diffusers' DreamBooth examples)
            noise_offset: offset noise (0.05-0.1 gives darker darks and brighter brights); 0 = off
            optim: optimizer and learning-rate schedule
            lora: LoRA adapters instead of a full fine-tune
            speed: speed and memory levers
        """
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if train_text_encoder and lora.text_encoder_rank:
            raise ValueError("model.train_text_encoder and model.lora.text_encoder_rank both train the text encoder: "
                             "choose the full fine-tune (train_text_encoder) or adapters (text_encoder_rank)")
        self.save_hyperparameters(as_record(config))  # plain values: YAML, W&B and weights_only checkpoints
        self.optim, self.lora, self.speed = optim, lora, speed
        parts = self.source().load()
        self.tokenizer, self.text_encoder, self.vae, self.unet = parts.tokenizer, parts.text_encoder, parts.vae, parts.unet
        # SDXL's / SD3's second encoder, Flux's T5; SD3's T5 third (None where the model has none).
        self.tokenizer_2, self.text_encoder_2 = parts.tokenizer_2, parts.text_encoder_2
        self.tokenizer_3, self.text_encoder_3 = parts.tokenizer_3, parts.text_encoder_3
        self.noise_scheduler, self.scheduler_config = parts.noise_scheduler, parts.scheduler_config
        flow = self.backbone.objective == "flow"
        if snr_gamma and flow:
            raise ValueError(f"model.snr_gamma weights the DDPM loss of a UNet; a {self.backbone.label} model trains a "
                             f"rectified flow: use model.flow_weighting (sigma_sqrt, cosmap, logit_normal, mode)")
        if flow_weighting and not flow:
            raise ValueError(f"model.flow_weighting is for the SD3 / Flux rectified flow; a {self.backbone.label} UNet "
                             f"trains on DDPM noise: use model.snr_gamma (or leave flow_weighting null)")
        self._set_up_training()
        # prompt -> its (1-row) conditioning; (split, image index, bucket) -> ((F flips, 2 [mean, std], 4, h, w)
        # latent moments, (F, 6) size/crop ids).
        self._text_cache: dict[str, Conditioning] = {}
        self._teacher_text: dict[str, Conditioning] = {}  # class prompt -> the base text encoder's conditioning
        self._latent_cache: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # The training noise table, not saved (it comes from the config): the UNets' (T,) cumulative alphas; the flow
        # models' (T,) sigmas and the matching model timesteps (sigma x 1000), both from high noise to low, as diffusers
        # builds them. A "timestep" in this module is a row of that table.
        sched = self.noise_scheduler
        if flow:
            self.register_buffer("flow_sigmas", sched.sigmas[: sched.config.num_train_timesteps].clone().float(),
                                 persistent=False)
            self.register_buffer("flow_timesteps", sched.timesteps.clone().float(), persistent=False)
        else:
            self.register_buffer("alphas_cumprod", sched.alphas_cumprod.clone().float(), persistent=False)
        # Checkpoints hold only the trainable weights, so loading one leaves the frozen ones as loaded.
        self.strict_loading = False
        self.ema: EMAModel | None = None  # made at fit start, on the training device (optim.ema_decay)
        self._ema_state: dict | None = None  # from a checkpoint being resumed, loaded into the EMA once it exists

    def _set_up_training(self) -> None:
        """Freeze everything, then unfreeze or adapt what trains; frozen weights in speed.frozen_dtype, trainable fp32."""
        lora, speed, dtype = self.lora, self.speed, DTYPES[self.speed.frozen_dtype]
        self.requires_grad_(False)
        frozen = [self.vae]
        self.teacher_unet = None
        if self.hparams.prior_loss == "teacher" and not lora.rank:
            # The base model to stay close to: a frozen copy (with LoRA, the UNet with its adapters off).
            self.teacher_unet = copy.deepcopy(self.unet)
            frozen.append(self.teacher_unet)
        if lora.rank:
            frozen.append(self.unet)  # the base UNet is frozen; its adapters train
            add_lora(self.unet, lora.rank, lora.alpha, lora.dropout, lora.targets or list(self.backbone.lora_targets),
                     lora.use_dora)
        else:
            self.unet.requires_grad_(True)
        trainable_text = self.trainable_text_encoders
        frozen += [e for e in self.text_encoders if e is not None and not any(e is t for t in trainable_text)]  # T5
        for encoder in trainable_text:
            if lora.text_encoder_rank:
                add_lora(encoder, lora.text_encoder_rank, lora.text_encoder_alpha, lora.dropout,
                         lora.text_encoder_targets, lora.use_dora)
                frozen.append(encoder)
            elif self.hparams.train_text_encoder:
                encoder.requires_grad_(True)
            else:
                frozen.append(encoder)
        if self.text_encoder_trains:
            for part in self.backbone.unused_text_modules(self.trainable_text_encoders):
                part.requires_grad_(False)
        # Half-precision frozen weights halve their memory; trainable weights (and adapters) stay fp32, since fp16
        # trainable weights are what make GradScaler fail with "unscale FP16 gradients".
        for module in frozen if dtype != torch.float32 else []:
            module.to(dtype)
        for p in self.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if speed.quantize_base != "none":
            if not lora.rank:
                raise ValueError(f"model.speed.quantize_base={speed.quantize_base} quantises the frozen base weights, but "
                                 f"a full fine-tune trains them: set model.lora.rank > 0, or quantize_base: none")
            quantize_frozen([self.unet, *(e for e in self.text_encoders if e is not None)], speed.quantize_base)
        self.train()  # from_pretrained returns eval-mode modules; `train()` keeps the frozen ones in eval
        if speed.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for encoder in self.trainable_text_encoders if self.text_encoder_trains else []:
                encoder.gradient_checkpointing_enable()
        if speed.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if speed.compile_unet:
            self.unet.compile()  # in place: state-dict keys (checkpoints, export) stay unprefixed

    # ----------------------------------------------------------------------------------------- parts

    @property
    def backbone(self) -> Backbone:
        """SD 1.x/2.x, SDXL, SD3 or Flux, from the loaded denoiser."""
        return backbone_of(self.unet)

    @property
    def text_encoders(self) -> list[torch.nn.Module | None]:
        """The text encoders in the backbone's order (one for SD 1.x/2.x, two for SDXL and Flux, three for SD3; None
        for an SD3 saved without T5)."""
        return [getattr(self, name) for name in self.backbone.text_encoders]

    @property
    def trainable_text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders `train_text_encoder` and text-encoder LoRA act on: the CLIPs (never T5, as diffusers)."""
        return [getattr(self, name) for name in self.backbone.lora_text_prefixes]

    def source(self) -> components.ModelSource:
        """Where the base weights come from."""
        hp = self.hparams
        return components.ModelSource(hp.pretrained, hp.revision, hp.variant, hp.single_file_config)

    def base_model(self) -> DreamBoothModule:
        """A fresh module holding the pretrained weights this one started from (on this module's device)."""
        return DreamBoothModule(**as_record(self.source())).to(self.device)

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
            tokenizer_2=self.tokenizer_2,
            text_encoder_2=self.text_encoder_2,
            tokenizer_3=self.tokenizer_3,
            text_encoder_3=self.text_encoder_3,
        )

    def export_parts(self) -> components.SDComponents:
        """The fine-tuned components in one dtype, as the base model ships them: the trained weights (fp32) with the
        frozen parts loaded again at full precision, not the half-precision copies `speed.frozen_dtype` trains with."""
        parts = self.parts()
        if self.speed.frozen_dtype == "fp32":
            return parts
        base = self.source().load()
        parts.vae = base.vae.to(self.device)
        trained = set(self.backbone.lora_text_prefixes) if self.text_encoder_trains else set()
        for name in self.backbone.text_encoders:  # the frozen ones (T5 always) as pretrained
            if name not in trained and getattr(base, name) is not None:
                setattr(parts, name, getattr(base, name).to(self.device))
        return parts

    @property
    def text_encoder_trains(self) -> bool:
        return self.hparams.train_text_encoder or self.lora.text_encoder_rank > 0

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        if self.teacher_unet is not None:
            self.teacher_unet.eval()
        trained = self.trainable_text_encoders if self.text_encoder_trains else []
        for encoder in self.text_encoders:
            if encoder is not None and not any(encoder is t for t in trained):
                encoder.eval()
        return self

    def setup(self, stage: str) -> None:
        if isinstance(self.trainer.strategy, FSDPStrategy) and self.optim.ema_decay:
            raise ValueError("model.optim.ema_decay with trainer.strategy: fsdp: the average would be kept per shard; "
                             "use ddp for EMA, or ema_decay: null with fsdp")
        if self.speed.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def on_fit_start(self) -> None:
        frozen_dtype = self.speed.frozen_dtype
        if self.lora.rank and frozen_dtype != "fp32" and "mixed" not in str(self.trainer.precision):
            raise ValueError(f"model.speed.frozen_dtype={frozen_dtype} with LoRA keeps the base UNet in half precision, "
                             f"which needs autocast: set trainer.precision to bf16-mixed (or 16-mixed on GPU), "
                             f"or model.speed.frozen_dtype: fp32")
        if self.optim.optimizer == "adamw_fused" and self.trainer.gradient_clip_val:
            raise ValueError(f"model.optim.optimizer: adamw_fused unscales gradients inside its kernel, so Lightning cannot "
                             f"clip them (trainer.gradient_clip_val={self.trainer.gradient_clip_val}): set "
                             f"trainer.gradient_clip_val: null, or use model.optim.optimizer: adamw")
        if self.optim.ema_decay:
            self.ema = EMAModel(self.trainable_parameters(), decay=self.optim.ema_decay)
            self._load_ema_state()  # a resumed fit continues its average
        if self.speed.cache_latents:
            self.cache_latents(self.trainer.datamodule.cache_views(), progress=self.trainer.is_global_zero)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------------- math

    @torch.no_grad()
    def latent_moments(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [-1, 1] -> VAE posterior mean and std, each (N, 4, H/8, W/8) fp32."""
        dist = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior sample, scaled: (N, C, h, w). The same draw as diffusers' `latent_dist.sample`."""
        eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scale_latents(mean + std * eps)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> what the denoiser sees: (z - shift) x scale (SD3 / Flux VAEs shift; SD's do not)."""
        cfg = self.vae.config
        return (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, C, H/8, W/8) scaled latents (C = 4, or 16 for SD3 / Flux)."""
        mean, std = self.latent_moments(pixel_values)
        return self.sample_latents(mean, std, generator) if sample else self.scale_latents(mean)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """N prompts -> their conditioning: (N, 77, D) hidden states (+ (N, P) pooled for SDXL), with grad only
        when a text encoder trains."""
        trains = self.text_encoder_trains and self.training
        if not self.text_encoder_trains and self.speed.cache_text_embeddings:
            # A frozen text encoder maps the two prompts of a run to the same states every step: encode once.
            return self._cached_conditioning(self._text_cache, prompts, self._encode)
        with nullcontext() if trains else torch.no_grad():
            return self._encode(prompts)

    @staticmethod
    def _cached_conditioning(cache: dict[str, Conditioning], prompts: list[str],
                             encode: Callable[[list[str]], Conditioning]) -> Conditioning:
        """`prompts`' conditioning, one cached row per prompt; `encode` runs once on the prompts not in `cache`."""
        missing = sorted({p for p in prompts if p not in cache})
        if missing:
            with torch.no_grad():  # states to keep across steps: no graph (under FSDP a frozen weight can share
                cond = encode(missing)  # a flat parameter that requires grad)
            for i, p in enumerate(missing):
                cache[p] = cond.rows(slice(i, i + 1))
        return Conditioning.cat([cache[p] for p in prompts])

    def _encode(self, prompts: list[str]) -> Conditioning:
        tokenizers = [getattr(self, name) for name in self.backbone.tokenizers]
        # A half-precision frozen text encoder feeds an fp32 UNet: cast to the UNet's dtype.
        return self.backbone.encode(tokenizers, self.text_encoders, prompts, self.device).to(self.unet.dtype)

    def unet_forward(self, unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                     time_ids: torch.Tensor | None) -> torch.Tensor:
        """One prediction of the denoiser `unet`, (N, C, h, w), conditioned as the backbone wants (SDXL: pooled +
        size/crop ids; SD3 / Flux: pooled, and the scheduler's timestep of each table row)."""
        if self.backbone.objective == "flow":
            timesteps = self.flow_timesteps[timesteps]  # the model's timestep input, sigma x 1000
        return self.backbone.predict(unet, noisy, timesteps, cond, time_ids)

    @torch.no_grad()
    def cache_latents(self, views: Iterable[tuple[tuple[str, int, int], torch.Tensor, torch.Tensor]],
                      progress: bool = True) -> None:
        """Encode each image's views once: (split, image index, bucket) -> its (F, 2 [mean, std], 4, h, w) VAE
        posterior moments and (F, 6) size/crop ids.

        `views` yields (key, (F, 3, h, w) views, (F, 6) ids), F = the flips the loader can show (the data module's
        `cache_views`); batches then carry (image_index, flipped, bucket) instead of pixels.
        """
        for key, v, ids in tqdm(views, desc="caching latents", disable=not progress):
            self._latent_cache[key] = (torch.stack(self.latent_moments(v.to(self.device)), dim=1), ids.to(self.device))

    @staticmethod
    def default_time_ids(latents: torch.Tensor) -> torch.Tensor:
        """(N, 6) size/crop ids of uncropped images as large as the latents show: original = target, crop (0, 0)."""
        h, w = (8 * s for s in latents.shape[-2:])
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=latents.device).expand(len(latents), 6)

    def batch_latents(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, 4, h, w) scaled latents of a batch and its (N, 6) size/crop ids (None: the batch has none): encoded
        from pixels, or drawn from the cached moments."""
        if "pixel_values" in batch:
            return self.encode_images(batch["pixel_values"]), batch.get("time_ids")
        n = batch["num_instance"]
        buckets = batch["bucket"].tolist() if "bucket" in batch else [-1] * len(batch["image_index"])
        cached = [self._latent_cache[("instance" if r < n else "class", int(i), b)]
                  for r, (i, b) in enumerate(zip(batch["image_index"].tolist(), buckets, strict=True))]
        # A cache made without random_flip holds one view: a row never flipped reads view 0.
        flips = [min(int(f), m.shape[0] - 1) for f, (m, _) in zip(batch["flipped"].tolist(), cached, strict=True)]
        moments = torch.stack([m[f] for f, (m, _) in zip(flips, cached, strict=True)])  # (N, 2, 4, h, w)
        ids = torch.stack([t[f] for f, (_, t) in zip(flips, cached, strict=True)])  # (N, 6)
        return self.sample_latents(moments[:, 0], moments[:, 1]), ids

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

    def noised(self, latents: torch.Tensor, generator: torch.Generator | None = None,
               timesteps: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 4, h, w) clean latents -> (noisy latents, noise, (N,) timesteps) at random or given timesteps; given
        `noise` is used as is (no offset noise)."""
        if noise is not None:
            noise = noise.to(latents.device, latents.dtype)
        else:
            noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            if self.hparams.noise_offset:
                extra = randn_tensor((*latents.shape[:2], 1, 1), generator=generator, device=latents.device,
                                     dtype=latents.dtype)
                noise = offset_noise(noise, self.hparams.noise_offset, extra)
        t_max = self.noise_scheduler.config.num_train_timesteps
        flow = self.backbone.objective == "flow"
        if timesteps is None and flow:  # rows of the noise table, drawn as the weighting scheme says (SD3: logit-normal)
            u = timestep_density(self.flow_weighting, latents.shape[0],
                                 generator if generator is None or generator.device.type == "cpu" else None)
            timesteps = (u * t_max).long()
        elif timesteps is None:
            timesteps = torch.randint(0, t_max, (latents.shape[0],), generator=generator,
                                      device=generator.device if generator else None)
        timesteps = timesteps.to(latents.device).long()
        if flow:
            noisy = flow_noised(latents, noise, self.flow_sigmas[timesteps])
        else:
            noisy = q_sample(latents, noise, timesteps, self.alphas_cumprod)
        if self.speed.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        return noisy, noise, timesteps

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser must predict for these noised latents (eps or v by the UNet's prediction type; the flow
        models' velocity eps - x_0)."""
        if self.backbone.objective == "flow":
            return flow_target(latents, noise)
        return diffusion_target(self.noise_scheduler.config.prediction_type, latents, noise, timesteps, self.alphas_cumprod)

    @property
    def flow_weighting(self) -> str:
        """The rectified-flow weighting scheme in use: model.flow_weighting, else the backbone's."""
        return self.hparams.flow_weighting or getattr(self.backbone, "weighting", "none")

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """(N,) per-row loss weights of these rows of the noise table: min-SNR (UNets, model.snr_gamma) or the flow
        weighting (sigma_sqrt, cosmap); None = all 1."""
        if self.backbone.objective == "flow":
            return flow_loss_weights(self.flow_weighting, self.flow_sigmas[timesteps])
        if self.hparams.snr_gamma:
            return min_snr_weights(timesteps, self.alphas_cumprod, self.hparams.snr_gamma,
                                   self.noise_scheduler.config.prediction_type)
        return None

    def denoise(self, latents: torch.Tensor, prompts: list[str], generator: torch.Generator | None = None,
                timesteps: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 4, h, w) clean latents -> (UNet prediction, target, timesteps) at random or given timesteps and noise;
        `time_ids` (N, 6): SDXL's size/crop ids (None: `default_time_ids`)."""
        cond = self.encode_prompts(prompts)
        noisy, noise, timesteps = self.noised(latents, generator, timesteps, noise)
        ids = self.default_time_ids(latents) if time_ids is None else time_ids.to(latents.device)
        pred = self.unet_forward(self.unet, noisy, timesteps, cond, ids)
        return pred, self.target(latents, noise, timesteps), timesteps

    def denoise_with_teacher(self, latents: torch.Tensor, prompts: list[str], class_prompts: list[str],
                             time_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`prior_loss: teacher`. `latents` (N, 4, h, w): n = len(class_prompts) instance rows, then N - n class-image
        rows (none without class images); `prompts` their N prompts, `class_prompts` each instance row's class prompt.

        Rows out (n + n + N - n): the instance rows as `denoise` (target: the noise); each instance row's noisy latents
        with its class prompt; the class images' noisy latents with theirs. The last two kinds are the teacher rows:
        their target is the frozen base model's prediction, conditioned by the base text encoder (`teacher_conditioning`),
        so the prior constrains the class prompt on the subject's latents and on the class's own. Returns prediction,
        target and timesteps."""
        n = len(class_prompts)
        noisy, noise, t = self.noised(latents)
        ids = self.default_time_ids(latents) if time_ids is None else time_ids.to(latents.device)  # (N, 6)
        rows = torch.cat([torch.arange(n), torch.arange(n), torch.arange(n, len(latents))]).to(latents.device)
        teacher_prompts = class_prompts + prompts[n:]  # the teacher rows' prompts, all class prompts
        cond = self.encode_prompts(prompts[:n] + teacher_prompts)
        pred = self.unet_forward(self.unet, noisy[rows], t[rows], cond, ids[rows])
        with torch.no_grad(), self.base_unet() as base:
            teacher_rows = rows[n:]
            teacher = self.unet_forward(base, noisy[teacher_rows].to(base.dtype), t[teacher_rows],
                                        self.teacher_conditioning(teacher_prompts).to(base.dtype), ids[teacher_rows])
        target = torch.cat([self.target(latents[:n], noise[:n], t[:n]), teacher.to(pred.dtype)])
        return pred, target, t[rows]

    def teacher_conditioning(self, prompts: list[str]) -> Conditioning:
        """The base model's conditioning of `prompts` for the teacher rows (cached per prompt): the frozen text encoder
        as it is; a LoRA-adapted one with its adapters off; a fully trained one as pretrained (loaded again once from
        `pretrained`, so a resumed fit gets the base states too)."""
        return self._cached_conditioning(self._teacher_text, prompts, self._encode_with_base_text_encoders)

    def _encode_with_base_text_encoders(self, prompts: list[str]) -> Conditioning:
        """`prompts` through the text encoders as pretrained (see `teacher_conditioning`)."""
        if not self.text_encoder_trains:
            return self._encode(prompts)
        if self.lora.text_encoder_rank:
            with adapters_off(*self.trainable_text_encoders):
                return self._encode(prompts)
        base = self.source().load()
        encoders = [getattr(base, name).to(self.device).eval() for name in self.backbone.text_encoders]
        tokenizers = [getattr(base, name) for name in self.backbone.tokenizers]
        return self.backbone.encode(tokenizers, encoders, prompts, self.device).to(self.unet.dtype)

    @contextmanager
    def base_unet(self) -> Iterator[torch.nn.Module]:
        """The UNet as pretrained: with LoRA the UNet with its adapters off, else the frozen copy."""
        if self.teacher_unet is not None:
            yield self.teacher_unet
            return
        with adapters_off(self.unet):
            yield self.unet

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DreamBooth loss of a batch: (L_instance + lambda * L_prior, {"instance": ..., "prior": ...})."""
        hp = self.hparams
        (latents, time_ids), n = self.batch_latents(batch), batch["num_instance"]
        if hp.prior_loss == "class_images":
            pred, target, t = self.denoise(latents, batch["prompts"], time_ids=time_ids)
        else:
            pred, target, t = self.denoise_with_teacher(latents, batch["prompts"],
                                                        batch.get("class_prompts") or [batch["class_prompt"]] * n,
                                                        time_ids)
        mask = batch.get("loss_mask")
        if mask is not None:  # (n, 1, H, W) pixels -> (n, 1, h, w) latent cells: the share of each cell that counts
            mask = torch.nn.functional.adaptive_avg_pool2d(mask.to(pred.device, torch.float32), pred.shape[-2:])
        loss, parts = prior_preservation_loss(pred, target, n, hp.prior_loss_weight, self.loss_weights(t), mask)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"train/loss is {loss.item()} at step {self.global_step}: the weights diverged; likely causes are a "
                f"learning rate too high (model.optim.learning_rate={self.optim.learning_rate}) or fp16 overflow "
                f"(try trainer.precision=bf16-mixed or 32)."
            )
        return loss, parts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, parts = self.compute_loss(batch)
        self.log_dict(
            {"train/loss": loss, "train/loss_instance": parts["instance"], "train/loss_prior": parts["prior"]},
            prog_bar=True, batch_size=batch["num_instance"],
        )
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """val/loss_<split>: the unweighted denoising MSE of one split's images (held-out class images, or the
        photos) with noise and timesteps fixed by each image's seed, so every validation measures the same thing."""
        latents = self.encode_images(batch["pixel_values"], sample=False)  # (n, 4, h, w) posterior means
        t_max = self.noise_scheduler.config.num_train_timesteps
        noise, timesteps = fixed_draws(batch["seeds"].tolist(), tuple(latents.shape[1:]), VAL_DRAWS, t_max)
        losses = []
        for k in range(VAL_DRAWS):  # (n, 4, h, w) noise and (n,) timesteps of draw k
            pred, target, _ = self.denoise(latents, batch["prompts"], timesteps=timesteps[k], noise=noise[k])
            losses.append(torch.nn.functional.mse_loss(pred.float(), target.float()))
        loss = torch.stack(losses).mean()
        self.log(f"val/loss_{batch['split']}", loss, batch_size=len(latents), sync_dist=True)
        return loss

    def on_validation_start(self) -> None:
        if self.ema is not None:  # validate the weights that evaluation and the exports use
            self.ema.store(self.trainable_parameters())
            self.ema.copy_to(self.trainable_parameters())

    def on_validation_end(self) -> None:
        if self.ema is not None:
            self.ema.restore(self.trainable_parameters())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if isinstance(self.trainer.strategy, FSDPStrategy) and gradient_clip_val:
            # Each rank holds a shard of the gradients: FSDP computes the norm over all of them.
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # once per optimizer step, before any callback (checkpoint, export) sees the step
            self.ema.step(self.trainable_parameters())

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """The EMA weights in place of the trained ones inside the block (evaluation, exports); no-op without EMA."""
        if self.ema is None:
            yield
            return
        params = self.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

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

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The configured AdamW over the trainable weights only (UNet or adapters, then the text encoder's)."""
        o = self.optim
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": o.learning_rate}]
        if self.text_encoder_trains:
            te_lr = o.text_encoder_learning_rate or o.learning_rate
            groups.append({"params": [p for e in self.trainable_text_encoders for p in e.parameters() if p.requires_grad],
                           "lr": te_lr})
        return make_optimizer(o.optimizer, groups, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay,
                              eps=o.epsilon)

    def make_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """The configured diffusers schedule (warm-up, then `lr_schedule`) over `total_steps` optimizer steps."""
        name, warmup = self.optim.lr_schedule, self.optim.lr_warmup_steps
        if name == "constant" and warmup:  # diffusers' "constant" ignores the warm-up; nobody asking for one wants that
            name = "constant_with_warmup"
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    def configure_optimizers(self):
        opt = self.make_optimizer()
        sched = self.make_scheduler(opt, int(self.trainer.estimated_stepping_batches))
        # `name`: LearningRateMonitor logs it as train/lr (train/lr/pg1, /pg2 with a training text encoder).
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "train/lr"}}

    # ----------------------------------------------------------------------------------------- checkpoints

    def trainable_state_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> tuple[DreamBoothModule, dict]:
        """The fine-tuned module a checkpoint describes (base weights from its `pretrained`, the trainable ones from
        the file, read with weights_only=True) and the checkpoint itself (step, data settings)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist: pass a run's checkpoints/<name>.ckpt")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        hp = dict(ckpt["hyper_parameters"])
        groups = dict(optim=Optimization(**hp.pop("optim")), lora=LoraSettings(**hp.pop("lora")),
                      speed=SpeedSettings(**hp.pop("speed")))
        module = cls(**hp, **groups)
        if ckpt.get("ema") is not None:  # an EMA run exports its averaged weights, as after fit
            module.ema = EMAModel(module.trainable_parameters())
        module.load_trained(ckpt)
        if module.ema is not None:
            module.ema.copy_to(module.trainable_parameters())
        return module.eval(), ckpt

    def load_trained(self, ckpt: dict) -> None:
        """A checkpoint's trainable weights into this module, and its EMA into `self.ema` when both have one."""
        self.on_load_checkpoint(ckpt)  # refuses a checkpoint that lacks trainable weights
        self.load_state_dict(ckpt["state_dict"], strict=False)
        self._load_ema_state()

    def _load_ema_state(self) -> None:
        """The EMA state of the checkpoint loaded last (resume, best step) into `self.ema`, when both exist."""
        if self.ema is not None and self._ema_state is not None:
            self.ema.load_state_dict(self._ema_state)
            self.ema.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Drop the frozen gigabytes: they come back from `pretrained` when the module is rebuilt.
        keep = self.trainable_state_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()  # tensors and numbers: weights_only loads it

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._ema_state = checkpoint.get("ema")
        missing = sorted(self.trainable_state_names() - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} trainable weights (first: {missing[0]}): it was saved by a "
                f"run with other trainable parts (train_text_encoder, LoRA) than this one."
            )

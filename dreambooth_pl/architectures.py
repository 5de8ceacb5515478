"""Architecture tables: UNet / transformer, VAE, text-encoder and scheduler configs of the tiny models, SD 1.5 / 2.1,
SDXL, SD3.5 medium and FLUX.1-dev.

Data only: `tiny.build_random` turns a table into random-initialised modules, and the tests build the public
shapes on the meta device to check their parameter counts.
"""

from __future__ import annotations

# SD's DDPM/DDIM-style training schedule (also the key set of the released PNDM sampling config).
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
V_SCHEDULER = {**SCHEDULER, "prediction_type": "v_prediction"}

# ------------------------------------------------------------------------------------ tiny (tests, demo)

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=8,
)
# InstructPix2Pix: 8 input channels (noisy latents ++ image latents).
TINY_IP2P_UNET = {**TINY_UNET, "in_channels": 8}
# Four encoder blocks -> three 2x downsamples: 8x like the real VAE (64 px -> 8x8 latents).
TINY_VAE = dict(
    sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, scaling_factor=0.18215,
)
TINY_TEXT = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)

# SDXL layout in miniature: two text encoders (hidden states concatenated: 32 + 48 = 80-d cross-attention; the
# second one's pooled projection, 32-d, plus six size/crop ids x 8 feed the UNet's added embedding: 32 + 6*8 = 80).
# The encoders differ in width as SDXL's do: diffusers' single-file loader tells them apart by it.
TINY_XL_UNET = {
    **TINY_UNET, "cross_attention_dim": 80, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80, "use_linear_projection": True,
}
TINY_XL_IP2P_UNET = {**TINY_XL_UNET, "in_channels": 8}  # sdxl-instructpix2pix layout
TINY_XL_VAE = {**TINY_VAE, "scaling_factor": 0.13025}
# CLIPTextModelWithProjection, OpenCLIP-style (gelu, "!" padding), 48 wide with a 32-d pooled projection
TINY_XL_TEXT_2 = {**TINY_TEXT, "hidden_size": 48, "intermediate_size": 96, "hidden_act": "gelu", "pad_token_id": 0}
# SDXL samples with Euler (leading spacing); training uses the same betas as SD 1.x.
XL_SCHEDULER = {**SCHEDULER, "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False}

# ------------------------------------------------------------------------------------ public SD shapes

SD_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215,
)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
# runwayml/stable-diffusion-v1-5: CLIP ViT-L/14 text tower
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
# stabilityai/stable-diffusion-2-1: 768 px, 1024-d cross-attention, linear attention projections.
SD21_UNET = {
    **SD15_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
# stabilityai/stable-diffusion-2-1: OpenCLIP ViT-H text tower (23 layers)
SD21_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, projection_dim=512, hidden_act="gelu",
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)

# stabilityai/stable-diffusion-xl-base-1.0: 2.6B-parameter UNet, three levels, 10 transformer layers at the lowest.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
SDXL_TEXT = {**SD15_TEXT}  # CLIP ViT-L/14, penultimate layer
# OpenCLIP ViT-bigG/14 text tower with its 1280-d pooled projection
SDXL_TEXT_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
)

# ------------------------------------------------------------------------------------ flow-matching transformers
# SD3 / SD3.5 and Flux.1 in miniature: a 16-channel VAE with a shift factor (the released ones' values), a rectified-
# flow scheduler, and their text encoders (SD3: two CLIPs with projections + T5; Flux: CLIP + T5). T5 is small and
# takes the offline T5 tokenizer (`tiny.build_t5_tokenizer`). Constraints diffusers imposes: SD3's caption
# projection = heads x head dim, T5's width >= both CLIPs' widths together (they are zero-padded up to it), pooled =
# both projections; Flux's rope axes sum to the head dim and its input is the 2 x 2-packed latents (4 x 16).


def _flow_vae(shift: float, scale: float) -> dict:
    return {**TINY_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
            "shift_factor": shift, "scaling_factor": scale}


TINY_SD3_VAE = _flow_vae(0.0609, 1.5305)  # stabilityai/stable-diffusion-3-medium's VAE factors
TINY_FLUX_VAE = _flow_vae(0.1159, 0.3611)  # black-forest-labs/FLUX.1-dev's
TINY_CLIP_PROJ = TINY_TEXT  # CLIPTextModelWithProjection: 32 wide, 32-d projection
TINY_CLIP_G = {**TINY_XL_TEXT_2, "projection_dim": 48}  # the second, 48 wide, 48-d projection, "!" padding


def _t5(d_model: int) -> dict:
    """T5 v1.1 encoder layout (gated GELU, untied), tiny; the vocabulary is the offline T5 tokenizer's (set by tiny.py)."""
    return dict(d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=0, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
                dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                is_encoder_decoder=False)


TINY_SD3_T5 = _t5(96)  # >= 32 + 48
TINY_SD3_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=32 + 48,
    pos_embed_max_size=16, dual_attention_layers=(), qk_norm=None,
)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # FlowMatchEulerDiscreteScheduler, static shift
TINY_FLUX_T5 = _t5(64)
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev's: the shift follows image size

# Public shapes (for parameter-count tests on the meta device and the slow tier): SD3.5 medium's transformer
# (24 layers, 1536 wide, dual attention in the first 13, qk RMS norm) and FLUX.1-dev's (19 double + 38 single
# blocks, 3072 wide, guidance embedding).
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

ARCHITECTURES: dict[str, dict[str, dict]] = {
    "tiny": dict(unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT, scheduler=SCHEDULER),
    "tiny-v": dict(unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT, scheduler=V_SCHEDULER),
    "tiny-ip2p": dict(unet=TINY_IP2P_UNET, vae=TINY_VAE, text=TINY_TEXT, scheduler=SCHEDULER),
    "sd15": dict(unet=SD15_UNET, vae=SD_VAE, text=SD15_TEXT, scheduler=SCHEDULER),
    "sd21": dict(unet=SD21_UNET, vae=SD_VAE, text=SD21_TEXT, scheduler=V_SCHEDULER),
    "tiny-xl": dict(unet=TINY_XL_UNET, vae=TINY_XL_VAE, text=TINY_TEXT, text_2=TINY_XL_TEXT_2, scheduler=XL_SCHEDULER),
    "tiny-xl-ip2p": dict(unet=TINY_XL_IP2P_UNET, vae=TINY_XL_VAE, text=TINY_TEXT, text_2=TINY_XL_TEXT_2,
                         scheduler=XL_SCHEDULER),
    "sdxl": dict(unet=SDXL_UNET, vae=SDXL_VAE, text=SDXL_TEXT, text_2=SDXL_TEXT_2, scheduler=XL_SCHEDULER),
    # Flow-matching transformers: `transformer` instead of `unet`, `t5` the T5 encoder's config.
    "tiny-sd3": dict(transformer=TINY_SD3_TRANSFORMER, vae=TINY_SD3_VAE, text=TINY_CLIP_PROJ, text_2=TINY_CLIP_G,
                     t5=TINY_SD3_T5, scheduler=SD3_SCHEDULER),
    "tiny-flux": dict(transformer=TINY_FLUX_TRANSFORMER, vae=TINY_FLUX_VAE, text=TINY_TEXT, t5=TINY_FLUX_T5,
                      scheduler=FLUX_SCHEDULER),
    "sd35-medium": dict(transformer=SD35M_TRANSFORMER, scheduler=SD3_SCHEDULER),
    "flux-dev": dict(transformer=FLUX_DEV_TRANSFORMER, scheduler=FLUX_SCHEDULER),
}


def architecture(name: str) -> dict[str, dict]:
    """UNet, VAE, text-encoder(s) and scheduler configs of one of `ARCHITECTURES` (`text_2`: SDXL's second encoder).

    Fresh dicts on every call: a caller may change them without touching the tables.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}: choose one of {', '.join(ARCHITECTURES)}")
    return {part: dict(config) for part, config in ARCHITECTURES[name].items()}

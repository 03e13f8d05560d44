"""The bundled toy base model: a real `StableDiffusionPipeline`, small enough to train and run on a CPU.

Same component classes as SD 1.x (AutoencoderKL, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer), so every
code path of the toolkit runs on it unchanged. Sizes are the measured ones of docs/toyworld.md:

- VAE: channels (16, 32, 64), 4x downsampling, 64x64x3 images <-> 16x16x4 latents;
- UNet: SD 1.x's block layout at toy sizes: four levels, channels (32, 64, 128, 128) at 16x16, 8x8, 4x4, 2x2
  latents, cross-attention at the three finest (`CrossAttnDownBlock2D` x3 + `DownBlock2D`, mirrored on the way
  up) and in the mid block, one layer per block, 32 channels per head: the text steers the finest detail, as in
  SD 1.x, so a new token can carry a concept through cross-attention;
- text encoder: CLIP, 128 wide, 3 layers, 4 heads; tokenizer: one token per vocabulary word (`vocabulary()`).

The 16x16 level is 32 channels wide, so the smallest adapted layers have min(out, in) = 32: 8 bands of rank 4 fit
everywhere.

API:
    MODEL_DIR                               # the trained model folder shipped in the package
    vocabulary() -> list[str]               # the tokenizer's word list
    build_pipeline(tokenizer_dir) -> StableDiffusionPipeline   # random weights (fp32)

Load the trained model with `spectral_diffusion.models.load_base("toy")` (fp16 files, up-cast to fp32 on CPU).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from spectral_diffusion.tokenizer import build_clip_tokenizer
from spectral_diffusion.toyworld import render

MODEL_DIR = Path(__file__).resolve().parent / "model"
TEXT_WIDTH = 128

# Words a user is likely to type around the world's own vocabulary (`render.VOCABULARY`); each becomes one token.
EXTRA_WORDS = (
    "with", "is", "two", "one", "next", "to", "beside", "near", "above", "below", "under", "over",
    "picture", "image", "drawing", "painting", "rendering", "style", "big", "tiny", "little", "shape", "object",
    "toy", "world", "scene", "my", "his", "her", "their", "this", "that", "it", "colorful", "colourful",
    "bright", "dark", "light", "pink", "gray", "grey", "stripes", "dots",
    "face", "door", "disc", "flag", "cross", "ring", "target", "nut", "spots", "smiling", "dog",
    "cat", "person", "man", "woman", "car", "tree", "flower", "sun", "moon", "sky", "water", "grass", "sand",
    "left", "right", "top", "bottom", "middle", "center", "centre", "corner",
)

# Diffusion noise schedule (SD 1.x's), shared by the training and the shipped sampling scheduler.
NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                  "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


def vocabulary() -> list[str]:
    """The tokenizer's word list: the world's words (colours, shapes, backgrounds, captions) + common prompt words."""
    return sorted(set(render.VOCABULARY) | set(EXTRA_WORDS))


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=render.RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=render.RESOLUTION // 4, in_channels=4, out_channels=4,
        block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=(1, 2, 4, 4),  # heads per block: 32 channels per head
    )


def build_text_encoder(vocab_size: int, bos_id: int, eos_id: int, max_length: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=TEXT_WIDTH,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    return CLIPTextModel(config)


def build_pipeline(tokenizer_dir: str | Path) -> StableDiffusionPipeline:
    """A randomly initialised toy pipeline (fp32); its tokenizer files are written to `tokenizer_dir`."""
    tokenizer = build_clip_tokenizer(vocabulary(), tokenizer_dir)
    text_encoder = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                      tokenizer.model_max_length)
    return StableDiffusionPipeline(
        vae=build_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=build_unet(),
        scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**NOISE_SCHEDULE)


def sampling_scheduler() -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2nd order): good samples in ~20 steps with the training noise schedule."""
    return DPMSolverMultistepScheduler(**NOISE_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)

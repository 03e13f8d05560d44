"""`spectral-diffusion train PHOTO_DIR --token "<dogA>" --out dogA.safetensors`: one concept from a photo folder."""

from __future__ import annotations

import argparse

from spectral_diffusion.models import add_base_arguments

EPILOG = """\
The folder holds jpg/jpeg/png/webp/bmp photos, optional same-name .txt captions using {token} and {class_word}
(default caption: "a photo of {token} {class_word}"), and optional masks (<name>_mask.png or masks/<name>.png,
white = subject) that weight the loss. Writes CONCEPT.safetensors, a sidecar CONCEPT.json for listings,
CONCEPT.preview.png and the loss log CONCEPT.loss.csv (step,loss,lr,seconds). The token is the trigger word, stored
lower-case. Progress is a bar on a terminal and ~10 plain lines in a log. Checkpoints go to CONCEPT.safetensors.ckpt/ (removed when training completes); Ctrl-C writes
one, and the same command with --resume continues exactly where it stopped. Multi-GPU: accelerate launch -m
spectral_diffusion train ... See docs/training.md.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a concept (adapter band + new token) from a folder of photos",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photo_dir", metavar="PHOTO_DIR", help="folder of photos of the concept")
    p.add_argument("--token", required=True, help='the new trigger word, e.g. "<dogA>" (must not be a known word)')
    p.add_argument("--class-word", default="", help="what the concept is (dog, person, ...): initialises the token "
                   "embedding and fills {class_word} in captions (default: none)")
    p.add_argument("--out", required=True, metavar="CONCEPT.safetensors", help="the concept file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its old checkpoints)")
    add_base_arguments(p)

    a = p.add_argument_group("adapter")
    a.add_argument("--variant", default="additive",
                   help="additive | rotational (Spectral Adapter bands) | lora | ortho (baselines) (default: additive)")
    a.add_argument("--band", default="auto", type=_band,
                   help="SVD band N (singular vectors N*rank..(N+1)*rank-1), or auto: the lowest band that no concept "
                        "of this base model in --concepts-dir uses (default: auto)")
    a.add_argument("--rank", type=int, default=8, help="singular vectors per band / LoRA rank (default: 8)")
    a.add_argument("--targets", default="attn",
                   help="kv (cross-attention keys/values + text-encoder attention: the text pathway only) | attn | "
                        "attn+ff | attn+ff+conv (adds the UNet's 3x3 resnet and sampler convs, LoCon-style) | "
                        "comma-separated glob patterns on layer names (default: attn)")
    a.add_argument("--no-singular-values", dest="train_singular_values", action="store_false",
                   help="spectral variants: keep the band's singular values frozen (default: trained)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    o.add_argument("--batch-size", type=int, default=2, help="images per micro-batch and process (default: 2)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    o.add_argument("--resolution", type=int, default=None,
                   help="training size in px (default: the model's native size, 512 for SD 1.5)")
    o.add_argument("--lr-unet", type=float, default=None,
                   help="UNet adapter learning rate (default: 1e-3 spectral variants, 1e-4 lora/ortho)")
    o.add_argument("--lr-text", type=float, default=None,
                   help="text-encoder adapter learning rate; 0 freezes it (default: 1e-4 spectral, 1e-5 lora/ortho)")
    o.add_argument("--lr-emb", type=float, default=1e-3,
                   help="new token embeddings learning rate; 0 freezes them (default: 1e-3)")
    o.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up before the cosine decay (default: 5%% of --steps)")
    o.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay of adapters (default: 0.01)")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 turns it off (default: 1)")
    o.add_argument("--seed", type=int, default=0, help="seed of everything random (default: 0)")
    o.add_argument("--mixed-precision", default="no",
                   help="no | fp16 | bf16; GPU only, the CPU always trains in fp32 (default: no)")
    o.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, ~30%% slower (default: off)")
    o.add_argument("--noise-offset", type=float, default=0.01, help="noise offset (default: 0.01)")
    o.add_argument("--snr-gamma", type=float, default=0.0,
                   help="min-SNR loss weighting gamma, e.g. 5; 0 turns it off (default: 0)")

    o.add_argument("--locality-weight", type=float, default=0.0,
                   help="keep the text encoder's and the cross-attention keys/values' outputs at the base model's on "
                        "prompts without the token (its captions with the token dropped, or replaced by random "
                        "foreign token vectors), so the concept stays out of other concepts' way; 0: off (default: 0)")

    t = p.add_argument_group("token")
    t.add_argument("--num-vectors", type=int, default=2,
                   help="embedding vectors of the token: <tok>, <tok>_1, ... (default: 2)")
    t.add_argument("--emb-norm-cap", type=float, default=None,
                   help="largest norm of a token vector; 0 turns it off (default: 1.4x the vocabulary's mean norm, "
                        "about 0.55 on SD 1.5)")

    d = p.add_argument_group("data")
    d.add_argument("--prior-dir", default=None, metavar="DIR",
                   help="images of the class (or ordinary renders) mixed into every batch to keep the base "
                        "model's prior; captions default to 'a photo of a {class_word}' (default: none)")
    d.add_argument("--prior-weight", type=float, default=1.0, help="loss weight of the prior images (default: 1)")
    d.add_argument("--mask-floor", type=float, default=0.0,
                   help="loss weight of the background where masks are given, 0..1 (default: 0)")
    d.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips (text, logos)")

    b = p.add_argument_group("checkpoints and samples")
    b.add_argument("--checkpoint-every", type=int, default=250,
                   help="write a resumable checkpoint every N steps; 0: only on Ctrl-C (default: 250)")
    b.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of --out")
    b.add_argument("--validation-prompt", dest="validation_prompts", action="append", default=[], metavar="P",
                   help="prompt to sample during training and in the preview (repeatable; default: the caption "
                        "template for the preview only)")
    b.add_argument("--validate-every", type=int, default=0,
                   help="sample the validation prompts every N steps into <out stem>_samples/ (default: 0, never)")
    b.add_argument("--sample-steps", type=int, default=25, help="denoising steps of samples (default: 25)")
    b.add_argument("--preview-images", type=int, default=4,
                   help="images per prompt in the final preview grid; 0: no preview (default: 4)")
    b.add_argument("--concepts-dir", default=None, metavar="DIR",
                   help="folder of the concepts this one will be fused with: --band auto avoids their bands "
                        "(default: the folder of --out)")
    p.set_defaults(func=run)


def _band(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        band = int(text)
    except ValueError:
        band = -1
    if band < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a non-negative integer, got {text!r}")
    return band


def run(args: argparse.Namespace) -> int:
    from spectral_diffusion.training.config import TrainConfig
    from spectral_diffusion.training.trainer import train

    config = TrainConfig(
        photo_dir=args.photo_dir, token=args.token, out=args.out, class_word=args.class_word,
        base=args.base, base_config=args.config, allow_pickle=args.allow_pickle, device=args.device,
        dtype=args.dtype, variant=args.variant, band=args.band, rank=args.rank, targets=args.targets,
        train_singular_values=args.train_singular_values, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, resolution=args.resolution, lr_unet=args.lr_unet, lr_text=args.lr_text,
        lr_emb=args.lr_emb, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, seed=args.seed, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, noise_offset=args.noise_offset,
        snr_gamma=args.snr_gamma, locality_weight=args.locality_weight, num_vectors=args.num_vectors,
        emb_norm_cap=args.emb_norm_cap,
        prior_dir=args.prior_dir, prior_weight=args.prior_weight, mask_floor=args.mask_floor, flip=args.flip,
        checkpoint_every=args.checkpoint_every, resume=args.resume, validation_prompts=args.validation_prompts,
        validate_every=args.validate_every, sample_steps=args.sample_steps, preview_images=args.preview_images,
        concepts_dir=args.concepts_dir, overwrite=args.overwrite,
    )
    print(train(config))
    return 0

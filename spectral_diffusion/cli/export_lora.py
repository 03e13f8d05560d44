"""`spectral-diffusion export-lora CONCEPT --lora-format peft|kohya --out NAME.safetensors`: a concept as a plain LoRA."""

from __future__ import annotations

import argparse

from spectral_diffusion.export import FORMATS, export_lora

EPILOG = """\
Writes NAME.safetensors (the exact weight change of every adapted layer, as a LoRA at scale 1) and, beside it,
the token embedding named after the concept's trigger word, e.g. <doga>.safetensors. Trigger words are stored
lower-case and work verbatim everywhere. In diffusers:
  pipe.load_lora_weights("NAME.safetensors"); pipe.load_textual_inversion("<doga>.safetensors")
then prompt with <doga>. In A1111 / ComfyUI use --lora-format kohya: the LoRA goes in models/Lora, the embedding in
embeddings/ (its file name is the trigger word there).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-lora", help="export a concept as a LoRA + textual-inversion file for other tools",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("concept", metavar="CONCEPT", help="concept file (.safetensors) written by `train`")
    p.add_argument(
        "--lora-format", "--format", dest="lora_format", choices=FORMATS, default="peft",
        help="key layout, as fuse's --lora-format: peft (diffusers/PEFT keys) or kohya (lora_unet_*/lora_te_* keys "
             "for A1111 and ComfyUI); --format is the older spelling (default: peft)",
    )
    p.add_argument("--out", required=True, metavar="NAME.safetensors", help="the LoRA file to write")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = export_lora(args.concept, args.out, args.lora_format, overwrite=args.overwrite)
    print(f"wrote {result.lora} ({args.lora_format}) and {result.embedding} (trigger word: {result.token})")
    return 0

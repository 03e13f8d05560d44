"""`spectral-diffusion export-lora CONCEPT --format peft|kohya --out NAME.safetensors`: a concept as a plain LoRA."""

from __future__ import annotations

import argparse

from spectral_diffusion.export import FORMATS, export_lora

EPILOG = """\
Writes NAME.safetensors (the exact weight change of every adapted layer, as a LoRA at scale 1) and
NAME.ti.safetensors (the token embedding). In diffusers:
  pipe.load_lora_weights("NAME.safetensors"); pipe.load_textual_inversion("NAME.ti.safetensors")
and write the token in lower case in prompts. In A1111 / ComfyUI use the kohya format: the LoRA goes in
models/Lora, the embedding in embeddings/ (its file name is the prompt word there).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-lora", help="export a concept as a LoRA + textual-inversion file for other tools",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("concept", metavar="CONCEPT", help="concept file (.safetensors) written by `train`")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="peft",
        help="peft: diffusers/PEFT keys; kohya: lora_unet_*/lora_te_* keys for A1111 and ComfyUI (default: peft)",
    )
    p.add_argument("--out", required=True, metavar="NAME.safetensors", help="the LoRA file to write")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = export_lora(args.concept, args.out, args.format, overwrite=args.overwrite)
    print(f"wrote {result.lora} ({args.format}) and {result.embedding} (token {result.token})")
    return 0

"""`spectral-diffusion app`: the web UI (generate with live concepts and regions, train, export) in a browser."""

from __future__ import annotations

import argparse
from pathlib import Path

from spectral_diffusion.cli.options import add_config_arguments, config_from_args
from spectral_diffusion.models import BaseSpec

EPILOG = """\
Serves on http://127.0.0.1:7860 by default, reachable from this machine only. --host 0.0.0.0 opens it to the
local network and --share creates a temporary public gradio.live link: anyone with the address can generate and
train on this machine. Generated images (with A1111-style PNG metadata) and exports go to --output-dir.
See docs/app.md.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "app", help="start the web UI", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts-dir", type=Path, default=Path("concepts"),
                   help="folder of concept files listed in the UI; new concepts are trained into it "
                        "(default: ./concepts)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"),
                   help="where generated images and exported LoRAs are written (default: ./outputs)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    p.add_argument("--share", action="store_true", help="also create a temporary public link (off by default)")
    add_config_arguments(p, BaseSpec)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spectral_diffusion.ui.app import launch
    from spectral_diffusion.ui.backend import Backend

    base = config_from_args(BaseSpec, args).load()
    backend = Backend(base, concepts_dir=args.concepts_dir, output_dir=args.output_dir)
    # Gradio's own start-up lines tell the user to "set share=True in launch()": quiet, and say it in CLI terms.
    demo = launch(backend, host=args.host, port=args.port, share=args.share, prevent_thread_lock=True, quiet=True)
    print(f"* Running on local URL: {demo.local_url}")
    if not args.share:
        print("* To create a public link, add --share")
    demo.block_thread()
    return 0

"""Launcher in the layout hosted Gradio apps use (`python app/app.py`): the same UI as `spectral-diffusion app`.

Takes the same flags, e.g. `python app/app.py --base toy --concepts-dir concepts --host 0.0.0.0`.
"""

import sys

from spectral_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))

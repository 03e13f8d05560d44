import sys

from spectral_diffusion.cli import main

sys.exit(main())

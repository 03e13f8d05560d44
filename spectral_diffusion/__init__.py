"""spectral-diffusion: multi-concept customization of Stable Diffusion 1.x with Spectral Adapters."""

from spectral_diffusion.errors import SpectralDiffusionError

__version__ = "0.1.0"
__all__ = ["SpectralDiffusionError", "__version__"]

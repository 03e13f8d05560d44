"""The adapter configuration shared by training, concept files and injection."""

from __future__ import annotations

from dataclasses import dataclass

from spectral_diffusion.errors import SpectralDiffusionError

SPECTRAL_VARIANTS = ("additive", "rotational")
VARIANTS = (*SPECTRAL_VARIANTS, "lora", "ortho")


@dataclass
class AdapterConfig:
    """What to adapt and how.

    ``variant``: ``additive`` / ``rotational`` (Spectral Adapter bands), ``lora`` or ``ortho`` (baselines).
    ``band`` picks singular-vector columns ``[band*rank, (band+1)*rank)`` (spectral variants only).
    ``targets``: a preset (``kv``, ``attn``, ``attn+ff``, ``attn+ff+conv``) or comma-separated glob patterns on qualified layer names.
    ``train_singular_values``: also train the band's singular values (spectral variants).
    ``seed``: per-concept seed; the ``ortho`` baseline derives its frozen basis from it.
    """

    variant: str = "additive"
    rank: int = 8
    band: int = 0
    targets: str = "attn"
    train_singular_values: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise SpectralDiffusionError(
                f"unknown adapter variant {self.variant!r}; choose one of {', '.join(VARIANTS)}"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise SpectralDiffusionError(f"adapter rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.band, bool) or not isinstance(self.band, int) or self.band < 0:
            raise SpectralDiffusionError(f"band must be a non-negative integer, got {self.band!r}")
        if not isinstance(self.targets, str) or not self.targets.strip():
            raise SpectralDiffusionError("adapter targets must be a preset name or glob patterns")

    @property
    def spectral(self) -> bool:
        """True for the variants that live in an SVD band."""
        return self.variant in SPECTRAL_VARIANTS

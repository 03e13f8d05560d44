"""The base-model fingerprint that concept files are checked against."""

from __future__ import annotations

import hashlib

from torch import nn

from spectral_diffusion.adapters.layers import unwrap
from spectral_diffusion.adapters.targets import find_targets
from spectral_diffusion.bands import tensor_digest, weight_matrix


def base_fingerprint(unet: nn.Module | None, text_encoder: nn.Module | None) -> str:
    """First 16 hex of a sha256 over the names and digests of every weight the ``attn+ff`` preset can adapt."""
    digest = hashlib.sha256()
    for name, module in sorted(find_targets(unet, text_encoder, "attn+ff").items()):
        digest.update(name.encode())
        digest.update(tensor_digest(weight_matrix(unwrap(module))).encode())
    return digest.hexdigest()[:16]

"""Weight digests (the SVD cache key) and the base-model fingerprint that concept files are checked against."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from spectral_diffusion.bands import weight_matrix


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's shape and fp16-cast bytes.

    Casting to fp16 first makes the same model loaded in fp32 or fp16 hash alike.
    """
    data = tensor.detach().to(device="cpu", dtype=torch.float16).contiguous()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def base_fingerprint(unet: nn.Module | None, text_encoder: nn.Module | None) -> str:
    """First 16 hex of a sha256 over the names and digests of every weight the ``attn+ff`` preset can adapt."""
    # Imported here: the adapters package imports the SVD cache, which imports tensor_digest from this module.
    from spectral_diffusion.adapters.layers import unwrap
    from spectral_diffusion.adapters.targets import find_targets

    digest = hashlib.sha256()
    for name, module in sorted(find_targets(unet, text_encoder, "attn+ff").items()):
        digest.update(name.encode())
        digest.update(tensor_digest(weight_matrix(unwrap(module))).encode())
    return digest.hexdigest()[:16]

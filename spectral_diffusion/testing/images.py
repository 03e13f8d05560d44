"""Image files for tests of size limits: PNGs that claim any size while staying a few bytes long."""

from __future__ import annotations

import struct
import zlib


def png_header(width: int, height: int) -> bytes:
    """A small PNG that claims `width` x `height` greyscale pixels; its data stops after the first 64 bytes.

    PIL opens it and reports the claimed size (a decompression bomb as its header tells it); decoding it fails.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(64)))

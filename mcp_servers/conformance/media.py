"""The smallest valid image and sound the fixtures hand out, built rather than stored."""

from __future__ import annotations

import base64
import struct
import zlib


def red_pixel_png() -> bytes:
    """A 1x1 PNG whose one pixel is red."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # width, height, 8-bit depth, RGB, defaults
    scanline = b"\x00\xff\x00\x00"  # filter type 0, then R G B
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanline)) + chunk(b"IEND", b"")


def silent_wav(samples: int = 80, rate: int = 8000) -> bytes:
    """A mono 16-bit PCM WAV of `samples` samples of silence (10 ms by default)."""
    data = b"\x00\x00" * samples
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)  # PCM, mono, rate, byte rate, block align, bits
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


PNG = red_pixel_png()
PNG_BASE64 = base64.b64encode(PNG).decode("ascii")
WAV_BASE64 = base64.b64encode(silent_wav()).decode("ascii")

"""Crafted inputs for the bad-input battery: each a (name, bytes) built from a real test image."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def zero_size_png() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")


def bomb_png(side: int = 20000) -> bytes:
    """A few hundred kB that declare side x side pixels (400 MP by default)."""
    raw = zlib.compress(b"\x00" * (side + 1) * side, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", raw) + png_chunk(b"IEND", b"")


def corrupt_chunk_png(png: bytes) -> bytes:
    data = bytearray(png)
    idat = data.index(b"IDAT")
    data[idat + 8] ^= 0xFF  # damage compressed pixels; the chunk's CRC no longer matches
    return bytes(data)


def bad_inputs(img: Image.Image) -> dict[str, bytes]:
    png, jpeg = save(img, "PNG"), save(img.convert("RGB"), "JPEG")
    return {
        "empty": b"",
        "random_bytes": bytes(range(256)) * 8,
        "truncated_png": png[: len(png) // 2],
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "corrupt_chunk_png": corrupt_chunk_png(png),
        "zero_size_png": zero_size_png(),
        "decompression_bomb": bomb_png(),
        "text_file": b"order 4711: 2 x trousers, returned\n",
    }


def odd_but_valid(img: Image.Image) -> dict[str, bytes]:
    """Unusual encodings that must still be classified."""
    big = img.resize((280, 280))
    rgba = big.convert("RGBA")
    rgba.putalpha(200)
    frames = [big.convert("P"), big.rotate(90).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        # The same photo 16 bits deep, over the full 16-bit range (convert("I;16") would keep 0..255:
        # an almost black 16-bit photo).
        "16_bit_png": save(Image.fromarray(np.asarray(img, dtype=np.uint16) * 257), "PNG"),
        "cmyk_jpeg": save(big.convert("CMYK"), "JPEG"),
        "palette_png": save(big.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        "alpha_png": save(rgba, "PNG"),
        "animated_gif": gif.getvalue(),
        "webp": save(big, "WEBP"),
        "bmp": save(big, "BMP"),
        "wide_photo_jpeg": save(img.resize((400, 150)).convert("RGB"), "JPEG"),
    }

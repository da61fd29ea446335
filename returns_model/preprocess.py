"""The one preprocessing source: image bytes -> the model's input tensor.

Training's evaluation path, the server adapters and the benchmarks all import
this module, and the .mar ships it, so the constants below live nowhere else.
The spec itself (``PreprocessSpec``, ``returns_model.meta``, with the normalisation's
defaults) travels with the weights in ``model.json``, so a server never guesses the
input size or normalisation.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from returns_model.meta import PreprocessSpec
from returns_model.names import MAX_IMAGE_PIXELS


class CodedError(ValueError):
    """An error a client reads: a machine-readable ``code`` and a message saying what was wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class PhotoError(CodedError):
    """One photo cannot be turned into a model input.

    The one per-photo error type: decoding raises it, request parsing returns it for a bad
    instance, and a server answers it as that photo's result (HTTP 200 beside the other photos,
    or 400 when no photo of the request was valid).
    """


# Image.resize first shrinks by a whole factor to within this multiple of the target size, then filters.
REDUCING_GAP = 3.0
# ``img.info`` key of a scaled decoding: the photo's full size and the scale, so the letterbox keeps
# the photo's own proportions rather than the rounded ones of the reduced image.
SCALED_FROM = "returns_scaled_from"


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, spec: PreprocessSpec | None = None) -> Image.Image:
    """Decode bytes into a fully loaded PIL image (first frame of an animation), turned upright
    as its EXIF orientation says (``_upright``).

    With ``spec``, a JPEG large enough is decoded at 1/2, 1/4 or 1/8 of its size straight from its
    DCT coefficients (libjpeg's scaled decoding, Pillow's ``draft``), never below ``REDUCING_GAP`` x
    the target size on either side, so ``image_to_uint8`` shrinks it from there as it would have
    from the full image (grey levels within 1-2 of a full decode). A 12-megapixel phone photo then
    costs about 12 ms instead of 80 and a few hundred kilobytes instead of 36 MB. Smaller photos
    decode exactly as without ``spec``.

    Raises PhotoError with a code: ``empty``, ``not_an_image``, ``too_large``,
    ``zero_size`` or ``corrupt`` (truncated or damaged data).
    """
    if not data:
        raise PhotoError("empty", "the photo is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns before it errors on bombs; we check the size ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width == 0 or height == 0:
                raise PhotoError("zero_size", f"the photo has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise PhotoError(
                    "too_large",
                    f"the photo is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                )
            img.seek(0)
            if spec is not None and img.format == "JPEG":
                _scaled_decoding(img, spec)
            img.load()
        _upright(img)
    except PhotoError:
        raise
    except UnidentifiedImageError:
        raise PhotoError("not_an_image", "the bytes are not an image in a supported format "
                         "(PNG, JPEG, WebP, BMP, GIF, TIFF)") from None
    except Image.DecompressionBombError as exc:
        raise PhotoError("too_large", f"the photo is too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise PhotoError("corrupt", f"the photo is truncated or damaged: {exc}") from None
    return img


def _scaled_decoding(img: Image.Image, spec: PreprocessSpec) -> None:
    """Ask libjpeg for a reduced decode where one of at least 2x fits (see ``decode_image``)."""
    floor = int(spec.size * REDUCING_GAP)
    full = img.size
    if min(full[0] // floor, full[1] // floor) >= 2:
        drafted = img.draft("L" if spec.channels == 1 else "RGB", (floor, floor))
        if drafted is not None and img.size != full:
            _, box = drafted  # (0, 0, width / scale, height / scale)
            img.info[SCALED_FROM] = (full, round(full[0] / box[2]))


# Where Pillow's getexif() finds an orientation: EXIF blocks, ImageMagick's PNG text chunk, XMP
# (and a TIFF's own tags, ``tag_v2``).
_ORIENTATION_SOURCES = frozenset({"exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"})


def _upright(img: Image.Image) -> None:
    """Turn the pixels the way the photo's EXIF orientation says (a phone stores a portrait shot
    sideways and tags it), so the model sees the garment as every photo viewer shows it. A tag
    that cannot be read leaves the pixels as stored: they are still the photo."""
    if not (_ORIENTATION_SOURCES & img.info.keys()) and not hasattr(img, "tag_v2"):
        return  # nothing that could carry an orientation (the common case; reading EXIF costs ~6 us)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data" before giving up on a block
            ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - Pillow raises many kinds on damaged EXIF blocks
        pass


def _source_size(img: Image.Image) -> tuple[int, int]:
    """The size the letterbox follows: the full photo's for a scaled decoding (turned with the
    pixels when its orientation swapped the sides), else the image's own."""
    full, scale = img.info.get(SCALED_FROM, (img.size, 1))
    reduced = ((full[0] + scale - 1) // scale, (full[1] + scale - 1) // scale)
    if reduced == img.size:
        return full
    if reduced[::-1] == img.size:
        return full[1], full[0]
    return img.size  # not the image that was decoded (cropped or resized since): its own size


def _to_mode(img: Image.Image, channels: int, fill: int) -> Image.Image:
    """Convert any PIL mode (16-bit, CMYK, palette, alpha) to L or RGB."""
    if img.mode.startswith("I"):
        # 16-bit (and 32-bit integer) greyscale: map the 16-bit range onto 8 bits, not clip at 255.
        img = img.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, (fill, fill, fill, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def image_to_uint8(img: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """A decoded image -> ``uint8`` tensor ``[C, size, size]``, aspect ratio kept (letterboxed)."""
    source = _source_size(img)
    img = _to_mode(img, spec.channels, spec.fill)
    if img.size != (spec.size, spec.size):
        scale = spec.size / max(source)
        w = max(1, round(source[0] * scale))
        h = max(1, round(source[1] * scale))
        resized = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
        canvas = Image.new(img.mode, (spec.size, spec.size), spec.fill if spec.channels == 1 else (spec.fill,) * 3)
        canvas.paste(resized, ((spec.size - w) // 2, (spec.size - h) // 2))
        img = canvas
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return t.view(spec.size, spec.size, spec.channels).permute(2, 0, 1).contiguous()


def bytes_to_uint8(data: bytes, spec: PreprocessSpec) -> torch.Tensor:
    """Image bytes -> ``uint8`` tensor ``[C, size, size]``; raises PhotoError for bad photos."""
    return image_to_uint8(decode_image(data, spec.max_pixels, spec), spec)


def normalize(batch: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """``uint8 [N, C, H, W]`` (or ``[C, H, W]``) -> normalised float32, on the batch's device."""
    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {batch.dtype}")
    shape = (-1, 1, 1) if batch.dim() == 3 else (1, -1, 1, 1)
    mean = torch.tensor(spec.mean, device=batch.device).view(shape)
    std = torch.tensor(spec.std, device=batch.device).view(shape)
    return (batch.float().div_(255.0) - mean) / std

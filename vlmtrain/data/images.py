"""Image handling for the shard writer: path containment, validating decode and optional resize."""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from PIL import Image, ImageFile, UnidentifiedImageError

# PIL's own default (about 89.5 megapixels, a 1024 MiB RGBA buffer / 3): larger images are rejected
# as possible decompression bombs.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# JPEG quality used whenever an image is re-encoded by --image-size.
RESIZE_JPEG_QUALITY = 95

# Every reason a record can be skipped for, with the text shown to users. Names are stable: they are
# keys of manifest.json["skipped"] and of the summary table.
SKIP_REASONS: dict[str, str] = {
    "missing_image": "the image file does not exist",
    "empty_file": "the image file (or embedded image) has zero bytes",
    "not_an_image_format": "the bytes are not in any image format (e.g. a text or HTML file)",
    "unreadable_image": "an image format was recognised but the data cannot be decoded (truncated or corrupt)",
    "decompression_bomb": "the image has more pixels than --max-image-pixels allows",
    "path_escapes_root": "the image path is absolute, has '..' parts, or resolves outside --images",
    "malformed_record": "a required key is missing or has the wrong type",
    "malformed_conversation": "roles do not alternate human/gpt starting with human, or a role is unknown",
    "no_answer": "the conversation has no gpt (answer) turn",
    "empty_answer": "an answer (gpt turn) is empty",
    "empty_caption": "every caption of the image is empty (or it has none)",
}

# Reasons a single caption is left out of an otherwise written sample (manifest.json["dropped"]).
DROP_REASONS: dict[str, str] = {
    "empty_caption": "an empty reference caption was left out; the image's other captions were kept",
    "malformed_caption": "a caption that is not a string was left out",
    "orphan_caption": "a COCO annotation names an image id that is not in 'images'",
}

# PIL formats whose original bytes are kept as they are (after a validating decode), by shard extension.
PASSTHROUGH_EXTENSIONS: dict[str, str] = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}

# Leading bytes of image formats: an unidentifiable file that starts like an image is a damaged image
# (unreadable_image); anything else is not an image at all (not_an_image_format).
_IMAGE_MAGIC: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little endian
    b"MM\x00*",  # TIFF, big endian
)

# Exceptions PIL raises for data it recognises but cannot decode.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


class SampleError(Exception):
    """A record that cannot become a sample; the shard loop counts it under ``reason`` and goes on."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {sorted(SKIP_REASONS)}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[SampleError], tuple[str, str]]:
        return (SampleError, (self.reason, self.detail))


def resolve_image_path(root: Path, rel: str) -> Path:
    """Return the real path of ``rel`` under ``root``, refusing anything that leads outside it.

    Nothing is opened here: absolute paths and ``..`` parts are refused from the string alone, and the
    containment check uses ``os.path.realpath`` (symlinks followed, link targets read, no file opened).
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise SampleError("malformed_record", f"image path must be a non-empty string, got {rel!r}")
    parts = PurePosixPath(rel)
    if parts.is_absolute() or ".." in parts.parts:
        raise SampleError("path_escapes_root", f"{rel!r} is absolute or has '..' parts")
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root / rel))
    if not real.is_relative_to(real_root):
        raise SampleError("path_escapes_root", f"{rel!r} resolves to {real}, outside {real_root}")
    return real


def load_image_bytes(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[bytes, str]:
    """Read an image file; return its bytes and the format PIL detects from its header.

    Only the header is parsed here; ``validate_and_maybe_resize`` does the full decode.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SampleError("missing_image", f"{path} does not exist") from None
    except OSError as e:
        raise SampleError("unreadable_image", f"{path}: {e.strerror or e}") from None
    with _open_image(data, str(path), max_pixels) as img:
        return data, str(img.format)


def validate_and_maybe_resize(
    data: bytes, image_size: int | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, name: str = "image"
) -> tuple[bytes, str]:
    """Fully decode ``data`` (so damaged files are caught here, not in training); return (bytes, extension).

    Without ``image_size`` JPEG, PNG and WebP bytes are returned unchanged and other formats (GIF, BMP,
    TIFF, ...) are re-encoded losslessly as PNG. With ``image_size`` the image is converted to RGB and
    downscaled (bicubic, aspect kept) so its shorter side is ``image_size``, never upscaled, and stored as
    JPEG quality 95; an RGB JPEG that needs no downscaling keeps its original bytes.
    """
    with _open_image(data, name, max_pixels) as img:
        if image_size is None:
            _decode(img, name)
            ext = PASSTHROUGH_EXTENSIONS.get(str(img.format))
            return (data, ext) if ext is not None else (_encode_png(img), "png")
        return _resize_to_jpeg(img, data, image_size, name)


def target_size(size: tuple[int, int], image_size: int) -> tuple[int, int]:
    """Size with the shorter side scaled down to ``image_size`` (aspect kept); unchanged if already smaller."""
    width, height = size
    short = min(width, height)
    if short <= image_size:
        return size
    scale = image_size / short
    if width <= height:
        return image_size, max(1, round(height * scale))
    return max(1, round(width * scale)), image_size


@contextmanager
def pil_limits(max_pixels: int) -> Iterator[None]:
    """Set PIL's process-wide bomb limit to ``max_pixels`` and refuse truncated files, restoring both after.

    PIL warns above ``Image.MAX_IMAGE_PIXELS``; we turn that warning into a skip, so the global must match
    the limit the user asked for or a raised limit would be silently capped at PIL's default.
    """
    saved = set_pil_limits(max_pixels)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def set_pil_limits(max_pixels: int) -> tuple[int | None, bool]:
    """Set PIL's globals as ``pil_limits`` does, for a whole process; return the previous values."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    return saved


@contextmanager
def _open_image(data: bytes, name: str, max_pixels: int) -> Iterator[Image.Image]:
    """Open ``data`` lazily (header only), mapping every failure to a SampleError with its reason."""
    if not data:
        raise SampleError("empty_file", f"{name} has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError("decompression_bomb", f"{name}: {e}") from None
    except UnidentifiedImageError:
        if _looks_like_image(data):
            raise SampleError("unreadable_image", f"{name}: image header is damaged") from None
        raise SampleError("not_an_image_format", f"{name}: not an image (starts with {data[:8]!r})") from None
    except _DECODE_ERRORS as e:
        raise SampleError("unreadable_image", f"{name}: {e}") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise SampleError("decompression_bomb", f"{name}: {width}x{height} exceeds {max_pixels} pixels")
        yield img


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _decode(img: Image.Image, name: str) -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With this PIL global on, truncated files decode "successfully" with grey padding.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; shard writing needs it False")
    try:
        img.load()
    except _DECODE_ERRORS as e:
        raise SampleError("unreadable_image", f"{name}: {e}") from None


def _resize_to_jpeg(img: Image.Image, data: bytes, image_size: int, name: str) -> tuple[bytes, str]:
    original = img.size
    size = target_size(original, image_size)
    is_jpeg = img.format in ("JPEG", "MPO")
    if is_jpeg and size != original:
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the target size): the entropy
        # decode still covers the whole file, so truncation is still caught, at a fraction of the cost.
        img.draft("RGB", size)
    _decode(img, name)
    if is_jpeg and size == original and img.mode == "RGB":
        return data, "jpg"
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=RESIZE_JPEG_QUALITY)
    return out.getvalue(), "jpg"


def _encode_png(img: Image.Image) -> bytes:
    if img.mode not in ("1", "L", "LA", "RGB", "RGBA", "P", "I;16"):
        img = img.convert("RGBA" if img.has_transparency_data else "RGB")
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()

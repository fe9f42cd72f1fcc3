"""First pipeline stage: validate text and decode images safely.

Every failure a client can cause raises a domain error from `service.errors` with a short message that is
safe to show (never raw Pillow exception text). Nothing here touches global Pillow state: the caps are
applied per call (reliability cases C2, C3, D1, D2, D3 and the "Image rules"):

- a byte cap before base64 decoding and again before opening the image;
- an allowlist of formats passed to `Image.open` (identifiable but disallowed formats answer 415);
- a pixel cap checked against the header size right after `Image.open`, before any pixel is decoded; the cap
  is never above Pillow's `MAX_IMAGE_PIXELS`, so every image Pillow would only warn about is refused by it
  (no process-wide warning filters are touched: decoding runs in worker threads);
- `draft()` for JPEGs so large photos decode at a reduced scale;
- animated images rejected; truncated or corrupt data rejected.
"""

from __future__ import annotations

import binascii
import functools
import io
import logging
import re
import struct
import threading
import time
import unicodedata
from dataclasses import dataclass

import numpy as np
import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage, InvalidInput, TextTooLong, UnsupportedImageFormat
from service.settings import LimitSettings

logger = logging.getLogger(__name__)

__all__ = ["DECODE_COUNTS", "DecodeCounts", "base64_image_bytes", "clean_text", "decode_image", "text_pattern"]


@dataclass(frozen=True)
class DecodeCounts:
    """How much decoding work this process has done: proof that a refusal came before the work."""

    base64_bytes: int = 0  # base64 payload characters handed to the base64 decoder
    image_decodes: int = 0  # pixel decodes started (after every header check passed)
    pixels: int = 0  # pixels produced by decodes that finished

    def __sub__(self, other: DecodeCounts) -> DecodeCounts:
        return DecodeCounts(self.base64_bytes - other.base64_bytes, self.image_decodes - other.image_decodes,
                            self.pixels - other.pixels)


class _DecodeCounter:
    """Process-wide, thread-safe counters behind the `el_image_*` metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = DecodeCounts()

    def add(self, *, base64_bytes: int = 0, image_decodes: int = 0, pixels: int = 0) -> None:
        with self._lock:
            c = self._counts
            self._counts = DecodeCounts(c.base64_bytes + base64_bytes, c.image_decodes + image_decodes,
                                        c.pixels + pixels)

    def snapshot(self) -> DecodeCounts:
        with self._lock:
            return self._counts


DECODE_COUNTS = _DecodeCounter()

# --------------------------------------------------------------------------------------------------- text

# C0 controls except \t \n \r, DEL, and C1 controls (Unicode category Cc minus the three allowed).
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
# Raw input longer than this multiple of the cap is rejected before any normalisation work.
_RAW_SLACK = 4


def _char_class(codes: list[int]) -> str:
    """A regex character class body (ranges of \\uXXXX escapes, valid in Python and ECMA-262 regexes)."""
    out, i = [], 0
    while i < len(codes):
        j = i
        while j + 1 < len(codes) and codes[j + 1] == codes[j] + 1:
            j += 1
        out.append(f"\\u{codes[i]:04x}" + (f"-\\u{codes[j]:04x}" if j > i else ""))
        i = j + 1
    return "".join(out)


@functools.cache
def text_pattern(*, required: bool) -> str:
    """The JSON-schema `pattern` of a text field that `clean_text` accepts: no control character (other than
    tab, newline, carriage return); when required, at least one character that is not
    whitespace (as `str.split` sees it), so that the cleaned text is not empty. Built from the same rules."""
    # Lone surrogates are refused too but left out here: the validators behind JSON-schema tools cannot compile
    # a surrogate range, and no UTF-8 text holds one (only a JSON \uD800 escape can).
    bad = [c for c in range(0x110000) if _CONTROL_RE.match(chr(c))]
    if not required:
        return f"^[^{_char_class(bad)}]*$"
    blank = sorted(set(bad) | {c for c in range(0x110000) if chr(c).isspace()})
    return f"^[^{_char_class(bad)}]*[^{_char_class(blank)}][^{_char_class(bad)}]*$"


def clean_text(value: str | None, *, field: str, max_chars: int, required: bool = False) -> str:
    """Validate and normalise one text field.

    NFC-normalises, rejects control characters (other than tab, newline, carriage return) and lone
    surrogates, collapses every whitespace run to one space and strips the ends. Raises `InvalidInput`
    for bad characters or (when `required`) an empty result, and `TextTooLong` when the cleaned text has
    more than `max_chars` characters. Raw input longer than 4 x `max_chars` is refused with `TextTooLong`
    before any normalisation work. `None` is returned as "" unless `required`.
    """
    if value is None:
        if required:
            raise InvalidInput(f"{field} is required")
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string")
    if len(value) > _RAW_SLACK * max_chars:
        raise TextTooLong(f"{field} is longer than {max_chars} characters")
    if m := _SURROGATE_RE.search(value):
        raise InvalidInput(f"{field} contains an unpaired surrogate at position {m.start()}")
    if m := _CONTROL_RE.search(value):
        raise InvalidInput(f"{field} contains a control character (U+{ord(m.group()):04X}) at position {m.start()}")
    text = " ".join(unicodedata.normalize("NFC", value).split())
    if required and not text:
        raise InvalidInput(f"{field} must not be empty")
    # Measured before and after NFC (which can lengthen a few scripts' text): within the cap either way passes,
    # so any string of at most max_chars characters (the documented maxLength) is accepted.
    if len(text) > max_chars and len(" ".join(value.split())) > max_chars:
        raise TextTooLong(f"{field} is longer than {max_chars} characters ({len(text)})")
    return text


# ------------------------------------------------------------------------------------------------- base64

_B64_WHITESPACE = (" ", "\t", "\r", "\n")
_B64_WHITESPACE_RE = re.compile(r"[ \t\r\n]+")
_DATA_URL_RE = re.compile(r"data:(image/[A-Za-z0-9.+-]+)?;base64,", re.IGNORECASE)


B64_PIECE = 1 << 16  # base64 characters decoded per call (a multiple of 4)


def _b64decode_piece(piece: str) -> bytes:
    """Strict base64 (standard alphabet, correct padding) of one piece with pybase64's SIMD decoder: 0.39 ms per
    photo of the WikiMEL release (~1 MB of base64) against 2.4 ms for `binascii.a2b_base64(strict_mode=True)`,
    which refuses the same inputs (tests/pipeline/test_decode.py)."""
    return pybase64.b64decode(piece, validate=True)


def _b64decode_yielding(payload: str) -> bytes:
    """Strict base64 (standard alphabet, padding only at the end) decoded in B64_PIECE pieces, giving up the GIL
    between pieces. One call over a megabyte held the GIL for ~2 ms with binascii, and every other thread of the
    process that comes back from native code (the link pipeline's ONNX, torch and FAISS calls, dozens a request)
    waits for it: in one process, a thread decoding photos back to back took single link_batch calls from p50 23 ms
    to 540 ms (p99 6 s); decoded in pieces, 31 ms (p99 54-79 ms). The pieces stay with the faster decoder: an image
    may be 4 MB."""
    if len(payload) <= B64_PIECE:
        return _b64decode_piece(payload)
    parts = []
    last = len(payload) - B64_PIECE  # pieces starting before it are not the final one
    for start in range(0, len(payload), B64_PIECE):
        piece = payload[start : start + B64_PIECE]
        if start < last and "=" in piece:
            raise binascii.Error("padding before the end")
        parts.append(_b64decode_piece(piece))
        time.sleep(0)  # let waiting threads take the GIL now, not after the 5 ms switch interval
    return b"".join(parts)


def base64_image_bytes(data: str, *, max_bytes: int) -> bytes:
    """Decode a base64 image string (optionally a `data:image/...;base64,` URL) to bytes.

    The size implied by the base64 length is checked against `max_bytes` before anything is decoded
    (`ImageTooLarge`). Decoding is strict: only the standard alphabet with correct padding; ASCII
    whitespace (line wrapping) is ignored. Anything malformed raises `InvalidImage`.
    """
    if not isinstance(data, str):
        raise InvalidImage("image must be a base64 string")
    payload = data.strip()
    if payload[:5].lower() == "data:":
        m = _DATA_URL_RE.match(payload)
        if m is None:
            raise InvalidImage("image data URL must look like 'data:image/<type>;base64,<data>'")
        payload = payload[m.end() :]
    # `in` is a C-speed scan (~0.1 ms a megabyte); the regex search it guards took ~14 ms on a 1 MB image.
    if any(ch in payload for ch in _B64_WHITESPACE):
        payload = _B64_WHITESPACE_RE.sub("", payload)
    if not payload:
        raise InvalidImage("image is empty")
    implied = len(payload) * 3 // 4 - min(2, len(payload) - len(payload.rstrip("=")))
    if implied > max_bytes:
        raise ImageTooLarge(f"image is about {implied} bytes; the limit is {max_bytes} bytes")
    if len(payload) % 4:
        raise InvalidImage("image is not valid base64 (length is not a multiple of 4)")
    DECODE_COUNTS.add(base64_bytes=len(payload))
    try:
        raw = _b64decode_yielding(payload)
    except (binascii.Error, ValueError):
        raise InvalidImage("image is not valid base64") from None
    if len(raw) > max_bytes:  # cannot happen given the check above; kept as a guard
        raise ImageTooLarge(f"image is {len(raw)} bytes; the limit is {max_bytes} bytes")
    return raw


# -------------------------------------------------------------------------------------------------- image

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Magic numbers of formats a client may plausibly send, so that a disallowed one answers 415 instead of
# "not an image". Only prefixes are compared; no parser of a disallowed format ever runs.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (_PNG_SIGNATURE, "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"icns", "ICNS"),
    (b"8BPS", "PSD"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"\xff\x0a", "JPEGXL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEGXL"),
)
_ISO_BMFF_BRANDS = {
    b"avif": "AVIF",
    b"avis": "AVIF",
    b"heic": "HEIF",
    b"heix": "HEIF",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
}


def _sniff_format(data: bytes) -> str | None:
    """Name the format from its magic number, or None when unknown."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp" and data[8:12] in _ISO_BMFF_BRANDS:
        return _ISO_BMFF_BRANDS[data[8:12]]
    head = data[:64].lstrip()
    if head[:4] == b"<svg" or (head[:5] == b"<?xml" and b"<svg" in data[:1024]):
        return "SVG"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def _too_large(width: int, height: int, cap: int) -> ImageTooLarge:
    return ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {cap} pixels")


def _pixel_cap(limits: LimitSettings) -> int:
    """Our cap, never above Pillow's own warning threshold (which we treat as an error)."""
    cap = limits.max_image_pixels
    pil_cap = Image.MAX_IMAGE_PIXELS  # read only; never changed here
    return min(cap, pil_cap) if pil_cap else cap


def _check_png_header(data: bytes, cap: int) -> None:
    """Reject a PNG whose IHDR declares too many pixels, even if nothing follows the header."""
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        if width * height > cap:
            raise _too_large(width, height, cap)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit greyscale ("I;16", "I", "F") to 8 bits instead of clipping at 255."""
    arr = np.asarray(img, dtype=np.float32)
    peak = float(arr.max()) if arr.size else 0.0
    if peak > 255.0:
        arr = arr * (255.0 / 65535.0) if peak <= 65535.0 else arr * (255.0 / peak)
    return Image.fromarray(np.clip(arr, 0.0, 255.0).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded mode to RGB; transparency is composited onto white."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_l(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block is ignored rather than failing the image."""
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, IndexError, struct.error):
        logger.debug("ignoring malformed EXIF orientation")
        return img


def decode_image(data: bytes, limits: LimitSettings, *, target_size: int = 224) -> Image.Image:
    """Decode untrusted image bytes to an RGB `PIL.Image.Image`.

    Raises `ImageTooLarge` (413) over the byte or pixel cap (the pixel cap is checked from the header,
    before decoding), `UnsupportedImageFormat` (415) for a recognised format outside
    `limits.image_formats`, and `InvalidImage` (422) for unidentifiable, animated, truncated or corrupt
    data. JPEGs are decoded at the smallest DCT scale that keeps both sides >= `target_size`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImage("image must be bytes")
    data = bytes(data)
    if len(data) > limits.max_image_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {limits.max_image_bytes} bytes")
    if not data:
        raise InvalidImage("image is empty")

    allowed = tuple(dict.fromkeys(f.upper() for f in limits.image_formats))
    cap = _pixel_cap(limits)
    _check_png_header(data, cap)

    # No warnings.catch_warnings() here: it swaps process-wide filters and is not thread-safe, and decoding runs
    # in worker threads. Pillow only warns (DecompressionBombWarning) above Image.MAX_IMAGE_PIXELS, our cap is
    # never above that (_pixel_cap), and the header check right after open refuses every such image before a
    # pixel is decoded. The warning is still caught below, for a process run with warnings as errors.
    try:
        img = Image.open(io.BytesIO(data), formats=allowed)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"image dimensions exceed the limit of {cap} pixels") from None
    except UnidentifiedImageError:
        sniffed = _sniff_format(data)
        if sniffed is not None and sniffed not in allowed:
            logger.debug("rejected image format %s", sniffed)
            raise UnsupportedImageFormat(
                f"image format {sniffed} is not supported; send one of {', '.join(allowed)}"
            ) from None
        raise InvalidImage("image data is not a recognised image or its header is corrupt") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error):
        raise InvalidImage("image header is corrupt") from None

    with img:
        width, height = img.size
        if width * height > cap:
            raise _too_large(width, height, cap)
        # MPO (multi-picture JPEG from cameras/phones) is a JPEG whose first frame is the photo.
        is_jpeg = img.format in ("JPEG", "MPO")
        if not is_jpeg and getattr(img, "n_frames", 1) > 1:
            raise InvalidImage("animated images are not supported; send a single frame")
        try:
            if is_jpeg:
                img.draft("RGB", (target_size, target_size))
            DECODE_COUNTS.add(image_decodes=1)
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLarge(f"image dimensions exceed the limit of {cap} pixels") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
            logger.debug("image decode failed: %s", type(exc).__name__)
            raise InvalidImage("image data is truncated or corrupt") from None
        DECODE_COUNTS.add(pixels=img.size[0] * img.size[1])
        out = _to_rgb(_exif_transpose(img))
        if out is img:  # detach the result from the file object being closed
            out = img.copy()
    return out

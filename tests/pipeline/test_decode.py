"""Tests of the decode stage: text validation (C3), base64 (C2) and safe image decoding (D1, D2, D3).

Every protection is asserted by something that fails without it: a status/code, the decoder's own work
counters (a refusal "before decoding" means no pixel decode was started and no pixel produced), a size or a
memory bound. No test reads a clock: the machine's speed cannot fail them.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from service.errors import ELError, ImageTooLarge, InvalidImage, InvalidInput, TextTooLong, UnsupportedImageFormat
from service.pipeline.decode import DECODE_COUNTS, DecodeCounts, base64_image_bytes, clean_text, decode_image
from service.settings import LimitSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
LIMITS = LimitSettings()


# ------------------------------------------------------------------------------------------------ helpers


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header(width: int, height: int, *, color_type: int = 0, bit_depth: int = 8) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)


def _solid_grey_png(width: int, height: int) -> bytes:
    """A valid 8-bit greyscale PNG of zeros, compressed row block by row block (never a full frame in RAM)."""
    comp = zlib.compressobj(9)
    rows_per_block = max(1, 4_000_000 // (width + 1))
    block = (b"\x00" * (width + 1)) * rows_per_block
    parts = []
    left = height
    while left > 0:
        n = min(rows_per_block, left)
        parts.append(comp.compress(block if n == rows_per_block else (b"\x00" * (width + 1)) * n))
        left -= n
    parts.append(comp.flush())
    return _png_header(width, height) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rgb(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 60)) -> Image.Image:
    return Image.new("RGB", size, color)


def _noisy_rgb(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))


def _counted(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Run fn, return (exception or result, the decoding work it did)."""
    before = DECODE_COUNTS.snapshot()
    try:
        out = fn(*args, **kwargs)
    except ELError as exc:
        out = exc
    return out, DECODE_COUNTS.snapshot() - before


NOTHING_DECODED = DecodeCounts()


def _frames(n: int, size: tuple[int, int] = (32, 32)) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * i % 256, 100, 200)) for i in range(n)]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _warm_pillow() -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        decode_image(_encode(_rgb(), fmt), LIMITS)


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """D2: a ~140 KB PNG that decodes to 12000 x 12000 = 144 megapixels."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(_solid_grey_png(12_000, 12_000))
    return path


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    img = _rgb((4000, 3000), (120, 30, 200))
    draw = ImageDraw.Draw(img)
    for i in range(0, 4000, 50):
        draw.line([(i, 0), (4000 - i, 3000)], fill=(i % 255, 80, 40), width=7)
    data = _encode(img, "JPEG", quality=80)
    assert len(data) <= LIMITS.max_image_bytes
    return data


# -------------------------------------------------------------------------------------------- clean_text


def test_clean_text_nfc_and_whitespace() -> None:
    decomposed = "Cafe\u0301"  # e + combining acute
    assert clean_text(decomposed, field="mention", max_chars=100) == "Caf\u00e9"
    assert clean_text("  a\t\tb\r\n c  \u00a0 d ", field="mention", max_chars=100) == "a b c d"
    assert clean_text(None, field="sentence", max_chars=10) == ""


@pytest.mark.parametrize("bad", ["a\x00b", "esc\x1b[31m", "next\x85line", "del\x7f", "bell\x07", "c1\x9f"])
def test_clean_text_rejects_control_characters(bad: str) -> None:
    with pytest.raises(InvalidInput) as info:
        clean_text(bad, field="mention", max_chars=100)
    assert info.value.status == 422 and info.value.code == "invalid_input"
    assert "mention" in info.value.message and "control character" in info.value.message


def test_clean_text_rejects_lone_surrogate() -> None:
    with pytest.raises(InvalidInput) as info:
        clean_text("ab\ud800cd", field="sentence", max_chars=100)
    assert info.value.code == "invalid_input" and "sentence" in info.value.message


def test_clean_text_too_long() -> None:
    assert clean_text("x" * 10, field="mention", max_chars=10) == "x" * 10
    for text in ("x" * 11, "x" * 10_000):
        with pytest.raises(TextTooLong) as info:
            clean_text(text, field="mention", max_chars=10)
        assert info.value.status == 422 and info.value.code == "text_too_long"
        assert "mention" in info.value.message and "10" in info.value.message
    # whitespace collapses before the length is measured
    assert clean_text("a" + " " * 20 + "b", field="mention", max_chars=10) == "a b"
    # raw input over 4x the cap is refused before any normalisation work
    with pytest.raises(TextTooLong):
        clean_text("a" + " " * 50 + "b", field="mention", max_chars=10)


@pytest.mark.parametrize("empty", [None, "", "   \t\n "])
def test_clean_text_required(empty: str | None) -> None:
    with pytest.raises(InvalidInput) as info:
        clean_text(empty, field="mention", max_chars=10, required=True)
    assert info.value.status == 422 and info.value.code == "invalid_input" and "mention" in info.value.message
    assert clean_text(empty, field="mention", max_chars=10) == ""


# ------------------------------------------------------------------------------------------- base64 (C2)


def test_base64_oversized_is_rejected_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def _must_not_decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("base64 decoded on an oversized payload")

    import pybase64

    monkeypatch.setattr(binascii, "a2b_base64", _must_not_decode)
    monkeypatch.setattr(pybase64, "b64decode", _must_not_decode)
    max_bytes = 1024 * 1024
    huge = "A" * (4 * (max_bytes // 3 + 8))
    for payload in (huge, "data:image/png;base64," + huge):
        with pytest.raises(ImageTooLarge) as info:
            base64_image_bytes(payload, max_bytes=max_bytes)
        assert info.value.status == 413 and info.value.code == "image_too_large"


def test_base64_at_cap_is_accepted() -> None:
    raw = os.urandom(3000)
    assert base64_image_bytes(base64.b64encode(raw).decode(), max_bytes=3000) == raw
    with pytest.raises(ImageTooLarge):
        base64_image_bytes(base64.b64encode(raw + b"x").decode(), max_bytes=3000)


@pytest.mark.parametrize(
    "bad",
    ["!!!!", "abc", "ab=c", "QUJD\u00ff", "", "   ", "data:text/plain;base64,QUJD", "data:image/png,QUJD", "QU-_"],
)
def test_base64_malformed(bad: str) -> None:
    with pytest.raises(InvalidImage) as info:
        base64_image_bytes(bad, max_bytes=1024)
    assert info.value.status == 422 and info.value.code == "invalid_image"


def test_large_base64_is_decoded_in_pieces_with_the_same_rules() -> None:
    """Over B64_PIECE characters the payload is decoded piece by piece (giving up the GIL between pieces): the
    bytes are the same, and padding or a bad character in any piece is still refused."""
    from service.pipeline.decode import B64_PIECE

    raw = os.urandom(B64_PIECE * 3 // 4 * 3 + 1000)  # three pieces and a bit, padded at the end
    b64 = base64.b64encode(raw).decode()
    assert len(b64) > 3 * B64_PIECE and b64.endswith("=")
    assert base64_image_bytes(b64, max_bytes=len(raw)) == raw
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert base64_image_bytes(wrapped, max_bytes=len(raw)) == raw
    for bad in (b64[:B64_PIECE - 4] + "AA==" + b64[B64_PIECE:],  # padding closing the first piece
                b64[: 2 * B64_PIECE + 9] + "-" + b64[2 * B64_PIECE + 10 :],  # URL-safe alphabet in the third
                b64 + "AAAA"):  # data after the padding
        with pytest.raises(InvalidImage):
            base64_image_bytes(bad, max_bytes=len(raw) + 10)


@pytest.mark.parametrize("piece", ["QUJD", "QUI=", "QQ==", "", "QUJDRA==", "QUJDREU=", "QQ==QQ==", "QUI=QUJD",
                                   "QUJ=", "Q===", "====", "QU=D", "QUJD====", "QUJDéAAA", "QU-_", "QU/+",
                                   "QUJD!AAA", "QUJDAA=A"])
def test_base64_piece_decoder_refuses_what_binascii_strict_refuses(piece: str) -> None:
    """The SIMD decoder (pybase64) against binascii's strict mode on one piece whose length is a multiple of 4
    (base64_image_bytes refuses any other length first): what binascii refuses, it refuses; what it accepts decodes
    to the same bytes. It refuses one thing more: padding after a complete group ("QUJD===="), malformed in
    RFC 4648, which strict binascii lets through."""
    from service.pipeline.decode import _b64decode_piece

    assert len(piece) % 4 == 0
    try:
        want: bytes | None = binascii.a2b_base64(piece, strict_mode=True)
    except (binascii.Error, ValueError):
        want = None
    try:
        got: bytes | None = _b64decode_piece(piece)
    except (binascii.Error, ValueError):
        got = None
    if piece == "QUJD====":
        assert want == b"ABC" and got is None
    else:
        assert got == want


def test_base64_data_url_and_line_wrapping() -> None:
    png = _encode(_rgb(), "PNG")
    b64 = base64.b64encode(png).decode()
    assert base64_image_bytes(f"data:image/png;base64,{b64}", max_bytes=LIMITS.max_image_bytes) == png
    assert base64_image_bytes(f"DATA:image/PNG;BASE64,{b64}", max_bytes=LIMITS.max_image_bytes) == png
    wrapped = "\n".join(textwrap.wrap(b64, 76))
    assert base64_image_bytes(wrapped, max_bytes=LIMITS.max_image_bytes) == png
    assert decode_image(base64_image_bytes(b64, max_bytes=LIMITS.max_image_bytes), LIMITS).size == (64, 48)


# ------------------------------------------------------------------------------------------ D1: PNG header


@pytest.mark.parametrize("with_body", [True, False])
def test_d1_png_header_declaring_50000_squared(with_body: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _png_header(50_000, 50_000)
    if with_body:
        data += _chunk(b"IDAT", zlib.compress(b"\x00")) + _chunk(b"IEND", b"")
        assert 60 <= len(data) <= 70
    # Pillow's own global guard is not what protects us.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    out, work = _counted(decode_image, data, LIMITS)
    assert isinstance(out, ImageTooLarge), out
    assert out.status == 413 and out.code == "image_too_large"
    assert "50000x50000" in out.message
    assert work == NOTHING_DECODED  # refused from the header, before any pixel


def test_jpeg_header_declaring_huge_size_rejected_from_header() -> None:
    """Same as D1 for a JPEG: SOF patched to 50000 x 50000, rejected at open, before decoding."""
    data = bytearray(_encode(_rgb((16, 16)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5 : sof + 9] = struct.pack(">HH", 50_000, 50_000)
    for pil_cap in (Image.MAX_IMAGE_PIXELS, None):  # Pillow's DecompressionBombError, then our own cap
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Image, "MAX_IMAGE_PIXELS", pil_cap)
            out, work = _counted(decode_image, bytes(data), LIMITS)
        assert isinstance(out, ImageTooLarge), out
        assert work == NOTHING_DECODED  # refused from the header, before any pixel


def test_pixel_cap_is_ours_not_pillows() -> None:
    """Images below Pillow's 89 MP threshold but over our cap are rejected before decoding."""
    small_cap = LimitSettings(max_image_pixels=10_000)
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = _encode(_rgb((200, 200)), fmt)  # 40,000 pixels
        out, work = _counted(decode_image, data, small_cap)
        assert isinstance(out, ImageTooLarge), (fmt, out)
        assert "200x200" in out.message
        assert work == NOTHING_DECODED, (fmt, work)
        assert decode_image(data, LIMITS).size == (200, 200)


# ------------------------------------------------------------------------------------------ D2: PNG bomb


def test_d2_bomb_png_rejected(bomb_png: Path) -> None:
    data = bomb_png.read_bytes()
    assert 100_000 <= len(data) <= 200_000
    out, work = _counted(decode_image, data, LIMITS)
    assert isinstance(out, ImageTooLarge), out
    assert "12000x12000" in out.message
    assert work == NOTHING_DECODED  # refused from the header, before any pixel
    # Raising our cap above 144 MP does not let Pillow's decompression-bomb warning through.
    out, _ = _counted(decode_image, data, LimitSettings(max_image_pixels=500_000_000))
    assert isinstance(out, ImageTooLarge), out


def test_bomb_refusal_does_not_touch_warning_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding runs in worker threads, so the refusal must not rely on `warnings.catch_warnings` (it swaps the
    process-wide filters: two overlapping calls can leave them changed). With Pillow's threshold lowered so that a
    small JPEG falls in its warn-only band (threshold < pixels <= 2 x threshold), concurrent decodes are each
    refused from the header whatever the warning filter says, and no call enters catch_warnings."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)
    data = _encode(_rgb((50, 50)), "JPEG")  # 2,500 pixels: Pillow warns, does not raise
    entered: list[int] = []
    real = warnings.catch_warnings

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        entered.append(threading.get_ident())
        return real(*args, **kwargs)

    for action in ("ignore", "always", "error"):
        with real(record=True) as seen:
            warnings.simplefilter(action, Image.DecompressionBombWarning)
            filters = list(warnings.filters)
            monkeypatch.setattr(warnings, "catch_warnings", spy)
            with ThreadPoolExecutor(8) as pool:
                outs = list(pool.map(lambda _: _counted(decode_image, data, LIMITS), range(32)))
            monkeypatch.setattr(warnings, "catch_warnings", real)
            assert warnings.filters == filters, action
        if action == "always":  # the image is in Pillow's warn-only band: it warned, and we refused anyway
            assert seen and all(w.category is Image.DecompressionBombWarning for w in seen), seen
        for out, work in outs:
            assert isinstance(out, ImageTooLarge), (action, out)
            assert work == NOTHING_DECODED, (action, work)
    assert entered == []


_RSS_SCRIPT = """
import json, re, sys

def kib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

data = open(sys.argv[1], "rb").read()
mode = sys.argv[2]
if mode == "service":
    from service.errors import ImageTooLarge
    from service.pipeline.decode import decode_image
    from service.settings import LimitSettings
    decode_image(open(sys.argv[3], "rb").read(), LimitSettings())  # warm the plugins
    def run():
        try:
            decode_image(data, LimitSettings())
            return "decoded"
        except ImageTooLarge:
            return "image_too_large"
else:  # control: plain Pillow with its guard off, to show the measurement sees a real decode
    import io
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None
    def run():
        Image.open(io.BytesIO(data)).load()
        return "decoded"
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
except OSError:
    pass
before = kib("VmRSS")
outcome = run()
print(json.dumps({"outcome": outcome, "growth_mb": (kib("VmHWM") - before) / 1024}))
"""


def _rss_growth(bomb: Path, mode: str, tmp_path: Path) -> dict[str, object]:
    """Peak RSS growth of one decode in a fresh process.

    ru_maxrss is inherited across exec on Linux and tracemalloc cannot see Pillow's C allocations, so this
    reads VmHWM after resetting it. If the reset is refused, the peak of start-up counts too (conservative).
    """
    warm = tmp_path / "warm.png"
    warm.write_bytes(_encode(_rgb(), "PNG"))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(bomb), mode, str(warm)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=env,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_d2_bomb_png_memory_growth(bomb_png: Path, tmp_path: Path) -> None:
    result = _rss_growth(bomb_png, "service", tmp_path)
    assert result["outcome"] == "image_too_large"
    assert result["growth_mb"] < 50
    control = _rss_growth(bomb_png, "control", tmp_path)
    assert control["growth_mb"] > 100  # a real decode of this file (144 MB of pixels) is visible


# ----------------------------------------------------------------------------------- D3: bad and disallowed


def test_d3_truncated_jpeg() -> None:
    full = _encode(_noisy_rgb((640, 480)), "JPEG", quality=90)
    for cut in (len(full) // 2, 200, 20):
        out, work = _counted(decode_image, full[:cut], LIMITS)
        assert isinstance(out, InvalidImage), (cut, out)
        assert out.status == 422 and out.code == "invalid_image"
        assert work.pixels == 0 and work.image_decodes <= 1, work  # at most the one failed attempt


def test_d3_truncated_png() -> None:
    full = _encode(_noisy_rgb((320, 240)), "PNG")
    out, work = _counted(decode_image, full[: len(full) // 2], LIMITS)
    assert isinstance(out, InvalidImage), out
    assert work.pixels == 0 and work.image_decodes <= 1, work


@pytest.mark.parametrize("seed", range(5))
def test_d3_random_bytes(seed: int) -> None:
    data = random.Random(seed).randbytes(4096)
    out, work = _counted(decode_image, data, LIMITS)
    assert isinstance(out, ELError), out
    assert 400 <= out.status < 500
    assert work == NOTHING_DECODED, work  # not identified as an image: no decoder ran


def _animated_gif() -> bytes:
    frames = _frames(3)
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


@pytest.mark.parametrize(
    ("name", "make", "sniffed"),
    [
        ("animated gif", _animated_gif, "GIF"),
        ("static gif", lambda: _encode(_rgb(), "GIF"), "GIF"),
        ("bmp", lambda: _encode(_rgb(), "BMP"), "BMP"),
        ("tiff", lambda: _encode(_rgb(), "TIFF"), "TIFF"),
        ("ico", lambda: _encode(_rgb((32, 32)), "ICO"), "ICO"),
    ],
)
def test_d3_disallowed_format_is_415(name: str, make, sniffed: str) -> None:  # type: ignore[no-untyped-def]
    data = make()
    with Image.open(io.BytesIO(data)) as probe:  # Pillow itself would happily open it
        assert probe.format is not None
    out, work = _counted(decode_image, data, LIMITS)
    assert isinstance(out, UnsupportedImageFormat), (name, out)
    assert out.status == 415 and out.code == "unsupported_image_format"
    assert sniffed in out.message and "JPEG" in out.message
    assert work == NOTHING_DECODED, work  # no parser of a disallowed format ever runs


def test_allowlist_comes_from_settings() -> None:
    png_only = LimitSettings(image_formats=["PNG"])
    out, _ = _counted(decode_image, _encode(_rgb(), "JPEG"), png_only)
    assert isinstance(out, UnsupportedImageFormat), out
    assert decode_image(_encode(_rgb(), "PNG"), png_only).mode == "RGB"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_d3_animated_png_and_webp_rejected(fmt: str) -> None:
    frames = _frames(3)
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as probe:
        assert probe.format == fmt and getattr(probe, "n_frames", 1) == 3
    out, work = _counted(decode_image, data, LIMITS)
    assert isinstance(out, InvalidImage), out
    assert "animated" in out.message
    assert work == NOTHING_DECODED, work  # frames counted from the header; none decoded


def test_byte_cap() -> None:
    data = _encode(_noisy_rgb((64, 64)), "PNG")
    out, _ = _counted(decode_image, data, LimitSettings(max_image_bytes=1024))
    assert isinstance(out, ImageTooLarge) and out.status == 413
    out, _ = _counted(decode_image, b"", LIMITS)
    assert isinstance(out, InvalidImage)


# ----------------------------------------------------------------------------------------------- good paths


def test_large_jpeg_decodes_through_draft(big_jpeg: bytes) -> None:
    out, work = _counted(decode_image, big_jpeg, LIMITS, target_size=224)
    assert isinstance(out, Image.Image), out
    assert out.mode == "RGB"
    assert out.size == (500, 375)  # DCT scale 1/8: both sides still >= target_size
    assert work == DecodeCounts(image_decodes=1, pixels=500 * 375), work  # 1/8 of the 4000x3000 pixels


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_valid_small_images_decode_to_rgb(fmt: str) -> None:
    out = decode_image(_encode(_rgb((64, 48)), fmt), LIMITS)
    assert out.mode == "RGB" and out.size == (64, 48)
    r, g, b = out.getpixel((10, 10))
    assert abs(r - 200) < 8 and abs(g - 30) < 8 and abs(b - 60) < 8


def test_modes_converted_to_rgb() -> None:
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    out = decode_image(_encode(rgba, "PNG"), LIMITS)
    assert out.mode == "RGB" and out.size == (20, 10)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent composited onto white
    assert out.getpixel((5, 5)) == (255, 0, 0)

    grey = decode_image(_encode(Image.new("L", (12, 8), 77), "PNG"), LIMITS)
    assert grey.mode == "RGB" and grey.getpixel((3, 3)) == (77, 77, 77)

    pal = _rgb((16, 16), (10, 200, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    out = decode_image(_encode(pal, "PNG"), LIMITS)
    assert out.mode == "RGB" and out.size == (16, 16)

    pal_t = pal.copy()
    pal_t.info["transparency"] = pal_t.getpixel((0, 0))
    out = decode_image(_encode(pal_t, "PNG"), LIMITS)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)

    cmyk = decode_image(_encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG"), LIMITS)
    assert cmyk.mode == "RGB"
    r, g, b = cmyk.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60

    webp_rgba = decode_image(_encode(rgba, "WEBP", lossless=True), LIMITS)
    assert webp_rgba.mode == "RGB" and webp_rgba.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    import numpy as np

    arr = np.full((8, 8), 32768, dtype=np.uint16)
    data = _encode(Image.fromarray(arr), "PNG")
    out = decode_image(data, LIMITS)
    assert out.mode == "RGB"
    assert 120 <= out.getpixel((1, 1))[0] <= 135


def test_exif_orientation_applied() -> None:
    img = _rgb((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes()), LIMITS)
    assert out.size == (20, 40)


def test_result_is_detached_and_independent() -> None:
    data = _encode(_rgb(), "PNG")
    a = decode_image(data, LIMITS)
    b = decode_image(data, LIMITS)
    a.putpixel((0, 0), (0, 0, 0))
    assert b.getpixel((0, 0)) == (200, 30, 60)
    assert a.getpixel((1, 1)) == (200, 30, 60)

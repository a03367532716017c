"""Reading images, and checking image files cheaply (size and completeness from the header) before training."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """An image file that cannot be used."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 [H, W, 3]. Grayscale becomes three channels and alpha is dropped (OpenCV's IMREAD_COLOR,
    as the official code reads)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(f"cannot read image {path}: missing, empty, truncated or not an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _png_size(data: bytes, path: Path) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise ImageError(f"{path} is not a valid PNG (no IHDR chunk)")
    width, height = struct.unpack(">II", data[16:24])
    with open(path, "rb") as f:
        f.seek(-12, os.SEEK_END)
        if f.read(12)[4:8] != b"IEND":
            raise ImageError(f"{path} is truncated (no IEND chunk at the end of the PNG)")
    return height, width


def _bmp_size(data: bytes, path: Path) -> tuple[int, int]:
    pixel_offset = struct.unpack("<I", data[10:14])[0]
    header_size = struct.unpack("<I", data[14:18])[0]
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height, _, bits = struct.unpack("<HHHH", data[18:26])
        compression = 0
    else:
        width, height, _, bits, compression = struct.unpack("<iiHHI", data[18:34])
    if compression in (0, 3):  # uncompressed (BI_RGB, BI_BITFIELDS): the pixel data has a known size
        row = ((width * bits + 31) // 32) * 4
        if path.stat().st_size < pixel_offset + row * abs(height):
            raise ImageError(f"{path} is truncated ({path.stat().st_size} bytes, the BMP header needs "
                             f"{pixel_offset + row * abs(height)})")
    return abs(height), width


def _jpeg_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        data = f.read()
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise ImageError(f"{path} is truncated (no end-of-image marker at the end of the JPEG)")
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return height, width
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    raise ImageError(f"{path} is not a valid JPEG (no frame header)")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file, raising ImageError for a missing, empty, truncated or non-image file.

    BMP, PNG and JPEG (every dataset here) are checked from their headers and file ends without decoding;
    other formats are decoded.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(64)
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from None
    if not data:
        raise ImageError(f"image {path} is empty (0 bytes)")
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png_size(data, path)
        if data.startswith(b"BM") and len(data) >= 34:
            return _bmp_size(data, path)
        if data.startswith(b"\xff\xd8"):
            return _jpeg_size(path)
    except (struct.error, OSError) as exc:
        raise ImageError(f"{path} has a damaged header: {exc}") from None
    if path.suffix.lower() in (".bmp", ".png", ".jpg", ".jpeg"):
        raise ImageError(f"{path} is not a {path.suffix[1:].upper()} image (its first bytes are {data[:8]!r})")
    return read_image(path).shape[:2]

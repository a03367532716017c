"""Reading images, and checking image files cheaply (size and completeness from the header) before training."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

from ahiq.messages import last_line

# Every decode failure is reported by ImageError, naming the file; OpenCV's own log lines would only add
# noise around that one line.
if hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """An image file that cannot be used."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 [H, W, 3]. Grayscale becomes three channels and alpha is dropped (OpenCV's IMREAD_COLOR,
    as the official code reads). Any failure is an ImageError naming the file and what is wrong."""
    try:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    except cv2.error as exc:  # OpenCV's size limits, among others
        if "CV_IO_MAX_IMAGE" in str(exc):
            raise ImageError(f"cannot decode image {path}: it is over OpenCV's size limits; raise them with the "
                             f"environment variables {', '.join(opencv_limits())}") from None
        raise ImageError(f"cannot decode image {path}: {last_line(str(exc))}") from None
    if image is None:
        raise ImageError(_unreadable(Path(path)))
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _unreadable(path: Path) -> str:
    """Why OpenCV's colour reader returned nothing for ``path``."""
    if not path.exists():
        return f"image {path} does not exist"
    if path.is_dir():
        return f"{path} is a folder, not an image"
    if path.stat().st_size == 0:
        return f"image {path} is empty (0 bytes)"
    try:
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        raw = None
    if raw is not None:  # decodable, in a sample format the 8-bit colour reader does not convert
        channels = raw.shape[2] if raw.ndim == 3 else 1
        return (f"{path} holds {raw.dtype} samples ({channels} channel(s)), which the 8-bit colour reader cannot "
                f"convert; save it as an 8-bit image (PNG, BMP or JPEG)")
    return f"cannot read image {path}: truncated, damaged or not an image"


def opencv_limits() -> dict[str, int]:
    """The decoder's size limits, as OpenCV reads them from the environment (its defaults otherwise)."""
    return {"OPENCV_IO_MAX_IMAGE_PIXELS": int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30)),
            "OPENCV_IO_MAX_IMAGE_WIDTH": int(os.environ.get("OPENCV_IO_MAX_IMAGE_WIDTH", 1 << 20)),
            "OPENCV_IO_MAX_IMAGE_HEIGHT": int(os.environ.get("OPENCV_IO_MAX_IMAGE_HEIGHT", 1 << 20))}


def _check_decodable(path: Path, height: int, width: int) -> None:
    """The header's size against OpenCV's limits: an image over them passes every header check and then
    fails in the middle of a run."""
    limits = opencv_limits()
    for variable, value in (("OPENCV_IO_MAX_IMAGE_PIXELS", height * width), ("OPENCV_IO_MAX_IMAGE_WIDTH", width),
                            ("OPENCV_IO_MAX_IMAGE_HEIGHT", height)):
        if value > limits[variable]:
            raise ImageError(f"{path} is {height}x{width}, over OpenCV's limit {variable}={limits[variable]}: "
                             f"set the environment variable {variable}={value} (or more) to read it")


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
    except IsADirectoryError:
        raise ImageError(f"{path} is a folder, not an image") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from None
    if not data:
        raise ImageError(f"image {path} is empty (0 bytes)")
    try:
        size = None
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            size = _png_size(data, path)
        elif data.startswith(b"BM") and len(data) >= 34:
            size = _bmp_size(data, path)
        elif data.startswith(b"\xff\xd8"):
            size = _jpeg_size(path)
    except (struct.error, OSError) as exc:
        raise ImageError(f"{path} has a damaged header: {exc}") from None
    if size is not None:
        _check_decodable(path, *size)
        return size
    if path.suffix.lower() in (".bmp", ".png", ".jpg", ".jpeg"):
        raise ImageError(f"{path} is not a {path.suffix[1:].upper()} image (its first bytes are {data[:8]!r})")
    return read_image(path).shape[:2]

import cv2
import numpy as np
import pytest

from ahiq.data import DatasetError, ImageError, Pair, check_images, image_size, read_image
from trees import META, meta, touch


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".jpg"])
def test_image_size_from_header(tmp_path, ext):
    touch(tmp_path / f"a{ext}", _image(37, 53))
    assert image_size(tmp_path / f"a{ext}") == (37, 53)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".jpg"])
def test_truncated_images_are_found(tmp_path, ext):
    touch(tmp_path / f"a{ext}", _image(64, 64))
    data = (tmp_path / f"a{ext}").read_bytes()
    (tmp_path / f"a{ext}").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError, match="truncated"):
        image_size(tmp_path / f"a{ext}")


def test_empty_missing_and_non_image_files(tmp_path):
    (tmp_path / "empty.bmp").touch()
    (tmp_path / "text.png").write_text("this is not an image")
    with pytest.raises(ImageError, match="empty.bmp is empty"):
        image_size(tmp_path / "empty.bmp")
    with pytest.raises(ImageError, match="text.png is not a PNG image"):
        image_size(tmp_path / "text.png")
    with pytest.raises(ImageError, match="nowhere.png does not exist"):
        image_size(tmp_path / "nowhere.png")
    with pytest.raises(ImageError, match="cannot read image .*text.png"):
        read_image(tmp_path / "text.png")


def test_read_image_rgb_gray_and_alpha(tmp_path):
    rgb = _image(5, 6)
    touch(tmp_path / "rgb.png", rgb)
    assert np.array_equal(read_image(tmp_path / "rgb.png"), rgb)  # RGB order, not OpenCV's BGR
    gray = rgb[..., 0]
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    assert np.array_equal(read_image(tmp_path / "gray.png"), np.stack([gray] * 3, -1))
    bgra = np.dstack([rgb[..., ::-1], np.full((5, 6), 7, np.uint8)])
    cv2.imwrite(str(tmp_path / "alpha.png"), bgra)
    assert np.array_equal(read_image(tmp_path / "alpha.png"), rgb)


def test_check_images_reports_every_problem(tmp_path):
    touch(tmp_path / "ref.png", _image(40, 40))
    touch(tmp_path / "same.png", _image(40, 40, 1))
    touch(tmp_path / "other_size.png", _image(40, 48))
    touch(tmp_path / "small_ref.png", _image(20, 20))
    touch(tmp_path / "small.png", _image(20, 20))
    (tmp_path / "zero.png").touch()
    pairs = [Pair(str(tmp_path / "ref.png"), str(tmp_path / n), 1.0, n)
             for n in ("same.png", "other_size.png", "zero.png", "missing.png")]
    pairs.append(Pair(str(tmp_path / "small_ref.png"), str(tmp_path / "small.png"), 1.0, "small.png"))
    with pytest.raises(DatasetError) as err:
        check_images(pairs, crop_size=32)
    message = str(err.value)
    assert "4 problems with the images of 5 pairs" in message
    assert "other_size.png is 40x48 but its reference" in message
    assert "zero.png is empty" in message and "missing.png does not exist" in message
    assert "small.png is 20x20, smaller than the 32x32 crop" in message
    check_images(pairs[:1], crop_size=32)  # a good pair passes
    with pytest.raises(DatasetError, match="whole-image evaluation needs 32x32"):
        check_images(pairs[:1], crop_size=32, whole=True)


def test_real_dataset_images_read():
    ref, dist = meta("images/tid2013/I01.BMP"), META / "images/tid2013/i01_01_5.bmp"
    assert image_size(ref) == image_size(dist) == (384, 512)
    image = read_image(ref)
    assert image.shape == (384, 512, 3) and image.dtype == np.uint8
    kadid = meta("images/kadid10k")
    for path in sorted(kadid.glob("*.png")):
        assert image_size(path) == read_image(path).shape[:2] == (384, 512)

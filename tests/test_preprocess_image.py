"""Image decoding rules and equality with the original's PIL + torchvision test transform."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from galr.preprocess.image import (
    ImageLoadError,
    ImagePreprocessConfig,
    load_and_preprocess,
    load_image,
    preprocess_image,
    preprocess_images,
    scale_to_uint8,
)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def reference_transform(image: Image.Image, size: int = 256) -> np.ndarray:
    """Independent statement of torchvision Resize((S,S)) [PIL path] + ToTensor + Normalize."""
    resized = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
    return ((resized / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def random_rgb(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def as_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring a size but holding one scanline of data (a bomb's cheap header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# Transform equality


@pytest.mark.parametrize("height, width", [(300, 200), (224, 224), (256, 256)])
def test_preprocess_equals_pil_bilinear_totensor_normalize(height, width):
    # (224, 224) is RSICD's upsample, (256, 256) RSITMD's no-op resize, (300, 200) a downsample.
    image = random_rgb(height, width)
    out = preprocess_image(image)
    assert out.dtype == np.float32 and out.shape == (3, 256, 256)
    np.testing.assert_allclose(out, reference_transform(image), rtol=0, atol=1e-6)


def test_batch_equals_single_images_and_accepts_paths(tmp_path):
    images = [random_rgb(224, 224, seed) for seed in range(3)]
    path = tmp_path / "scene.png"
    images[2].save(path)
    batch = preprocess_images([images[0], np.asarray(images[1]), path])
    assert batch.shape == (3, 3, 256, 256) and batch.dtype == np.float32
    for got, image in zip(batch, images):
        np.testing.assert_allclose(got, reference_transform(image), rtol=0, atol=1e-6)
    assert preprocess_images([]).shape == (0, 3, 256, 256)


def test_other_size_and_interpolation_follow_config():
    image = random_rgb(50, 70)
    config = ImagePreprocessConfig(size=64, interpolation="bicubic")
    expected = np.asarray(image.resize((64, 64), Image.BICUBIC), dtype=np.float32)
    expected = ((expected / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(preprocess_image(image, config), expected, rtol=0, atol=1e-6)


def test_preprocess_image_rejects_arrays_that_are_not_rgb_uint8():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        preprocess_image(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="load_image"):
        preprocess_image(np.zeros((8, 8), dtype=np.uint8))


def test_config_round_trip_and_validation():
    config = ImagePreprocessConfig(size=128, bands=(3, 2, 1), max_pixels=10_000)
    assert ImagePreprocessConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ImagePreprocessConfig fields"):
        ImagePreprocessConfig.from_dict({"size": 256, "crop": 224})
    with pytest.raises(ValueError, match="interpolation"):
        ImagePreprocessConfig(interpolation="area")
    with pytest.raises(ValueError, match="bands"):
        ImagePreprocessConfig(bands=(0, 1))
    with pytest.raises(ValueError, match="std"):
        ImagePreprocessConfig(std=(0.2, 0.0, 0.2))


# ---------------------------------------------------------------------------------------------
# Modes and bit depths


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_eight_bit_modes_convert_like_the_original(tmp_path, mode):
    source = random_rgb(40, 30).convert(mode)
    path = tmp_path / f"scene.{'jpg' if mode == 'CMYK' else 'png'}"
    source.save(path)
    with Image.open(path) as reopened:
        expected = np.asarray(reopened.convert("RGB"))
    np.testing.assert_array_equal(as_array(load_image(path)), expected)
    np.testing.assert_allclose(load_and_preprocess(path), reference_transform(Image.fromarray(expected)), atol=1e-6)


def test_rgba_alpha_is_dropped_not_blended():
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., 0], pixels[..., 3] = 200, 0  # fully transparent red stays red, like .convert('RGB')
    assert as_array(load_image(Image.fromarray(pixels)))[0, 0].tolist() == [200, 0, 0]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_is_scaled_by_its_maximum(tmp_path, suffix):
    values = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)  # 12-bit data in a 16-bit file
    path = tmp_path / f"dem{suffix}"
    Image.fromarray(values).save(path)
    loaded = as_array(load_image(path))
    expected = np.rint(values * (255.0 / 4095.0)).astype(np.uint8)
    np.testing.assert_array_equal(loaded[..., 0], expected)
    assert (loaded[..., 0] == loaded[..., 1]).all() and (loaded[..., 1] == loaded[..., 2]).all()


def test_16_bit_holding_8_bit_values_is_unchanged(tmp_path):
    values = np.array([[0, 17], [128, 255]], dtype=np.uint16)
    path = tmp_path / "low.png"
    Image.fromarray(values).save(path)
    np.testing.assert_array_equal(as_array(load_image(path))[..., 0], values.astype(np.uint8))


def test_float_tiff_reflectance_and_large_values(tmp_path):
    reflectance = np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32)
    path = tmp_path / "reflectance.tif"
    Image.fromarray(reflectance, mode="F").save(path)
    np.testing.assert_array_equal(as_array(load_image(path))[..., 0], [[0, 128], [64, 255]])
    radiance = np.array([[-5.0, 500.0], [1000.0, np.nan]], dtype=np.float32)
    path = tmp_path / "radiance.tif"
    Image.fromarray(radiance, mode="F").save(path)
    np.testing.assert_array_equal(as_array(load_image(path))[..., 0], [[0, 128], [255, 0]])


def test_scale_to_uint8_rules():
    assert scale_to_uint8(np.array([3, 250], dtype=np.uint8)).tolist() == [3, 250]
    assert scale_to_uint8(np.array([True, False])).tolist() == [255, 0]
    assert scale_to_uint8(np.array([-7, 100, 65535], dtype=np.int32)).tolist() == [0, 0, 255]
    assert scale_to_uint8(np.array([np.inf, 0.5], dtype=np.float64)).tolist() == [0, 128]
    assert scale_to_uint8(np.zeros((0,), dtype=np.uint16)).shape == (0,)


def test_numpy_rasters_use_bands_and_reject_out_of_range():
    rgbn = np.stack([np.full((3, 3), v, dtype=np.uint16) for v in (100, 200, 300, 1000)], axis=2)
    loaded = as_array(load_image(rgbn, ImagePreprocessConfig(bands=(3, 0, 1))))
    # One factor (255 / max of the selected bands = 255 / 1000) for all channels keeps colour balance.
    assert loaded[0, 0].tolist() == [255, 26, 51]
    with pytest.raises(ImageLoadError, match="4 channels"):
        load_image(rgbn, ImagePreprocessConfig(bands=(0, 1, 4)))
    grey = as_array(load_image(np.array([[0, 255]], dtype=np.uint8)))
    assert grey.tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_bands_are_applied_once_through_load_and_preprocess():
    image = random_rgb(16, 16)
    config = ImagePreprocessConfig(bands=(2, 1, 0), size=16)
    swapped = Image.fromarray(np.asarray(image)[..., ::-1].copy())
    np.testing.assert_allclose(load_and_preprocess(image, config), reference_transform(swapped, 16), atol=1e-6)


def test_binary_streams_are_read(tmp_path):
    image = random_rgb(20, 20)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    np.testing.assert_array_equal(as_array(load_image(buffer)), np.asarray(image))


# ---------------------------------------------------------------------------------------------
# Multi-band TIFF (tifffile)


def _tifffile():
    return pytest.importorskip(
        "tifffile", reason="tifffile not installed (extra galr[tiff]); multi-band TIFF tests skipped", exc_type=ImportError
    )


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_multiband_uint16_tiff_picks_bands(tmp_path, planar):
    tifffile = _tifffile()
    rng = np.random.default_rng(1)
    rgbn = rng.integers(0, 4096, (12, 10, 4), dtype=np.uint16)
    path = tmp_path / "rgbn.tif"
    data = rgbn if planar == "contig" else np.moveaxis(rgbn, 2, 0)
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig=planar)
    config = ImagePreprocessConfig(bands=(3, 2, 1))
    selected = rgbn[..., [3, 2, 1]].astype(np.float64)
    expected = np.rint(selected * (255.0 / selected.max())).astype(np.uint8)
    np.testing.assert_array_equal(as_array(load_image(path, config)), expected)


def test_16_bit_rgb_tiff_is_scaled_not_truncated_to_the_high_byte(tmp_path):
    tifffile = _tifffile()
    rgb = np.array([[[10, 1000, 4000]]], dtype=np.uint16)
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    # Pillow alone would give the high bytes [0, 3, 15].
    assert as_array(load_image(path))[0, 0].tolist() == [1, 64, 255]


def test_multiband_tiff_without_tifffile_says_what_to_install(tmp_path, monkeypatch):
    tifffile = _tifffile()
    path = tmp_path / "rgbn.tif"
    tifffile.imwrite(path, np.zeros((4, 4, 4), dtype=np.uint16), photometric="minisblack", planarconfig="contig")
    monkeypatch.setitem(__import__("sys").modules, "tifffile", None)  # import tifffile now raises ImportError
    with pytest.raises(ImageLoadError, match=r"galr\[tiff\]") as error:
        load_image(path)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------------------------------------
# Refused files


def test_decompression_bomb_header_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(ImageLoadError, match="decompression bomb") as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_max_pixels_is_checked_before_decoding(tmp_path):
    # The header declares 5000 x 5000 but holds no pixel data: decoding would fail as "truncated",
    # so this message proves the size was checked first.
    path = tmp_path / "large.png"
    path.write_bytes(png_header_only(5000, 5000))
    with pytest.raises(ImageLoadError, match="max_pixels=1000000") as error:
        load_image(path, ImagePreprocessConfig(max_pixels=1_000_000))
    assert str(path) in str(error.value)


def test_truncated_jpeg_is_refused(tmp_path):
    buffer = io.BytesIO()
    random_rgb(64, 64).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="corrupt or truncated") as error:
        load_image(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("content", [b"<html>not found</html>", b""])
def test_non_image_file_is_refused(tmp_path, content):
    path = tmp_path / "scene.png"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match="not a readable image") as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.tif"
    with pytest.raises(ImageLoadError, match="no such image file") as error:
        preprocess_images([path])
    assert str(Path(path)) in str(error.value)

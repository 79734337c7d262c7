"""Image decoding and normalisation equal to the original GaLR test transform (torch-free).

The original (``R:data.py:84-89``) does::

    PIL.Image.open(path).convert('RGB')
    T.Resize((256, 256))      # on a PIL image: img.resize((256, 256), Image.BILINEAR)
    T.ToTensor()              # uint8 -> float32 / 255, HWC -> CHW
    T.Normalize(mean, std)    # ImageNet constants

:func:`preprocess_image` reproduces that chain with Pillow and numpy. It follows torchvision's *PIL*
path, which is what the original runs; torchvision's *tensor* path (``interpolate(...,
antialias=True)`` on a uint8/float tensor) rounds differently and would differ by up to a few
grey levels, so do not feed it tensors if you need parity.

:func:`load_image` adds what real remote-sensing files need and the original lacks (rules in
``docs/preprocessing.md``):

* 8-bit colour/grey/palette images: ``.convert('RGB')`` exactly like the original (alpha dropped).
* Single-channel 16-bit, 32-bit integer and float rasters (Pillow modes ``I;16*``, ``I``, ``F``):
  scaled to 0..255 by :func:`scale_to_uint8` and replicated to R=G=B. The original would clip them.
* TIFFs Pillow cannot read faithfully (more than 8 bits in a multi-channel raster, more samples
  than Pillow exposes, float RGB, unknown layouts) are read with ``tifffile`` when it is installed
  (extra ``galr[tiff]``); ``config.bands`` picks R, G, B from their channels.
* Decompression bombs are refused from the header, before any pixel is decoded: the pixel count
  (``max_pixels``) and the decoded size in bytes, width x height x bands x bytes per sample
  (``max_decoded_bytes``), so a small file declaring 64 bands of 16 bits is refused too.
* Pillow's own warnings about a file (a possible bomb, samples it cannot decode) come out as one
  :class:`ImageWarning` naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from galr.errors import InputError
from galr.serialization import fields_from_dict

# Pillow's own hard limit (it raises above 2 * MAX_IMAGE_PIXELS); 178_956_970 px ~ 13_377 x 13_377.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
#: Decoded bytes of one image at most (1 GiB): an 8-bit RGB image at the pixel limit fits, a 64-band
#: 16-bit 4096 x 4096 raster (2 GiB) does not.
DEFAULT_MAX_DECODED_BYTES = 1 << 30
# Bytes per sample of Pillow modes holding more than 8 bits per channel.
_MODE_SAMPLE_BYTES = {"I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4, "F": 4, "RGBA;16": 2}

_RESAMPLING: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Pillow modes holding one channel of more than 8 bits; they go through scale_to_uint8.
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# Pillow modes whose channels are the raster's bands in file order, so `bands` can index them.
_BAND_MODES = frozenset({"RGB", "RGBA", "RGBX"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TIFF_SAMPLES_PER_PIXEL = 277
_TIFF_BITS_PER_SAMPLE = 258
_TIFF_SAMPLE_FORMAT = 339
_TIFF_FLOAT = 3
_TIFF_HINT = (
    "install the TIFF extra (pip install 'galr[tiff]', i.e. tifffile) or convert the file to an 8-bit RGB PNG/TIFF"
)

ImageSource = Union[str, os.PathLike, BinaryIO, Image.Image, np.ndarray]


class ImageLoadError(InputError):
    """An image could not be read or converted; the message names the file and what to do."""


class ImageWarning(UserWarning):
    """Something about an image worth knowing (Pillow's own warnings, re-worded to name the file)."""


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """How images become the model's ``float32 [3, size, size]`` input.

    Attributes:
        size: square side after resizing (the original model needs 256).
        mean: per-channel mean subtracted after scaling to [0, 1] (ImageNet).
        std: per-channel standard deviation divided by (ImageNet).
        interpolation: Pillow resampling filter name; the original uses ``"bilinear"``.
        bands: zero-based channel indices that become R, G, B for rasters with 3 or more channels
            (multi-band TIFFs, numpy arrays, Pillow RGB/RGBA/RGBX images).
        max_pixels: refuse images whose header declares more than ``width * height`` pixels.
            Values above Pillow's own hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``) only take
            effect if that process-wide Pillow setting is raised as well.
        max_decoded_bytes: refuse images whose header declares more decoded bytes than this
            (width x height x bands x bytes per sample).
    """

    size: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    bands: tuple[int, int, int] = (0, 1, 2)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES

    def __post_init__(self) -> None:
        if self.size < 1:
            raise InputError(f"ImagePreprocessConfig.size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise InputError(f"ImagePreprocessConfig.mean and .std need 3 values each, got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise InputError(f"ImagePreprocessConfig.std must be positive, got {self.std}")
        if self.interpolation not in _RESAMPLING:
            raise InputError(
                f"ImagePreprocessConfig.interpolation {self.interpolation!r} is unknown; "
                f"use one of {sorted(_RESAMPLING)}"
            )
        if len(self.bands) != 3 or min(self.bands) < 0:
            raise InputError(f"ImagePreprocessConfig.bands needs 3 non-negative channel indices, got {self.bands}")
        if self.max_pixels < 1 or self.max_decoded_bytes < 1:
            raise InputError(f"ImagePreprocessConfig.max_pixels and .max_decoded_bytes must be positive, got "
                             f"{self.max_pixels} and {self.max_decoded_bytes}")

    @property
    def resample(self) -> Image.Resampling:
        """The Pillow filter named by :attr:`interpolation`."""
        return _RESAMPLING[self.interpolation]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ImagePreprocessConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error so a newer manifest is never half-read."""
        return cls(**fields_from_dict(cls, values))


# ---------------------------------------------------------------------------------------------
# Pixel value rules


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map a raster of any numeric dtype to uint8 with one linear factor for the whole raster.

    The rule (one factor for all channels, so colour balance is kept):

    * uint8 is returned unchanged; bool becomes 0/255.
    * Negative values are clipped to 0; non-finite float values become 0.
    * Floats whose maximum is at most 1.0 are taken as reflectance in [0, 1] and multiplied by 255.
    * Otherwise, when the maximum exceeds 255, values are multiplied by ``255 / max`` (the authors'
      server rescales 16-bit input by its maximum the same way); when it does not, they are kept.
    * The result is rounded half to even and clipped to 0..255.

    Args:
        values: array of any shape and numeric dtype.

    Returns:
        np.ndarray: uint8 array of the same shape.
    """
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * np.uint8(255)
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise TypeError(f"cannot scale an array of dtype {values.dtype} to 8 bits; give integers or floats")
    # float32 is exact enough for an 8-bit result and halves the memory of float64 on large scenes.
    data = values.astype(np.float32)
    is_float = np.issubdtype(values.dtype, np.floating)
    if is_float:
        data[~np.isfinite(data)] = 0.0
    np.maximum(data, 0.0, out=data)
    peak = float(data.max()) if data.size else 0.0
    if is_float and peak <= 1.0:
        data *= 255.0
    elif peak > 255.0:
        data *= 255.0 / peak
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)


def _array_to_rgb(pixels: np.ndarray, bands: tuple[int, int, int], name: str) -> Image.Image:
    """HxW or HxWxC raster -> 8-bit RGB image; one channel is replicated, two are grey+alpha."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3 and pixels.shape[2] == 2:
        pixels = pixels[:, :, 0]  # grey + alpha: drop alpha, as .convert('RGB') does for LA
    if pixels.ndim == 2:
        grey = scale_to_uint8(pixels)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if pixels.ndim != 3:
        raise ImageLoadError(f"{name}: expected an HxW or HxWxC raster, got shape {pixels.shape}")
    channels = pixels.shape[2]
    if max(bands) >= channels:
        raise ImageLoadError(
            f"{name}: ImagePreprocessConfig.bands={bands} asks for channel {max(bands)} but the raster has "
            f"{channels} channels; choose bands below {channels}"
        )
    selected = np.ascontiguousarray(pixels[:, :, list(bands)])
    return Image.fromarray(scale_to_uint8(selected))


def _pillow_to_rgb(image: Image.Image, bands: tuple[int, int, int], name: str) -> Image.Image:
    """Apply the mode rules to a Pillow image (see the module docstring)."""
    if image.mode in _HIGH_DEPTH_MODES:
        return _array_to_rgb(np.asarray(image), bands, name)
    if image.mode in _BAND_MODES and bands != (0, 1, 2):
        return _array_to_rgb(np.asarray(image), bands, name)
    if image.mode == "RGB":
        return image
    # Everything else (L, LA, P, PA, 1, CMYK, YCbCr, RGBA, ...) exactly as the original: alpha dropped.
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Decoding


def _source_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


def _check_size(width: int, height: int, bands: int, sample_bytes: int, config: ImagePreprocessConfig,
                name: str) -> None:
    """Refuse, from the header, an image whose pixels or decoded bytes exceed the configured bounds."""
    if width * height > config.max_pixels:
        raise ImageLoadError(
            f"{name}: refusing a {width}x{height} image ({width * height} pixels > max_pixels={config.max_pixels}); "
            "it may be a decompression bomb. Downsample or tile the file, or raise ImagePreprocessConfig.max_pixels "
            "if you trust it"
        )
    decoded = width * height * max(1, bands) * max(1, sample_bytes)
    if decoded > config.max_decoded_bytes:
        raise ImageLoadError(
            f"{name}: refusing a {width}x{height} image of {bands} band(s) of {8 * sample_bytes} bits: it decodes to "
            f"{decoded / 2**20:.0f} MiB > max_decoded_bytes={config.max_decoded_bytes / 2**20:.0f} MiB; it may be "
            "a decompression bomb. Tile or convert the file, or raise ImagePreprocessConfig.max_decoded_bytes "
            "if you trust it"
        )


def _tiff_needs_tifffile(image: Image.Image) -> bool:
    """True when Pillow opened a TIFF but would drop bands or bits of it."""
    tags = getattr(image, "tag_v2", {})
    samples = int(tags.get(_TIFF_SAMPLES_PER_PIXEL, 1))
    bits = tags.get(_TIFF_BITS_PER_SAMPLE, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    formats = tags.get(_TIFF_SAMPLE_FORMAT, (1,))
    formats = formats if isinstance(formats, tuple) else (formats,)
    if samples > len(image.getbands()):
        return True  # e.g. 4-band planar uint16 opens as band 0 only
    # Pillow reduces multi-channel 16-bit to the high byte and cannot hold float RGB.
    return samples > 1 and (max(bits) > 8 or _TIFF_FLOAT in formats)


def _read_tiff_with_tifffile(stream: BinaryIO, config: ImagePreprocessConfig, name: str, reason: str) -> Image.Image:
    """Read the first page of a TIFF with tifffile and pick ``config.bands``."""
    try:
        import tifffile
    except ImportError:
        raise ImageLoadError(f"{name}: {reason}, which Pillow cannot read faithfully; {_TIFF_HINT}") from None
    try:
        with tifffile.TiffFile(stream) as tif:
            page = tif.pages[0]
            samples = int(np.prod(page.shape)) // max(1, int(page.imagewidth) * int(page.imagelength))
            _check_size(int(page.imagewidth), int(page.imagelength), samples, np.dtype(page.dtype).itemsize, config,
                        name)
            axes, pixels = page.axes, page.asarray()
    except ImageLoadError:
        raise
    except Exception as exc:  # tifffile raises many types (TiffFileError, ValueError, struct.error, ...)
        raise ImageLoadError(f"{name}: tifffile could not read this TIFF ({exc}); check or re-export the file") from exc
    # Put the one non-spatial axis (samples 'S', or a channel/plane axis) last.
    extra = [i for i, axis in enumerate(axes) if axis not in "YX" and pixels.shape[i] > 1]
    spatial = [axes.index("Y"), axes.index("X")] if "Y" in axes and "X" in axes else []
    if not spatial or len(extra) > 1:
        raise ImageLoadError(
            f"{name}: TIFF page has axes {axes!r} and shape {pixels.shape}; expected height x width with at most one "
            "band axis. Convert the file to a single multi-band image"
        )
    order = spatial + extra + [i for i in range(pixels.ndim) if i not in spatial + extra]
    pixels = np.transpose(pixels, order).reshape(pixels.shape[order[0]], pixels.shape[order[1]], -1)
    return _array_to_rgb(pixels, config.bands, name)


def _decode_stream(stream: BinaryIO, config: ImagePreprocessConfig, name: str) -> Image.Image:
    """Decode with the rules of the module docstring; Pillow's warnings come out as :class:`ImageWarning`.

    (``catch_warnings`` is process-wide before Python 3.14: a warning another thread raises meanwhile
    may be re-worded as this file's too.)
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = _decode_checked(stream, config, name)
    for message in dict.fromkeys(str(w.message) for w in caught):
        warnings.warn(ImageWarning(f"{name}: {message}"), stacklevel=3)
    return image


def _decode_checked(stream: BinaryIO, config: ImagePreprocessConfig, name: str) -> Image.Image:
    start = stream.tell()
    head = stream.read(4)
    stream.seek(start)
    is_tiff = head in _TIFF_MAGIC
    try:
        image = Image.open(stream)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(
            f"{name}: Pillow refused the image as a possible decompression bomb ({exc}); downsample or tile the file"
        ) from exc
    except UnidentifiedImageError as exc:
        if is_tiff:
            stream.seek(start)
            return _read_tiff_with_tifffile(stream, config, name, "it is a TIFF layout Pillow cannot open")
        raise ImageLoadError(
            f"{name}: not a readable image (Pillow cannot identify it); check that the file is an image and not "
            "empty, HTML or text saved under an image extension"
        ) from exc
    tags = getattr(image, "tag_v2", {})
    bands = max(len(image.getbands()), int(tags.get(_TIFF_SAMPLES_PER_PIXEL, 1)) if is_tiff else 0)
    bits = tags.get(_TIFF_BITS_PER_SAMPLE, (8,)) if is_tiff else (8,)
    sample_bytes = max(_MODE_SAMPLE_BYTES.get(image.mode, 1), (max(bits if isinstance(bits, tuple) else (bits,)) + 7) // 8)
    _check_size(image.width, image.height, bands, sample_bytes, config, name)
    if is_tiff and _tiff_needs_tifffile(image):
        stream.seek(start)
        reason = f"it is a multi-band or >8-bit TIFF (Pillow mode {image.mode})"
        return _read_tiff_with_tifffile(stream, config, name, reason)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(
            f"{name}: the image data is corrupt or truncated ({exc}); re-download or re-export it"
        ) from exc
    return _pillow_to_rgb(image, config.bands, name)


def load_image(source: ImageSource, config: ImagePreprocessConfig | None = None) -> Image.Image:
    """Read an image and convert it to 8-bit RGB by the rules in the module docstring.

    Args:
        source: a path, an open binary file, a Pillow image (any mode) or a numpy raster
            (HxW or HxWxC, any numeric dtype; channels last).
        config: preprocessing settings; only ``bands`` and ``max_pixels`` matter here.

    Returns:
        PIL.Image.Image: decoded image in mode ``"RGB"`` at its original size.

    Raises:
        ImageLoadError: missing, corrupt, truncated or non-image file; decompression bomb;
            unsupported raster layout; bands out of range. The message names the file.
    """
    config = config or ImagePreprocessConfig()
    name = _source_name(source)
    if isinstance(source, Image.Image):
        return _pillow_to_rgb(source, config.bands, name if name != "<stream>" else "<PIL image>")
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, config.bands, "<numpy array>")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(f"{name}: no such image file; check the path")
        with path.open("rb") as stream:
            return _decode_stream(stream, config, name)
    if hasattr(source, "read"):
        stream = source if source.seekable() else io.BytesIO(source.read())
        return _decode_stream(stream, config, name)
    raise TypeError(f"load_image cannot read a {type(source).__name__}; pass a path, binary file, PIL image or array")


# ---------------------------------------------------------------------------------------------
# Resize + ToTensor + Normalize


def _as_rgb(image: Image.Image | np.ndarray, config: ImagePreprocessConfig) -> Image.Image:
    if isinstance(image, Image.Image):
        # An RGB image is final (load_image already applied `bands`); applying them again would re-permute.
        return image if image.mode == "RGB" else load_image(image, config)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(
                f"preprocess_image needs an HxWx3 uint8 array, got {image.dtype} {image.shape}; "
                "convert other rasters with load_image first"
            )
        return Image.fromarray(np.ascontiguousarray(image))
    raise TypeError(f"preprocess_image takes a PIL image or numpy array, got {type(image).__name__}")


def _resize(image: Image.Image, config: ImagePreprocessConfig) -> np.ndarray:
    # Pillow returns a copy when the size already matches, as torchvision's Resize skips it.
    return np.asarray(image.resize((config.size, config.size), config.resample), dtype=np.uint8)


def _normalise(resized: np.ndarray, config: ImagePreprocessConfig) -> np.ndarray:
    """uint8 [n, S, S, 3] -> float32 [n, 3, S, S], with torchvision's float32 operation order."""
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    scaled = resized.astype(np.float32) / np.float32(255.0)
    normalised = (scaled - mean) / std
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))


def preprocess_image(image: Image.Image | np.ndarray, config: ImagePreprocessConfig | None = None) -> np.ndarray:
    """Resize, scale and normalise one image like the original's test transform.

    Equals torchvision ``Resize((S, S))`` on a PIL image (``img.resize((S, S), BILINEAR)``),
    ``ToTensor`` and ``Normalize(mean, std)``. torchvision's tensor path (antialiased
    ``interpolate``) would differ slightly; the original uses the PIL path, so we do.

    Args:
        image: a Pillow image or an HxWx3 uint8 RGB array. RGB images are used as they are;
            other modes are converted by the :func:`load_image` rules.
        config: size, interpolation and normalisation constants.

    Returns:
        np.ndarray: float32 ``[3, size, size]``.

    Raises:
        ValueError: an array that is not HxWx3 uint8.
    """
    config = config or ImagePreprocessConfig()
    return _normalise(_resize(_as_rgb(image, config), config)[None], config)[0]


def preprocess_images(sources: Sequence[ImageSource], config: ImagePreprocessConfig | None = None) -> np.ndarray:
    """Load and preprocess several images into one batch.

    Args:
        sources: anything :func:`load_image` accepts, one per image.
        config: preprocessing settings.

    Returns:
        np.ndarray: float32 ``[n, 3, size, size]`` (``n`` may be 0).

    Raises:
        ImageLoadError: the first source that cannot be read, named in the message.
    """
    config = config or ImagePreprocessConfig()
    resized = np.empty((len(sources), config.size, config.size, 3), dtype=np.uint8)
    for index, source in enumerate(sources):
        resized[index] = _resize(load_image(source, config), config)
    return _normalise(resized, config)


def load_and_preprocess(source: ImageSource, config: ImagePreprocessConfig | None = None) -> np.ndarray:
    """:func:`load_image` followed by :func:`preprocess_image`; returns float32 ``[3, size, size]``."""
    config = config or ImagePreprocessConfig()
    return preprocess_image(load_image(source, config), config)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "ImagePreprocessConfig",
    "ImageWarning",
    "load_and_preprocess",
    "load_image",
    "preprocess_image",
    "preprocess_images",
    "scale_to_uint8",
]

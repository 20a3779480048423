"""Pixels to JPEG or PNG for the WADO-RS ``rendered`` and ``thumbnail`` resources.

PS3.18 section 9.5 (rendered resources) and 8.3.5.1 (query parameters
``window``, ``viewport``, ``quality``). A rendering is the presentation a
viewer would show: stored values through the Modality LUT (PS3.3 C.11.1),
then a VOI window (C.11.2) to 8 bits, MONOCHROME1 inverted; colour images as
RGB. The window comes from the request, else from the dataset (its first
Window Center / Width, per frame for enhanced multi-frame images), else from
the frame's own range.

Pure and blocking: ``render`` takes a dataset whose pixel data is already
uncompressed and returns the encoded bytes, with no I/O. Decoding and scaling
a large frame takes tens of milliseconds of CPU, so the web layer calls it in a
worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from decimal import Decimal
from io import BytesIO
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.pixels.utils import pixel_array

from engine.errors import EngineError

log = logging.getLogger(__name__)

JPEG = "image/jpeg"
PNG = "image/png"
# The rendered media types this module encodes (PS3.18 also names GIF, JPEG 2000, ...).
MEDIA_TYPES = frozenset({JPEG, PNG})
_PILLOW_FORMATS = {JPEG: "JPEG", PNG: "PNG"}

DEFAULT_QUALITY = 90
MIN_QUALITY = 1
MAX_QUALITY = 100

# A thumbnail is a rendering scaled to fit this box unless the request gives a viewport.
THUMBNAIL_SIZE = 128

# Rendered output is 8 bits per sample.
_OUTPUT_BITS = 8
_OUTPUT_MAX = 2**_OUTPUT_BITS - 1
# 16-bit palette entries keep their top 8 bits (RGB samples shift by their Bits Stored).
_PALETTE_16_BIT_SHIFT = 8
# PS3.3 C.11.2.1.2: a LINEAR window is at least one unit wide.
_MIN_LINEAR_WIDTH = 1.0
# PS3.3 C.11.2.1.3.1: the SIGMOID function's slope factor.
_SIGMOID_SLOPE = 4.0
# A decoded frame is rows x columns, with a third axis of samples for colour.
_PLANE_AXES = 2
_COLOUR_AXES = 3
_COLOUR_SAMPLES = 3
# Two window values; a third, the function, is optional (PS3.18 8.3.5.1.4).
_WINDOW_VALUES = (2, 3)
_WINDOW_FUNCTION = "linear"
# ``vw,vh``; the source-rectangle form ``vw,vh,sx,sy,sw,sh`` is not supported.
_VIEWPORT_VALUES = 2

_GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
# pydicom's decoder returns these as RGB already (its default ``as_rgb``), subsampling
# removed, so no colour conversion is left to do here.
_DECODED_AS_RGB = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422"})
_PALETTE = "PALETTE COLOR"
_PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

FloatArray = npt.NDArray[np.float64]
ByteArray = npt.NDArray[np.uint8]


class RenderError(EngineError):
    """The rendering cannot be made; the message says why, fit for a 400 answer.

    Bad query parameters, a frame that does not exist, a photometric
    interpretation that has no rendering, pixel data that cannot be read.
    """


@dataclass(frozen=True)
class Rendering:
    """What a request asks for; checked when built so that ``render`` gets valid values.

    ``window`` is (center, width) in the Modality LUT's output units (Hounsfield
    units for CT); ``None`` takes the dataset's own. ``viewport`` is the box the
    image must fit in, scaled down with its aspect ratio kept, never up.
    """

    media_type: str
    frame: int = 1
    window: tuple[float, float] | None = None
    viewport: tuple[int, int] | None = None
    quality: int = DEFAULT_QUALITY

    def __post_init__(self) -> None:
        if self.media_type not in MEDIA_TYPES:
            raise RenderError(
                f"media type {self.media_type!r} is not rendered; use one of "
                + ", ".join(sorted(MEDIA_TYPES))
            )
        if self.frame < 1:
            raise RenderError(f"frame numbers start at 1, not {self.frame}")
        if self.window is not None:
            _check_window(*self.window)
        if self.viewport is not None and min(self.viewport) < 1:
            raise RenderError(f"viewport {self.viewport} must be at least 1 x 1")
        if not MIN_QUALITY <= self.quality <= MAX_QUALITY:
            raise RenderError(f"quality {self.quality} is outside {MIN_QUALITY}..{MAX_QUALITY}")


def thumbnail(rendering: Rendering) -> Rendering:
    """The rendering for a ``thumbnail`` resource: the request's viewport, else the default box."""
    if rendering.viewport is not None:
        return rendering
    return replace(rendering, viewport=(THUMBNAIL_SIZE, THUMBNAIL_SIZE))


def parse_window(text: str) -> tuple[float, float]:
    """``center,width[,function]`` from a ``window`` query parameter, as (center, width).

    Only the ``linear`` function (PS3.3 C.11.2.1.2) is rendered: the others
    would need the function carried to ``render``, and no viewer asks for them.
    """
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in _WINDOW_VALUES:
        raise RenderError(f"window {text!r} is not center,width[,function]")
    if len(parts) == max(_WINDOW_VALUES) and parts[-1].lower() != _WINDOW_FUNCTION:
        raise RenderError(
            f"window function {parts[-1]!r} is not supported; only {_WINDOW_FUNCTION!r}"
        )
    center, width = (_finite(part, "window") for part in parts[:2])
    _check_window(center, width)
    return center, width


def parse_viewport(text: str) -> tuple[int, int]:
    """``vw,vh`` from a ``viewport`` query parameter: the box to fit the image in."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != _VIEWPORT_VALUES:
        raise RenderError(f"viewport {text!r} is not width,height")
    try:
        width, height = (int(part) for part in parts)
    except ValueError:
        raise RenderError(f"viewport {text!r} is not two whole numbers") from None
    if min(width, height) < 1:
        raise RenderError(f"viewport {text!r} must be at least 1,1")
    return width, height


def parse_quality(text: str) -> int:
    """The ``quality`` query parameter: a whole number 1-100 (JPEG only; PNG is lossless)."""
    try:
        quality = int(text.strip())
    except ValueError:
        raise RenderError(f"quality {text!r} is not a whole number") from None
    if not MIN_QUALITY <= quality <= MAX_QUALITY:
        raise RenderError(f"quality {text!r} is outside {MIN_QUALITY}..{MAX_QUALITY}")
    return quality


def render(ds: Dataset, rendering: Rendering) -> bytes:
    """Encode one frame of ``ds`` as the rendering asks; ``RenderError`` when it cannot.

    ``ds`` must hold uncompressed pixel data (the caller decompresses, which also
    turns JPEG and JPEG 2000 YBR colour into RGB). Only the requested frame is
    decoded.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    index = _frame_index(ds, rendering.frame)
    frame = _read_frame(ds, index)
    if photometric in _GRAYSCALE:
        pixels = _render_grayscale(ds, index, frame, photometric, rendering.window)
    elif photometric in _DECODED_AS_RGB or photometric == _PALETTE:
        if rendering.window is not None:
            log.debug("window ignored: %s is a colour image", photometric)
        pixels = _render_colour(ds, frame, photometric)
    else:
        raise RenderError(
            f"photometric interpretation {photometric or '(none)'!r} has no rendering"
        )
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if rendering.viewport is not None:
        image.thumbnail(rendering.viewport, Image.Resampling.LANCZOS)
    out = BytesIO()
    if rendering.media_type == JPEG:
        image.save(out, format=_PILLOW_FORMATS[JPEG], quality=rendering.quality)
    else:
        image.save(out, format=_PILLOW_FORMATS[rendering.media_type])
    return out.getvalue()


def _finite(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RenderError(f"{name} value {text!r} is not a number") from None
    if not math.isfinite(value):
        raise RenderError(f"{name} value {text!r} is not a finite number")
    return value


def _check_window(center: float, width: float) -> None:
    if not (math.isfinite(center) and math.isfinite(width)):
        raise RenderError(f"window {center},{width} is not finite")
    if width < _MIN_LINEAR_WIDTH:
        raise RenderError(f"window width {width} is below {_MIN_LINEAR_WIDTH:g}")


def _frame_index(ds: Dataset, frame: int) -> int:
    """The 0-based index of a 1-based frame number, checked against Number of Frames."""
    try:
        count = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise RenderError(f"Number of Frames {ds.NumberOfFrames!r} is not a number") from None
    if not 1 <= frame <= count:
        raise RenderError(f"frame {frame} does not exist: the image has {count} frame(s)")
    return frame - 1


def _read_frame(ds: Dataset, index: int) -> npt.NDArray[Any]:
    """One decoded frame; pydicom's errors (missing elements, short data) become ours."""
    if not any(keyword in ds for keyword in _PIXEL_DATA):
        raise RenderError("the instance has no pixel data")
    try:
        return pixel_array(ds, index=index)
    except Exception as exc:
        raise RenderError(f"the pixel data cannot be read: {exc}") from exc


def _frame_macro(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """The first item of a functional group macro for a frame: per-frame first, then shared.

    Enhanced multi-frame images (PS3.3 C.7.6.16) keep rescale and window there
    rather than at the top level.
    """
    groups: list[Dataset] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        sequence = group.get(keyword)
        if sequence:
            item: Dataset = sequence[0]
            return item
    return None


def _first(value: object) -> float | None:
    """The first of a possibly multi-valued numeric element (VOI has one per view)."""
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    # DS values are DSfloat or DSdecimal, IS values int; a bad value read leniently is a str.
    if not isinstance(value, int | float | Decimal | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _modality(ds: Dataset, index: int, frame: npt.NDArray[Any]) -> FloatArray:
    """Stored values to modality values (PS3.3 C.11.1): rescale, or the Modality LUT."""
    source = _frame_macro(ds, index, "PixelValueTransformationSequence")
    if source is not None:
        slope, intercept = (
            _first(source.get("RescaleSlope")),
            _first(source.get("RescaleIntercept")),
        )
        if slope is not None and intercept is not None:
            return frame.astype(np.float64) * slope + intercept
    try:
        values = apply_modality_lut(frame, ds)
    except Exception as exc:
        raise RenderError(f"the Modality LUT cannot be applied: {exc}") from exc
    return np.asarray(values, dtype=np.float64)


def _render_grayscale(
    ds: Dataset,
    index: int,
    frame: npt.NDArray[Any],
    photometric: str,
    window: tuple[float, float] | None,
) -> ByteArray:
    if frame.ndim != _PLANE_AXES:
        raise RenderError(f"{photometric} pixel data is not one sample per pixel")
    values = _modality(ds, index, frame)
    function = "LINEAR"
    if window is None:
        source = _frame_macro(ds, index, "FrameVOILUTSequence") or ds
        center = _first(source.get("WindowCenter"))
        width = _first(source.get("WindowWidth"))
        function = str(source.get("VOILUTFunction") or "LINEAR").strip().upper()
        if center is not None and width is not None and width > 0:
            window = (center, width)
        elif center is not None or width is not None:
            log.debug("ignoring window %s/%s: the frame's range is used", center, width)
    if window is None:
        function = "LINEAR"
        low, high = float(values.min()), float(values.max())
        if low == high:
            # A blank frame: nothing to stretch; it shows as its lowest value would.
            out = np.zeros(values.shape, dtype=np.uint8)
            return _invert(out) if photometric == "MONOCHROME1" else out
        window = ((low + high) / 2, high - low)
    out = _voi(values, *window, function)
    return _invert(out) if photometric == "MONOCHROME1" else out


def _voi(values: FloatArray, center: float, width: float, function: str) -> ByteArray:
    """A window to 0..255 with the VOI LUT Function of PS3.3 C.11.2.1.2 and C.11.2.1.3."""
    if function == "SIGMOID":
        scaled = _OUTPUT_MAX / (1 + np.exp(-_SIGMOID_SLOPE * (values - center) / width))
    elif function == "LINEAR_EXACT":
        scaled = ((values - center) / width + 0.5) * _OUTPUT_MAX
    else:
        if function != "LINEAR":
            log.debug("VOI LUT Function %r is unknown; LINEAR is used", function)
        if width <= _MIN_LINEAR_WIDTH:
            # A one-unit window is a threshold: the formula's divisor (w - 1) is zero.
            scaled = np.where(values > center - 0.5, float(_OUTPUT_MAX), 0.0)
        else:
            scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * _OUTPUT_MAX
    # Clipping is the standard's "below the window: y min, above: y max".
    out: ByteArray = np.rint(np.clip(scaled, 0, _OUTPUT_MAX)).astype(np.uint8)
    return out


def _invert(pixels: ByteArray) -> ByteArray:
    """MONOCHROME1: the lowest value is white."""
    inverted: ByteArray = (_OUTPUT_MAX - pixels).astype(np.uint8)
    return inverted


def _render_colour(ds: Dataset, frame: npt.NDArray[Any], photometric: str) -> ByteArray:
    if photometric == _PALETTE:
        if frame.ndim != _PLANE_AXES:
            raise RenderError("PALETTE COLOR pixel data is not one sample per pixel")
        try:
            rgb = apply_color_lut(frame, ds)
        except Exception as exc:
            raise RenderError(f"the palette cannot be applied: {exc}") from exc
        rgb = rgb[..., :_COLOUR_SAMPLES]  # a palette with alpha: the alpha is dropped
        if rgb.dtype != np.uint8:
            # 16-bit palette entries span 0..65535 (PS3.3 C.7.6.3.1.6).
            rgb = (rgb >> _PALETTE_16_BIT_SHIFT).astype(np.uint8)
        return np.asarray(rgb, dtype=np.uint8)
    if frame.ndim != _COLOUR_AXES or frame.shape[-1] != _COLOUR_SAMPLES:
        raise RenderError(f"{photometric} pixel data is not three samples per pixel")
    if frame.dtype == np.uint8:
        return np.asarray(frame, dtype=np.uint8)
    bits_stored = int(ds.get("BitsStored") or frame.dtype.itemsize * _OUTPUT_BITS)
    shift = max(bits_stored - _OUTPUT_BITS, 0)
    return np.asarray(np.clip(frame.astype(np.int64) >> shift, 0, _OUTPUT_MAX), dtype=np.uint8)

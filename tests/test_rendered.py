"""WADO-RS rendering: synthetic images in, decoded JPEG/PNG pixels checked.

The CT is a column gradient in Hounsfield units (-600 + 20 per column, stored
with Rescale Intercept -1024), so every column has a known value and the
expected grey level follows from PS3.3 C.11.2.1.2 by hand.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian

from engine.web.rendered import (
    JPEG,
    PNG,
    THUMBNAIL_SIZE,
    RenderError,
    Rendering,
    parse_quality,
    parse_viewport,
    parse_window,
    render,
    thumbnail,
)

SIZE = 64
INTERCEPT = -1024
HU_START = -600
HU_STEP = 20
# Window 40/400 covers -160..240 HU: columns 22..42 of the gradient.
CENTER, WIDTH = 40.0, 400.0
CENTER_COLUMN = (40 - HU_START) // HU_STEP  # 40 HU


def hu(column: int) -> int:
    return HU_START + HU_STEP * column


def linear(value: float, center: float, width: float) -> int:
    """PS3.3 C.11.2.1.2 to 0..255, written out independently of the module."""
    if value <= center - 0.5 - (width - 1) / 2:
        return 0
    if value > center - 0.5 + (width - 1) / 2:
        return 255
    return round(((value - (center - 0.5)) / (width - 1) + 0.5) * 255)


def image(pixels: npt.NDArray[Any], photometric: str, bits_stored: int, **elements: Any) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def ct(photometric: str = "MONOCHROME2", **elements: Any) -> Dataset:
    row = np.array([hu(column) - INTERCEPT for column in range(SIZE)], dtype=np.int16)
    pixels = np.tile(row, (SIZE, 1))
    defaults: dict[str, Any] = {
        "RescaleIntercept": INTERCEPT,
        "RescaleSlope": 1,
        "WindowCenter": CENTER,
        "WindowWidth": WIDTH,
    }
    return image(pixels, photometric, 12, **(defaults | elements))


def decode(data: bytes, expected_format: str) -> Image.Image:
    img = Image.open(BytesIO(data))
    assert img.format == expected_format
    img.load()
    return img


def pixels(data: bytes, expected_format: str = "PNG") -> npt.NDArray[Any]:
    return np.asarray(decode(data, expected_format))


# -- grayscale ---------------------------------------------------------------------------


def test_ct_png_uses_the_dataset_window() -> None:
    out = pixels(render(ct(), Rendering(PNG)))
    assert out.shape == (SIZE, SIZE)
    assert out.dtype == np.uint8
    assert (out == out[0]).all(), "every row of the gradient renders the same"
    row = out[0]
    below = [c for c in range(SIZE) if hu(c) < CENTER - WIDTH / 2]
    above = [c for c in range(SIZE) if hu(c) > CENTER + WIDTH / 2]
    assert below and above
    assert (row[below] == 0).all()
    assert (row[above] == 255).all()
    assert abs(int(row[CENTER_COLUMN]) - 128) <= 1
    for column in range(SIZE):
        assert row[column] == linear(hu(column), CENTER, WIDTH), column
    assert (np.diff(row.astype(int)) >= 0).all()


def test_request_window_overrides_the_dataset() -> None:
    ds = ct()
    default = pixels(render(ds, Rendering(PNG)))[0]
    narrow = pixels(render(ds, Rendering(PNG, window=(0.0, 100.0))))[0]
    for column in range(SIZE):
        assert narrow[column] == linear(hu(column), 0.0, 100.0), column
    hundred = (100 - HU_START) // HU_STEP
    assert narrow[hundred] == 255
    assert 0 < default[hundred] < 255


def test_without_a_window_the_frame_range_is_stretched() -> None:
    ds = ct()
    del ds.WindowCenter, ds.WindowWidth
    row = pixels(render(ds, Rendering(PNG)))[0]
    assert row[0] == 0
    assert row[-1] == 255
    assert (np.diff(row.astype(int)) > 0).all()


def test_dataset_voi_lut_function() -> None:
    ds = ct(VOILUTFunction="SIGMOID")
    row = pixels(render(ds, Rendering(PNG)))[0]
    assert abs(int(row[CENTER_COLUMN]) - 128) <= 1
    # Sigmoid never quite reaches the ends: one width above the centre is 255 / (1 + e^-4).
    one_width_up = (int(CENTER + WIDTH) - HU_START) // HU_STEP
    assert row[one_width_up] == round(255 / (1 + np.exp(-4)))
    assert 0 < row[CENTER_COLUMN - 10] < row[CENTER_COLUMN]


def test_monochrome1_is_inverted() -> None:
    normal = pixels(render(ct(), Rendering(PNG)))
    inverted = pixels(render(ct("MONOCHROME1"), Rendering(PNG)))
    assert (inverted == 255 - normal).all()
    assert inverted[0, 0] == 255
    assert inverted[0, -1] == 0


def test_multi_frame_picks_the_frame() -> None:
    values = [100, 200, 300]
    frames = np.stack([np.full((8, 8), value, dtype=np.uint16) for value in values])
    ds = image(frames, "MONOCHROME2", 12, WindowCenter=200, WindowWidth=400)
    assert ds.NumberOfFrames == len(values)
    for number, value in enumerate(values, 1):
        out = pixels(render(ds, Rendering(PNG, frame=number)))
        assert out.shape == (8, 8)
        assert (out == linear(value, 200, 400)).all(), number
    assert linear(100, 200, 400) < linear(200, 200, 400) < linear(300, 200, 400)


@pytest.mark.parametrize("frame", [2, 4, 99])
def test_frame_out_of_range(frame: int) -> None:
    ds = ct() if frame == 2 else image(np.zeros((3, 4, 4), np.uint8), "MONOCHROME2", 8)
    with pytest.raises(RenderError, match=f"frame {frame} does not exist"):
        render(ds, Rendering(PNG, frame=frame))


def test_enhanced_multi_frame_uses_functional_groups() -> None:
    row = np.array([hu(column) - INTERCEPT for column in range(SIZE)], dtype=np.uint16)
    frames = np.stack([np.tile(row, (4, 1))] * 2)
    ds = image(frames, "MONOCHROME2", 12)

    def item(**elements: Any) -> Dataset:
        out = Dataset()
        for keyword, value in elements.items():
            setattr(out, keyword, value)
        return out

    rescale = item(RescaleIntercept=INTERCEPT, RescaleSlope=1, RescaleType="HU")
    ds.SharedFunctionalGroupsSequence = [item(PixelValueTransformationSequence=[rescale])]
    ds.PerFrameFunctionalGroupsSequence = [
        item(FrameVOILUTSequence=[item(WindowCenter=CENTER, WindowWidth=WIDTH)]),
        item(FrameVOILUTSequence=[item(WindowCenter=0, WindowWidth=100)]),
    ]
    first = pixels(render(ds, Rendering(PNG, frame=1)))[0]
    second = pixels(render(ds, Rendering(PNG, frame=2)))[0]
    for column in range(SIZE):
        assert first[column] == linear(hu(column), CENTER, WIDTH), column
        assert second[column] == linear(hu(column), 0, 100), column


# -- encoding and size -------------------------------------------------------------------


def test_jpeg_decodes_with_the_right_size_and_values() -> None:
    ds = ct()
    img = decode(render(ds, Rendering(JPEG)), "JPEG")
    assert img.size == (SIZE, SIZE)
    assert img.mode == "L"
    row = np.asarray(img)[SIZE // 2].astype(int)
    expected = np.array([linear(hu(column), CENTER, WIDTH) for column in range(SIZE)])
    assert np.abs(row - expected).max() <= 8  # lossy, but the same picture


def test_jpeg_quality_changes_the_encoding() -> None:
    ds = ct()
    del ds.WindowCenter, ds.WindowWidth
    noisy = np.random.default_rng(1).integers(0, 4096, (SIZE, SIZE), dtype=np.uint16)
    ds.set_pixel_data(noisy, "MONOCHROME2", 12)
    low = render(ds, Rendering(JPEG, quality=10))
    high = render(ds, Rendering(JPEG, quality=95))
    assert len(low) < len(high)


def test_viewport_scales_down_keeping_the_aspect_ratio() -> None:
    ds = ct()
    assert decode(render(ds, Rendering(PNG, viewport=(32, 16))), "PNG").size == (16, 16)
    wide = image(np.zeros((32, 64), np.uint8), "MONOCHROME2", 8)
    assert decode(render(wide, Rendering(JPEG, viewport=(16, 16))), "JPEG").size == (16, 8)


def test_viewport_never_scales_up() -> None:
    out = decode(render(ct(), Rendering(PNG, viewport=(1000, 500))), "PNG")
    assert out.size == (SIZE, SIZE)


def test_downscaled_gradient_keeps_its_ends() -> None:
    row = pixels(render(ct(), Rendering(PNG, viewport=(16, 16))))[0]
    assert row[0] == 0
    assert row[-1] == 255


def test_thumbnail_default_viewport() -> None:
    big = image(np.zeros((256, 512), np.uint8), "MONOCHROME2", 8)
    img = decode(render(big, thumbnail(Rendering(JPEG))), "JPEG")
    assert img.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE // 2)
    assert thumbnail(Rendering(JPEG, viewport=(10, 20))).viewport == (10, 20)


# -- colour ------------------------------------------------------------------------------

COLOURS = np.array(
    [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]],
    dtype=np.uint8,
)


def colour_blocks() -> npt.NDArray[np.uint8]:
    """Four 8x8 blocks of red, green, blue and white."""
    return np.repeat(np.repeat(COLOURS, 8, axis=0), 8, axis=1)


def test_rgb_renders_its_colours() -> None:
    ds = image(colour_blocks(), "RGB", 8)
    out = pixels(render(ds, Rendering(PNG)))
    assert out.shape == (16, 16, 3)
    assert (out == colour_blocks()).all()


def test_colour_ignores_a_window() -> None:
    ds = image(colour_blocks(), "RGB", 8)
    assert render(ds, Rendering(PNG, window=(10.0, 20.0))) == render(ds, Rendering(PNG))


def test_rgb_jpeg_keeps_its_colours() -> None:
    ds = image(colour_blocks(), "RGB", 8)
    img = decode(render(ds, Rendering(JPEG, quality=100)), "JPEG")
    assert img.mode == "RGB"
    # Block centres, away from the chroma-subsampled edges.
    for row, column in [(4, 4), (4, 12), (12, 4), (12, 12)]:
        got = np.asarray(img)[row, column].astype(int)
        assert np.abs(got - colour_blocks()[row, column]).max() <= 10


def test_ybr_full_is_converted_to_rgb() -> None:
    ybr = convert_color_space(colour_blocks(), "RGB", "YBR_FULL")
    ds = image(ybr, "YBR_FULL", 8)
    out = pixels(render(ds, Rendering(PNG))).astype(int)
    assert np.abs(out - colour_blocks()).max() <= 2


def test_16_bit_rgb_keeps_its_top_bits() -> None:
    ds = image(colour_blocks().astype(np.uint16) << 4, "RGB", 12)
    assert (pixels(render(ds, Rendering(PNG))) == colour_blocks()).all()


def test_palette_color() -> None:
    entries = 256
    ramp = np.arange(entries, dtype=np.uint16) * 257
    ds = image(np.array([[0, 255], [128, 0]], np.uint8), "PALETTE COLOR", 8)
    descriptor = [entries, 0, 16]
    ds.RedPaletteColorLookupTableDescriptor = descriptor
    ds.GreenPaletteColorLookupTableDescriptor = descriptor
    ds.BluePaletteColorLookupTableDescriptor = descriptor
    ds.RedPaletteColorLookupTableData = ramp.tobytes()
    ds.GreenPaletteColorLookupTableData = np.zeros(entries, np.uint16).tobytes()
    ds.BluePaletteColorLookupTableData = (65535 - ramp).tobytes()
    out = pixels(render(ds, Rendering(PNG)))
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [0, 0, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert out[1, 0].tolist() == [128, 0, 127]


# -- refusals ----------------------------------------------------------------------------


def test_unsupported_photometric_interpretation() -> None:
    ds = image(colour_blocks(), "RGB", 8)
    ds.PhotometricInterpretation = "HSV"
    with pytest.raises(RenderError, match="'HSV' has no rendering"):
        render(ds, Rendering(PNG))


def test_missing_pixel_data() -> None:
    ds = ct()
    del ds.PixelData
    with pytest.raises(RenderError, match="no pixel data"):
        render(ds, Rendering(PNG))


def test_short_pixel_data() -> None:
    ds = ct()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(RenderError, match="cannot be read"):
        render(ds, Rendering(PNG))


@pytest.mark.parametrize(
    "arguments",
    [
        {"media_type": "image/gif"},
        {"media_type": PNG, "frame": 0},
        {"media_type": JPEG, "quality": 0},
        {"media_type": JPEG, "quality": 101},
        {"media_type": PNG, "window": (40.0, 0.5)},
        {"media_type": PNG, "window": (float("nan"), 400.0)},
        {"media_type": PNG, "viewport": (0, 10)},
    ],
)
def test_bad_rendering(arguments: dict[str, Any]) -> None:
    with pytest.raises(RenderError):
        Rendering(**arguments)


# -- query parameters --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("40,400", (40.0, 400.0)),
        (" -600.5 , 1500 ", (-600.5, 1500.0)),
        ("40,400,linear", (40.0, 400.0)),
        ("40,400,LINEAR", (40.0, 400.0)),
        ("1e2,1", (100.0, 1.0)),
    ],
)
def test_parse_window(text: str, expected: tuple[float, float]) -> None:
    assert parse_window(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "40",
        "40,",
        "40,abc",
        "abc,400",
        "40,400,sigmoid",
        "40,400,linear,extra",
        "40,0",
        "40,-5",
        "nan,400",
        "40,inf",
    ],
)
def test_parse_window_refuses(text: str) -> None:
    with pytest.raises((RenderError, ValueError)):
        parse_window(text)


def test_parse_window_names_the_function() -> None:
    with pytest.raises(RenderError, match="'sigmoid' is not supported"):
        parse_window("40,400,sigmoid")


@pytest.mark.parametrize(("text", "expected"), [("32,16", (32, 16)), (" 512 , 512 ", (512, 512))])
def test_parse_viewport(text: str, expected: tuple[int, int]) -> None:
    assert parse_viewport(text) == expected


@pytest.mark.parametrize("text", ["", "32", "a,b", "0,10", "10,-1", "1.5,2", "1,2,0,0,1,1"])
def test_parse_viewport_refuses(text: str) -> None:
    with pytest.raises(RenderError):
        parse_viewport(text)


def test_parse_quality() -> None:
    assert parse_quality("75") == 75
    for text in ["0", "101", "high", ""]:
        with pytest.raises(RenderError):
            parse_quality(text)

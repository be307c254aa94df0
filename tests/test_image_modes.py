"""Page images in modes EasyOCR's own file reader gets wrong: CMYK and 1-bit (bilevel) scans.

EasyOCR's colour reader (skimage) hands CRAFT a CMYK image's C, M and Y channels as R, G and B, so
a print-shop scan whose black ink is all in K is a black page to the detector; a 1-bit PNG is a bool
array that OpenCV cannot convert, so the page was refused as unreadable. Both are read as Pillow
converts them, on generated pages (no real data needed).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from evaluation.reader import Detector, load_image
from training.data.prepare import load_grey


@pytest.fixture(scope="module")
def page_grey(sample_pages) -> np.ndarray:
    with Image.open(sorted(sample_pages.glob("*.jpg"))[0]) as page:
        return np.asarray(page.convert("L"))


def _k_only_cmyk(grey: np.ndarray, path) -> None:
    """The page as a print workflow stores black text: C = M = Y = 0, the ink in K."""
    zeros = np.zeros_like(grey)
    Image.fromarray(np.dstack([zeros, zeros, zeros, 255 - grey]), "CMYK").save(path, quality=95)


def test_a_cmyk_scan_with_its_ink_in_k_is_detected_as_its_grey_page(page_grey, tmp_path):
    _k_only_cmyk(page_grey, tmp_path / "cmyk.jpg")
    Image.fromarray(page_grey).save(tmp_path / "grey.png")
    rgb, grey = load_image(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as shown:
        assert shown.mode == "CMYK"
        want = np.asarray(shown.convert("RGB"))
    # was: the C, M, Y channels as RGB, all 0: a black page, on which CRAFT found no word
    assert np.abs(rgb.astype(int) - want.astype(int)).max() <= 1
    assert np.abs(grey.astype(int) - page_grey.astype(int)).mean() < 2
    detector = Detector()
    found, wanted = detector.detect(rgb), detector.detect(load_image(tmp_path / "grey.png")[0])
    assert len(wanted[0]) > 0
    assert len(found[0]) == len(wanted[0])


def test_a_1_bit_scan_is_read_not_refused(page_grey, tmp_path):
    bilevel = Image.fromarray(page_grey).point(lambda v: 255 if v > 128 else 0).convert("1")
    bilevel.save(tmp_path / "fax.png")
    with Image.open(tmp_path / "fax.png") as stored:
        assert stored.mode == "1"
    rgb, grey = load_image(tmp_path / "fax.png")  # was UnreadableImage: OpenCV cannot convert a bool array
    want = np.asarray(bilevel.convert("L"))
    assert np.array_equal(grey, want) and rgb.shape == (*want.shape, 3)
    assert np.array_equal(load_grey(tmp_path / "fax.png"), want)  # prepare crops the same pixels


@pytest.mark.parametrize("kind", ["lzw", "jpeg", "group4", "rgb16"])
def test_a_tiff_scan_is_read_as_pillow_reads_it(page_grey, tmp_path, kind):
    # EasyOCR's reader (tifffile) refused compressed TIFFs ("requires the 'imagecodecs' package": the page
    # was "not a readable image" to evaluate and predict, while prepare read it) and gave a 16-bit RGB
    # TIFF's samples to CRAFT as they are, 0-65535
    import cv2

    rgb8 = np.dstack([page_grey, page_grey, 255 - page_grey // 2])
    path = tmp_path / f"scan_{kind}.tif"
    if kind == "rgb16":
        cv2.imwrite(str(path), cv2.cvtColor(rgb8, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257,
                    [cv2.IMWRITE_TIFF_COMPRESSION, 1])
        want = rgb8
    elif kind == "group4":
        bilevel = Image.fromarray(page_grey).point(lambda v: 255 if v > 128 else 0).convert("1")
        bilevel.save(path, compression="group4")
        want = np.asarray(bilevel.convert("RGB"))
    else:
        Image.fromarray(rgb8).save(path, compression="tiff_lzw" if kind == "lzw" else "jpeg")
        with Image.open(path) as stored:
            want = np.asarray(stored.convert("RGB"))
    rgb, grey = load_image(path)
    assert rgb.dtype == np.uint8 and np.array_equal(rgb, want)
    assert np.abs(grey.astype(int) - load_grey(path).astype(int)).max() <= 1  # prepare crops the same page


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_page_cut_out_of_its_paper_is_read_over_white_not_black_on_black(page_grey, tmp_path, mode):
    # the paper made transparent and its pixels cleared to (0, 0, 0, 0), as editors and PNG optimisers
    # store them; the ink is not one flat colour. Viewers show the ink on white; EasyOCR dropped the alpha
    # and read dark ink on black (realdata/paddleocr/korean_1.jpg so cut out: every line read as garbage)
    ink = page_grey < 200
    if mode == "RGBA":
        colours = np.dstack([page_grey, page_grey, np.maximum(page_grey, 90)])  # blue-black ink
    else:
        colours = page_grey[..., None]
    cut = np.dstack([np.where(ink[..., None], colours, 0), np.where(ink, 255, 0)]).astype(np.uint8)
    Image.fromarray(cut, mode).save(tmp_path / "cut.png")
    Image.fromarray(np.where(ink[..., None], colours, 255).astype(np.uint8).squeeze()).save(tmp_path / "white.png")
    rgb, grey = load_image(tmp_path / "cut.png")
    want_rgb, want_grey = load_image(tmp_path / "white.png")
    assert np.array_equal(rgb, want_rgb)  # was: the paper black
    assert np.abs(grey.astype(int) - want_grey).max() <= 1  # OpenCV's imread rounds its grey by 1 in a few pixels
    assert np.array_equal(load_grey(tmp_path / "cut.png"), load_grey(tmp_path / "white.png"))  # prepare's crops alike


def test_an_exif_turned_colour_jpeg_is_cropped_from_the_grey_evaluation_reads(tmp_path):
    # prepare decoded it straight to grey (libjpeg's luma) while evaluation converts the turned RGB (as the
    # bundle README's snippet saves it for EasyOCR): up to 30 levels apart at sharp colour edges, so the
    # recogniser was trained on other pixels than it was scored on
    colours = np.zeros((60, 160, 3), np.uint8)
    colours[:, :, 1] = 120  # a green sign
    colours[15:45, 20:140] = 255  # white lettering, its edges sharp against the green
    colours[25:35, 40:120] = (200, 30, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown upright
    Image.fromarray(colours).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", quality=95,
                                                                        exif=exif.tobytes())
    _, grey = load_image(tmp_path / "phone.jpg")
    assert grey.shape == (60, 160)
    assert np.abs(load_grey(tmp_path / "phone.jpg").astype(int) - grey).max() <= 1

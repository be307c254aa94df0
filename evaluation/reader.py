"""End-to-end page reading: CRAFT detection + the platform's recogniser, the way EasyOCR reads.

Detection, box grouping, cropping, contrast retry and decoding are EasyOCR's own functions, called
with the platform's model, so what is evaluated here is what ``easyocr.Reader`` will read with the
exported bundle (``tests/test_export_easyocr.py`` holds the two to the same text).

On CPU both networks run through ``evaluation.fast_cpu`` (NNPACK Winograd CRAFT, exact fast pools),
and boxes with the same padded width share one recogniser pass; the readings stay EasyOCR's
(``tests/test_fast_cpu.py``). ``fast=False`` runs easyocr's own code path, one box at a time.

Example:
    >>> reader = PageReader(load_recognizer("english_g2"))        # doctest: +SKIP
    >>> page = reader.read("scan.jpg")                             # doctest: +SKIP
    >>> [w.text for w in page.words]                               # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.fast_cpu import accelerate
from kocr.easyocr_compat import import_easyocr, offline_model_dir
from training.checkpoint import LoadedRecognizer, ModelSpecError
from training.data.pages import Page, Word, as_written
from training.data.pixels import mend, note_pixels
from training.data.transforms import align_collate, collate_crops


@dataclass(frozen=True)
class DetectorSettings:
    """CRAFT and box-grouping thresholds (``detector:`` in params.yaml); defaults are easyocr.Reader's."""

    text_threshold: float = 0.7
    low_text: float = 0.4
    link_threshold: float = 0.4
    canvas_size: int = 2560
    mag_ratio: float = 1.0
    slope_ths: float = 0.1
    ycenter_ths: float = 0.5
    height_ths: float = 0.5
    width_ths: float = 0.5
    add_margin: float = 0.1
    min_size: int = 20
    contrast_ths: float = 0.1
    adjust_contrast: float = 0.5

    @classmethod
    def from_params(cls, params: dict[str, Any] | None, where: str = "detector") -> "DetectorSettings":
        """The ``detector:`` mapping of params.yaml (``where`` names it in errors); null is every default.

        A key that is not a setting (a typo such as ``widht_ths``, which would silently run with
        EasyOCR's default) and a value that is not a number (``text_threshold: high``, which would fail
        deep inside CRAFT) raise ParamsError naming it; a whole-number setting takes no fraction.
        """
        from kocr.params import section, typed_settings

        values = section({where: params}, where)
        kinds = {f.name: {"float": float, "int": int}[str(f.type)] for f in fields(cls)}
        return cls(**typed_settings(where, values, kinds))

    def readtext_kwargs(self) -> dict[str, Any]:
        """The same settings as keyword arguments of ``easyocr.Reader.readtext``."""
        return asdict(self)

    def changed(self) -> dict[str, Any]:
        """The settings that differ from ``easyocr.Reader.readtext``'s defaults, as its keyword arguments.

        >>> DetectorSettings(width_ths=0.0).changed()
        {'width_ths': 0.0}
        """
        default = asdict(DetectorSettings())
        return {k: v for k, v in asdict(self).items() if v != default[k]}


Boxes = tuple[list[list[int]], list[list[list[float]]]]  # EasyOCR horizontal_list, free_list


class Detector:
    """EasyOCR's CRAFT detector (``craft_mlt_25k.pth``, shipped offline), unquantized.

    ``fast`` (CPU only): the Winograd/folded copy of ``evaluation.fast_cpu``; heatmaps within ~1e-5.
    """

    def __init__(self, settings: DetectorSettings = DetectorSettings(), device: str = "cpu",
                 weights: str | os.PathLike | None = None, fast: bool = True) -> None:
        import_easyocr()
        from easyocr.detection import get_detector

        self.settings, self.device = settings, device
        path = Path(weights or Path(offline_model_dir()) / "craft_mlt_25k.pth")
        self.net = get_detector(str(path), device=device, quantize=False)
        if fast and device == "cpu":
            self.net = accelerate(self.net, winograd=True)

    def detect(self, image: np.ndarray) -> Boxes:
        """Word boxes of an RGB image, grouped as ``easyocr.Reader.detect`` groups them."""
        from easyocr.detection import get_textbox
        from easyocr.utils import diff, group_text_box

        s = self.settings
        polys = get_textbox(self.net, image, canvas_size=s.canvas_size, mag_ratio=s.mag_ratio,
                            text_threshold=s.text_threshold, link_threshold=s.link_threshold,
                            low_text=s.low_text, poly=False, device=self.device, optimal_num_chars=None)
        horizontal, free = group_text_box(polys[0], s.slope_ths, s.ycenter_ths, s.height_ths,
                                          s.width_ths, s.add_margin, True)
        if s.min_size:
            horizontal = [b for b in horizontal if max(b[1] - b[0], b[3] - b[2]) > s.min_size]
            free = [b for b in free if max(diff([c[0] for c in b]), diff([c[1] for c in b])) > s.min_size]
        return horizontal, free


class Recognition:
    """The platform's recogniser driven through EasyOCR's cropping, batching and decoding.

    ``fast`` (CPU only): exact fast pools (weights shared with ``loaded.model``) and one forward pass
    per group of at most ``batch_size`` boxes of equal padded width; ``fast=False``: easyocr's get_text.
    ``decoder`` and ``beam_width`` are ``readtext``'s (``greedy``, what the platform scores, or
    ``beamsearch``; ``bench/decoders.py`` compares them).
    """

    decoder: str = "greedy"
    beam_width: int = 5

    def __init__(self, loaded: LoadedRecognizer, settings: DetectorSettings = DetectorSettings(),
                 device: str = "cpu", fast: bool = True, batch_size: int = 32) -> None:
        if loaded.config.prediction != "ctc":
            raise ModelSpecError(f"{loaded.source}: has an attention (attn) head; pages are read through EasyOCR's "
                                 "CTC decoding, so only CTC models (model.prediction: ctc) can be evaluated end to "
                                 "end or used by kocr predict; the train stage scores attention models on crops")
        easyocr = import_easyocr()
        self.loaded, self.settings, self.device = loaded, settings, device
        self.converter = easyocr.utils.CTCLabelConverter(loaded.charset.chars, {}, {})
        loaded.model.to(device).eval()
        self.fast, self.batch_size = fast and device == "cpu", max(1, int(batch_size))
        self.model = accelerate(loaded.model) if self.fast else loaded.model

    def read_boxes(self, grey: np.ndarray, horizontal: list, free: list) -> list[tuple[Any, str, float]]:
        """(box, text, confidence) per box, in the order and with the readings of ``easyocr.Reader``.

        Each box is cropped on its own by EasyOCR's ``get_image_list`` and keeps its own padded width,
        as on EasyOCR's CPU path; only boxes of equal width share a batch, and the low-contrast retry
        (``contrast_ths``/``adjust_contrast``) and the choice between the two readings are easyocr's.
        """
        if not self.fast:
            return self.read_boxes_easyocr(grey, horizontal, free)
        from easyocr.utils import get_image_list

        imgH, s = self.loaded.config.imgH, self.settings
        crops = []  # (box, crop resized to the model height, padded width)
        for h_list, f_list in [([b], []) for b in horizontal] + [([], [b]) for b in free]:
            image_list, max_width = get_image_list(h_list, f_list, grey, model_height=imgH)
            crops += [(box, crop, int(max_width)) for box, crop in image_list]
        first = self._predict(crops, range(len(crops)), 0.0)
        low = [i for i in range(len(crops)) if first[i][1] < s.contrast_ths]
        retry = self._predict(crops, low, s.adjust_contrast) if low else {}
        results = []
        for i, (box, _, _) in enumerate(crops):
            text, conf = first[i]
            if i in retry and not conf > retry[i][1]:  # easyocr keeps the first reading only if strictly better
                text, conf = retry[i]
            results.append((box, text, conf))
        return results

    def _predict(self, crops: list, indices: Any, contrast: float) -> dict[int, tuple[str, float]]:
        """(text, confidence) of ``crops[i]`` for each index, batched by padded width."""
        from easyocr.recognition import recognizer_predict

        imgH, groups, out = self.loaded.config.imgH, {}, {}
        for i in indices:
            groups.setdefault(crops[i][2], []).append(i)
        for width, members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                batch = collate_crops([(easyocr_input(crops[i][1], imgH, width, contrast), width) for i in chunk], imgH)
                preds = recognizer_predict(self.model, self.converter, [batch.to(self.device)], int(width / 10),
                                           [], {}, self.decoder, self.beam_width, self.device)
                out.update((i, (text, conf)) for i, (text, conf) in zip(chunk, preds))
        return out

    def read_boxes_easyocr(self, grey: np.ndarray, horizontal: list, free: list) -> list[tuple[Any, str, float]]:
        """(box, text, confidence) per box through easyocr's own get_text, one box at a time (the reference)."""
        from easyocr.recognition import get_text
        from easyocr.utils import get_image_list

        imgH, s = self.loaded.config.imgH, self.settings
        results = []
        with warnings.catch_warnings():  # easyocr asks for pinned memory even on CPU
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            for h_list, f_list in [([b], []) for b in horizontal] + [([], [b]) for b in free]:
                image_list, max_width = get_image_list(h_list, f_list, grey, model_height=imgH)
                results += get_text(self.loaded.charset.chars, imgH, int(max_width), self.loaded.model,
                                    self.converter, image_list, "", self.decoder, self.beam_width, 1, s.contrast_ths,
                                    s.adjust_contrast, 0.003, 0, self.device)
        return results


def easyocr_input(crop: np.ndarray, height: int, width: int, contrast: float = 0.0) -> np.ndarray:
    """A crop already resized to ``height`` (by ``get_image_list``) as easyocr's AlignCollate prepares it.

    Optional contrast stretch (``adjust_contrast_grey``), PIL bicubic resize capped at ``width``,
    scaling to [-1, 1]; ``collate_crops`` then pads on the right with the last column.
    """
    from easyocr.recognition import adjust_contrast_grey

    if contrast > 0:
        crop = adjust_contrast_grey(crop, target=contrast)
    return align_collate(crop, height, max_width=width)


class UnreadableImage(ValueError):
    """An image file that does not decode; the message names the file and why."""


def load_image(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, greyscale image) as easyocr.Reader loads a file path, and as a person sees it.

    An ordinary 8-bit image other than a TIFF decodes exactly as in EasyOCR (an uncompressed 8-bit RGB
    TIFF, which Pillow decodes, gets the same colour image and a grey one that OpenCV's own conversion
    rounds differently in a few pixels, by 1). Three kinds it reads wrongly are mended:
    an EXIF orientation (phone photos: EasyOCR's colour image ignores it and its grey one applies it,
    so boxes found in one are cut from the other) is applied to both; 16-bit samples are scaled to
    8 bits (CRAFT found nothing in them); an image with transparent pixels is laid over white, as
    viewers show it (EasyOCR drops alpha and reads the colour stored under it, usually black: a page cut
    out of its paper, or text drawn only in alpha, read as black on black); an opaque grey image with
    alpha is read as its grey (EasyOCR's reader would hand CRAFT two channels). CMYK and 1-bit images
    are read as Pillow converts them (to RGB, to grey), and every TIFF
    is decoded by Pillow (:func:`mended_pixels`)."""
    import_easyocr()
    from easyocr.utils import reformat_input

    check_image_file(path)
    try:
        mended = mended_pixels(Path(path))
        rgb, grey = mended if mended is not None else reformat_input(str(path))
    except Exception as exc:  # decoders raise anything on damaged input: OSError, SyntaxError, struct.error…
        raise UnreadableImage(f"{path}: not a readable image ({_unreadable_why(Path(path), exc)})") from None
    if grey is None:
        raise UnreadableImage(f"{path}: not a readable image")
    return rgb, grey


def check_image_file(path: str | os.PathLike) -> None:
    """Raise as :func:`load_image` does for a path it cannot open: a folder (UnreadableImage), nothing
    there (FileNotFoundError), or a file it may not read (UnreadableImage, ``cannot be read (why)``).
    Opens the file but decodes nothing, so a batch can be checked whole before its first page is read.

    >>> check_image_file("no/such/page.jpg")
    Traceback (most recent call last):
    FileNotFoundError: no/such/page.jpg: image not found
    """
    if Path(path).is_dir():
        raise UnreadableImage(f"{path}: is a folder, not an image")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:  # permissions, I/O
        raise UnreadableImage(f"{path}: cannot be read ({exc.strerror or exc})") from None


def mended_pixels(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(RGB, grey) for an image EasyOCR would read wrongly (EXIF-rotated, 16-bit, transparent, CMYK,
    1-bit, any TIFF), else None.

    A TIFF is always decoded by Pillow: EasyOCR's reader (scikit-image's tifffile) cannot decode the
    compressed TIFFs scanners write (LZW, JPEG, CCITT G4: it wants the imagecodecs package, so the page
    was refused as unreadable), and hands CRAFT a 16-bit RGB TIFF's samples unscaled (0-65535). Pillow
    reads both, as ``prepare`` reads them."""
    import cv2
    from PIL import Image

    with Image.open(path) as image:
        note_pixels(str(path), image.width * image.height)
        upright = mend(image)
        if upright is None:
            if image.format != "TIFF":
                return None
            upright = image
        rgb = np.asarray(upright.convert("RGB"))
    return rgb, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _unreadable_why(path: Path, exc: Exception) -> str:
    """Why ``path`` does not decode, in words: empty, not an image format, truncated, or too large."""
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(exc, Image.DecompressionBombError):
        return f"{exc} Raise PIL.Image.MAX_IMAGE_PIXELS, or scale the image down, to read it"
    try:
        with Image.open(path) as image:
            image.load()
    except UnidentifiedImageError:
        return "corrupt, or not an image"
    except (OSError, SyntaxError, ValueError) as pil_exc:  # PIL's decoders raise all three on a damaged file
        return f"corrupt: {pil_exc}"
    return str(exc)


def results_to_page(image_name: str, grey: np.ndarray, results: list[tuple[Any, str, float]]) -> Page:
    """EasyOCR results (quad, text, confidence) as a prediction page with axis-aligned boxes inside the image.

    Each box is its quad's envelope clipped to the image: a slanted or vertical word's quad (EasyOCR's
    free boxes, cut with a perspective warp) runs past the page's edge where the word is near it, and a
    prediction, read with the same schema as labels, holds no box past the image (scoring clamps boxes
    to it all the same, so scores are unchanged).

    >>> grey = np.zeros((50, 100), np.uint8)
    >>> results_to_page("p.png", grey, [([[-3.5, 40], [90, 20], [104, 48], [10, 61]], "상설", 0.5)]).words[0].bbox
    (0.0, 20.0, 100.0, 30.0)
    """
    height, width = grey.shape[:2]
    words = []
    for quad, text, conf in results:
        xs, ys = [float(p[0]) for p in quad], [float(p[1]) for p in quad]
        x0, y0 = min(max(0.0, min(xs)), width), min(max(0.0, min(ys)), height)
        x1, y1 = max(min(float(width), max(xs)), x0), max(min(float(height), max(ys)), y0)
        # rounded as the prediction file stores it: scored in memory (evaluate) as read back (kocr score);
        # was: a box 4.996 high matched at IoU .4996 short of .5 in evaluate.json, and 5.0 from its file
        words.append(Word(as_written((x0, y0, x1 - x0, y1 - y0)), text, float(conf)))
    return Page(image_name, width, height, words)


class PageReader:
    """Detect and recognise whole pages: ``read(path) -> Page`` in the page-JSON schema."""

    def __init__(self, loaded: LoadedRecognizer, settings: DetectorSettings = DetectorSettings(),
                 device: str = "cpu", detector: Detector | None = None) -> None:
        self.detector = detector or Detector(settings, device)
        self.recognition = Recognition(loaded, settings, device)

    def read(self, path: str | os.PathLike) -> Page:
        rgb, grey = load_image(path)
        horizontal, free = self.detector.detect(rgb)
        return results_to_page(Path(path).name, grey, self.recognition.read_boxes(grey, horizontal, free))

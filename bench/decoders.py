"""EasyOCR's CTC decoders on one recogniser: what ``readtext(decoder=…)`` would read, and how fast.

Each crop of a labels file (``kocr evaluate-crops`` format) is read once by the network, as
``easyocr.Reader.recognize`` reads a whole crop, and its class scores are decoded by each decoder
with easyocr's own ``recognizer_predict``; word accuracy, CER and the seconds spent per decoder are
printed, and the crops each decoder reads differently from the first.

    python bench/decoders.py --labels recipes/ko-base/data/heldout_crops/labels.tsv \
        --model models/base/ko_base.pt --decoders greedy beamsearch:5 beamsearch:20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapidfuzz.distance import Levenshtein  # noqa: E402

from evaluation.reader import easyocr_input  # noqa: E402
from evaluation.score_crops import RecognizerCrops, load_crop, read_labels  # noqa: E402
from kocr.easyocr_compat import import_easyocr  # noqa: E402
from training.data.pages import nfc  # noqa: E402
from training.data.transforms import collate_crops  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="a kocr evaluate-crops labels file")
    parser.add_argument("--model", default="ko_base")
    parser.add_argument("--decoders", nargs="+", default=["greedy", "beamsearch:5"],
                        help="easyocr decoder names, beamsearch with :WIDTH (default 5)")
    parser.add_argument("--show", type=int, default=15, help="differing crops to print per decoder")
    args = parser.parse_args(argv)

    import_easyocr()
    from easyocr.recognition import recognizer_predict
    from easyocr.utils import get_image_list

    crops = read_labels(args.labels)
    recognition = RecognizerCrops(args.model).recognition
    imgH = recognition.loaded.config.imgH
    readings: dict[str, list[str]] = {d: [] for d in args.decoders}
    seconds = dict.fromkeys(args.decoders, 0.0)
    for crop in crops:
        grey = load_crop(crop, args.labels)
        height, width = grey.shape[:2]
        image_list, max_width = get_image_list([[0, width, 0, height]], [], grey, model_height=imgH)
        (_, resized), padded = image_list[0], int(max_width)
        batch = collate_crops([(easyocr_input(resized, imgH, padded), padded)], imgH)
        for spec in args.decoders:
            name, _, beam = spec.partition(":")
            start = time.perf_counter()
            (text, _), = recognizer_predict(recognition.model, recognition.converter, [batch], int(padded / 10),
                                            [], {}, name, int(beam or 5), "cpu")
            seconds[spec] += time.perf_counter() - start
            readings[spec].append(text)
    truth = [nfc(c.text) for c in crops]
    chars = sum(len(t) for t in truth)
    first = args.decoders[0]
    for spec in args.decoders:
        exact = [nfc(r) == t for r, t in zip(readings[spec], truth)]
        errors = sum(Levenshtein.distance(nfc(r), t) for r, t in zip(readings[spec], truth))
        line = (f"{spec}: word accuracy {sum(exact) / len(crops):.3f}, cer {errors / chars:.4f}, "
                f"{seconds[spec]:.1f} s (network and decoding)")
        if spec != first:
            base = [nfc(r) == t for r, t in zip(readings[first], truth)]
            fixed = sum(e and not b for e, b in zip(exact, base))
            broken = sum(b and not e for e, b in zip(exact, base))
            line += f"; against {first}: {fixed} fixed, {broken} broken"
        print(line)
        if spec != first:
            shown = [(t, a, b) for t, a, b in zip(truth, readings[first], readings[spec]) if a != b][:args.show]
            for t, a, b in shown:
                print(f"  {t!r}: {first} {a!r}, {spec} {b!r}")


if __name__ == "__main__":
    main()

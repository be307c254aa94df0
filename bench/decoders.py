"""EasyOCR's CTC decoders on one recogniser: what ``readtext(decoder=…)`` would read, and how fast.

Each crop of a labels file (``kocr evaluate-crops`` format) is read whole, as ``kocr evaluate-crops``
and ``easyocr.Reader.recognize`` read it, once per decoder (``evaluation.reader.Recognition.decoder``,
decoded by easyocr's own ``recognizer_predict``); word accuracy, CER and the seconds spent per decoder
are printed, with the words each decoder fixes and breaks against the first and the crops it reads
differently.

    python bench/decoders.py --labels recipes/ko-base/data/heldout_crops/labels.tsv \
        --model models/base/ko_base.pt --decoders greedy beamsearch:5 beamsearch:20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.metrics import paired_words, recognition_scores  # noqa: E402
from evaluation.score_crops import RecognizerCrops, load_crop, read_labels  # noqa: E402


DECODERS = ("greedy", "beamsearch", "wordbeamsearch")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="a kocr evaluate-crops labels file")
    parser.add_argument("--model", default="ko_base")
    parser.add_argument("--decoders", nargs="+", default=["greedy", "beamsearch:5"],
                        help="easyocr decoder names, beamsearch with :WIDTH (default 5)")
    parser.add_argument("--show", type=int, default=15, help="differing crops to print per decoder")
    args = parser.parse_args(argv)
    for spec in args.decoders:  # easyocr fails deep inside on a name it does not know
        name, _, beam = spec.partition(":")
        if name not in DECODERS or (beam and not beam.isdigit()):
            parser.error(f"--decoders {spec!r}: expected one of {', '.join(DECODERS)}, beamsearch and "
                         "wordbeamsearch with an optional :WIDTH (a whole number)")

    crops = read_labels(args.labels)
    greys = [load_crop(crop, args.labels) for crop in crops]
    truth = [crop.text for crop in crops]
    engine = RecognizerCrops(args.model)  # reads a crop as `kocr evaluate-crops` does, with the decoder set below
    first, readings = args.decoders[0], {}
    for spec in args.decoders:
        name, _, beam = spec.partition(":")
        engine.recognition.decoder, engine.recognition.beam_width = name, int(beam or 5)
        start = time.perf_counter()
        readings[spec] = [engine.read(grey) for grey in greys]
        seconds = time.perf_counter() - start
        scores = recognition_scores(truth, readings[spec])
        line = (f"{spec}: word accuracy {scores['word_accuracy']:.3f}, cer {scores['cer']:.4f}, "
                f"{seconds:.1f} s (network and decoding)")
        if spec != first:
            paired = paired_words(truth, readings[first], readings[spec])
            line += f"; against {first}: {paired['fixed']} fixed, {paired['broken']} broken"
        print(line)
        if spec != first:
            shown = [(t, a, b) for t, a, b in zip(truth, readings[first], readings[spec]) if a != b][:args.show]
            for t, a, b in shown:
                print(f"  {t!r}: {first} {a!r}, {spec} {b!r}")


if __name__ == "__main__":
    main()

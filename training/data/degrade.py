"""Scan-like degradations for synthetic text images (word lines and whole pages).

Each effect takes a float32 image in [0, 255] (H x W grey or H x W x 3 RGB) and a seeded
``numpy.random.Generator`` and returns a new image; nothing moves text (no geometry), so word
boxes stay valid. ``apply`` runs the enabled effects of a ``DegradeConfig`` in a fixed order and
draws the same number of random values whatever happens, so one seed always gives one result.

Effects: ink bleed, highlighter strokes, scribbles over text, underline (needs word boxes), low
contrast, blur, Gaussian noise, JPEG artefacts.

Example:
    >>> import numpy as np
    >>> image = np.full((32, 96), 250, np.float32); image[10:22, 10:80] = 20
    >>> out = apply(image, np.random.default_rng(0), DegradeConfig.from_params("strong"))
    >>> out.shape, out.dtype
    ((32, 96), dtype('float32'))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from kocr.params import ParamsError

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)

# Effect name -> its range parameter and default range. Order is the order ``apply`` runs them.
EFFECTS: dict[str, tuple[str, tuple[float, float]]] = {
    "ink_bleed": ("strength", (0.4, 0.8)),
    "highlighter": ("opacity", (0.55, 0.85)),
    "scribble": ("strokes", (1, 2)),
    "underline": ("thickness", (0.05, 0.09)),  # fraction of the word's height
    "low_contrast": ("keep", (0.35, 0.7)),  # share of the ink-to-paper contrast kept
    "blur": ("sigma", (0.4, 1.2)),
    "noise": ("sigma", (2.0, 8.0)),
    "jpeg": ("quality", (25, 70)),
}
# Effect name -> the interval its range must lie in: (lo, hi, lo excluded?).
LIMITS: dict[str, tuple[float, float, bool]] = {
    "ink_bleed": (0.0, 1.0, False),
    "highlighter": (0.0, 1.0, False),
    "scribble": (1.0, 50.0, False),
    "underline": (0.0, 1.0, True),
    "low_contrast": (0.0, 1.0, True),
    "blur": (0.0, 50.0, True),
    "noise": (0.0, 255.0, False),
    "jpeg": (1.0, 100.0, False),
}
HIGHLIGHTER_COLOURS = ((255, 236, 80), (150, 240, 140), (255, 160, 205), (150, 210, 255))
PEN_COLOURS = ((25, 30, 110), (20, 20, 25), (170, 30, 35))


class SynthConfigError(ParamsError):
    """A synthetic-data setting (degradations, synth_lines, sample) that cannot work; names the file and key."""


@dataclass(frozen=True)
class Effect:
    """One degradation: applied with probability ``p``, its strength drawn uniformly from ``span``."""

    p: float = 0.0
    span: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class DegradeConfig:
    """Probability and strength range of every effect; ``DegradeConfig()`` disables them all."""

    effects: Mapping[str, Effect] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return any(e.p > 0 for e in self.effects.values())

    def effect(self, name: str) -> Effect:
        return self.effects.get(name, Effect(0.0, EFFECTS[name][1]))

    def as_params(self) -> dict[str, dict[str, Any]] | str:
        """Flat, loggable view: effect -> {p, span}; ``off`` when no effect can happen (every spelling of
        off, or every probability 0, which draws the images off draws), as ``logged`` writes
        ``sample.degrade: off``, not ``{}``."""
        if not self.enabled:
            return "off"
        return {k: {"p": e.p, "span": list(e.span)} for k, e in self.effects.items()}

    @classmethod
    def preset(cls, name: str) -> "DegradeConfig":
        """``off``, ``mild`` (light scanner wear) or ``strong`` (every effect, often)."""
        if name not in PRESETS:
            raise SynthConfigError(f"unknown degrade preset {name!r}; known: {', '.join(PRESETS)}")
        return cls({k: Effect(p, EFFECTS[k][1]) for k, p in PRESETS[name].items()})

    @classmethod
    def from_params(cls, value: Any, where: str = "degrade") -> "DegradeConfig":
        """Build from params.yaml: ``off``/``false``/null (PyYAML reads a bare ``off`` as false), a preset
        name, or a mapping.

        A mapping may name a ``preset`` to start from and override effects, each either a
        probability or ``{p: 0.3, <range key>: [lo, hi]}`` (range keys in ``EFFECTS``), e.g.
        ``{preset: mild, jpeg: {p: 0.5, quality: [20, 50]}, scribble: 0}``.
        Unknown keys raise SynthConfigError naming ``where`` and the key.
        """
        if _off(value):
            return cls()
        if isinstance(value, str):
            return cls.preset(value)
        if not isinstance(value, Mapping):
            raise SynthConfigError(f"{where}: expected a preset name or a mapping, got {_shown(value)}")
        preset = value.get("preset", "off")
        if preset is True:
            raise SynthConfigError(f"{where}.preset: expected a preset name ({', '.join(PRESETS)}), got {_shown(True)}")
        base = cls.preset("off" if _off(preset) else str(preset))
        effects = dict(base.effects)
        for name, spec in value.items():
            if name == "preset":
                continue
            if name not in EFFECTS:
                raise SynthConfigError(f"{where}: unknown effect {name!r}; known: {', '.join(EFFECTS)}")
            key, default = EFFECTS[name]
            current = effects.get(name, Effect(0.0, default))
            if _effect_off(spec):
                spec = 0.0
            if isinstance(spec, (int, float)) and not isinstance(spec, bool):
                effects[name] = replace(current, p=float(spec))
                continue
            if not isinstance(spec, Mapping) or set(spec) - {"p", key}:
                raise SynthConfigError(f"{where}.{name}: expected a probability or a mapping with keys "
                                 f"p and {key}, got {_shown(spec)}")
            span = _span(spec.get(key, current.span), f"{where}.{name}.{key}")
            lo, hi, open_lo = LIMITS[name]
            if span[0] < lo or (open_lo and span[0] == lo) or span[1] > hi:
                interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
                raise SynthConfigError(f"{where}.{name}.{key}: each end must be in {interval}, got {list(span)}")
            effects[name] = Effect(float(spec.get("p", current.p)), span)  # type: ignore[arg-type]
        for name, eff in effects.items():
            if not 0.0 <= eff.p <= 1.0:
                raise SynthConfigError(f"{where}.{name}: probability must be in [0, 1], got {eff.p}")
        return cls(effects)


def _off(value: Any) -> bool:
    """Whether a ``degrade`` value (or its ``preset``) means no wear: ``off`` as written, or as YAML 1.1
    reads a bare ``off`` or ``no`` (false, PyYAML's reading of params.yaml), or null."""
    return value is None or value is False or value == "off"


def _effect_off(spec: Any) -> bool:
    """Whether one effect's value turns it off (``scribble: off``, which YAML 1.1 reads as false): probability 0."""
    return spec is False or spec == "off"


def _shown(value: Any) -> str:
    """A params value for a message; true is named as what YAML reads it from (``on``, ``yes``, ``true``)."""
    return "true (YAML's reading of on, yes or true)" if value is True else repr(value)


def logged(value: Any) -> Any:
    """A ``degrade`` params value as it means, for MLflow: ``off`` for every spelling of off (false, null),
    in a mapping's ``preset`` too, and an effect turned off (``scribble: off``) as its probability 0.0, so
    ``degrade: off`` is logged as ``off``, not as PyYAML's ``False``; anything else as written.

    >>> logged(False), logged(None), logged("mild"), logged({"preset": False, "jpeg": 0.5, "scribble": False})
    ('off', 'off', 'mild', {'preset': 'off', 'jpeg': 0.5, 'scribble': 0.0})
    """
    if _off(value):
        return "off"
    if isinstance(value, Mapping):
        return {k: ("off" if _off(v) else v) if k == "preset" else (0.0 if _effect_off(v) else v)
                for k, v in value.items()}
    return value


def _span(value: Any, where: str) -> tuple[float, float]:
    """``[lo, hi]`` as two floats with lo <= hi, else SynthConfigError naming ``where``."""
    try:
        span = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        span = ()
    if len(span) != 2 or not all(math.isfinite(v) for v in span) or span[0] > span[1]:  # NaN passes LIMITS' checks
        raise SynthConfigError(f"{where}: expected [lo, hi] of finite numbers with lo <= hi, got {value!r}")
    return span  # type: ignore[return-value]


PRESETS: dict[str, dict[str, float]] = {
    "off": {},
    "mild": {"ink_bleed": 0.1, "highlighter": 0.03, "scribble": 0.02, "underline": 0.04,
             "low_contrast": 0.15, "blur": 0.25, "noise": 0.3, "jpeg": 0.25},
    "strong": {"ink_bleed": 0.3, "highlighter": 0.15, "scribble": 0.12, "underline": 0.15,
               "low_contrast": 0.4, "blur": 0.5, "noise": 0.6, "jpeg": 0.5},
}


# -- helpers ---------------------------------------------------------------------------------

def _tone(colour: Sequence[int], image: np.ndarray) -> np.ndarray:
    """``colour`` as the image's channels: RGB as is, grey as its luminance."""
    rgb = np.asarray(colour, np.float32)
    if image.ndim == 3:
        return rgb
    return np.float32(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _composite(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Paint ``colour`` over ``image`` with per-pixel coverage ``alpha`` (H x W, 0..1)."""
    a = alpha[..., None] if image.ndim == 3 else alpha
    return image * (1.0 - a) + colour * a


def _paper(image: np.ndarray) -> float:
    return float(np.percentile(image, 90))


def _whole(image: np.ndarray) -> Box:
    return 0, 0, image.shape[1], image.shape[0]


# -- effects ---------------------------------------------------------------------------------

def ink_bleed(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Ink spreading into the paper: dark strokes thicken by about a pixel and soften."""
    size = 2 if image.shape[0] < 48 else 3
    spread = cv2.erode(image, np.ones((size, size), np.uint8))
    out = image * (1.0 - strength) + spread * strength
    return cv2.GaussianBlur(out, (0, 0), 0.5 + 0.3 * rng.random())


def highlighter(image: np.ndarray, rng: np.random.Generator, opacity: float,
                box: Box | None = None) -> np.ndarray:
    """A translucent marker stroke (multiply blend) across the middle of ``box``."""
    x0, y0, x1, y1 = box or _whole(image)
    h = max(2, y1 - y0)
    top = y0 + h * rng.uniform(-0.1, 0.25)
    bottom = y1 - h * rng.uniform(-0.15, 0.2)
    lx, rx = x0 - h * rng.uniform(0.0, 0.3), x1 + h * rng.uniform(-0.1, 0.3)
    slant = h * rng.uniform(-0.12, 0.12)
    poly = np.array([[lx, top + slant], [rx, top - slant], [rx, bottom - slant],
                     [lx, bottom + slant]], np.float32)
    mask = np.zeros(image.shape[:2], np.float32)
    cv2.fillPoly(mask, [np.round(poly * 4).astype(np.int32)], 1.0, cv2.LINE_AA, shift=2)
    mask = cv2.GaussianBlur(mask, (0, 0), max(0.6, h * 0.03)) * opacity
    colour = _tone(HIGHLIGHTER_COLOURS[rng.integers(len(HIGHLIGHTER_COLOURS))], image) / 255.0
    a = mask[..., None] if image.ndim == 3 else mask
    return image * (1.0 - a + a * colour)


def scribble(image: np.ndarray, rng: np.random.Generator, strokes: float,
             box: Box | None = None) -> np.ndarray:
    """Pen strokes over the text: ``strokes`` wavy lines crossing ``box`` (a crossed-out word)."""
    x0, y0, x1, y1 = box or _whole(image)
    h, w = max(2, y1 - y0), max(2, x1 - x0)
    colour = _tone(PEN_COLOURS[rng.integers(len(PEN_COLOURS))], image)
    thickness = max(1, round(h * rng.uniform(0.03, 0.06)))
    mask = np.zeros(image.shape[:2], np.float32)
    for _ in range(max(1, int(round(strokes)))):
        n = int(rng.integers(3, 7))
        xs = np.sort(rng.uniform(x0 - 0.05 * w, x1 + 0.05 * w, n))
        ys = rng.uniform(y0 + 0.1 * h, y1 - 0.1 * h, n)
        pts = np.stack([xs, ys], 1)
        t = np.linspace(0, 1, 8 * n)  # smooth the zig-zag through the points
        xs_s = np.interp(t, np.linspace(0, 1, n), pts[:, 0])
        ys_s = np.convolve(np.interp(t, np.linspace(0, 1, n), pts[:, 1]), np.ones(5) / 5, "same")
        ys_s[:2], ys_s[-2:] = pts[0, 1], pts[-1, 1]
        curve = np.round(np.stack([xs_s, ys_s], 1) * 4).astype(np.int32)
        cv2.polylines(mask, [curve], False, 1.0, thickness, cv2.LINE_AA, shift=2)
    mask *= rng.uniform(0.55, 0.9)  # pen lighter than the print, so the word stays readable
    return _composite(image, np.clip(mask, 0, 1), colour)


def underline(image: np.ndarray, rng: np.random.Generator, thickness: float, box: Box,
              ink: float | Sequence[int] | None = None) -> np.ndarray:
    """A ruled or hand-drawn line just under ``box``; ``thickness`` is a share of its height.

    ``ink`` is the line's value (grey number or RGB); by default a dark pen colour.
    """
    x0, y0, x1, y1 = box
    h = max(2, y1 - y0)
    width = max(1, round(h * thickness))
    gap = max(1, round(h * rng.uniform(0.04, 0.12)))
    y = y1 + gap + width / 2
    slope = h * rng.uniform(-0.05, 0.05)
    lx, rx = x0 - h * rng.uniform(0, 0.15), x1 + h * rng.uniform(0, 0.15)
    mask = np.zeros(image.shape[:2], np.float32)
    pts = np.round(np.array([[lx, y + slope], [rx, y - slope]]) * 4).astype(np.int32)
    cv2.polylines(mask, [pts], False, 1.0, width, cv2.LINE_AA, shift=2)
    if ink is None:
        colour = _tone(PEN_COLOURS[rng.integers(len(PEN_COLOURS))], image)
    elif isinstance(ink, (int, float)):
        colour = np.float32(ink) if image.ndim == 2 else np.full(3, ink, np.float32)
    else:
        colour = _tone(ink, image)
    return _composite(image, mask, colour)


def low_contrast(image: np.ndarray, rng: np.random.Generator, keep: float) -> np.ndarray:
    """Faded print: ink pulled towards the paper tone, keeping ``keep`` of the contrast."""
    paper = _paper(image) * rng.uniform(0.92, 1.0)
    return paper + (image - paper) * keep


def blur(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian blur (an out-of-focus scan)."""
    return cv2.GaussianBlur(image, (0, 0), sigma)


def noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Additive Gaussian sensor noise."""
    return image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)


def jpeg(image: np.ndarray, rng: np.random.Generator, quality: float) -> np.ndarray:
    """JPEG round trip at ``quality`` (block and ringing artefacts)."""
    pixels = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(round(quality))])
    if not ok:
        raise ValueError("JPEG encoding failed")
    flag = cv2.IMREAD_COLOR if image.ndim == 3 else cv2.IMREAD_GRAYSCALE
    return cv2.imdecode(buf, flag).astype(np.float32)


def apply(image: np.ndarray, rng: np.random.Generator, config: DegradeConfig,
          boxes: Sequence[Box] | None = None) -> np.ndarray:
    """Run each effect of ``config`` with its probability, in ``EFFECTS`` order.

    ``boxes`` (word ink boxes, x0 y0 x1 y1) place highlighter strokes, scribbles and underlines on
    one word each; without boxes those cover the whole image (a word or line crop), and underline,
    which needs to know where the text ends, is skipped. Always draws the same random numbers for
    a given config and image, so results depend only on the generator's seed.
    """
    out = image.astype(np.float32, copy=True)
    if not config.enabled:
        return out
    for name in EFFECTS:
        eff = config.effect(name)
        hit = rng.random() < eff.p
        strength = rng.uniform(*eff.span)
        pick = int(rng.integers(len(boxes))) if boxes else 0
        effect_rng = np.random.default_rng(rng.integers(2**63))
        if not hit:
            continue
        box = boxes[pick] if boxes else None
        if name == "ink_bleed":
            out = ink_bleed(out, effect_rng, strength)
        elif name == "highlighter":
            out = highlighter(out, effect_rng, strength, box)
        elif name == "scribble":
            out = scribble(out, effect_rng, strength, box)
        elif name == "underline":
            if box is not None:
                out = underline(out, effect_rng, strength, box)
        elif name == "low_contrast":
            out = low_contrast(out, effect_rng, strength)
        elif name == "blur":
            out = blur(out, effect_rng, strength)
        elif name == "noise":
            out = noise(out, effect_rng, strength)
        elif name == "jpeg":
            out = jpeg(np.clip(out, 0, 255), effect_rng, strength)
    return np.clip(out, 0, 255)

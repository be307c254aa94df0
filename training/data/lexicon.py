"""Korean word list and token sampler for synthetic administrative-document pages.

Words come from wordfreq's Korean list (MeCab-style morphemes and short eojeol), filtered to
the recogniser's charset. ``make_token`` mixes them with the numbers, dates, codes, phone
numbers and punctuated words that fill real 공공행정문서 pages.

Example:
    >>> import random
    >>> from training.charset import Charset
    >>> words, weights = load_lexicon(Charset.named("korean_g2"), top_n=5000)
    >>> token = make_token(random.Random(0), words, weights)
    >>> isinstance(token, str) and token != ""
    True
"""

from __future__ import annotations

import random
import unicodedata
from itertools import accumulate
from typing import Sequence

from training.charset import Charset

HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3

# Vocabulary typical of administrative documents (form labels, document titles, units).
ADMIN_LABELS = (
    "성명", "주소", "생년월일", "연락처", "전화번호", "등록번호", "신청인", "담당자", "일시",
    "장소", "목적", "금액", "비고", "제목", "수신", "발신", "참조", "소재지", "대표자", "상호",
    "사업자", "처리기한", "접수번호", "발급일", "시행일", "기간", "내용", "사유", "용도", "면적",
    "수량", "단가", "합계", "소속", "직위", "부서", "문서번호", "결재", "주민등록번호",
)
TITLE_TERMS = (
    "신청서", "확인서", "증명서", "계획서", "보고서", "공고", "안내", "협조", "요청", "결과",
    "통지서", "허가서", "신고서", "동의서", "위임장", "회의록", "의견서", "검토", "알림",
)
NAME_FAMILY = "김이박최정강조장임한오서신권황안송류홍"
NAME_GIVEN = "민수지영현준서연우진호은혜성동하경미재희상태윤정원"
PARTICLES_BATCHIM = ("은", "이", "을", "과", "으로", "에", "의", "에서", "도", "만")
PARTICLES_OPEN = ("는", "가", "를", "와", "로", "에", "의", "에서", "도", "만")
UNITS = ("원", "개", "명", "층", "호", "건", "회", "번", "부", "매", "개월", "세")
LATIN_CODES = ("OCR", "TEL", "FAX", "KS", "ISO", "PDF", "ID", "A4", "IT", "CCTV", "LED", "Tel.",
               "Fax.", "e-mail", "www", "No.", "KOR", "PC", "GPS", "QR")


def is_hangul(ch: str) -> bool:
    """True for a precomposed Hangul syllable (가-힣)."""
    return HANGUL_FIRST <= ord(ch) <= HANGUL_LAST


def has_hangul(text: str) -> bool:
    """True when ``text`` holds at least one Hangul syllable."""
    return any(is_hangul(c) for c in text)


def load_lexicon(charset: Charset, top_n: int = 30000, min_len: int = 2,
                 power: float = 0.5) -> tuple[list[str], list[float]]:
    """Korean words of wordfreq's top ``top_n`` expressible in ``charset``, with sampling weights.

    Keeps NFC words of at least ``min_len`` characters holding a Hangul syllable and no
    character outside the charset. Weights are frequency ** ``power`` (0.5 flattens the
    head so function words do not dominate), normalised to sum to 1.
    Raises ValueError when no word survives the filter.
    """
    import wordfreq  # imported here: it takes 0.2 s, and every kocr command imports this module

    # wordfreq.word_frequency() tokenises Korean with MeCab (an optional dependency we do not
    # have); the frequency dict holds the same stored values without tokenising.
    freq = wordfreq.get_frequency_dict("ko")
    words: list[str] = []
    raw: list[float] = []
    seen: set[str] = set()
    for word in wordfreq.top_n_list("ko", top_n):
        w = unicodedata.normalize("NFC", word).strip()
        if len(w) < min_len or w in seen or not has_hangul(w) or charset.missing(w):
            continue
        f = freq.get(word) or freq.get(w) or 0.0
        if f <= 0:
            continue
        seen.add(w)
        words.append(w)
        raw.append(f ** power)
    if not words:
        raise ValueError(f"no Korean word of wordfreq's top {top_n} (min_len={min_len}) "
                         f"fits charset {charset.name!r}")
    total = sum(raw)
    return words, [r / total for r in raw]


_CUM_CACHE: dict[int, tuple[Sequence[float], list[float]]] = {}


def _cum_weights(weights: Sequence[float]) -> list[float]:
    """Cumulative weights, cached per weights object (held, so its id cannot be reused)."""
    hit = _CUM_CACHE.get(id(weights))
    if hit is not None and hit[0] is weights and len(hit[1]) == len(weights):
        return hit[1]
    cum = list(accumulate(weights))
    if len(_CUM_CACHE) > 8:
        _CUM_CACHE.clear()
    _CUM_CACHE[id(weights)] = (weights, cum)
    return cum


def sample_word(rng: random.Random, words: Sequence[str], weights: Sequence[float]) -> str:
    """One lexicon word, frequency-weighted."""
    return rng.choices(words, cum_weights=_cum_weights(weights))[0]


def _has_batchim(ch: str) -> bool:
    return is_hangul(ch) and (ord(ch) - HANGUL_FIRST) % 28 != 0


def attach_particle(rng: random.Random, word: str) -> str:
    """``word`` plus a case particle matching its final syllable (산림청 -> 산림청의)."""
    if not word or not is_hangul(word[-1]):
        return word
    return word + rng.choice(PARTICLES_BATCHIM if _has_batchim(word[-1]) else PARTICLES_OPEN)


def random_name(rng: random.Random) -> str:
    """A plausible Korean person name (family name + two given syllables)."""
    return rng.choice(NAME_FAMILY) + rng.choice(NAME_GIVEN) + rng.choice(NAME_GIVEN)


def random_date(rng: random.Random) -> str:
    """A date in one of the forms Korean documents use: 2024.03.15, 1994년, 3월, ..."""
    y, m, d = rng.randint(1985, 2024), rng.randint(1, 12), rng.randint(1, 28)
    form = rng.random()
    if form < 0.40:
        return f"{y}.{m:02d}.{d:02d}" + ("." if rng.random() < 0.25 else "")
    if form < 0.55:
        return f"{y}-{m:02d}-{d:02d}"
    if form < 0.65:
        return f"{y % 100:02d}.{m:02d}.{d:02d}"
    if form < 0.80:
        return f"{y}년"
    if form < 0.90:
        return f"{m}월"
    if form < 0.97:
        return f"{d}일"
    return f"({y}.{m:02d}.{d:02d})"


def random_phone(rng: random.Random) -> str:
    """A phone number such as 02-123-4567 or 010-1234-5678."""
    if rng.random() < 0.5:
        return f"010-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}"
    area = rng.choice(("02", "031", "032", "051", "053", "055", "061", "062", "063", "064"))
    return f"{area}-{rng.randint(100, 9999)}-{rng.randint(1000, 9999)}"


def random_number(rng: random.Random) -> str:
    """A number as documents print it: 1,250 / 3. / (2) / 12.5 / 35% / 15,000원 / 3개."""
    form = rng.random()
    if form < 0.22:
        return f"{int(10 ** rng.uniform(3, 7.5)):,}"
    if form < 0.40:
        return str(rng.randint(0, 999))
    if form < 0.55:
        n = rng.randint(1, 12)
        return rng.choice((f"{n}.", f"({n})", f"{n})"))
    if form < 0.62:
        return f"{rng.randint(0, 999)}.{rng.randint(0, 99)}"
    if form < 0.70:
        return f"{rng.randint(1, 100)}%"
    if form < 0.82:
        return f"{rng.randint(1, 999) * 1000:,}원"
    if form < 0.92:
        return f"{rng.randint(1, 99)}{rng.choice(UNITS)}"
    return random_phone(rng)


def random_code(rng: random.Random) -> str:
    """A short Latin word or code: OCR, No.12, A-3, 제2024-153호, ISO9001, ..."""
    form = rng.random()
    if form < 0.35:
        return rng.choice(LATIN_CODES)
    if form < 0.50:
        return f"No.{rng.randint(1, 999)}"
    if form < 0.65:
        return f"{rng.choice('ABCDEFGHKMNPRSTW')}-{rng.randint(1, 999)}"
    if form < 0.80:
        return f"제{rng.randint(1995, 2024)}-{rng.randint(1, 9999)}호"
    if form < 0.90:
        letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(rng.randint(2, 3)))
        return f"{letters}{rng.randint(10, 9999)}"
    return f"{rng.randint(100, 999)}-{rng.randint(10, 99)}-{rng.randint(10000, 99999)}"


def punctuate(rng: random.Random, word: str) -> str:
    """``word`` with the punctuation documents attach to it: 등록번호:, (주)한국, "word", ..."""
    form = rng.random()
    if form < 0.25:
        return word + ":"
    if form < 0.45:
        return word + rng.choice((",", ".", ")"))
    if form < 0.60:
        return f"({word})"
    if form < 0.72:
        return "(주)" + word if rng.random() < 0.6 else "(주)"
    if form < 0.82:
        return rng.choice(('"{}"', "'{}'", "[{}]", "<{}>")).format(word)
    if form < 0.92:
        return "-" + word if rng.random() < 0.5 else "*" + word
    return word + "~"


def make_token(rng: random.Random, words: Sequence[str], weights: Sequence[float],
               charset: Charset | None = None) -> str:
    """One space-free token for a synthetic administrative page.

    About 62% lexicon words (a third of them with a particle attached), 8% administrative
    terms, 10% numbers (amounts, list markers, phone numbers), 7% dates, 4% Latin words or
    codes, 9% words with attached punctuation. Deterministic given ``rng``. When ``charset``
    is given, a token it cannot express is replaced by a plain lexicon word (which the
    lexicon already guarantees to be in the charset it was loaded for).
    """
    kind = rng.random()
    if kind < 0.62:
        token = sample_word(rng, words, weights)
        if rng.random() < 0.33:
            with_particle = attach_particle(rng, token)
            if charset is None or not charset.missing(with_particle):
                token = with_particle
    elif kind < 0.70:
        token = rng.choice(ADMIN_LABELS if rng.random() < 0.7 else TITLE_TERMS)
    elif kind < 0.80:
        token = random_number(rng)
    elif kind < 0.87:
        token = random_date(rng)
    elif kind < 0.91:
        token = random_code(rng)
    else:
        base = sample_word(rng, words, weights) if rng.random() < 0.7 else rng.choice(ADMIN_LABELS)
        token = punctuate(rng, base)
    token = unicodedata.normalize("NFC", token)
    if not token or (charset is not None and charset.missing(token)):
        return sample_word(rng, words, weights)
    return token

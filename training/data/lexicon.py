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
# English words of Korean signs, maps and document headers (the romanised place names come from the lexicon)
SIGN_WORDS = ("Station", "Exit", "Gate", "Line", "Bus", "Stop", "Center", "Centre", "City", "Hall", "Office",
              "Street", "Road", "Bridge", "Park", "Market", "Hospital", "Police", "Library", "Museum", "Airport",
              "Terminal", "Parking", "Entrance", "Information", "Toilet", "University", "School", "Church",
              "Temple", "Palace", "Tower", "Hotel", "Bank", "Post", "Korea", "Republic", "Ministry", "Service",
              "Welcome", "Open", "Closed", "Sale", "Free", "Coffee", "Cafe", "Restaurant", "Mart", "Shop",
              "Building", "Floor", "Room", "North", "South", "East", "West", "Tel", "Fax", "Email", "Date", "Name",
              "Address", "Page", "Total", "Form", "Report")
LATIN_UNITS = ("km", "Km", "KM", "m", "cm", "mm", "kg", "g", "t", "L", "l", "ml", "mL", "kW", "kWh", "MB", "GB",
               "ha", "m2", "cc", "h", "min")
ROAD_SUFFIXES = ("-gu", "-si", "-do", "-ro", "-gil", "-dong", "-eup", "-myeon", "-daero")
# Revised Romanization of Korean, letter by letter: initials, medials, finals (the final's plain
# form, then the form it takes before a vowel, where it carries over to the next syllable)
_RR_INITIALS = ("g", "kk", "n", "d", "tt", "r", "m", "b", "pp", "s", "ss", "", "j", "jj", "ch", "k", "t", "p", "h")
_RR_MEDIALS = ("a", "ae", "ya", "yae", "eo", "e", "yeo", "ye", "o", "wa", "wae", "oe", "yo", "u", "wo", "we",
               "wi", "yu", "eu", "ui", "i")
_RR_FINALS = (("", ""), ("k", "g"), ("k", "kk"), ("k", "ks"), ("n", "n"), ("n", "nj"), ("n", "nh"), ("t", "d"),
              ("l", "r"), ("k", "lg"), ("m", "lm"), ("l", "lb"), ("l", "ls"), ("l", "lt"), ("p", "lp"), ("l", "lh"),
              ("m", "m"), ("p", "b"), ("p", "ps"), ("t", "s"), ("t", "ss"), ("ng", "ng"), ("t", "j"), ("t", "ch"),
              ("k", "k"), ("t", "t"), ("p", "p"), ("t", "h"))


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


def romanize(word: str) -> str:
    """``word``'s Hangul in lower-case Revised Romanization, other characters kept.

    A final consonant before a vowel-initial syllable is carried over (서울 -> seoul), and ㄹ
    before ㄹ is ``ll``; the other sound changes of the official rules are left out, which keeps
    the spelling a plausible sign's (it is training text, not a transliteration service).

    >>> [romanize(w) for w in ("서울", "평양", "부산", "광주", "별로", "읽어", "종로2가")]
    ['seoul', 'pyeongyang', 'busan', 'gwangju', 'byeollo', 'ilgeo', 'jongro2ga']
    """
    out: list[str] = []
    for i, ch in enumerate(word):
        if not is_hangul(ch):
            out.append(ch)
            continue
        code = ord(ch) - HANGUL_FIRST
        initial, medial, final = code // 588, code % 588 // 28, code % 28
        after = word[i + 1] if i + 1 < len(word) else ""
        next_initial = (ord(after) - HANGUL_FIRST) // 588 if after and is_hangul(after) else -1
        head = _RR_INITIALS[initial]
        if initial == 5 and out and out[-1].endswith("l") and i > 0 and is_hangul(word[i - 1]):
            head = "l"  # ㄹ after a final ㄹ
        plain, carried = _RR_FINALS[final]
        out.append(head + _RR_MEDIALS[medial] + (carried if next_initial == 11 else plain))
    return "".join(out)


def random_latin(rng: random.Random, words: Sequence[str], weights: Sequence[float]) -> str:
    """A Latin-script word of Korean signs and documents: a romanised lexicon word (Seoul, JONGNO-GU),
    a measure with a Latin unit (56Km, 2.5kg) or an English sign word (Station, EXIT)."""
    form = rng.random()
    if form < 0.55:
        word = romanize(sample_word(rng, words, weights))
        if rng.random() < 0.15:
            word += rng.choice(ROAD_SUFFIXES)
    elif form < 0.80:
        number = rng.randint(1, 999) if rng.random() < 0.7 else round(rng.uniform(0.1, 99.9), 1)
        return f"{number}{rng.choice(LATIN_UNITS)}"
    else:
        word = rng.choice(SIGN_WORDS).lower()
    case = rng.random()
    return word.capitalize() if case < 0.6 else word.upper() if case < 0.85 else word


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


def draw_token(rng: random.Random, words: Sequence[str], weights: Sequence[float], charset: Charset | None = None,
               latin_words: float = 0.0) -> str:
    """One token of the synthetic-line mix: ``make_token``'s, with a ``latin_words`` share drawn by
    ``random_latin`` instead (the extra draw is made only when the share is above 0, so a mix without
    it stays draw for draw the same)."""
    if latin_words and rng.random() < latin_words:
        return random_latin(rng, words, weights)
    return make_token(rng, words, weights, charset)

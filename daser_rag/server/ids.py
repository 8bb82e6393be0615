"""Document ids: one spelling per document, addressable by URL, visible to a human.

Shared by the service (every route and body field that takes an id) and `DaserClient` (which
refuses such an id before sending anything), so both sides agree on what an id is. Stdlib
only: the client must not need pydantic or FastAPI.

* Ids are normalized to Unicode NFC: "café" typed as one code point or as "e" + U+0301 is one
  document, not two.
* Refused (400 `invalid_document_id` on a path, `invalid_request` in a body):
  - empty or longer than `MAX_ID_CHARS` (after normalization);
  - control characters, lone surrogates, private-use and noncharacter code points;
  - invisible or direction-changing characters: Unicode format characters (category Cf: U+200B
    zero width space, U+200E/U+200F marks, U+202A-U+202E and U+2066-U+2069 bidi controls, U+FEFF
    byte order mark, U+00AD soft hyphen, ...), the other default-ignorable code points (U+034F,
    U+115F, U+1160, U+17B4, U+17B5, U+180B-U+180F, U+3164, U+FFA0, ...) and line / paragraph
    separators. Variation selectors (emoji presentation) are allowed;
  - ids that a URL cannot carry as one path segment: "." and "..", or any "/"-separated segment
    that is "." or ".." (clients and proxies resolve such segments away, so DELETE
    /v1/documents/.. would reach another route).
"""

from __future__ import annotations

import unicodedata

MAX_ID_CHARS = 256

# Default_Ignorable_Code_Point ranges that are not of category Cf (Cf is refused as a whole),
# minus the variation selectors. Source: Unicode DerivedCoreProperties.txt.
_IGNORABLE = (
    (0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x3164, 0x3164),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1D173, 0x1D17A), (0xE0000, 0xE00FF), (0xE01F0, 0xE0FFF),
)
_REFUSED_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible formatting or bidi control character",
                       "Cs": "a lone surrogate", "Co": "a private-use character",
                       "Zl": "a line separator", "Zp": "a paragraph separator"}


def _problem(ch: str) -> str | None:
    cp = ord(ch)
    cat = unicodedata.category(ch)
    if cat in _REFUSED_CATEGORIES:
        return _REFUSED_CATEGORIES[cat]
    if (cp & 0xFFFE) == 0xFFFE or 0xFDD0 <= cp <= 0xFDEF:
        return "a noncharacter"
    if any(lo <= cp <= hi for lo, hi in _IGNORABLE):
        return "an invisible (default-ignorable) character"
    return None


def normalize_id(value: str) -> str:
    """`value` as the one spelling the service stores (NFC), or ValueError saying what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"document id must be a string, got {type(value).__name__}")
    try:
        value = unicodedata.normalize("NFC", value)
    except UnicodeError as exc:  # pragma: no cover - normalize accepts any str
        raise ValueError(f"document id cannot be normalized: {exc}") from exc
    if not value or len(value) > MAX_ID_CHARS:
        raise ValueError(f"document id must be 1..{MAX_ID_CHARS} characters")
    for pos, ch in enumerate(value):
        if ch.isascii() and ch.isprintable():
            continue
        what = _problem(ch)
        if what is not None:
            raise ValueError(f"document id must not contain {what} (U+{ord(ch):04X} at position {pos})")
    if any(seg in (".", "..") for seg in value.split("/")):
        raise ValueError(f"document id {value!r} cannot be addressed by URL: '.' and '..' (as the whole id or "
                         "as a '/'-separated segment) are resolved away by clients and proxies")
    return value


__all__ = ["MAX_ID_CHARS", "normalize_id"]

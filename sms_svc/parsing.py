"""What a viewer's SMS says: a contestant number, the language to answer in, who sent it.

Phones and people add more than the specification's "1".."12", "VOTE 1", "V1": Khmer
digits (U+17E0..U+17E9), full-width digits and letters from Asian keyboards (U+FF10..),
punctuation ("V.1", "#1", "1.", "VOTE:1", "*1#"), stray spaces and any case. All of these
are one vote for the number; any other text is INVALID_FORMAT, never a guess.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from dataclasses import dataclass

MAX_NUMBER = 12

_KHMER_DIGITS = str.maketrans("០១២៣៤៥៦៧៨៩", "0123456789")
_KHMER_SCRIPT = re.compile("[\u1780-\u17ff\u19e0-\u19ff]")
#: Punctuation phones and people put around the keyword and the number (never between two
#: digits: "1 2" is not 12).
_NOISE = r"[\s.,:;#*\-_/\\'\"!?()\[\]{}+=~`។៕]*"
#: "VOTE 1", "V1", "1" (or the Khmer word for "vote"), leading zeros allowed ("01").
_VOTE = re.compile(f"{_NOISE}(?:(?:VOTE|V|បោះឆ្នោត){_NOISE})?"
                   f"0*([0-9]{{1,2}}){_NOISE}")


@dataclass(frozen=True)
class Parsed:
    """A message's meaning: the contestant number (None when it is not a vote) and the
    language to answer in ("km", "en", or "" when the text does not tell)."""

    number: int | None
    language: str


def parse(text: str) -> Parsed:
    """The contestant number a message votes for, if it is a vote by the specification."""
    language = "km" if _KHMER_SCRIPT.search(text) else ""
    # NFKC folds full-width letters and digits into ASCII; Khmer digits have no
    # compatibility mapping, so they are translated.
    folded = unicodedata.normalize("NFKC", text).translate(_KHMER_DIGITS).upper()
    if language == "" and any(c.isalpha() for c in folded):
        language = "en"
    match = _VOTE.fullmatch(folded)
    if match is None:
        return Parsed(None, language)
    number = int(match.group(1))
    # "V0" or "13" is a vote for no one: UNKNOWN_CONTESTANT, not a bad format.
    return Parsed(number, language)


class InvalidMsisdnError(ValueError):
    """Not a Cambodian mobile number."""


_MSISDN_NOISE = re.compile(r"[\s.\-()/]+")


def normalise_msisdn(raw: str) -> str:
    """A Cambodian number in E.164 ("+85512345678") from the forms carriers send: E.164 with
    or without "+", the international prefix "00855", or the local form "012345678"; spaces,
    dots, dashes and brackets are ignored. Raises InvalidMsisdnError otherwise."""
    digits = _MSISDN_NOISE.sub("", raw)
    if digits.startswith("+"):
        digits = digits[1:]
        if not digits.startswith("855"):
            raise InvalidMsisdnError("not a Cambodian number (+855)")
    elif digits.startswith("00855"):
        digits = digits[2:]
    elif digits.startswith("0"):
        digits = "855" + digits[1:]
    if not (digits.isascii() and digits.isdigit() and digits.startswith("855")):
        raise InvalidMsisdnError("expected +855 and the subscriber number, or 0 and it")
    national = digits[3:]
    # Cambodian mobile numbers: 8 or 9 digits after the country code, never a leading 0.
    if not (8 <= len(national) <= 9) or national.startswith("0"):
        raise InvalidMsisdnError("a Cambodian mobile number has 8 or 9 digits after +855")
    return "+" + digits


def pseudonym(secret: bytes, msisdn_e164: str) -> str:
    """The keyed pseudonym of a subscriber: stable per number, unlinkable without the secret."""
    return hmac.new(secret, msisdn_e164.encode(), hashlib.sha256).hexdigest()[:32]


def content_hash(msisdn_e164: str, short_code: str, text: str) -> bytes:
    """What a carrier's redelivery of one message must repeat."""
    return hashlib.sha256("\x00".join((msisdn_e164, short_code, text)).encode()).digest()


def is_valid_number(number: int | None) -> bool:
    return number is not None and 1 <= number <= MAX_NUMBER

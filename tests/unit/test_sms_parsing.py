"""The SMS parsing table: what a viewer's text votes for, and the numbers carriers send."""

from __future__ import annotations

import pytest

from sms_svc.parsing import InvalidMsisdnError, normalise_msisdn, parse, pseudonym
from sms_svc.replies import LANGUAGES, Outcome, reply


@pytest.mark.parametrize(("text", "number", "language"), [
    ("1", 1, ""), ("12", 12, ""), ("VOTE 1", 1, "en"), ("V1", 1, "en"), ("v1", 1, "en"),
    ("  vote 7  ", 7, "en"), ("Vote1", 1, "en"), ("V 01", 1, "en"), ("V.1", 1, "en"),
    ("VOTE:1", 1, "en"), ("#1", 1, ""), ("*1#", 1, ""), ("1.", 1, ""), ("1\n", 1, ""),
    ("V-3!", 3, "en"),
    # Khmer digits, the Khmer word for "vote", Khmer punctuation.
    ("១", 1, "km"), ("១២", 12, "km"), ("V០៣", 3, "km"), ("បោះឆ្នោត ៤", 4, "km"),
    ("៥។", 5, "km"),
    # Full-width digits and letters.
    ("\uff11\uff12", 12, ""), ("\uff36\uff11", 1, "en"),
    ("\uff36\uff2f\uff34\uff25\u3000\uff12", 2, "en"),
    # Numbers out of the range parse (UNKNOWN_CONTESTANT), they are not a bad format.
    ("13", 13, ""), ("V0", 0, "en"),
    # Not votes.
    ("hello", None, "en"), ("1 2", None, ""), ("V1 V2", None, "en"), ("VV1", None, "en"),
    ("vote", None, "en"), ("123", None, ""), ("1x", None, "en"), ("ជំរាបសួរ", None, "km"),
])
def test_the_parsing_table(text: str, number: int | None, language: str) -> None:
    parsed = parse(text)
    assert (parsed.number, parsed.language) == (number, language)


@pytest.mark.parametrize(("raw", "e164"), [
    ("+85512345678", "+85512345678"), ("85512345678", "+85512345678"),
    ("012345678", "+85512345678"), ("012 345 678", "+85512345678"),
    ("(012) 345-678", "+85512345678"), ("0085512345678", "+85512345678"),
    ("0971234567", "+855971234567"), ("+855 97.123.4567", "+855971234567"),
])
def test_cambodian_numbers_in_e164_and_local_form(raw: str, e164: str) -> None:
    assert normalise_msisdn(raw) == e164


@pytest.mark.parametrize("raw", ["+66812345678", "12345", "+855012345678", "+8551234567",
                                 "+8551234567890", "", "+855abc", "٠١٢٣٤٥٦٧٨"])
def test_numbers_that_are_not_cambodian_mobiles_are_refused(raw: str) -> None:
    with pytest.raises(InvalidMsisdnError):
        normalise_msisdn(raw)


def test_the_pseudonym_is_keyed_and_stable() -> None:
    assert pseudonym(b"k1", "+85512345678") == pseudonym(b"k1", "+85512345678")
    assert pseudonym(b"k1", "+85512345678") != pseudonym(b"k2", "+85512345678")
    assert "12345678" not in pseudonym(b"k1", "+85512345678")


def test_every_outcome_has_a_reply_in_khmer_and_english() -> None:
    for language in LANGUAGES:
        for outcome in Outcome:
            assert reply(outcome, language, number=2, name="Dara", short_code="1255")
    assert reply(Outcome.CLOSED, "en") == "Voting is closed. Watch XFactor every Saturday!"
    assert "Dara" in reply(Outcome.COUNTED, "km", number=2, name="Dara")

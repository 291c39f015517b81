"""The voter app has a message, in English and in Khmer, for every reason SubmitVote may refuse
a vote with (vote_service.proto is the list)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _submit_vote_reasons() -> set[str]:
    proto = (ROOT / "protos/televote/vote/v1/vote_service.proto").read_text()
    doc = proto[proto.index("service VoteService"):proto.index("rpc SubmitVote")]
    return set(re.findall(r"`([A-Z][A-Z_]+)`", doc))


def _dictionary(source: str, name: str) -> set[str]:
    start = source.index(f"const {name}")
    body = source[start:source.index("\n};", start)]
    return set(re.findall(r"^\s+([A-Z][A-Z_]+):", body, re.MULTILINE))


def test_every_refusal_reason_of_submit_vote_has_an_english_and_a_khmer_message() -> None:
    reasons = _submit_vote_reasons()
    assert {"NO_FREE_VOTES", "VOTING_CLOSED", "RATE_LIMITED"} <= reasons  # the parse works
    source = (ROOT / "web/src/i18n.ts").read_text()
    assert reasons - _dictionary(source, "en") == set()
    assert reasons - _dictionary(source, "km") == set()

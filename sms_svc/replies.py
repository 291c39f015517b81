"""What a viewer reads back, in Khmer or English (the message's language, else the default)."""

from __future__ import annotations

import re
from enum import StrEnum


class Outcome(StrEnum):
    """What became of a message (sms_outcomes.outcome); only COUNTED is charged."""

    COUNTED = "COUNTED"
    CLOSED = "CLOSED"
    INVALID_FORMAT = "INVALID_FORMAT"
    UNKNOWN_CONTESTANT = "UNKNOWN_CONTESTANT"
    RATE_LIMITED = "RATE_LIMITED"
    BLOCKED = "BLOCKED"


_TEXTS: dict[str, dict[Outcome, str]] = {
    "en": {
        Outcome.COUNTED: "Thank you! Your vote for {number}. {name} is counted. XFactor",
        Outcome.CLOSED: "Voting is closed. Watch XFactor every Saturday!",
        Outcome.INVALID_FORMAT: "To vote, send the contestant's number to {short_code}, "
                                "e.g. 1 or V1. This message was not charged.",
        Outcome.UNKNOWN_CONTESTANT: "There is no contestant {number} in this vote. Send a "
                                    "number shown on screen to {short_code}. Not charged.",
        Outcome.RATE_LIMITED: "Too many votes. Please wait a minute. Not charged.",
        Outcome.BLOCKED: "Your vote could not be accepted. Not charged.",
    },
    "km": {
        Outcome.COUNTED: "អរគុណ! សំឡេងឆ្នោតរបស់អ្នកសម្រាប់ {number}. {name} ត្រូវបានរាប់។",
        Outcome.CLOSED: "ការបោះឆ្នោតបានបិទហើយ។ សូមទស្សនា XFactor រៀងរាល់ថ្ងៃសៅរ៍!",
        Outcome.INVALID_FORMAT: "ដើម្បីបោះឆ្នោត ផ្ញើលេខបេក្ខជនទៅ {short_code} ឧ. 1 ឬ V1។ "
                                "មិនគិតថ្លៃ។",
        Outcome.UNKNOWN_CONTESTANT: "គ្មានបេក្ខជនលេខ {number} ទេ។ ផ្ញើលេខនៅលើអេក្រង់ទៅ "
                                    "{short_code}។ មិនគិតថ្លៃ។",
        Outcome.RATE_LIMITED: "អ្នកផ្ញើញឹកពេក។ សូមរង់ចាំមួយនាទី។ មិនគិតថ្លៃ។",
        Outcome.BLOCKED: "សំឡេងឆ្នោតរបស់អ្នកមិនត្រូវបានទទួលទេ។ មិនគិតថ្លៃ។",
    },
}

LANGUAGES = frozenset(_TEXTS)


def reply(outcome: Outcome, language: str, *, number: int = 0, name: str = "",
          short_code: str = "") -> str:
    """The reply for an outcome (`language` must be one of LANGUAGES)."""
    return _TEXTS[language][outcome].format(number=number, name=name, short_code=short_code)


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{\w+\}", template)
    return re.compile(".*?".join(re.escape(part) for part in parts) + "$", re.DOTALL)


_READING = [(_pattern(text), outcome) for texts in _TEXTS.values()
            for outcome, text in texts.items()]


def outcome_of(text: str) -> Outcome | None:
    """The outcome a reply tells (what a subscriber's phone, or a load test reading replies
    at the SMS gateway, learns); None for a text that is no reply of ours."""
    return next((outcome for pattern, outcome in _READING if pattern.match(text)), None)

"""sms_svc's configuration (environment variables, read once at start)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from pydantic import field_validator

from runtime.config import ServiceConfig


class SmsConfig(ServiceConfig):
    service_name: ClassVar[str] = "sms_svc"

    #: A message's claim and its outcome are one statement each (many messages' at once);
    #: the few multi-statement writes open their own transaction.
    database_autocommit: bool = True

    #: vote_svc replicas ("ipv4:host:port,...").
    vote_target: str = ""
    #: Secret of the subscriber pseudonym (HMAC of the MSISDN). Empty: read
    #: `msisdn-secret` in TELEVOTE_STATE_DIR (`televote up` makes one there).
    sms_msisdn_secret: str = ""
    televote_state_dir: str = ""
    #: The reply's language when the message does not tell ("1" has no script): km or en.
    sms_default_language: str = "km"
    #: Votes wait this long for others to go to vote_svc in one SubmitVotes batch.
    sms_batch_wait_ms: float = 5.0
    #: At most this many votes per SubmitVotes call.
    sms_batch_max: int = 500
    #: How long a message may take to get its vote's answer, retries of a refused (OVERLOADED,
    #: UNAVAILABLE) batch included, before the carrier is told UNAVAILABLE (and redelivers).
    sms_vote_deadline_ms: float = 8_000.0
    #: One replica works on a message at a time (a lease in Redis); a replica that died
    #: holding it is taken over after this long.
    sms_processing_lease_ms: int = 10_000
    #: A short code's binding is read again after this long: a re-binding (another show)
    #: takes effect within it on every replica.
    sms_binding_cache_ms: float = 1000.0
    #: A carrier's `received_at` may be at most this much older than the edge's receipt.
    sms_gateway_max_age_ms: int = 120_000
    #: Kannel's sendsms URL for replies (MT); empty: replies are only returned to the caller.
    sms_kannel_sendsms_url: str = ""
    sms_kannel_username: str = ""
    sms_kannel_password: str = ""
    #: Per carrier (SMART, CELLCARD, METFONE): the delivery-report URL Kannel calls for our reply
    #: (with `%d` for the DLR type); sms_svc adds `carrier_message_id`. JSON object.
    sms_kannel_dlr_urls: str = "{}"
    #: Per carrier: Kannel's smsc-id to send replies through. JSON object.
    sms_kannel_smsc_ids: str = "{}"

    #: A reply recorded by a replica is its own to send for this long; after that (the
    #: replica died, or Kannel refused it) any replica's poll sends it.
    sms_reply_lease_ms: int = 10_000
    #: How often each replica looks for replies left pending.
    sms_reply_poll_ms: float = 1_000.0
    #: A reply Kannel did not take is tried again after this long.
    sms_reply_retry_ms: int = 2_000

    @field_validator("sms_default_language")
    @classmethod
    def _language(cls, value: str) -> str:
        if value not in ("km", "en"):
            raise ValueError("must be km or en")
        return value

    @field_validator("sms_kannel_dlr_urls", "sms_kannel_smsc_ids")
    @classmethod
    def _json_object(cls, value: str) -> str:
        if not isinstance(json.loads(value), dict):
            raise ValueError("must be a JSON object")
        return value

    def msisdn_secret(self) -> bytes:
        """The pseudonym key; refuses to start without one (an empty key would let anyone
        recompute every subscriber's pseudonym)."""
        if self.sms_msisdn_secret:
            return self.sms_msisdn_secret.encode()
        if self.televote_state_dir:
            path = Path(self.televote_state_dir) / "msisdn-secret"
            if path.exists():
                return path.read_text().strip().encode()
        raise SystemExit("sms_svc: SMS_MSISDN_SECRET is not set and TELEVOTE_STATE_DIR has no "
                         "msisdn-secret")

"""FraudScoringService: the internal RPC every vote passes through (batched by vote_svc)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import orjson
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import PoolTimeout
from redis.exceptions import RedisError

from fraud_svc import store
from fraud_svc.config import FraudConfig
from fraud_svc.features import Facts, Prepared, Scorer, Verdict
from fraud_svc.geoip import IpInfo, IpIntel, parse_ip
from fraud_svc.state import FeatureState, Observation
from fraud_svc.store import BlocklistCache, Pool
from runtime.errors import ApiError, FieldViolation, invalid_argument
from runtime.interceptors import current_principal
from televote.fraud.v1 import (
    fraud_scoring_service_pb2,
    fraud_types_pb2,
)
from televote.vote.v1 import vote_types_pb2

log = logging.getLogger(__name__)

MAX_BATCH = 1_000
MAX_ID = 128

_ACTIONS = {"ALLOW": fraud_types_pb2.FRAUD_ACTION_ALLOW,
            "REVIEW": fraud_types_pb2.FRAUD_ACTION_REVIEW,
            "BLOCK": fraud_types_pb2.FRAUD_ACTION_BLOCK,
            "REFUSE": fraud_types_pb2.FRAUD_ACTION_REFUSE}

#: Who automatic blocks and decisions are attributed to.
SELF = "fraud_svc"

_NO_IP = IpInfo()


def read(votes: Any, now_ms: int) -> tuple[list[Facts], list[Observation]]:
    """The facts of a batch, in one pass over the messages (every field access builds a
    Python object); refuses a malformed batch whole, before anything is recorded.

    A vote without `server_time` is timed `now_ms`.
    """
    if len(votes) > MAX_BATCH:
        raise invalid_argument(FieldViolation(
            "votes", f"{len(votes)} votes; at most {MAX_BATCH} per batch"),
            reason="BATCH_TOO_LARGE")
    if not votes:
        raise invalid_argument(FieldViolation("votes", "at least one vote is required"))
    facts: list[Facts] = []
    observations: list[Observation] = []
    bad: list[int] = []
    for index, vote in enumerate(votes):
        user_id, round_id, device_id, ref = vote.user_id, vote.round_id, vote.device_id, \
            vote.ref
        ip, hint, ip_hash = vote.ip, vote.country_hint, vote.ip_hash
        if vote.HasField("location"):
            location = vote.location
            latitude, longitude = location.latitude, location.longitude
            # NaN fails both comparisons, infinities the ranges.
            located = -90 <= latitude <= 90 and -180 <= longitude <= 180
        else:
            latitude = longitude = None
            located = True
        # Almost every vote is well formed: one cheap combined test, and the field-by-field
        # one (which names each problem) only when it fails.
        if not (user_id and round_id and len(user_id) <= MAX_ID and len(round_id) <= MAX_ID
                and len(device_id) <= MAX_ID and len(ref) <= MAX_ID
                and len(ip_hash) <= MAX_ID
                and (user_id + round_id + device_id + ref + ip_hash).isprintable()
                and (not ip or parse_ip(ip) is not None)
                and (not hint or (len(hint) == 2 and hint.isalpha()))
                and located and vote.count >= 0):
            bad.append(index)
        facts.append(Facts(user_id, device_id, ip, latitude, longitude, hint, ip_hash))
        if vote.HasField("server_time"):
            # Timestamp.ToMilliseconds is pure Python and shows in profiles.
            server_time = vote.server_time
            time_ms = server_time.seconds * 1000 + server_time.nanos // 1_000_000
        else:
            time_ms = now_ms
        # The state keeps the IP's hash when the caller gave one (vote_svc does).
        observations.append(Observation(ref or uuid.uuid4().hex, user_id, device_id,
                                        ip_hash or ip, time_ms, max(1, vote.count)))
    problems = [problem for index in bad for problem in _problems(index, votes[index])]
    if problems:
        raise invalid_argument(*problems)
    return facts, observations


def _problems(index: int, vote: fraud_scoring_service_pb2.VoteFacts) -> list[FieldViolation]:
    problems: list[FieldViolation] = []
    at = f"votes[{index}]"
    if not vote.user_id:
        problems.append(FieldViolation(f"{at}.user_id", "required"))
    if not vote.round_id:
        problems.append(FieldViolation(f"{at}.round_id", "required"))
    for name in ("user_id", "round_id", "device_id", "ref", "ip_hash"):
        value = getattr(vote, name)
        if len(value) > MAX_ID:
            problems.append(FieldViolation(f"{at}.{name}", f"longer than {MAX_ID} chars"))
        elif not value.isprintable():
            problems.append(FieldViolation(f"{at}.{name}", "contains control characters"))
    if vote.ip and parse_ip(vote.ip) is None:
        problems.append(FieldViolation(f"{at}.ip", "not an IPv4 or IPv6 address"))
    if vote.country_hint and (len(vote.country_hint) != 2
                              or not vote.country_hint.isalpha()):
        problems.append(FieldViolation(f"{at}.country_hint",
                                       "not an ISO 3166-1 alpha-2 code"))
    if vote.HasField("location"):
        lat, lon = vote.location.latitude, vote.location.longitude
        if not (math.isfinite(lat) and -90 <= lat <= 90):
            problems.append(FieldViolation(f"{at}.location.latitude", "outside -90..90"))
        if not (math.isfinite(lon) and -180 <= lon <= 180):
            problems.append(FieldViolation(f"{at}.location.longitude",
                                           "outside -180..180"))
    if vote.count < 0:
        problems.append(FieldViolation(f"{at}.count", "negative"))
    return problems


class Scoring:
    """Scores batches: feature state from Redis, blocks from memory, decisions audited."""

    def __init__(self, config: FraudConfig, pool: Pool, state: FeatureState, intel: IpIntel,
                 blocklist: BlocklistCache, scorer: Scorer) -> None:
        self._config = config
        self._pool = pool
        self._state = state
        self._intel = intel
        self._blocklist = blocklist
        self._scorer = scorer
        #: Set when the replica drains: open streams stop taking batches (see drain).
        self.draining = asyncio.Event()

    def drain(self) -> None:
        """End the scoring streams: each answers the batches it has read, then ends OK, and
        its caller opens a new one (on another replica)."""
        self.draining.set()

    async def score_into(self, votes: Any, scores: Any) -> None:
        """Scores `votes` (VoteFacts) into `scores` (a repeated VoteScore field), in order."""
        facts, observations = read(votes, int(time.time() * 1000))
        try:
            await self._blocklist.ensure_started()
            verdicts = await self.score(votes, facts, observations)
            decision_ids = await self._record(votes, verdicts)
        except (RedisError, psycopg.Error, PoolTimeout) as error:
            # vote_svc decides what an unscored vote means (fail open by default); it needs a
            # clear UNAVAILABLE, not an INTERNAL.
            log.warning("scoring unavailable: %s", error)
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE",
                           "fraud scoring storage is unavailable",
                           retry_after_seconds=1.0) from None
        # Built by appending to the repeated fields: no intermediate lists of messages.
        add_score = scores.add
        for index, (vote, verdict) in enumerate(zip(votes, verdicts, strict=True)):
            scored = add_score(ref=vote.ref, action=_ACTIONS[verdict.action],
                               score=verdict.score, decision_id=decision_ids.get(index, ""))
            if verdict.refusal is not None:
                scored.refusal_reason, scored.refusal_message = verdict.refusal
            add_reason = scored.reasons.add
            for r in verdict.reasons:
                add_reason(name=r.name, contribution=r.contribution, detail=r.detail)

    async def score(self, votes: Any, facts: list[Facts],
                    observations: list[Observation]) -> list[Verdict]:
        """The verdicts of a batch (`read`); records the votes in the feature state."""
        prepared: list[Prepared] = []

        def prepare_batch() -> None:
            # Everything that needs the vote alone, done while Redis runs the batch's script.
            blocklist = self._blocklist.current
            lookup, prepare = self._intel.lookup, self._scorer.prepare
            is_traveller, match = blocklist.is_traveller, blocklist.match
            travellers = blocklist.travellers
            policies = blocklist.policies  # per-show fraud policies, by round (store.py)
            for fact, vote in zip(facts, votes, strict=True):
                ip = lookup(fact.ip) if fact.ip else _NO_IP
                country = fact.country_hint.upper() or ip.country
                prepared.append(prepare(
                    fact, ip,
                    traveller=is_traveller(fact.user_id, country) if travellers else False,
                    blocked_by=match(fact.user_id, fact.device_id, fact.ip),
                    policy=policies.get(vote.round_id) if policies else None))

        histories = await self._state.record(observations, meanwhile=prepare_batch)
        finish = self._scorer.finish
        return [finish(p, h) for p, h in zip(prepared, histories, strict=True)]

    async def _record(self, votes: Any, verdicts: list[Verdict]) -> dict[int, str]:
        """Audits every REVIEW, BLOCK and REFUSE, queues reviews and flags blocked users (a
        geographic refusal flags no one), in one statement.

        One statement (three data-modifying CTEs) in autocommit: atomic, and one round trip
        to PostgreSQL per batch, which matters in the hot path of every vote.
        """
        caller = current_principal().subject
        decision_ids: dict[int, str] = {}
        audit: list[dict[str, object]] = []
        reviews: list[dict[str, object]] = []
        flagged: dict[str, str] = {}
        # At most two ids per decision: its own, and a review's or a flag's.
        ids = _uuid4s(2 * sum(1 for v in verdicts if v.action != "ALLOW"))
        for index, (vote, verdict) in enumerate(zip(votes, verdicts, strict=True)):
            if verdict.action == "ALLOW":
                continue
            decision_id = next(ids)
            decision_ids[index] = decision_id
            signals = [{"name": r.name, "contribution": round(r.contribution, 4),
                        "detail": r.detail} for r in verdict.reasons]
            attributes: dict[str, object] = {
                "decision_id": decision_id, "action": verdict.action,
                "score": round(verdict.score, 4), "signals": signals, "inputs": verdict.inputs,
                "device_id": vote.device_id, "ip_hash": vote.ip_hash,
                "contestant_id": vote.contestant_id,
                "channel": vote_types_pb2.Channel.Name(vote.channel), "caller": caller}
            if verdict.action == "REVIEW":
                review_id = next(ids)
                attributes["review_id"] = review_id
                reviews.append({"review_id": review_id, "vote_ref": vote.ref or decision_id,
                                "user_id": vote.user_id, "round_id": vote.round_id,
                                "score": verdict.score, "signals": signals,
                                "decision_id": decision_id})
            elif verdict.action == "BLOCK" and "blocklist" not in verdict.inputs:
                flagged[vote.user_id] = (
                    f"score {verdict.score:.2f} > {self._config.fraud_block_threshold}: "
                    + ", ".join(r.name for r in verdict.reasons))
                attributes["flagged_user"] = True
            audit.append({
                "actor_role": "internal", "actor": SELF, "action": "fraud.score",
                "target": vote.ref,
                "reason": f"{verdict.action}: " + ", ".join(r.name for r in verdict.reasons),
                "details": {"user_id": vote.user_id, "round_id": vote.round_id,
                            "target_id": vote.ref, "request_id": vote.ref,
                            "attributes": attributes}})
        if not decision_ids:
            return {}
        # orjson: the standard encoder cost ~10 us per audited vote, a third of the handler
        # on a batch of bots (PostgreSQL stores the same jsonb either way).
        batch = Jsonb({"audit": audit, "reviews": reviews, "blocks": [
            {"block_id": next(ids), "value": user, "reason": reason}
            for user, reason in flagged.items()]}, dumps=orjson.dumps)
        async with self._pool.connection() as conn:
            await conn.set_autocommit(True)
            try:
                await conn.execute(store.RECORD_SCORES, {"actor": SELF, "batch": batch})
            finally:
                await conn.set_autocommit(False)
        if flagged:
            # After the commit: a flag in Redis always has its row in PostgreSQL.
            await self._state.set_blocked(list(flagged))
            self._blocklist.current.users.update(flagged)
        return decision_ids


def _uuid4s(count: int) -> Iterator[str]:
    """Up to `count` random (version 4) UUIDs as uuid.uuid4() makes them, made as needed.

    One read of the OS's random source for all, and text formatted directly: uuid4() costs a
    system call and a pure-Python UUID object each, and a blocked batch needs ~100.
    """
    data = bytearray(os.urandom(16 * count))
    for at in range(0, 16 * count, 16):
        data[at + 6] = data[at + 6] & 0x0F | 0x40  # version 4
        data[at + 8] = data[at + 8] & 0x3F | 0x80  # RFC 4122 variant
        text = data[at:at + 16].hex()
        yield f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"

"""The life of a vote inside vote_svc: score, admit (one Lua script), group-commit, answer.

Used by both SubmitVote (one vote) and SubmitVotes (a gateway's batch): each vote gets either
an AcceptedVote (only after its ledger batch committed) or an ApiError that changed nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from runtime import overload
from runtime.coalesce import Coalescer, company_wait_ms
from runtime.errors import ApiError
from runtime.ids import new_time_ids
from runtime.protoconv import CHANNEL_ENUMS, timestamp_ms
from runtime.receipts import leaf_hash
from runtime.storage import Storage
from televote.fraud.v1 import fraud_scoring_service_pb2
from televote.vote.v1 import vote_types_pb2
from vote_svc import store
from vote_svc.admission import RATE_WINDOW_MS, Outcome, Scripts, VoteKeys, decode_reply
from vote_svc.config import VoteConfig
from vote_svc.fraud import FraudScorer, Score, ScoringUnavailableError
from vote_svc.geo import IpPlaces
from vote_svc.ledger import CommitResult, Ledger, LedgerVote
from vote_svc.overload import QueueTimeAdmission
from vote_svc.recovery import Recovery

log = logging.getLogger(__name__)

#: Rounds of the admit -> (load | rebuild | wait) loop before giving up with UNAVAILABLE.
_MAX_ROUNDS = 400

_TYPE_NAMES = {vote_types_pb2.VOTE_TYPE_FREE: "FREE", vote_types_pb2.VOTE_TYPE_PAID: "PAID",
               vote_types_pb2.VOTE_TYPE_PREMIUM_SMS: "PREMIUM_SMS"}


@dataclass(frozen=True)
class VoteRequest:
    """A validated vote, whoever submitted it."""

    request_id: str
    user_id: str
    round_id: str
    contestant_id: str
    vote_type: str  # FREE, PAID, PREMIUM_SMS
    count: int
    channel: str  # APP, WEB, SMS
    device_id: str = ""
    app_version: str = ""
    latitude: float | None = None
    longitude: float | None = None
    accuracy: float = 0.0
    ip: str = ""
    client_time: timestamp_pb2.Timestamp | None = None
    received_at: datetime | None = None
    #: When the edge received the vote, where that is not `received_at` (a carrier's own
    #: receive time, through the edge, is recorded but never judges lines-open).
    edge_received_at: datetime | None = None

    @cached_property
    def received_ms(self) -> int | str:
        """What the admission script judges lines-open by (within the window's receive lag):
        when the edge received the vote (for sms_svc's votes, the message), epoch ms; ''
        when unknown."""
        received = self.edge_received_at or self.received_at
        return "" if received is None else int(received.timestamp() * 1000)

    @cached_property
    def fingerprint(self) -> str:
        """What makes a retry "the same vote" (client metadata may differ between tries)."""
        text = "|".join([self.round_id, self.contestant_id, self.vote_type, str(self.count),
                         self.channel])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def facts(self, server_time_ms: int, ip_hash: str) -> fraud_scoring_service_pb2.VoteFacts:
        facts = fraud_scoring_service_pb2.VoteFacts(
            ref=self.request_id, user_id=self.user_id, device_id=self.device_id, ip=self.ip,
            ip_hash=ip_hash,
            channel=CHANNEL_ENUMS[self.channel],
            round_id=self.round_id, contestant_id=self.contestant_id, count=self.count,
            app_version=self.app_version)
        if self.latitude is not None and self.longitude is not None:
            facts.location.latitude = self.latitude
            facts.location.longitude = self.longitude
            facts.location.accuracy_meters = self.accuracy
        if self.client_time is not None:
            facts.client_time.CopyFrom(self.client_time)
        facts.server_time.FromMilliseconds(server_time_ms)
        return facts


Result = vote_types_pb2.AcceptedVote | ApiError
#: A voter in a round: (user_id, episode_id, round_id).
UserKey = tuple[str, str, str]


def unavailable(message: str = "the vote was not recorded; retry with the same request_id",
                ) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", message,
                    retry_after_seconds=0.2)


@dataclass
class _Batch:
    """One call's votes on their way through admission rounds, and what each came to."""

    votes: list[VoteRequest]
    scores: list[Score]
    results: list[Result | None]  # the answer, once there is one
    #: admitted votes waiting for the group commit
    commits: dict[int, tuple[LedgerVote, asyncio.Future[CommitResult]]] = field(
        default_factory=dict)
    #: PostgreSQL's figures for a vote's user (NEED_LOAD), sent with the next admission
    loaded: dict[int, list[str | int]] = field(default_factory=dict)


class Ingestor:
    """Admission and durable recording of votes for one vote_svc process."""

    def __init__(self, storage: Storage, scripts: Scripts, ledger: Ledger, scorer: FraudScorer,
                 config: VoteConfig) -> None:
        self._storage = storage
        self._scripts = scripts
        self._ledger = ledger
        self._scorer = scorer
        self._config = config
        self._salt = config.vote_pseudonym_salt.encode()
        self._ip_key = config.vote_ip_hash_key.encode()
        self._ip_places = IpPlaces(config.vote_geoip_db)
        # Voters' first votes arriving together: one PostgreSQL query for all of them.
        self._users: Coalescer[UserKey, list[str | int]] = Coalescer(
            self._load_users, max_inflight=config.vote_admit_max_inflight)
        self._inflight = 0.0  # cost of the votes between submit() and their answer
        self._queue = QueueTimeAdmission(target_ms=config.vote_queue_target_ms,
                                         interval_ms=config.vote_queue_interval_ms,
                                         budget_ms=config.vote_queue_budget_ms)
        self.recovery = Recovery(storage, scripts, config)

    # -- the pipeline -------------------------------------------------------------------

    @property
    def config(self) -> VoteConfig:
        return self._config

    def cost(self, count: int, *, gateway: bool = False) -> float:
        """What `count` votes weigh against VOTE_MAX_INFLIGHT_VOTES: a vote of a unary call
        counts 1, a vote of a gateway batch VOTE_GATEWAY_VOTE_COST (it shares its call, its
        scoring request and its Redis and PostgreSQL round trips with the batch)."""
        return count * (self._config.vote_gateway_vote_cost if gateway else 1.0)

    async def submit(self, votes: list[VoteRequest], *, gateway: bool = False,
                     arrived_ms: float | None = None) -> list[Result]:
        """Admit and record `votes` (the caller has asked `shed` first); `arrived_ms` is when
        the call reached this host (vote_svc/overload.py `arrival_ms`; None from inside the
        mesh)."""
        cost = self.cost(len(votes), gateway=gateway)
        self._inflight += cost
        try:
            return await self._submit(votes, arrived_ms)
        finally:
            self._inflight -= cost

    def shed(self, count: int, time_left_s: float | None, *, gateway: bool = False,
             arrived_ms: float | None = None) -> ApiError | None:
        """Refuse a call of `count` votes before anything is admitted (or even validated)
        when its answer could not arrive in time; `time_left_s` is what remains of the
        caller's deadline, `arrived_ms` when the call reached this host (`submit`).

        In the close-of-lines spike an overloaded replica must not keep working on calls
        whose clients have already given up (they retry, and the work doubles) nor queue
        without bound (every vote gets slower). Where the queues are (the edge, the gRPC
        server's completion queue, this event loop) a call cannot be seen until it is taken
        out, so the call is judged by how long it waited since it reached this host, on this
        host's clock (vote_svc/overload.py) -> refused at once with UNAVAILABLE `OVERLOADED` and a
        jittered retry delay (`overloaded`). A refusal costs a fraction of a vote, so under
        any offered load the replica spends its CPU on the votes it can answer in time, and
        the queue stays short. Past `vote_max_inflight_votes` (a backstop for calls from
        inside the mesh, which carry no timeout stated by the edge) new calls are refused
        too, and a call whose deadline has (nearly) passed is not started. Nothing changes
        for a refused vote.

        The limit is on cost, not on calls or votes (`cost`): counted per vote, one
        1,000-vote gateway batch filled a replica's limit on its own, and at the close of
        lines every other call (SMS batches included) was refused for a load the replica
        carries easily.
        """
        config = self._config
        if time_left_s is not None and time_left_s * 1000 <= config.vote_min_time_left_ms:
            return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED",
                            "the call's deadline passed before the vote could be admitted; "
                            "nothing was recorded")
        if arrived_ms is not None and self._queue.refuse(arrived_ms):
            return self.overloaded()
        if self._inflight >= config.vote_max_inflight_votes:  # a call may overshoot by itself
            return self.overloaded()
        return None

    def overloaded(self) -> ApiError:
        """UNAVAILABLE `OVERLOADED`, asking for a retry after a random delay around
        `vote_overload_retry_ms` (half to one and a half times it): a constant would bring a
        refused burst back as the same burst."""
        delay_s = self._config.vote_overload_retry_ms / 1000 * random.uniform(
            *overload.RETRY_SPREAD)
        return ApiError(grpc.StatusCode.UNAVAILABLE, "OVERLOADED",
                        "too many votes at this moment; nothing was recorded, retry with the "
                        "same request_id after the retry delay",
                        retry_after_seconds=delay_s)

    async def _submit(self, votes: list[VoteRequest], arrived_ms: float | None,
                      ) -> list[Result]:
        now_ms = int(time.time() * 1000)
        # A vote waits for company once, at the first stage that batches: scoring, else the
        # admission's Redis pipeline (VOTE_ADMIT_WAIT_MS; not a gateway's batch, whose votes
        # are company enough). Votes scored together arrive at admission together, and
        # retries (after a first vote's read) arrive together too.
        wait_ms = company_wait_ms(len(votes), self._config.vote_admit_wait_ms)
        try:
            if self._scorer.available:
                wait_ms = 0.0
                # Timing signals judge when each vote arrived (at the edge, or at the SMS
                # gateway), not when it reached this replica after a queue.
                scores = await self._scorer.score([
                    vote.facts(now_ms if vote.received_at is None
                               else int(vote.received_at.timestamp() * 1000),
                               self.ip_hash(vote.ip))
                    for vote in votes])
            else:  # no protos to build for a scorer that is not there
                scores = self._scorer.unavailable(len(votes))
        except ScoringUnavailableError:
            return [unavailable("fraud scoring is unavailable")] * len(votes)
        if arrived_ms is not None and self._queue.late(arrived_ms):
            # Scoring queued (fraud_svc, or this event loop): refuse before admitting, while
            # a refusal still changes nothing.
            return [self.overloaded() for _ in votes]
        batch = _Batch(votes, scores, [None] * len(votes))
        todo = list(range(len(votes)))
        backoff = 0.002
        for _ in range(_MAX_ROUNDS):
            if not todo:
                break
            todo, waiting = await self._admission_round(batch, todo, wait_ms)
            wait_ms = 0.0
            if waiting:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.05)
        for index in todo:
            batch.results[index] = unavailable("admission did not settle")
        for index, (entry, future) in batch.commits.items():
            batch.results[index] = self._after_commit(votes[index], entry, await future)
        assert all(result is not None for result in batch.results)
        return batch.results  # type: ignore[return-value]

    async def _admission_round(self, batch: _Batch, todo: list[int], wait_ms: float,
                               ) -> tuple[list[int], bool]:
        """Runs the admission script for the votes `todo` of `batch` (recording what each
        came to in it); returns the votes to try again and whether one waits for another
        replica's admission.

        A voter the Redis cache does not know yet (NEED_LOAD) is read from PostgreSQL into
        `batch.loaded`, and the next round's admission fills the cache with it in the same
        call.
        """
        config = self._config
        votes, scores, results, commits = batch.votes, batch.scores, batch.results, batch.commits
        vote_keys = [VoteKeys.of(votes[i].user_id, votes[i].round_id, votes[i].request_id)
                     for i in todo]
        calls = []
        for index, keyset, vote_id in zip(todo, vote_keys, new_vote_ids(len(todo)),
                                          strict=True):
            vote = votes[index]
            calls.append(self._scripts.call(self._scripts.admit, keyset.admit_keys(), [
                vote.contestant_id, vote.vote_type, vote.count, vote.channel.lower(),
                vote.fingerprint, vote_id, config.vote_lease_ms,
                config.vote_rate_limit_per_minute,
                _REFUSALS.get(scores[index].action, "0"), RATE_WINDOW_MS,
                config.vote_idempotency_ttl_s * 1000, vote.round_id, vote.received_ms,
                *batch.loaded.get(index, ())],
                wait_ms=wait_ms))
        replies = await asyncio.gather(*calls, return_exceptions=True)

        again: list[int] = []
        waiting = False
        need_load: dict[int, UserKey] = {}
        missing_windows: dict[str, list[int]] = {}
        rebuild: set[int] = set()
        takeovers: list[tuple[int, VoteKeys, Outcome]] = []
        for index, keyset, raw in zip(todo, vote_keys, replies, strict=True):
            vote = votes[index]
            if isinstance(raw, BaseException):
                log.warning("admission script failed: %r", raw)
                results[index] = unavailable()
                continue
            reply = decode_reply(raw)
            status = reply[0]
            if status == "OK":
                outcome = Outcome.parse(reply[1])
                entry = self._ledger_vote(vote, scores[index], keyset, outcome)
                entry.pending_member = reply[2]
                commits[index] = (entry, self._ledger.submit(entry))
            elif status == "DONE":
                results[index] = self._accepted(vote, Outcome.parse(reply[1]))
            elif status == "PENDING":
                outcome = Outcome.parse(reply[1])
                if int(reply[2]) >= outcome.lease_until_ms:
                    takeovers.append((index, keyset, outcome))
                else:
                    waiting = True
                again.append(index)
            elif status == "NEED_LOAD":
                need_load[index] = (vote.user_id, reply[1], vote.round_id)
                again.append(index)
            elif status == "NO_WINDOW":
                missing_windows.setdefault(vote.round_id, []).append(index)
            elif status == "REBUILD":
                rebuild.add(keyset.shard)
                again.append(index)
            else:
                results[index] = _refusal(reply, scores[index])
        try:
            if rebuild:
                await asyncio.gather(*(self.recovery.rebuild_shard(shard) for shard in rebuild))
            if need_load:
                figures = await asyncio.gather(*map(self._users.submit, need_load.values()))
                batch.loaded.update(zip(need_load, figures, strict=True))
            for round_id, indexes in missing_windows.items():
                refusal = await self.recovery.restore_window(
                    round_id, {VoteKeys.of(votes[i].user_id, round_id, "").window
                               for i in indexes})
                if refusal is None:
                    again.extend(indexes)
                else:
                    for index in indexes:
                        results[index] = refusal
            for index, keyset, outcome in takeovers:
                await self.recovery.take_over(votes[index], keyset, outcome)
        except Exception as error:  # PostgreSQL or Redis failed: nothing was admitted for these
            log.warning("admission slow path failed: %r", error)
            for index in again + [i for ids in missing_windows.values() for i in ids]:
                if results[index] is None and index not in commits:
                    results[index] = unavailable()
            return [], False
        return sorted(again), waiting

    def _after_commit(self, vote: VoteRequest, entry: LedgerVote, result: CommitResult) -> Result:
        if result.kind == "committed":
            return _answer(entry.outcome, entry.receipt_hash)
        if result.kind == "existing" and result.existing is not None:
            first = result.existing
            if first.fingerprint != vote.fingerprint:
                return _mismatch()
            return vote_types_pb2.AcceptedVote(
                vote_id=first.vote_id, receipt_hash=first.receipt_hash,
                accepted_at=timestamp_ms(first.admitted_ms),
                free_votes_left=entry.outcome.free_left,
                paid_balance=entry.outcome.paid_balance)
        if result.kind == "quota":
            # The Redis cache was looser than the ledger (after a Redis loss): the ledger's
            # CHECK had the last word. Nothing was recorded.
            if result.constraint == "wallet_not_overspent":
                return ApiError(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE",
                                "not enough paid votes", metadata={"paid_balance": "0"})
            return ApiError(grpc.StatusCode.FAILED_PRECONDITION, "NO_FREE_VOTES",
                            "no free votes left in this episode",
                            metadata={"free_votes_left": "0"})
        return unavailable()

    # -- helpers --------------------------------------------------------------------------

    def _db(self) -> Any:
        """A pooled connection, waiting no longer than a commit may take (PostgreSQL down
        must turn into UNAVAILABLE quickly, not a hung vote)."""
        return self._storage.pool.connection(timeout=self._config.vote_commit_timeout_ms / 1000)

    def _ledger_vote(self, vote: VoteRequest, score: Score, keyset: VoteKeys,
                     outcome: Outcome) -> LedgerVote:
        leaf = self.leaf_data(vote, outcome)
        return LedgerVote(
            vote_id=outcome.vote_id, request_id=vote.request_id, user_id=vote.user_id,
            round_id=vote.round_id, episode_id=outcome.episode_id,
            contestant_id=vote.contestant_id, vote_type=vote.vote_type, count=vote.count,
            channel=vote.channel, admitted_ms=outcome.admitted_ms, fraud_action=score.action,
            fraud_score=score.score, fraud_decision_id=score.decision_id,
            ip_hash=self.ip_hash(vote.ip),
            device_id=vote.device_id, app_version=vote.app_version, latitude=vote.latitude,
            longitude=vote.longitude, received_at=vote.received_at,
            fingerprint=vote.fingerprint, leaf_data=leaf, receipt_hash=leaf_hash(leaf),
            keys=keyset, outcome=outcome, ip_geo=self._ip_places.place(vote.ip),
            received_ms=outcome.judged_ms)

    def ip_hash(self, ip: str) -> str:
        """What the ledger (and fraud_svc) keep of an IP: HMAC-SHA256 under VOTE_IP_HASH_KEY,
        128 bits in hex; empty without an IP (SMS)."""
        if not ip:
            return ""
        return hmac.new(self._ip_key, ip.encode(), hashlib.sha256).hexdigest()[:32]

    def leaf_data(self, vote: VoteRequest, outcome: Outcome) -> bytes:
        """The canonical bytes of a vote's ledger leaf (VoteReceipt.leaf_data). It holds the
        time the window was judged by ("received_ms", the admission script's), so the signed
        tree commits to it: an export cannot move a vote in or out of the window unseen."""
        voter = hmac.new(self._salt, vote.user_id.encode(), hashlib.sha256).hexdigest()[:32]
        leaf: dict[str, Any] = {
            "accepted_at_ms": outcome.admitted_ms, "channel": vote.channel,
            "contestant_id": vote.contestant_id, "count": vote.count,
            "round_id": vote.round_id, "vote_id": outcome.vote_id, "vote_type": vote.vote_type,
            "voter": voter}
        if outcome.judged_ms is not None:  # None only in a record older than this field
            leaf["received_ms"] = outcome.judged_ms
        return json.dumps(leaf, sort_keys=True, separators=(",", ":")).encode()

    def _accepted(self, vote: VoteRequest, outcome: Outcome) -> vote_types_pb2.AcceptedVote:
        return _answer(outcome, leaf_hash(self.leaf_data(vote, outcome)))

    async def _load_users(self, wanted: list[UserKey]) -> list[list[str | int]]:
        """What PostgreSQL says of each (user, episode, round): the ADMIT script's ARGV[14..19]
        (credited, spent, episode, free used in it, round, free used in it); the cache's `spent`
        includes the votes refunds clawed back (vote_svc/purchases.py)."""
        triples = sorted(set(wanted))
        async with self._db() as connection:
            # One statement, in autocommit (a voter's first vote of an episode pays for it).
            # The user's free votes in the round are summed over the user's own ledger rows
            # (the voter's index, one partition): with the round in the WHERE clause the
            # planner, misled by a growing ledger's stale statistics, intersected it with the
            # round's index and read the whole round for every new voter (~1 ms a voter at
            # 200,000 votes, growing with the round).
            await connection.set_autocommit(True)
            try:
                cursor = await connection.execute(
                    store.USER_CACHE,
                    ([t[0] for t in triples], [t[1] for t in triples],
                     [t[2] for t in triples]))
                rows: list[dict[str, Any]] = await cursor.fetchall()
            finally:
                await connection.set_autocommit(False)
        figures: dict[UserKey, list[str | int]] = {
            (row["user_id"], row["episode_id"], row["round_id"]): [
                row["credited"], row["spent"], row["episode_id"], int(row["episode_used"]),
                row["round_id"], int(row["round_used"])] for row in rows}
        return [figures[triple] for triple in wanted]

def new_vote_ids(count: int, now_ms: int | None = None) -> list[str]:
    """`count` time-ordered vote ids (runtime.ids.new_time_ids).

    Time-ordered because the ledger is indexed by vote id: random (version 4) ids put every
    insert, and every lookup of a recent vote (the result checkpoint's duplicate check), on a
    random page of an index that outgrows memory at millions of votes; these land at its
    right edge. The time they reveal is the one the vote's receipt already carries.
    """
    return new_time_ids(count, now_ms)


#: What the admission script is told to refuse (after the idempotency check, so a retry of an
#: accepted vote still gets its answer): "1" a fraud block, "2" a geographic rule.
_REFUSALS = {"BLOCK": "1", "REFUSE": "2"}


def _refusal(reply: list[str], score: Score) -> ApiError:
    status = reply[0]
    precondition = grpc.StatusCode.FAILED_PRECONDITION
    if status == "MISMATCH":
        return _mismatch()
    if status == "BLOCKED" and score.refusal_reason:
        # GEO_RESTRICTED or LOCATION_MISMATCH, with fraud_svc's message for the voter.
        return ApiError(grpc.StatusCode.PERMISSION_DENIED, score.refusal_reason,
                        score.refusal_message)
    if status == "BLOCKED":
        return ApiError(grpc.StatusCode.PERMISSION_DENIED, "FRAUD_BLOCKED",
                        "the vote was refused by fraud controls")
    if status == "NOT_OPEN":
        return ApiError(precondition, "VOTING_NOT_OPEN", "voting has not opened yet",
                        metadata={"opens_at_ms": reply[2]})
    if status == "CLOSED":
        return ApiError(precondition, "VOTING_CLOSED", "voting has closed for this channel")
    if status == "INVALID_CONTESTANT":
        return ApiError(precondition, "INVALID_CONTESTANT", "the contestant is not in this round")
    if status == "RATE_LIMITED":
        delay_ms = int(reply[1])
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED",
                        "too many votes this minute", retry_after_seconds=delay_ms / 1000)
    if status == "NO_FREE":
        return ApiError(precondition, "NO_FREE_VOTES", "no free votes left in this episode",
                        metadata={"free_votes_left": reply[1]})
    if status == "NO_BALANCE":
        return ApiError(precondition, "INSUFFICIENT_BALANCE", "not enough paid votes",
                        metadata={"paid_balance": reply[1]})
    log.error("unexpected admission reply %r", reply)
    return unavailable()


def _answer(outcome: Outcome, receipt: bytes) -> vote_types_pb2.AcceptedVote:
    return vote_types_pb2.AcceptedVote(
        vote_id=outcome.vote_id, receipt_hash=receipt,
        accepted_at=timestamp_ms(outcome.admitted_ms),
        free_votes_left=outcome.free_left, paid_balance=outcome.paid_balance)


def _mismatch() -> ApiError:
    return ApiError(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH",
                    "this request_id was used before for a different vote")

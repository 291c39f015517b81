"""fraud_svc against real PostgreSQL, Redis and Envoy: signals, flags, reviews, blocks, audit.

Scoring is driven through an in-process server (port 0, same database and Redis as the mesh)
with a GeoIP database written by the test and a model that always says 0, so each rule
signal can be seen on its own. That server's default policy is the tuned one with the
geographic rules as signals (FRAUD_SCORING=tuned, FRAUD_GEO_*=score), the option whose numbers
most tests here pin; the seed's (the default) is set per show where a test says so, and its
rules are pinned one by one in tests/unit/test_seed_rules.py. The mesh's own fraud_svc (the
development GeoIP database `televote up` writes, shipped model, default policy) serves the
operator RPCs through the edge.
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest
import pytest_asyncio
from google.protobuf import timestamp_pb2
from psycopg.rows import dict_row

from fraud_svc.behaviour import NETWORKS, Network
from fraud_svc.config import FraudConfig
from fraud_svc.devgeo import write_database
from fraud_svc.features import Policy
from fraud_svc.server import create_server
from fraud_svc.state import blocked_key
from ops.stack import Stack, dev_geoip_environment
from runtime.access import Principal, Role
from runtime.errors import error_info
from runtime.storage import create_redis
from televote.fraud.v1 import (
    fraud_review_service_pb2,
    fraud_review_service_pb2_grpc,
    fraud_scoring_service_pb2,
    fraud_scoring_service_pb2_grpc,
    fraud_types_pb2,
)
from tests.conftest import bearer
from tests.fraud_support import write_zero_model
from tests.support_windows import close_test_round, open_test_round

INTERNAL = Principal(Role.INTERNAL, "vote_svc").to_metadata()
KH_IP = "100.64.1.10"  # Phnom Penh
TH_IP = "100.80.1.10"  # Bangkok
VN_IP = "100.81.1.10"
ASN_VPN_IP = "100.99.1.10"  # a Cambodian network whose AS is on the VPN list
CIDR_VPN_IP = "100.100.1.10"  # not in the database; its network is on the VPN list
PHNOM_PENH = (11.5564, 104.9282)
SIEM_REAP = (13.3633, 103.8564)
T0 = 1_900_000_000_000  # a fixed clock (ms) so timing signals do not depend on the machine
DECISION_SQL = ("SELECT * FROM audit_log WHERE action = 'fraud.score'"
                " AND details -> 'attributes' ->> 'decision_id' = %s")
Vote = fraud_scoring_service_pb2.VoteFacts
Action = fraud_types_pb2.FraudAction


@dataclass
class Fraud:
    host: Any
    stub: fraud_scoring_service_pb2_grpc.FraudScoringServiceStub
    config: FraudConfig

    async def score(self, *votes: Vote) -> list[fraud_scoring_service_pb2.VoteScore]:
        reply = await self.stub.ScoreVotes(
            fraud_scoring_service_pb2.ScoreVotesRequest(votes=votes), metadata=INTERNAL,
            timeout=10)
        return list(reply.scores)


@pytest_asyncio.fixture(scope="module")
async def fraud(stack: Stack, tmp_path_factory: pytest.TempPathFactory,
                ) -> AsyncIterator[Fraud]:
    geo = write_database(tmp_path_factory.mktemp("geo") / "city.mmdb", [
        *NETWORKS, Network("100.99.0.0/16", "KH", "Phnom Penh", *PHNOM_PENH, 64_999)])
    zero = write_zero_model(tmp_path_factory.mktemp("model") / "zero.json")
    config = FraudConfig(
        database_url=stack.database_url, redis_url=stack.redis_url, fraud_geoip_db=str(geo),
        fraud_vpn_cidrs=("100.100.0.0/16",), fraud_vpn_asns=("AS64999",),
        fraud_scoring="tuned", fraud_geo_foreign_country="score",
        fraud_geo_location_mismatch="score", fraud_model_path=str(zero),
        fraud_weight_model=0.0, fraud_refresh_seconds=0.1,
        televote_drain_announce_seconds=0.0, televote_grace_seconds=1.0)
    host, port = create_server(config)
    await host.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Fraud(host, fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(channel), config)
    await host.stop()


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def vote(user: str, *, at_ms: int = T0, ip: str = KH_IP, device: str = "",
         gps: tuple[float, float] | None = None, round_id: str = "round-1",
         ref: str | None = None, country: str = "", count: int = 1) -> Vote:
    facts = Vote(ref=ref or str(uuid.uuid4()), user_id=user, round_id=round_id, ip=ip,
                 device_id=device, contestant_id="c1", count=count, country_hint=country)
    facts.server_time.FromMilliseconds(at_ms)
    if gps is not None:
        facts.location.latitude, facts.location.longitude = gps
    return facts


def reasons(score: fraud_scoring_service_pb2.VoteScore) -> dict[str, float]:
    return {reason.name: reason.contribution for reason in score.reasons}


async def _db(stack: Stack, sql: str, *params: Any) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(stack.database_url,
                                                     row_factory=dict_row) as conn:
        cursor = await conn.execute(sql, params)
        return await cursor.fetchall() if cursor.description else []


async def _refusal(call: Any) -> tuple[grpc.StatusCode, str, Sequence[str]]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    info = error_info(refused.value)
    fields: list[str] = []
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [violation.field for violation in bad.field_violations]
    return refused.value.code(), info.reason if info else "", fields


# --- signals, each on its own -------------------------------------------------------------

async def test_a_clean_vote_is_allowed_with_nothing_against_it(fraud: Fraud) -> None:
    [score] = await fraud.score(vote(_user(), gps=(11.60, 104.90), device=_user()))
    assert score.action == Action.FRAUD_ACTION_ALLOW
    assert score.score == 0.0 and list(score.reasons) == []
    assert score.decision_id == ""  # ALLOW is not audited one by one


async def test_velocity_counts_the_users_votes_in_the_last_60_seconds(fraud: Fraud) -> None:
    user = _user()
    # Uneven gaps (std dev ~1.1 s) so only velocity fires: 51 votes within 58 s.
    times = [T0]
    for index in range(50):
        times.append(times[-1] + (50 if index % 2 else 2_250))
    scores = await fraud.score(*(vote(user, at_ms=t) for t in times))
    assert all("velocity" not in reasons(s) for s in scores[:50])
    assert reasons(scores[50]) == {"velocity": pytest.approx(0.6)}
    assert "51 votes in 60 s" in scores[50].reasons[0].detail
    assert scores[50].action == Action.FRAUD_ACTION_REVIEW
    # A minute later the window has moved on.
    [later] = await fraud.score(vote(user, at_ms=times[-1] + 61_000))
    assert "velocity" not in reasons(later)


async def test_velocity_counts_votes_not_calls(fraud: Fraud) -> None:
    user = _user()
    first, second = await fraud.score(vote(user, count=50), vote(user, at_ms=T0 + 1_000))
    assert "velocity" not in reasons(first)
    assert reasons(second) == {"velocity": pytest.approx(0.6)}
    assert "51 votes in 60 s" in second.reasons[0].detail
    [hundred] = await fraud.score(vote(_user(), count=100))  # one call of 100 votes
    assert "100 votes in 60 s" in hundred.reasons[0].detail


async def test_a_device_used_by_more_than_three_users_is_shared(fraud: Fraud) -> None:
    device = f"dev-{uuid.uuid4().hex}"
    scores = await fraud.score(*(vote(_user(), device=device) for _ in range(4)))
    assert ["shared_device" in reasons(s) for s in scores] == [False, False, False, True]
    assert reasons(scores[3])["shared_device"] == pytest.approx(0.4)
    # The same user again does not make the device more shared.
    assert "device used by 4 users" in scores[3].reasons[0].detail


async def test_vpn_and_proxy_networks_come_from_the_cidr_and_asn_lists(fraud: Fraud) -> None:
    by_asn, by_cidr, hosting, home = await fraud.score(
        vote(_user(), ip=ASN_VPN_IP), vote(_user(), ip=CIDR_VPN_IP),
        vote(_user(), ip="100.96.3.3"), vote(_user(), ip=KH_IP))
    assert reasons(by_asn) == {"vpn_proxy": pytest.approx(0.35)}
    assert "AS64999" in by_asn.reasons[0].detail
    assert reasons(by_cidr) == {"vpn_proxy": pytest.approx(0.35)}
    assert "100.100.0.0/16" in by_cidr.reasons[0].detail
    # A network the database marks as hosting (Singapore, so also outside the geo-fence).
    assert set(reasons(hosting)) == {"vpn_proxy", "foreign_country"}
    assert reasons(home) == {}


async def test_a_vote_from_outside_cambodia_is_geofenced(fraud: Fraud) -> None:
    abroad, hinted = await fraud.score(vote(_user(), ip=TH_IP),
                                       vote(_user(), ip=KH_IP, country="vn"))
    assert reasons(abroad) == {"foreign_country": pytest.approx(0.3)}
    assert "TH" in abroad.reasons[0].detail
    assert reasons(hinted) == {"foreign_country": pytest.approx(0.3)}


async def test_gps_more_than_100_km_from_the_ip_location_is_a_mismatch(fraud: Fraud) -> None:
    far, near, no_gps = await fraud.score(vote(_user(), gps=SIEM_REAP),
                                          vote(_user(), gps=(11.9, 104.9)),
                                          vote(_user()))
    assert reasons(far) == {"gps_mismatch": pytest.approx(0.25)}
    assert "km from the IP" in far.reasons[0].detail
    assert reasons(near) == {} and reasons(no_gps) == {}


async def test_votes_at_a_fixed_interval_are_bot_timing(fraud: Fraud) -> None:
    user = _user()
    scores = await fraud.score(*(vote(user, at_ms=T0 + i * 5_000) for i in range(6)))
    # Five intervals are needed to judge a rhythm; the sixth vote has them.
    assert ["bot_timing" in reasons(s) for s in scores] == [False] * 5 + [True]
    assert reasons(scores[5]) == {"bot_timing": pytest.approx(0.55)}
    human = _user()
    rng = random.Random(4)
    at = T0
    human_votes = []
    for _ in range(6):
        at += rng.randint(2_000, 60_000)
        human_votes.append(vote(human, at_ms=at))
    assert "bot_timing" not in reasons((await fraud.score(*human_votes))[-1])


async def test_votes_scored_again_with_the_same_ref_are_not_counted_twice(
        fraud: Fraud) -> None:
    user = _user()
    same = vote(user, ref="retry-1")
    for _ in range(60):
        [score] = await fraud.score(same)
    assert "velocity" not in reasons(score)


async def test_the_local_mesh_scores_country_and_vpn_signals_from_its_dev_database(
        stack: Stack, tmp_path: Any) -> None:
    """`televote up` (the session stack) wrote the synthetic plan's database into its state
    directory and pointed fraud_svc at it; a configured FRAUD_GEOIP_DB is left alone."""
    assert (stack.settings.state_dir / "dev-geoip.mmdb").is_file()
    async with stack.channel("fraud_svc", as_holder="vote_svc") as channel:
        stub = fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(channel)
        reply = await stub.ScoreVotes(fraud_scoring_service_pb2.ScoreVotesRequest(
            votes=[vote(_user(), ip=TH_IP), vote(_user(), ip="100.97.4.4"),
                   vote(_user(), ip=KH_IP)]), metadata=INTERNAL, timeout=10)
    abroad, hosting, home = reply.scores
    # The default policy refuses votes from abroad (the dev database places TH_IP in Bangkok).
    assert (abroad.action, abroad.refusal_reason) == (Action.FRAUD_ACTION_REFUSE,
                                                      "GEO_RESTRICTED")
    assert "vpn_proxy" in reasons(hosting) and hosting.refusal_reason == "GEO_RESTRICTED"
    assert home.action != Action.FRAUD_ACTION_REFUSE
    assert not {"foreign_country", "vpn_proxy"} & set(reasons(home))
    assert dev_geoip_environment(tmp_path, {"FRAUD_GEOIP_DB": "/data/GeoLite2-City.mmdb"}) == {}
    assert not list(tmp_path.iterdir())


async def test_without_a_geoip_database_ip_signals_say_unknown(stack: Stack) -> None:
    config = FraudConfig(database_url=stack.database_url, redis_url=stack.redis_url,
                         fraud_geoip_db="", televote_drain_announce_seconds=0.0,
                         televote_grace_seconds=1.0)
    host, port = create_server(config)
    await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(channel)
            reply = await stub.ScoreVotes(fraud_scoring_service_pb2.ScoreVotesRequest(
                votes=[vote(_user(), ip=TH_IP, gps=SIEM_REAP)]), metadata=INTERNAL,
                timeout=10)
    finally:
        await host.stop()
    [score] = reply.scores
    assert not {"foreign_country", "gps_mismatch", "vpn_proxy"} & set(reasons(score))
    assert score.action == Action.FRAUD_ACTION_ALLOW
    assert "model" in reasons(score)  # the shipped model is on by default


# --- combination, flagging and the audit trail ---------------------------------------------

async def test_a_score_over_0_8_blocks_audits_and_flags_the_user(
        stack: Stack, fraud: Fraud) -> None:
    user = _user()
    # 52 votes, 1 s apart: velocity (0.6) and bot timing (0.55) make 1 - 0.4 * 0.45 = 0.82.
    scores = await fraud.score(*(vote(user, at_ms=T0 + i * 1_000) for i in range(52)))
    blocked = scores[51]
    assert blocked.action == Action.FRAUD_ACTION_BLOCK
    assert blocked.score == pytest.approx(0.82)
    assert [r.name for r in blocked.reasons] == ["velocity", "bot_timing"]
    assert blocked.decision_id
    [entry] = await _db(stack, DECISION_SQL, blocked.decision_id)
    assert entry["action"] == "fraud.score" and entry["actor_subject"] == "fraud_svc"
    attributes = entry["details"]["attributes"]
    assert attributes["action"] == "BLOCK" and attributes["flagged_user"] is True
    assert attributes["inputs"]["window_votes"] == 52
    assert entry["details"]["user_id"] == user
    [flag] = await _db(stack, "SELECT * FROM fraud_blocks WHERE kind = 'USER' AND value = %s"
                       " AND deleted_at IS NULL", user)
    assert flag["created_by"] == "fraud_svc"

    # The flagged user's next vote, clean in every way, is blocked without scoring.
    [next_vote] = await fraud.score(vote(user, at_ms=T0 + 3_600_000, gps=(11.6, 104.9)))
    assert next_vote.action == Action.FRAUD_ACTION_BLOCK
    assert [r.name for r in next_vote.reasons] == ["blocklist"]
    redis = create_redis(stack.redis_url)
    try:
        assert await redis.zscore(blocked_key(user), user) is not None
    finally:
        await redis.aclose()


async def test_a_review_decision_queues_a_review_and_is_audited(
        stack: Stack, fraud: Fraud) -> None:
    user = _user()
    # Foreign (0.3) and VPN (0.35): 1 - 0.7 * 0.65 = 0.545, over 0.5.
    [score] = await fraud.score(vote(user, ip="100.96.9.9", ref="vote-review-1"))
    assert score.action == Action.FRAUD_ACTION_REVIEW
    assert score.score == pytest.approx(0.545)
    [review] = await _db(stack, "SELECT * FROM fraud_reviews WHERE user_id = %s", user)
    assert review["state"] == "PENDING" and review["vote_ref"] == "vote-review-1"
    assert review["decision_id"] == score.decision_id
    [entry] = await _db(stack, DECISION_SQL, score.decision_id)
    assert entry["details"]["attributes"]["review_id"] == str(review["review_id"])
    assert entry["details"]["attributes"]["inputs"]["ip_country"] == "SG"


# --- bad input ------------------------------------------------------------------------------

async def test_bad_batches_are_refused_with_reasons_and_change_nothing(
        stack: Stack, fraud: Fraud) -> None:
    request = fraud_scoring_service_pb2.ScoreVotesRequest
    code, reason, _ = await _refusal(fraud.stub.ScoreVotes(request(), metadata=INTERNAL))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    too_many = request(votes=[vote(_user()) for _ in range(1_001)])
    code, reason, _ = await _refusal(fraud.stub.ScoreVotes(too_many, metadata=INTERNAL))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")
    good_user = _user()
    bad = request(votes=[
        vote(good_user), Vote(round_id="r"), vote(_user(), ip="999.1.1.1"),
        vote(_user(), gps=(91.0, 0.0), round_id=""), vote(_user(), country="Cambodia")])
    code, reason, fields = await _refusal(fraud.stub.ScoreVotes(bad, metadata=INTERNAL))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert set(fields) == {"votes[1].user_id", "votes[2].ip", "votes[3].round_id",
                           "votes[3].location.latitude", "votes[4].country_hint"}
    redis = create_redis(stack.redis_url)
    try:
        from fraud_svc.state import votes_key
        assert await redis.exists(votes_key(good_user)) == 0  # the valid vote was not recorded
    finally:
        await redis.aclose()


async def test_only_internal_callers_may_score(fraud: Fraud) -> None:
    code, reason, _ = await _refusal(fraud.stub.ScoreVotes(
        fraud_scoring_service_pb2.ScoreVotesRequest(votes=[vote(_user())]),
        metadata=Principal(Role.OPERATOR, "op").to_metadata()))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


# --- operators, through the edge -------------------------------------------------------------

def _http(stack: Stack, method: str, path: str, body: dict[str, Any] | None = None,
          role: Role = Role.OPERATOR) -> tuple[int, dict[str, Any]]:
    token = bearer(stack.settings.state_dir, role, "producer")[0][1]
    request = urllib.request.Request(
        f"{stack.edge_url}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": token, "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw or b"{}")
        except ValueError:  # the edge's own refusals (RBAC) are plain text
            return error.code, {"message": raw.decode(errors="replace")}


def _reason(body: dict[str, Any]) -> str:
    for detail in body.get("details", []):
        if detail.get("@type", "").endswith("ErrorInfo"):
            return str(detail["reason"])
    return ""


@pytest_asyncio.fixture(scope="module")
async def review_stub(stack: Stack) -> AsyncIterator[
        fraud_review_service_pb2_grpc.FraudReviewServiceStub]:
    async with grpc.aio.insecure_channel(stack.edge_target) as channel:
        yield fraud_review_service_pb2_grpc.FraudReviewServiceStub(channel)


def _operator(stack: Stack) -> tuple[tuple[str, str]]:
    return bearer(stack.settings.state_dir, Role.OPERATOR, "producer")


async def _queue_reviews(fraud: Fraud, user: str, count: int, round_id: str) -> list[str]:
    scores = await fraud.score(*(vote(user, ip="100.96.9.9", round_id=round_id,
                                      ref=f"{user}-v{i}", at_ms=T0 + i * 7_000 + i * i * 900)
                                 for i in range(count)))
    assert all(s.action == Action.FRAUD_ACTION_REVIEW for s in scores)
    return [s.decision_id for s in scores]


async def test_an_operator_lists_and_rejects_a_reviewed_vote(
        stack: Stack, fraud: Fraud, review_stub: Any) -> None:
    user, round_id = _user(), f"round-{uuid.uuid4().hex[:8]}"
    await _queue_reviews(fraud, user, 2, round_id)
    status, body = await asyncio.to_thread(
        _http, stack, "GET", f"/v1/fraud/reviews?userId={user}&state=REVIEW_STATE_PENDING")
    assert status == 200, body
    listed = body["reviews"]
    assert [r["voteId"] for r in listed] == [f"{user}-v0", f"{user}-v1"]
    assert {s["name"] for s in listed[0]["signals"]} == {"vpn_proxy", "foreign_country"}

    request = fraud_review_service_pb2.ResolveReviewRequest(
        request_id=str(uuid.uuid4()), review_id=listed[0]["reviewId"],
        decision=fraud_review_service_pb2.REVIEW_DECISION_REJECT,
        scope=fraud_review_service_pb2.REVIEW_SCOPE_VOTE, note="VPN from Singapore")
    resolved = await review_stub.ResolveReview(request, metadata=_operator(stack), timeout=10)
    assert resolved.review.state == fraud_types_pb2.REVIEW_STATE_REJECTED
    assert resolved.review.resolved_by == "producer" and resolved.affected_votes == 1
    again = await review_stub.ResolveReview(request, metadata=_operator(stack), timeout=10)
    assert again.review == resolved.review  # a retry returns the original resolution
    rejections = await _db(stack, "SELECT * FROM fraud_rejections WHERE user_id = %s", user)
    assert [(r["round_id"], r["vote_ref"]) for r in rejections] == [(round_id, f"{user}-v0")]

    other = fraud_review_service_pb2.ResolveReviewRequest()
    other.CopyFrom(request)
    other.decision = fraud_review_service_pb2.REVIEW_DECISION_APPROVE
    assert (await _refusal(review_stub.ResolveReview(other, metadata=_operator(stack))))[:2] \
        == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH")
    other.request_id = str(uuid.uuid4())
    assert (await _refusal(review_stub.ResolveReview(other, metadata=_operator(stack))))[:2] \
        == (grpc.StatusCode.FAILED_PRECONDITION, "REVIEW_ALREADY_RESOLVED")
    other.review_id = str(uuid.uuid4())
    assert (await _refusal(review_stub.ResolveReview(other, metadata=_operator(stack))))[:2] \
        == (grpc.StatusCode.NOT_FOUND, "REVIEW_NOT_FOUND")

    audit = await review_stub.ListAuditEntries(fraud_review_service_pb2.ListAuditEntriesRequest(
        user_id=user, action="review.resolve"), metadata=_operator(stack), timeout=10)
    [entry] = audit.entries
    assert entry.actor == "producer" and entry.target_id == listed[0]["reviewId"]
    assert entry.attributes["decision"] == "REJECT" and entry.request_id == request.request_id
    assert entry.round_id == round_id


async def test_rejecting_a_users_votes_in_a_round_resolves_their_pending_reviews(
        stack: Stack, fraud: Fraud, review_stub: Any) -> None:
    user, round_id = _user(), f"round-{uuid.uuid4().hex[:8]}"
    await _queue_reviews(fraud, user, 3, round_id)
    listed = await review_stub.ListReviews(fraud_review_service_pb2.ListReviewsRequest(
        user_id=user, page_size=2), metadata=_operator(stack), timeout=10)
    assert len(listed.reviews) == 2 and listed.next_page_token
    status, body = await asyncio.to_thread(
        _http, stack, "POST", f"/v1/fraud/reviews/{listed.reviews[0].review_id}:resolve",
        {"requestId": str(uuid.uuid4()), "decision": "REVIEW_DECISION_REJECT",
         "scope": "REVIEW_SCOPE_USER_ROUND", "note": "device farm"})
    assert status == 200, body
    assert int(body["affectedVotes"]) == 3
    states = await _db(stack, "SELECT state FROM fraud_reviews WHERE user_id = %s", user)
    assert {r["state"] for r in states} == {"REJECTED"}
    [rejection] = await _db(stack, "SELECT * FROM fraud_rejections WHERE user_id = %s", user)
    assert rejection["vote_ref"] is None and rejection["round_id"] == round_id

    status, body = await asyncio.to_thread(
        _http, stack, "POST", f"/v1/fraud/reviews/{listed.reviews[1].review_id}:resolve",
        {"requestId": str(uuid.uuid4())})
    assert status == 400 and _reason(body) == "INVALID_REQUEST"


async def test_a_review_can_no_longer_be_resolved_once_the_final_result_is_published(
        stack: Stack, fraud: Fraud, review_stub: Any) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    user = _user()
    await _queue_reviews(fraud, user, 2, test_round.round_id)
    listed = await review_stub.ListReviews(fraud_review_service_pb2.ListReviewsRequest(
        user_id=user), metadata=_operator(stack), timeout=10)
    first, second = listed.reviews
    resolved = fraud_review_service_pb2.ResolveReviewRequest(
        request_id=str(uuid.uuid4()), review_id=first.review_id,
        decision=fraud_review_service_pb2.REVIEW_DECISION_APPROVE,
        scope=fraud_review_service_pb2.REVIEW_SCOPE_VOTE, note="a fan on holiday")
    before = await review_stub.ResolveReview(resolved, metadata=_operator(stack), timeout=10)

    await close_test_round(stack.database_url, stack.redis_url, test_round)

    async def stored() -> bool:  # results_svc recounts and stores the final result
        return bool(await _db(stack, "SELECT 1 FROM round_results WHERE round_id = %s",
                              test_round.round_id))
    assert await _eventually(stored, timeout=30)

    def state() -> Any:
        return asyncio.gather(
            _db(stack, "SELECT review_id, state, note FROM fraud_reviews WHERE user_id = %s"
                " ORDER BY seq", user),
            _db(stack, "SELECT * FROM fraud_rejections WHERE user_id = %s", user),
            _db(stack, "SELECT audit_id FROM audit_log WHERE details ->> 'user_id' = %s"
                " ORDER BY audit_id", user))
    unchanged = await state()
    for scope in (fraud_review_service_pb2.REVIEW_SCOPE_VOTE,
                  fraud_review_service_pb2.REVIEW_SCOPE_USER_ROUND):
        late = fraud_review_service_pb2.ResolveReviewRequest(
            request_id=str(uuid.uuid4()), review_id=second.review_id,
            decision=fraud_review_service_pb2.REVIEW_DECISION_REJECT, scope=scope)
        code, reason, _ = await _refusal(review_stub.ResolveReview(
            late, metadata=_operator(stack), timeout=10))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ROUND_FINALIZED")
    status, body = await asyncio.to_thread(
        _http, stack, "POST", f"/v1/fraud/reviews/{second.review_id}:resolve",
        {"requestId": str(uuid.uuid4()), "decision": "REVIEW_DECISION_REJECT",
         "scope": "REVIEW_SCOPE_VOTE"})
    assert (status, _reason(body)) == (400, "ROUND_FINALIZED"), body
    assert await state() == unchanged
    # A retry of a resolution made before the result still gets its original answer.
    again = await review_stub.ResolveReview(resolved, metadata=_operator(stack), timeout=10)
    assert again.review == before.review


async def test_a_traveller_may_vote_from_the_countries_of_their_exemption(
        stack: Stack, fraud: Fraud, review_stub: Any) -> None:
    user, other = _user(), _user()
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(datetime.now(UTC) + timedelta(days=3))
    grant = fraud_review_service_pb2.GrantTravellerExemptionRequest(
        request_id=str(uuid.uuid4()), user_id=user, countries=["th", "TH"], expire_time=expire,
        note="on tour in Thailand, ticket 7")
    granted = await review_stub.GrantTravellerExemption(grant, metadata=_operator(stack),
                                                        timeout=10)
    assert list(granted.exemption.countries) == ["TH"]
    assert (granted.exemption.granted_by, granted.exemption.note) == (
        "producer", "on tour in Thailand, ticket 7")
    again = await review_stub.GrantTravellerExemption(grant, metadata=_operator(stack),
                                                      timeout=10)
    assert again == granted  # a retry returns the original answer
    changed = fraud_review_service_pb2.GrantTravellerExemptionRequest()
    changed.CopyFrom(grant)
    changed.countries.append("VN")
    assert (await _refusal(review_stub.GrantTravellerExemption(
        changed, metadata=_operator(stack))))[:2] == (grpc.StatusCode.ALREADY_EXISTS,
                                                     "IDEMPOTENCY_MISMATCH")

    async def exempt_in_thailand() -> bool:
        [score] = await fraud.score(vote(user, ip=TH_IP, ref=f"probe-{uuid.uuid4()}",
                                         at_ms=T0 - 3_600_000))
        return reasons(score) == {}
    assert await _eventually(exempt_in_thailand)  # the other replica reloads every 0.1 s
    from_thailand, other_from_thailand, from_vietnam = await fraud.score(
        vote(user, ip=TH_IP), vote(other, ip=TH_IP), vote(user, ip=VN_IP, at_ms=T0 + 60_000))
    assert reasons(from_thailand) == {}
    assert reasons(other_from_thailand) == {"foreign_country": pytest.approx(0.3)}
    assert reasons(from_vietnam) == {"foreign_country": pytest.approx(0.3)}

    status, body = await asyncio.to_thread(_http, stack, "GET",
                                           "/v1/fraud/travellers?pageSize=1000")
    assert status == 200, body
    [listed] = [e for e in body["exemptions"] if e["userId"] == user]
    assert listed["countries"] == ["TH"] and listed["grantedBy"] == "producer"

    revoke_id = str(uuid.uuid4())
    for _ in range(2):  # the retry gets the same answer
        status, body = await asyncio.to_thread(
            _http, stack, "DELETE", f"/v1/fraud/travellers/{user}?requestId={revoke_id}")
        assert status == 200 and body["exemption"]["userId"] == user, body
    status, body = await asyncio.to_thread(
        _http, stack, "DELETE", f"/v1/fraud/travellers/{user}?requestId={uuid.uuid4()}")
    assert (status, _reason(body)) == (404, "TRAVELLER_NOT_FOUND")

    async def fenced_again() -> bool:
        [score] = await fraud.score(vote(user, ip=TH_IP, ref=f"probe-{uuid.uuid4()}",
                                         at_ms=T0 + 7_200_000))
        return reasons(score) == {"foreign_country": pytest.approx(0.3)}
    assert await _eventually(fenced_again)
    audit = await review_stub.ListAuditEntries(fraud_review_service_pb2.ListAuditEntriesRequest(
        user_id=user), metadata=_operator(stack), timeout=10)
    assert [(e.action, e.actor) for e in audit.entries] == [
        ("traveller.revoke", "producer"), ("traveller.grant", "producer")]
    assert audit.entries[1].request_id == grant.request_id
    assert audit.entries[0].request_id == revoke_id


async def test_bad_traveller_exemptions_are_refused_with_reasons_and_change_nothing(
        stack: Stack, review_stub: Any) -> None:
    user = _user()
    past = timestamp_pb2.Timestamp()
    past.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    request = fraud_review_service_pb2.GrantTravellerExemptionRequest
    for bad, fields in (
            (request(request_id=str(uuid.uuid4()), user_id=user, countries=["Thailand", "T1"],
                     expire_time=past, note=""),
             {"countries[0]", "countries[1]", "expire_time", "note"}),
            (request(request_id=str(uuid.uuid4()), note="x"),
             {"user_id", "expire_time"}),
            (request(request_id="retry-me", user_id=user, expire_time=later, note="x"),
             {"request_id"})):
        code, reason, named = await _refusal(review_stub.GrantTravellerExemption(
            bad, metadata=_operator(stack), timeout=10))
        assert (code, reason, set(named)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                              "INVALID_REQUEST", fields)
    assert not await _db(stack, "SELECT 1 FROM fraud_travellers WHERE user_id = %s", user)
    assert not await _db(stack, "SELECT 1 FROM audit_log WHERE details ->> 'user_id' = %s",
                         user)
    status, body = await asyncio.to_thread(_http, stack, "POST", "/v1/fraud/travellers", {
        "requestId": str(uuid.uuid4()), "userId": user, "note": "x"}, Role.VOTER)
    assert status == 403, body


async def test_a_shows_fraud_policy_sets_its_thresholds_and_geo_fence(
        stack: Stack, fraud: Fraud, review_stub: Any) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    show, round_id = test_round.show_id, test_round.round_id
    request_id = str(uuid.uuid4())
    body = {"requestId": request_id, "blockThreshold": 0.95, "reviewThreshold": 0.9,
            "allowedCountries": ["kh", "TH"], "note": "touring final, lenient"}
    for _ in range(2):  # the retry gets the same answer
        status, reply = await asyncio.to_thread(
            _http, stack, "PUT", f"/v1/shows/{show}/fraud-policy", body)
        assert status == 200, reply
        assert reply["policy"]["allowedCountries"] == ["KH", "TH"]
    status, reply = await asyncio.to_thread(
        _http, stack, "PUT", f"/v1/shows/{show}/fraud-policy", {**body, "blockThreshold": 1})
    assert (status, _reason(reply)) == (409, "IDEMPOTENCY_MISMATCH")
    got = await review_stub.GetFraudPolicy(fraud_review_service_pb2.GetFraudPolicyRequest(
        show_id=show), metadata=_operator(stack), timeout=10)
    assert (got.policy.block_threshold, got.policy.review_threshold) == (0.95, 0.9)
    assert got.policy.updated_by == "producer"

    async def applied() -> bool:
        [score] = await fraud.score(vote(_user(), ip=TH_IP, round_id=round_id))
        return reasons(score) == {}
    assert await _eventually(applied)  # the other replica reloads every 0.1 s
    # Thailand is inside this show's geo-fence, not the deployment's; a VPN from Singapore
    # (0.545) is a REVIEW by default and below this show's review threshold.
    here_th, elsewhere_th, here_vpn, elsewhere_vpn = await fraud.score(
        vote(_user(), ip=TH_IP, round_id=round_id), vote(_user(), ip=TH_IP),
        vote(_user(), ip="100.96.9.9", round_id=round_id), vote(_user(), ip="100.96.9.9"))
    assert reasons(here_th) == {} and "foreign_country" in reasons(elsewhere_th)
    assert here_vpn.action == Action.FRAUD_ACTION_ALLOW
    assert here_vpn.score == pytest.approx(0.545)
    assert elsewhere_vpn.action == Action.FRAUD_ACTION_REVIEW
    audit = await review_stub.ListAuditEntries(fraud_review_service_pb2.ListAuditEntriesRequest(
        action="policy.set"), metadata=_operator(stack), timeout=10)
    assert [e.request_id for e in audit.entries if e.target_id == show] == [request_id]

    other = str(uuid.uuid4())
    before = await _db(stack, "SELECT * FROM fraud_policies WHERE show_id = %s", show)
    for change, code, reason in (
            ({"reviewThreshold": 0.97}, 400, "INVALID_REQUEST"),
            ({"allowedCountries": ["KHM"]}, 400, "INVALID_REQUEST"),
            ({"allowedCountries": []}, 400, "INVALID_REQUEST"),
            ({"requestId": "again"}, 400, "INVALID_REQUEST")):
        status, reply = await asyncio.to_thread(
            _http, stack, "PUT", f"/v1/shows/{show}/fraud-policy",
            {**body, "requestId": str(uuid.uuid4()), **change})
        assert (status, _reason(reply)) == (code, reason), change
    status, reply = await asyncio.to_thread(
        _http, stack, "PUT", f"/v1/shows/{other}/fraud-policy",
        {**body, "requestId": str(uuid.uuid4())})
    assert (status, _reason(reply)) == (404, "SHOW_NOT_FOUND")
    assert await _db(stack, "SELECT * FROM fraud_policies WHERE show_id = %s", show) == before
    status, reply = await asyncio.to_thread(_http, stack, "GET",
                                            f"/v1/shows/{other}/fraud-policy")
    assert (status, _reason(reply)) == (404, "FRAUD_POLICY_NOT_FOUND")


async def _set_policy(stack: Stack, show: str, **fields: Any) -> dict[str, Any]:
    body = {"requestId": str(uuid.uuid4()), "blockThreshold": 0.8, "reviewThreshold": 0.5,
            "allowedCountries": ["KH"], **fields}
    status, reply = await asyncio.to_thread(_http, stack, "PUT",
                                            f"/v1/shows/{show}/fraud-policy", body)
    assert status == 200, reply
    return dict(reply["policy"])


async def test_both_scoring_policies_judge_the_same_votes_with_different_actions(
        stack: Stack, fraud: Fraud) -> None:
    """The same bot (52 votes 1 s apart: velocity and bot timing) in a show on the seed's
    policy and in one on the tuned policy: (0.3 + 0.5 + model 0) / 2 = 0.4 lets it through,
    the tuned noisy-OR's 1 - 0.4 * 0.45 = 0.82 blocks it and flags the user."""
    seed_round = await open_test_round(stack.database_url, stack.redis_url)
    tuned_round = await open_test_round(stack.database_url, stack.redis_url)
    policy = await _set_policy(stack, seed_round.show_id, scoring="FRAUD_SCORING_SEED")
    assert policy["scoring"] == "FRAUD_SCORING_SEED"
    policy = await _set_policy(stack, tuned_round.show_id, scoring="FRAUD_SCORING_TUNED")
    assert policy["scoring"] == "FRAUD_SCORING_TUNED"

    # Applied once a VPN from Singapore scores (0.4 + 0.3) / 2 under the seed's policy and
    # 1 - 0.65 * 0.7 under the tuned one (the other replica reloads every 0.1 s).
    assert await _eventually(lambda: _probe(fraud, seed_round.round_id, 0.35))
    assert await _eventually(lambda: _probe(fraud, tuned_round.round_id, 0.545))
    verdicts = {}
    for name, round_ in (("seed", seed_round), ("tuned", tuned_round)):
        user = _user()
        scores = await fraud.score(*(vote(user, at_ms=T0 + i * 1_000,
                                          round_id=round_.round_id) for i in range(52)))
        verdicts[name] = scores[51]
    assert verdicts["seed"].action == Action.FRAUD_ACTION_ALLOW
    assert verdicts["seed"].score == pytest.approx(0.4)
    assert verdicts["tuned"].action == Action.FRAUD_ACTION_BLOCK
    assert verdicts["tuned"].score == pytest.approx(0.82)
    for verdict in verdicts.values():
        assert {r.name for r in verdict.reasons} == {"velocity", "bot_timing"}
        assert sum(r.contribution for r in verdict.reasons) == pytest.approx(verdict.score)


async def _probe(fraud: Fraud, round_id: str, expected: float) -> bool:
    [probe] = await fraud.score(vote(_user(), ip="100.96.9.9", round_id=round_id))
    return abs(probe.score - expected) < 1e-6


async def test_a_geographic_refusal_is_audited_without_the_ip_and_flags_no_one(
        stack: Stack, fraud: Fraud) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    policy = await _set_policy(stack, test_round.show_id,
                               foreignCountry="GEO_ENFORCEMENT_REFUSE",
                               locationMismatch="GEO_ENFORCEMENT_REFUSE")
    assert (policy["foreignCountry"], policy["locationMismatch"]) == (
        "GEO_ENFORCEMENT_REFUSE", "GEO_ENFORCEMENT_REFUSE")

    async def refused() -> bool:
        [probe] = await fraud.score(vote(_user(), ip=TH_IP, round_id=test_round.round_id))
        return probe.action == Action.FRAUD_ACTION_REFUSE
    assert await _eventually(refused)
    user = _user()
    abroad = vote(user, ip=TH_IP, round_id=test_round.round_id)
    abroad.ip_hash = "5e3d0c1e2b7a4f60a1b2c3d4e5f60718"
    geo, location, near = await fraud.score(
        abroad, vote(user, gps=SIEM_REAP, round_id=test_round.round_id, at_ms=T0 + 30_000),
        vote(_user(), gps=(11.9, 104.9), round_id=test_round.round_id))
    assert (geo.action, geo.refusal_reason, geo.refusal_message) == (
        Action.FRAUD_ACTION_REFUSE, "GEO_RESTRICTED", "Voting only allowed from Cambodia")
    assert (location.action, location.refusal_reason) == (Action.FRAUD_ACTION_REFUSE,
                                                          "LOCATION_MISMATCH")
    assert near.action == Action.FRAUD_ACTION_ALLOW
    [entry] = await _db(stack, DECISION_SQL, geo.decision_id)
    attributes = entry["details"]["attributes"]
    assert attributes["action"] == "REFUSE" and "flagged_user" not in attributes
    assert attributes["ip_hash"] == abroad.ip_hash
    assert TH_IP not in json.dumps(entry["details"])
    assert not await _db(stack, "SELECT 1 FROM fraud_blocks WHERE value = %s", user)
    assert not await _db(stack, "SELECT 1 FROM fraud_reviews WHERE user_id = %s", user)


async def _eventually(check: Any, timeout: float = 5.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.1)


async def test_operators_block_and_unblock_devices_ips_networks_and_users(
        stack: Stack, fraud: Fraud, review_stub: Any) -> None:
    device, user = f"dev-{uuid.uuid4().hex}", _user()
    blocks = {}
    for kind, value in (("BLOCK_KIND_DEVICE", device), ("BLOCK_KIND_IP", "100.64.200.7"),
                        ("BLOCK_KIND_CIDR", "100.65.77.9/24"), ("BLOCK_KIND_USER", user)):
        status, body = await asyncio.to_thread(_http, stack, "POST", "/v1/fraud/blocks", {
            "requestId": str(uuid.uuid4()), "kind": kind, "value": value,
            "reason": "ticket 42"})
        assert status == 200, body
        blocks[kind] = body["block"]
    assert blocks["BLOCK_KIND_CIDR"]["value"] == "100.65.77.0/24"  # normalized
    assert blocks["BLOCK_KIND_USER"]["createdBy"] == "producer"

    async def all_blocked() -> bool:
        scores = await fraud.score(vote(_user(), device=device),
                                   vote(_user(), ip="100.64.200.7"),
                                   vote(_user(), ip="100.65.77.200"), vote(user))
        return all(s.action == Action.FRAUD_ACTION_BLOCK
                   and [r.name for r in s.reasons] == ["blocklist"] for s in scores)
    assert await _eventually(all_blocked)

    status, body = await asyncio.to_thread(_http, stack, "POST", "/v1/fraud/blocks", {
        "requestId": str(uuid.uuid4()), "kind": "BLOCK_KIND_DEVICE", "value": device,
        "reason": "again"})
    assert status == 409 and _reason(body) == "BLOCK_ALREADY_EXISTS"
    listed = await review_stub.ListBlocks(fraud_review_service_pb2.ListBlocksRequest(
        kind=fraud_types_pb2.BLOCK_KIND_DEVICE, page_size=1000), metadata=_operator(stack))
    assert device in {b.value for b in listed.blocks}

    for block in blocks.values():
        request_id = str(uuid.uuid4())
        path = f"/v1/fraud/blocks/{block['blockId']}?requestId={request_id}"
        status, body = await asyncio.to_thread(_http, stack, "DELETE", path)
        assert status == 200, body
        status, _ = await asyncio.to_thread(_http, stack, "DELETE", path)
        assert status == 200  # a retry of the same delete succeeds

    async def none_blocked() -> bool:
        scores = await fraud.score(vote(_user(), device=device),
                                   vote(_user(), ip="100.64.200.7"),
                                   vote(_user(), ip="100.65.77.200"),
                                   vote(user, at_ms=T0 + 7_200_000))
        return all(s.action == Action.FRAUD_ACTION_ALLOW for s in scores)
    assert await _eventually(none_blocked)

    audit = await review_stub.ListAuditEntries(fraud_review_service_pb2.ListAuditEntriesRequest(
        user_id=user), metadata=_operator(stack), timeout=10)
    operator_entries = [e for e in audit.entries if e.action.startswith("block.")]
    assert [e.action for e in operator_entries] == ["block.delete", "block.create"]
    assert all(e.actor == "producer" for e in operator_entries)
    assert operator_entries[1].attributes["reason"] == "ticket 42"
    # Each vote refused by the block is audited as a decision too.
    refused = [e for e in audit.entries if e.action == "score"]
    assert refused and all(e.attributes["action"] == "BLOCK" for e in refused)


async def test_bad_blocks_are_refused_with_reasons(stack: Stack, review_stub: Any) -> None:
    def create(**fields: Any) -> Any:
        request = fraud_review_service_pb2.CreateBlockRequest(
            request_id=str(uuid.uuid4()), kind=fraud_types_pb2.BLOCK_KIND_CIDR,
            value="10.0.0.0/8", reason="why")
        for name, value in fields.items():
            setattr(request, name, value)
        return review_stub.CreateBlock(request, metadata=_operator(stack), timeout=10)

    for fields, field in ((dict(value="10.0.0.0/33"), "value"),
                          (dict(kind=fraud_types_pb2.BLOCK_KIND_IP, value="10.0.0"), "value"),
                          (dict(kind=0), "kind"), (dict(reason=""), "reason"),
                          (dict(request_id="not-a-uuid"), "request_id")):
        code, reason, fields_seen = await _refusal(create(**fields))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        assert field in fields_seen
    code, reason, _ = await _refusal(review_stub.ListAuditEntries(
        fraud_review_service_pb2.ListAuditEntriesRequest(page_token="garbage"),
        metadata=_operator(stack)))
    assert reason == "INVALID_REQUEST"
    code, reason, _ = await _refusal(review_stub.DeleteBlock(
        fraud_review_service_pb2.DeleteBlockRequest(block_id=str(uuid.uuid4()),
                                                    request_id=str(uuid.uuid4())),
        metadata=_operator(stack)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "BLOCK_NOT_FOUND")


def test_a_voter_may_not_review(stack: Stack) -> None:
    status, _ = _http(stack, "GET", "/v1/fraud/reviews", role=Role.VOTER)
    assert status == 403




async def test_scoring_without_redis_is_unavailable_not_internal(stack: Stack) -> None:
    from fraud_svc.api import FraudScoringServicer
    from fraud_svc.features import Scorer
    from fraud_svc.geoip import MaxMindIntel, VpnLists
    from fraud_svc.model import Model
    from fraud_svc.state import FeatureState
    from fraud_svc.store import BlocklistCache
    from ops.processes import free_port
    from runtime.errors import ApiError
    from runtime.storage import create_pool

    config = FraudConfig(database_url=stack.database_url,
                         redis_url=f"redis://127.0.0.1:{free_port()}/0")
    pool = create_pool(config.database_url)
    await pool.open()
    redis = create_redis(config.redis_url)
    try:
        blocklist = BlocklistCache(pool, 60.0, Policy.default(config))
        servicer = FraudScoringServicer(
            config, pool, FeatureState(redis, config), MaxMindIntel("", "", VpnLists([], [])),
            blocklist, Scorer(config, Model.load()))
        with pytest.raises(ApiError) as refused:
            await servicer.ScoreVotes(fraud_scoring_service_pb2.ScoreVotesRequest(
                votes=[vote(_user())]), None)  # type: ignore[arg-type]
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert refused.value.reason == "UNAVAILABLE"
        await blocklist.stop()
    finally:
        await redis.aclose()
        await pool.close()


async def test_on_a_cluster_each_script_call_stays_in_one_hash_slot(stack: Stack) -> None:
    """Redis Cluster mode splits a batch by hash tag; the histories are the same as one call.
    On a real cluster (TELEVOTE_TEST_REDIS_CLUSTER) only the split batch can run: it must."""
    import re

    from fraud_svc.state import FeatureState, Observation

    single = FraudConfig(database_url=stack.database_url, redis_url=stack.redis_url)
    cluster = single.model_copy(update={"redis_cluster": True})
    redis = create_redis(stack.redis_url)
    try:
        results = []
        for config in (cluster,) if single.on_redis_cluster else (single, cluster):
            run = uuid.uuid4().hex[:8]
            votes = [Observation(f"{run}-r{i}", f"{run}-u{i % 7}", f"{run}-d{i % 3}",
                                 f"100.64.0.{i % 5}", T0 + i * 1_000) for i in range(40)]
            state = FeatureState(redis, config)
            calls = state.plan(votes)
            for call in calls.values():
                tags = {re.search(r"\{[^}]*\}", key).group(0)  # type: ignore[union-attr]
                        for key in call.keys}
                assert len(tags) == 1 or not config.on_redis_cluster
            assert (len(calls) > 1) == config.on_redis_cluster
            results.append(await state.record(votes))
        assert all(result == results[0] for result in results)
    finally:
        await redis.aclose()


async def test_the_redis_feature_state_matches_the_windows_the_model_was_trained_on(
        stack: Stack) -> None:
    from fraud_svc.behaviour import TrafficMix, generate
    from fraud_svc.features import FeatureMemory
    from fraud_svc.state import FeatureState, Observation

    config = FraudConfig(database_url=stack.database_url, redis_url=stack.redis_url,
                         fraud_user_history=60)  # small, so trimming by count is exercised
    run = uuid.uuid4().hex[:8]
    events = generate(TrafficMix(humans=40, fixed_interval_bots=2, device_farms=1,
                                 farm_accounts=6, proxy_rotators=2, duration_seconds=900,
                                 prefix=run), seed=9)
    memory = FeatureMemory(config)
    # Some submissions carry several votes (paid votes, count up to 100): velocity counts them.
    counts = [1 + 20 * (i % 7 == 0) for i in range(len(events))]
    expected = [memory.record(e.user_id, e.device_id, e.ip, round(e.time, 3), n)
                for e, n in zip(events, counts, strict=True)]
    redis = create_redis(stack.redis_url)
    try:
        state = FeatureState(redis, config)
        actual = []
        for start in range(0, len(events), 100):
            actual += await state.record([
                Observation(f"{run}-{start + i}", e.user_id, e.device_id, e.ip,
                            T0 + round(e.time * 1000), counts[start + i])
                for i, e in enumerate(events[start:start + 100])])
    finally:
        await redis.aclose()
    assert len(actual) == len(expected) > 300
    for got, want in zip(actual, expected, strict=True):
        assert (got.window_votes, got.intervals, got.distinct_ips, got.device_users) == (
            want.window_votes, want.intervals, want.distinct_ips, want.device_users)
        assert got.interval_std_s == pytest.approx(want.interval_std_s, abs=2e-3)
        assert got.interval_mean_s == pytest.approx(want.interval_mean_s, abs=2e-3)


async def test_work_done_while_redis_runs_the_batch_runs_once_even_when_redis_lost_the_script(
        stack: Stack) -> None:
    """`FeatureState.record(meanwhile=...)`: the scoring that needs no feature state runs
    once while the script runs, also when the batch is replayed because Redis lost the script
    (a restart), and the replay records nothing twice."""
    from fraud_svc.state import FeatureState, Observation

    config = FraudConfig(database_url=stack.database_url, redis_url=stack.redis_url)
    redis = create_redis(stack.redis_url)
    try:
        state = FeatureState(redis, config)
        run = uuid.uuid4().hex[:8]
        user = f"{run}-u"
        calls: list[int] = []
        first = await state.record(
            [Observation(f"{run}-r0", user, f"{run}-d", KH_IP, T0)],
            meanwhile=lambda: calls.append(0))
        assert calls == [0]
        await redis.script_flush()  # what a Redis restart does to the loaded script
        second = await state.record(
            [Observation(f"{run}-r1", user, f"{run}-d", KH_IP, T0 + 5_000),
             Observation(f"{run}-r1", user, f"{run}-d", KH_IP, T0 + 5_000)],
            meanwhile=lambda: calls.append(1))
        assert calls == [0, 1]
        assert await redis.script_exists(state._sha) == [True]  # it was replayed after a reload
        assert (first[0].window_votes, second[0].window_votes, second[1].window_votes) == (
            1, 2, 2)
        assert second[0].intervals == 1 and second[0].interval_mean_s == 5.0
    finally:
        await redis.aclose()


async def test_the_blocklist_is_rebuilt_only_when_its_blocks_change(stack: Stack) -> None:
    """Each replica reloads every FRAUD_REFRESH_SECONDS: unchanged blocks are kept as they
    are (not rebuilt in the event loop), and a new, expired or deleted block is seen."""
    from fraud_svc.store import BlocklistCache
    from runtime.storage import create_pool

    pool = create_pool(stack.database_url)
    await pool.open()
    try:
        cache = BlocklistCache(pool, 60.0, Policy.default(FraudConfig(
            database_url=stack.database_url, redis_url=stack.redis_url)))
        await cache.reload()
        before = cache.current
        await cache.reload()
        assert cache.current.devices is before.devices and cache.current.users is before.users

        expiring, deleted = f"dev-{uuid.uuid4()}", f"dev-{uuid.uuid4()}"
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO fraud_blocks (block_id, kind, value, reason, created_by,"
                " expire_at) VALUES (%s, 'DEVICE', %s, 'test', 'test', now() + interval '1 s'),"
                " (%s, 'DEVICE', %s, 'test', 'test', NULL)",
                (uuid.uuid4(), expiring, uuid.uuid4(), deleted))
            await conn.commit()
        await cache.reload()
        assert {expiring, deleted} <= cache.current.devices.keys()

        await asyncio.sleep(1.2)  # past the expiry: no row changes, only the time
        await cache.reload()
        assert expiring not in cache.current.devices and deleted in cache.current.devices

        async with pool.connection() as conn:
            await conn.execute("UPDATE fraud_blocks SET deleted_at = now(), deleted_by = 'test'"
                               " WHERE value = %s", (deleted,))
            await conn.commit()
        await cache.reload()
        assert deleted not in cache.current.devices
    finally:
        await pool.close()


async def test_feature_keys_live_their_window_after_the_last_vote_without_a_refresh_per_vote(
        stack: Stack) -> None:
    """A user's keys (votes, stats) and a device's key get a lease a little longer than their
    window when their TTL is under it (a new key, or one the previous release left with exactly
    its window), and are not rewritten while it still covers the window."""
    from fraud_svc.state import (
        FeatureState,
        Observation,
        _lease,
        device_key,
        stats_key,
        votes_key,
    )

    config = FraudConfig(database_url=stack.database_url, redis_url=stack.redis_url)
    timing = int(config.fraud_bot_timing_window_seconds * 1000)
    device_ttl = config.fraud_device_ttl_seconds * 1000
    redis = create_redis(stack.redis_url)
    try:
        state = FeatureState(redis, config)
        run = uuid.uuid4().hex[:8]
        user, device = f"{run}-u", f"{run}-d"
        keys = {votes_key(user): timing, stats_key(user): timing, device_key(device): device_ttl}

        async def vote(index: int) -> None:
            await state.record([Observation(f"{run}-r{index}", user, device, KH_IP,
                                            T0 + index * 10_000)])

        async def ttls() -> dict[str, int]:
            return {key: await redis.pttl(key) for key in keys}

        await vote(0)  # new keys: leased
        assert all(window < ttl <= _lease(window)
                   for (key, window), ttl in zip(keys.items(), (await ttls()).values(),
                                                 strict=True))
        for key, window in keys.items():  # still covering the window: left alone
            await redis.pexpire(key, window + 60_000)
        await vote(1)
        assert all(window < ttl <= window + 60_000
                   for (key, window), ttl in zip(keys.items(), (await ttls()).values(),
                                                 strict=True))
        for key, window in keys.items():  # under the window (as the previous release left it)
            await redis.pexpire(key, window - 1)
        await vote(2)
        assert all(window + 60_000 < ttl <= _lease(window)
                   for (key, window), ttl in zip(keys.items(), (await ttls()).values(),
                                                 strict=True))
        # The history is whole through all of it.
        [history] = await state.record([Observation(f"{run}-r3", user, device, KH_IP,
                                                    T0 + 30_000)])
        assert (history.window_votes, history.intervals, history.device_users) == (4, 3, 1)
    finally:
        await redis.aclose()


async def test_velocity_counts_only_the_vote_when_the_users_previous_one_left_the_window(
        stack: Stack) -> None:
    """The script counts the window without a ZCOUNT when the previous vote is out of it; the
    count is the same as counting (edges included: a vote exactly 60 s old is out)."""
    from fraud_svc.state import FeatureState, Observation

    config = FraudConfig(database_url=stack.database_url, redis_url=stack.redis_url)
    redis = create_redis(stack.redis_url)
    try:
        state = FeatureState(redis, config)
        run = uuid.uuid4().hex[:8]
        user = f"{run}-u"
        offsets = [0, 1_000, 61_000, 61_500, 121_500, 121_501, 300_000, 359_999, 360_000]
        counts = [(await state.record([Observation(f"{run}-r{i}", user, "", KH_IP,
                                                   T0 + offset)]))[0].window_votes
                  for i, offset in enumerate(offsets)]
        window = config.fraud_velocity_window_seconds * 1000
        assert counts == [sum(1 for earlier in offsets[:i + 1] if earlier > offset - window)
                          for i, offset in enumerate(offsets)] == [1, 2, 1, 2, 1, 2, 1, 2, 2]
    finally:
        await redis.aclose()


async def test_audit_log_does_not_index_decision_ids(stack: Stack) -> None:
    """Every REVIEW and BLOCK writes an audit_log row in the scoring RPC: each index costs
    every such vote. No query looks a decision up by its id (by the vote's ref: the target),
    so migrations/0011 dropped that index; a new one should be as deliberate."""
    rows = await _db(stack, "SELECT indexname FROM pg_indexes WHERE tablename = 'audit_log'")
    assert {r["indexname"] for r in rows} == {
        "audit_log_pkey", "audit_log_target", "audit_log_fraud_user", "audit_log_fraud_recent"}


# --- the scoring stream ------------------------------------------------------------------
async def test_the_scoring_stream_answers_each_batch_by_number_and_goes_on_after_a_bad_one(
        stack: Stack, fraud: Fraud) -> None:
    """Batches on one ScoreVoteStream call: each answered with its number, scored as
    ScoreVotes scores (recorded in the feature state), a bad batch answered with its
    error (as ScoreVotes refuses it) without ending the stream or recording anything."""
    from google.rpc import error_details_pb2

    user, bad_user = _user(), _user()
    call = fraud.stub.ScoreVoteStream(metadata=INTERNAL)  # type: ignore[call-arg]
    request = fraud_scoring_service_pb2.ScoreVoteStreamRequest
    await call.write(request(batch=7, votes=[vote(user, at_ms=T0), vote(_user())]))
    await call.write(request(batch=8, votes=[vote(bad_user), Vote(round_id="r")]))
    await call.write(request(batch=9, votes=[vote(user, at_ms=T0 + 1000)]))
    answers = {}
    for _ in range(3):
        answer = await asyncio.wait_for(call.read(), 10)
        answers[answer.batch] = answer
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK

    assert [s.action for s in answers[7].scores] == [Action.FRAUD_ACTION_ALLOW] * 2
    assert not answers[7].HasField("error") and not answers[9].HasField("error")
    [second] = answers[9].scores
    assert second.action == Action.FRAUD_ACTION_ALLOW
    assert not answers[8].scores
    error = answers[8].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    found = {}
    for detail in error.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if detail.Is(kind.DESCRIPTOR):
                found[kind] = kind()
                detail.Unpack(found[kind])
    assert found[error_details_pb2.ErrorInfo].reason == "INVALID_REQUEST"
    assert [v.field for v in found[error_details_pb2.BadRequest].field_violations] == [
        "votes[1].user_id"]
    redis = create_redis(stack.redis_url)
    try:
        from fraud_svc.state import votes_key
        assert await redis.zcard(votes_key(user)) == 2
        assert await redis.exists(votes_key(bad_user)) == 0
    finally:
        await redis.aclose()


async def test_a_draining_replica_answers_what_it_read_then_ends_its_scoring_streams(
        stack: Stack, fraud: Fraud) -> None:
    """A replica going away must not hold a stream (and vote_svc's batches) until its grace
    period runs out: it answers the batches it read and ends the stream OK; the caller opens
    another."""
    host, port = create_server(fraud.config.model_copy(update={
        "televote_grace_seconds": 30.0}))
    await host.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(channel)
        call = stub.ScoreVoteStream(metadata=INTERNAL)  # type: ignore[call-arg]
        await call.write(fraud_scoring_service_pb2.ScoreVoteStreamRequest(
            batch=1, votes=[vote(_user())]))
        first = await asyncio.wait_for(call.read(), 10)
        assert (first.batch, len(first.scores)) == (1, 1)
        started = asyncio.get_running_loop().time()
        stopping = asyncio.create_task(host.stop())
        assert await asyncio.wait_for(call.read(), 10) == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        await stopping
        assert asyncio.get_running_loop().time() - started < 10  # not the 30 s grace

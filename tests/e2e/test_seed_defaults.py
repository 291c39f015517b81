"""The specification's defaults through the edge, on services that run them as shipped.

The session mesh shortens the countdown ticks (FAST_SHOW_ENV) so whole shows run in seconds.
These tests start a small second mesh beside it, on the same PostgreSQL and Redis, whose
sync_svc keeps the default ticks and whose edge trusts one proxy in front of it (so a test can
vote "from" a Cambodian or a Thai address with X-Forwarded-For): fraud_svc, sync_svc and
vote_svc, one replica each, with everything else at its default but two things fraud_svc is
given so each rule's number shows in the ledger: a model that always says 0, and the
Battambang and Ho Chi Minh City networks of the dev GeoIP plan listed as VPNs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import pytest_asyncio
from google.protobuf import timestamp_pb2

from ops.stack import SERVICES, Stack, StackSettings, service_dir
from runtime.access import Role
from televote.fraud.v1 import fraud_review_service_pb2, fraud_review_service_pb2_grpc
from televote.sync.v1 import sync_types_pb2
from televote.vote.v1 import (
    vote_service_pb2,
    vote_service_pb2_grpc,
    vote_types_pb2,
    wallet_admin_service_pb2,
    wallet_admin_service_pb2_grpc,
)
from tests.conftest import FAST_SHOW_ENV, bearer
from tests.fraud_support import write_zero_model
from tests.support_windows import open_test_round
from tests.sync_support import Operator, SseWatcher, seconds
from tests.vote_support import (
    http,
    json_reason,
    ledger_rows,
    new_id,
    query,
    refusal,
    state_of,
    vote_request,
)
from tests.vote_support import token as mint

KH_IP, TH_IP = "100.64.7.7", "100.80.7.7"  # Phnom Penh and Bangkok in the dev GeoIP plan
#: Battambang and Ho Chi Minh City, listed as VPNs by this mesh's FRAUD_VPN_CIDRS.
KH_VPN_IP, VN_VPN_IP = "100.66.7.7", "100.81.7.7"
PHNOM_PENH = (11.5564, 104.9282)
KM_PER_DEGREE = 12_742 * math.pi / 360


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def seed_stack(stack: Stack, tmp_path_factory: pytest.TempPathFactory,
                     ) -> AsyncIterator[Stack]:
    env = {key: value for key, value in FAST_SHOW_ENV.items()
           if not key.startswith(("SYNC_TIME_UPDATE", "SYNC_WARNING", "SYNC_COUNTDOWN"))}
    env["FRAUD_MODEL_PATH"] = str(write_zero_model(
        tmp_path_factory.mktemp("seed-model") / "zero.json"))
    env["FRAUD_VPN_CIDRS"] = "100.66.0.0/16,100.81.0.0/16"  # KH_VPN_IP's and VN_VPN_IP's
    replicas = dict.fromkeys(SERVICES, 0) | {"fraud_svc": 1, "sync_svc": 1, "vote_svc": 1}
    mesh = Stack(StackSettings(
        state_dir=tmp_path_factory.mktemp("seed-stack"), edge_port=0, trusted_proxy_hops=1,
        replicas=replicas, database_url=stack.database_url, redis_url=stack.redis_url,
        service_env=env))
    await mesh.start()
    try:
        yield mesh
    finally:
        await mesh.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def seed_channel(seed_stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(seed_stack.edge_target) as channel:
        yield channel


def _from(stack: Stack, user: str, ip: str) -> tuple[tuple[str, str], ...]:
    return (*bearer(stack.settings.state_dir, Role.VOTER, user), ("x-forwarded-for", ip))


def _north_of_phnom_penh(km: float) -> vote_types_pb2.GeoPoint:
    return vote_types_pb2.GeoPoint(latitude=PHNOM_PENH[0] + km / KM_PER_DEGREE,
                                   longitude=PHNOM_PENH[1])


async def test_a_round_created_without_options_is_30_minutes_with_public_results(
        seed_stack: Stack, seed_channel: grpc.aio.Channel) -> None:
    operator = Operator(seed_stack, seed_channel)
    episode_id, contestants = await operator.episode_with_contestants(2)
    round_ = (await operator.call("CreateRound", episode_id=episode_id,
                                  contestant_ids=contestants)).round
    assert round_.window_duration.ToSeconds() == 30 * 60
    assert round_.visibility == sync_types_pb2.RESULTS_VISIBILITY_PUBLIC_COUNTS


async def test_votes_from_outside_cambodia_are_refused_unless_the_voter_is_a_traveller(
        seed_stack: Stack, seed_channel: grpc.aio.Channel) -> None:
    test_round = await open_test_round(seed_stack.database_url, seed_stack.redis_url)
    votes = vote_service_pb2_grpc.VoteServiceStub(seed_channel)
    home, abroad = f"home-{new_id()[:8]}", f"abroad-{new_id()[:8]}"
    await votes.SubmitVote(vote_request(test_round), metadata=_from(seed_stack, home, KH_IP),
                           timeout=10)
    before = await state_of(seed_stack.database_url, seed_stack.redis_url, abroad, test_round)
    code, reason, _ = await refusal(votes.SubmitVote(
        vote_request(test_round), metadata=_from(seed_stack, abroad, TH_IP), timeout=10))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "GEO_RESTRICTED")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await votes.SubmitVote(vote_request(test_round),
                               metadata=_from(seed_stack, abroad, TH_IP), timeout=10)
    assert refused.value.details() == "Voting only allowed from Cambodia"
    # JSON, as a browser votes.
    status, body = await asyncio.to_thread(
        http, seed_stack, "POST", f"/v1/rounds/{test_round.round_id}/votes",
        mint(seed_stack, Role.VOTER, abroad),
        {"requestId": new_id(), "contestantId": test_round.contestants[0],
         "voteType": "VOTE_TYPE_FREE", "count": 1, "channel": "CHANNEL_WEB"},
        {"x-forwarded-for": TH_IP})
    assert (status, json_reason(body)) == (403, "GEO_RESTRICTED")
    assert body["message"] == "Voting only allowed from Cambodia"
    assert await state_of(seed_stack.database_url, seed_stack.redis_url, abroad,
                          test_round) == before

    # An operator grants a traveller exemption for Thailand: the same voter's vote counts.
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    reviews = fraud_review_service_pb2_grpc.FraudReviewServiceStub(seed_channel)
    await reviews.GrantTravellerExemption(fraud_review_service_pb2.GrantTravellerExemptionRequest(
        request_id=new_id(), user_id=abroad, countries=["TH"], expire_time=expire,
        note="on tour"), metadata=bearer(seed_stack.settings.state_dir, Role.OPERATOR, "op"),
        timeout=10)
    accepted = await votes.SubmitVote(vote_request(test_round),
                                      metadata=_from(seed_stack, abroad, TH_IP), timeout=10)
    assert accepted.vote_id
    rows = await ledger_rows(seed_stack.database_url, test_round.round_id)
    assert sorted(row["user_id"] for row in rows) == sorted([home, abroad])


async def test_gps_more_than_100_km_from_the_ip_is_refused_as_a_location_mismatch(
        seed_stack: Stack, seed_channel: grpc.aio.Channel) -> None:
    test_round = await open_test_round(seed_stack.database_url, seed_stack.redis_url)
    votes = vote_service_pb2_grpc.VoteServiceStub(seed_channel)
    user = f"gps-{new_id()[:8]}"

    def located(km: float) -> vote_service_pb2.SubmitVoteRequest:
        request = vote_request(test_round)
        request.client.location.CopyFrom(_north_of_phnom_penh(km))
        return request

    await votes.SubmitVote(located(99), metadata=_from(seed_stack, user, KH_IP), timeout=10)
    before = await state_of(seed_stack.database_url, seed_stack.redis_url, user, test_round)
    code, reason, _ = await refusal(votes.SubmitVote(
        located(101), metadata=_from(seed_stack, user, KH_IP), timeout=10))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "LOCATION_MISMATCH")
    request = located(101)
    status, body = await asyncio.to_thread(
        http, seed_stack, "POST", f"/v1/rounds/{test_round.round_id}/votes",
        mint(seed_stack, Role.VOTER, user),
        {"requestId": new_id(), "contestantId": test_round.contestants[0],
         "voteType": "VOTE_TYPE_FREE", "count": 1, "channel": "CHANNEL_WEB",
         "client": {"location": {"latitude": request.client.location.latitude,
                                 "longitude": request.client.location.longitude}}},
        {"x-forwarded-for": KH_IP})
    assert (status, json_reason(body)) == (403, "LOCATION_MISMATCH")
    assert await state_of(seed_stack.database_url, seed_stack.redis_url, user,
                          test_round) == before


async def test_the_ledger_keeps_a_keyed_hash_of_the_ip_never_the_address(
        seed_stack: Stack, seed_channel: grpc.aio.Channel) -> None:
    test_round = await open_test_round(seed_stack.database_url, seed_stack.redis_url)
    votes = vote_service_pb2_grpc.VoteServiceStub(seed_channel)
    await votes.SubmitVote(vote_request(test_round),
                           metadata=_from(seed_stack, f"private-{new_id()[:8]}", KH_IP),
                           timeout=10)
    (row,) = await ledger_rows(seed_stack.database_url, test_round.round_id)
    key = (service_dir(seed_stack.settings.state_dir, "vote_svc") / "ip-hash-key").read_text() \
        .strip().encode()
    assert row["ip_hash"] == hmac.new(key, KH_IP.encode(), hashlib.sha256).hexdigest()[:32]
    assert not [column for column, value in row.items() if KH_IP in str(value)]


async def test_the_seeds_rules_score_votes_through_the_edge_at_their_boundaries(
        seed_stack: Stack, seed_channel: grpc.aio.Channel) -> None:
    """With the model at 0 a vote's score is half its rules: velocity over 50 votes in 60 s
    (counted in votes) 0.15, a device of more than 3 users 0.1, a VPN 0.2, bot-like timing
    0.25; four rules make 0.7, a REVIEW; all five (a traveller's foreign country) 0.85, a
    BLOCK that flags the user."""
    test_round = await open_test_round(seed_stack.database_url, seed_stack.redis_url,
                                       free_quota=10)
    votes = vote_service_pb2_grpc.VoteServiceStub(seed_channel)
    run = new_id()[:8]
    operator = bearer(seed_stack.settings.state_dir, Role.OPERATOR, "op")
    admin = wallet_admin_service_pb2_grpc.WalletAdminServiceStub(seed_channel)

    async def submit(user: str, ip: str = KH_IP, device: str = "",
                     count: int = 1) -> vote_service_pb2.SubmitVoteResponse:
        request = vote_request(test_round, count=count,
                               vote_type=vote_types_pb2.VOTE_TYPE_PAID if count > 1
                               else vote_types_pb2.VOTE_TYPE_FREE)
        request.client.device_id = device or f"own-{user}"
        if count > 1:
            await admin.GrantVotes(wallet_admin_service_pb2.GrantVotesRequest(
                request_id=new_id(), user_id=user, count=count, reason="test credit"),
                metadata=operator, timeout=10)
        return await votes.SubmitVote(request, metadata=_from(seed_stack, user, ip),
                                      timeout=10)

    async def scored(reply: vote_service_pb2.SubmitVoteResponse) -> tuple[str, float]:
        [row] = await query(seed_stack.database_url, "SELECT fraud_action, fraud_score"
                            " FROM votes WHERE vote_id = %s", reply.vote_id)
        return row["fraud_action"], round(float(row["fraud_score"]), 4)

    # Velocity: one call of 50 votes is 50, not over; one more vote makes 51.
    fast = f"fast-{run}"
    assert await scored(await submit(fast, count=50)) == ("ALLOW", 0.0)
    assert await scored(await submit(fast)) == ("ALLOW", 0.15)
    # A device of 3 users is not shared; its 4th user is.
    shared = f"device-{run}"
    for n in range(3):
        assert await scored(await submit(f"d{n}-{run}", device=shared)) == ("ALLOW", 0.0)
    assert await scored(await submit(f"d3-{run}", device=shared)) == ("ALLOW", 0.1)
    # A VPN.
    assert await scored(await submit(f"vpn-{run}", ip=KH_VPN_IP)) == ("ALLOW", 0.2)
    # Bot timing: 5 intervals between votes sent back to back (std dev far under 1 s).
    bot = f"bot-{run}"
    assert [await scored(await submit(bot)) for _ in range(6)] == (
        [("ALLOW", 0.0)] * 5 + [("ALLOW", 0.25)])

    async def five_calls(user: str, ip: str, device: str) -> list[tuple[str, float]]:
        """Three other users on the device, then 46 + 4 votes in five calls: the sixth call
        brings velocity (51 votes), the shared device (4 users) and bot timing (5 intervals)
        on top of what the IP brings."""
        for n in range(3):
            await submit(f"{user}-friend{n}", device=device)
        calls = [await submit(user, ip=ip, device=device, count=46)]
        calls += [await submit(user, ip=ip, device=device) for _ in range(4)]
        return [await scored(call) for call in calls]

    reviewed, farm = f"review-{run}", f"farm-{run}"
    assert [action for action, _ in await five_calls(reviewed, KH_VPN_IP, farm)] == [
        "ALLOW"] * 5
    sixth = await submit(reviewed, ip=KH_VPN_IP, device=farm)
    assert await scored(sixth) == ("REVIEW", 0.7)  # (0.3 + 0.2 + 0.4 + 0.5) / 2

    # A traveller abroad on a VPN adds the foreign country's 0.3: (1.7 + 0) / 2 = 0.85.
    blocked, farm = f"block-{run}", f"farm2-{run}"
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    await fraud_review_service_pb2_grpc.FraudReviewServiceStub(
        seed_channel).GrantTravellerExemption(
        fraud_review_service_pb2.GrantTravellerExemptionRequest(
            request_id=new_id(), user_id=blocked, countries=["VN"], expire_time=expire,
            note="on tour"), metadata=operator, timeout=10)
    # (0.2 + 0.4 + 0.3) / 2 = 0.45 at the fifth call.
    assert [action for action, _ in await five_calls(blocked, VN_VPN_IP, farm)] == [
        "ALLOW"] * 5
    code, reason, _ = await refusal(submit(blocked, ip=VN_VPN_IP, device=farm))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "FRAUD_BLOCKED")
    assert await query(seed_stack.database_url, "SELECT 1 FROM fraud_blocks WHERE kind = 'USER'"
                       " AND value = %s AND deleted_at IS NULL", blocked)


@pytest.mark.timeout(240)
async def test_a_75_second_round_counts_down_over_sse_with_the_specifications_ticks(
        seed_stack: Stack, seed_channel: grpc.aio.Channel) -> None:
    """The real timings, once: TIME_UPDATE at 70, 60, ... 10 s, the WARNING at 60 s and the
    COUNTDOWN from 10 to 1, then VOTING_CLOSED (75 s of wall time)."""
    operator = Operator(seed_stack, seed_channel)
    episode_id, contestants = await operator.episode_with_contestants(2)
    round_ = (await operator.call("CreateRound", episode_id=episode_id,
                                  contestant_ids=contestants)).round
    sse = SseWatcher().start(seed_stack.edge_target, f"/v1/episodes/{episode_id}/events")
    await sse.wait_until(lambda event: event["type"] == "SHOW_EVENT_TYPE_SNAPSHOT", timeout=10)
    await operator.call("StartShow", episode_id=episode_id)
    await operator.call("OpenVoting", round_id=round_.round_id, duration=seconds(75))
    await sse.wait_until(lambda event: event["type"] == "SHOW_EVENT_TYPE_VOTING_CLOSED",
                         timeout=100)
    await sse.stop()
    ticks = [(event["type"].removeprefix("SHOW_EVENT_TYPE_"), event["timing"]["secondsRemaining"])
             for event in sse.events
             if event["type"].endswith(("TIME_UPDATE", "WARNING", "COUNTDOWN"))]
    assert ticks == [
        ("TIME_UPDATE", 70), ("TIME_UPDATE", 60), ("WARNING", 60), ("TIME_UPDATE", 50),
        ("TIME_UPDATE", 40), ("TIME_UPDATE", 30), ("TIME_UPDATE", 20), ("TIME_UPDATE", 10),
        ("COUNTDOWN", 10), *(("COUNTDOWN", s) for s in range(9, 0, -1))]

"""ReportService.GetEpisodeReport over a scripted episode: every figure equals the number the
script implies (or, for times, what the ledger says), an empty episode, a live one."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import grpc
import pytest
from psycopg.types.json import Jsonb

from ops.stack import Stack
from runtime.access import Role
from televote.results.v1 import report_service_pb2 as rpb
from televote.results.v1 import report_service_pb2_grpc as rgrpc
from televote.vote.v1 import (
    vote_gateway_service_pb2,
    vote_gateway_service_pb2_grpc,
    vote_service_pb2,
    vote_types_pb2,
    wallet_admin_service_pb2,
    wallet_admin_service_pb2_grpc,
)
from tests.conftest import bearer
from tests.support_windows import TestRound, close_test_round, open_test_round
from tests.vote_support import (
    APP,
    FREE,
    PAID,
    SMS,
    SMS_TYPE,
    WEB,
    http,
    inside,
    new_id,
    query,
    refusal,
    stub,
    token,
    vote_request,
    voter,
)

PHNOM_PENH = (11.5564, 104.9282)
SIEM_REAP = (13.3633, 103.8564)
ABROAD = {"FR": (48.8566, 2.3522), "TH": (13.7563, 100.5018), "US": (40.7128, -74.0060)}


def _operator(stack: Stack) -> tuple[tuple[str, str]]:
    return bearer(stack.settings.state_dir, Role.OPERATOR, "producer")


async def _report(stack: Stack, channel: grpc.aio.Channel, episode_id: str
                  ) -> rpb.GetEpisodeReportResponse:
    return await rgrpc.ReportServiceStub(channel).GetEpisodeReport(  # type: ignore[no-any-return]
        rpb.GetEpisodeReportRequest(episode_id=episode_id), metadata=_operator(stack),
        timeout=60)


async def _vote(stack: Stack, channel: grpc.aio.Channel, test_round: TestRound, user: str, *,
                contestant: int, count: int = 1, vote_type: int = FREE, via: int = APP,
                at: tuple[float, float] | None = None) -> None:
    request = vote_request(test_round, contestant=contestant, vote_type=vote_type,
                           count=count, channel=via)
    if at is not None:
        request.client.location.latitude, request.client.location.longitude = at
    await stub(channel).SubmitVote(request, metadata=voter(stack, user), timeout=15)


async def _finalized(stack: Stack, round_id: str) -> None:
    async with asyncio.timeout(60):
        for _ in range(1000):  # the finalizer announces nothing a test could await here
            rows = await query(stack.database_url,
                               "SELECT state FROM rounds WHERE round_id = %s", round_id)
            if rows[0]["state"] == "FINALIZED":
                return
            await asyncio.sleep(0.3)


async def _end(stack: Stack, episode_id: str) -> None:
    await query(stack.database_url, "UPDATE episodes SET state = 'ENDED', ended_at = now()"
                " WHERE episode_id = %s RETURNING 1", episode_id)


async def _stored(stack: Stack, episode_id: str) -> rpb.GetEpisodeReportResponse:
    async with asyncio.timeout(60):
        for _ in range(1000):  # results_svc's precompute pass stores it; nothing to await
            rows = await query(stack.database_url,
                               "SELECT report FROM episode_reports WHERE episode_id = %s",
                               episode_id)
            if rows:
                return rpb.GetEpisodeReportResponse.FromString(bytes(rows[0]["report"]))
            await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


async def _set_profile(stack: Stack, channel: grpc.aio.Channel, user: str, **fields: str
                       ) -> None:
    await stub(channel).SetVoterProfile(vote_service_pb2.SetVoterProfileRequest(**fields),
                                        metadata=voter(stack, user), timeout=15)


@pytest.fixture(scope="module")
async def scripted(stack: Stack, edge_channel: grpc.aio.Channel
                   ) -> tuple[TestRound, rpb.GetEpisodeReportResponse]:
    """An earlier episode (voters r1, r2, r3), then the scripted one, finalized and ended."""
    db = stack.database_url
    earlier = await open_test_round(db, stack.redis_url)
    for user in ("report-r1", "report-r2", "report-r3"):
        await _vote(stack, edge_channel, earlier, user, contestant=0)
    await close_test_round(db, stack.redis_url, earlier)
    await _finalized(stack, earlier.round_id)
    await _end(stack, earlier.episode_id)

    episode = await open_test_round(db, stack.redis_url)
    await query(db, "UPDATE episodes SET show_id = %s, started_at = now() - interval '1 minute'"
                " WHERE episode_id = %s RETURNING 1", earlier.show_id, episode.episode_id)
    # Store purchases as vote_svc records them, by voter r2: one before the show (not the
    # episode's), two of the smallest package in the App Store (one later refunded), one in
    # Google Play; and one by someone who never voted in the episode (not its sale either).
    purchases = [("APPLE", "vote_pack_10", 990_000, "2 hours"),
                 ("APPLE", "vote_pack_10", 990_000, "10 seconds"),
                 ("APPLE", "vote_pack_10", 990_000, "5 seconds"),
                 ("GOOGLE", "vote_pack_50", 3_990_000, "3 seconds"),
                 ("GOOGLE", "vote_pack_50", 3_990_000, "2 seconds")]
    purchase_ids = [new_id() for _ in purchases]
    buyers = ["report-r2", "report-r2", "report-r2", "report-r2", "not-a-voter"]
    for purchase_id, buyer, (store, package, price, ago) in zip(
            purchase_ids, buyers, purchases, strict=True):
        await query(db, "INSERT INTO purchases (purchase_id, request_id, user_id, store,"
                    " store_transaction_id, store_reference, environment, package_id,"
                    " product_id, votes, bonus_votes, price_micros, currency_code,"
                    " purchased_at, balance_after, fingerprint) VALUES (%s, %s, %s, %s,"
                    " %s, %s, 'Sandbox', %s, %s, 10, 0, %s, 'USD', now() - %s::interval, 10,"
                    " '\\x00') RETURNING 1", purchase_id, new_id(), buyer, store, new_id(),
                    new_id(), package, package, price, ago)
    await query(db, "INSERT INTO purchase_refunds (refund_id, purchase_id, user_id, source,"
                " store_reason, refunded_at, votes_credited, clawed_back, already_spent,"
                " flagged_for_review) VALUES (%s, %s, 'report-r2', 'APPLE_NOTIFICATION',"
                " 'REFUND', now(), 10, 10, 0, false) RETURNING 1", new_id(), purchase_ids[1])
    await query(db, "INSERT INTO performances (performance_id, episode_id, contestant_id,"
                " started_at, ended_at) VALUES (%s, %s, %s, to_timestamp(%s / 1000.0),"
                " to_timestamp(%s / 1000.0) + interval '1 second') RETURNING 1", new_id(),
                episode.episode_id, episode.contestants[0], episode.opens_at_ms,
                episode.opens_at_ms)
    for n in range(1, 5):
        await _set_profile(stack, edge_channel, f"pp{n}", age_band="18-24", gender="female",
                           province="Phnom Penh")
        await _vote(stack, edge_channel, episode, f"pp{n}", contestant=0, count=2,
                    at=PHNOM_PENH)
    for n in range(1, 4):
        await _set_profile(stack, edge_channel, f"sr{n}", age_band="25-34", gender="male",
                           province="Siem Reap")
        await _vote(stack, edge_channel, episode, f"sr{n}", contestant=1, via=WEB,
                    at=SIEM_REAP)
    for country, point in ABROAD.items():
        await _vote(stack, edge_channel, episode, f"tourist-{country}", contestant=2, at=point)
    for _ in range(5):
        await _vote(stack, edge_channel, episode, "report-r1", contestant=0)
    await _vote(stack, edge_channel, episode, "report-r2", contestant=1)
    await wallet_admin_service_pb2_grpc.WalletAdminServiceStub(edge_channel).GrantVotes(
        wallet_admin_service_pb2.GrantVotesRequest(request_id=new_id(), user_id="report-r2",
                                                   count=10, reason="test credit"),
        metadata=_operator(stack), timeout=15)
    await _vote(stack, edge_channel, episode, "report-r2", contestant=1, count=3, vote_type=PAID)
    async with stack.channel("vote_svc", as_holder="sms_svc") as internal:
        reply = await vote_gateway_service_pb2_grpc.VoteGatewayServiceStub(internal).SubmitVotes(
            vote_gateway_service_pb2.SubmitVotesRequest(votes=[
                vote_gateway_service_pb2.GatewayVote(
                    request_id=new_id(), user_id=f"sms:{n}", round_id=episode.round_id,
                    contestant_id=episode.contestants[2], vote_type=SMS_TYPE, count=1,
                    channel=SMS) for n in range(3)]),
            metadata=inside(Role.INTERNAL, "sms_svc"), timeout=15)
        assert all(result.ok for result in reply.results), reply
    # The SMS records as sms_svc keeps them: two charged on Smart, one on Cellcard, one that
    # came after the close on Metfone (not charged).
    for carrier, charged in (("SMART", True), ("SMART", True), ("CELLCARD", True),
                             ("METFONE", False)):
        message_id = new_id()
        await query(db, "INSERT INTO sms_messages (message_id, carrier, carrier_message_id,"
                    " content_hash, pseudonym, short_code, text, language, received_at)"
                    " VALUES (%s, %s, %s, '\\x00', 'p', '1255', '1', 'en', now())"
                    " RETURNING 1", message_id, carrier, new_id())
        await query(db, "INSERT INTO sms_outcomes (message_id, outcome, episode_id, round_id,"
                    " vote_id, charged, price_micros, reply_text) VALUES (%s, %s, %s, %s, %s,"
                    " %s, %s, 'ok') RETURNING 1", message_id,
                    "COUNTED" if charged else "CLOSED", episode.episode_id, episode.round_id,
                    new_id() if charged else None, charged, 500_000 if charged else 0)
    await _vote(stack, edge_channel, episode, "bot", contestant=0, count=2, at=PHNOM_PENH)
    # Fraud decisions, as fraud_svc records them: the bot reviewed and rejected (every vote
    # of the round), pp1 reviewed and pending, one vote blocked at admission.
    rejected_review, pending_review = new_id(), new_id()
    for review_id, user, state, signals in (
            (rejected_review, "bot", "REJECTED", ["velocity", "device_shared"]),
            (pending_review, "pp1", "PENDING", ["velocity"])):
        await query(db, "INSERT INTO fraud_reviews (review_id, vote_ref, decision_id, user_id,"
                    " round_id, score, signals, state) VALUES (%s, %s, %s, %s, %s, 0.6, %s, %s)"
                    " RETURNING 1", review_id, new_id(), new_id(), user, episode.round_id,
                    Jsonb([{"name": s, "contribution": 0.3, "detail": ""} for s in signals]),
                    state)
    await query(db, "INSERT INTO fraud_rejections (rejection_id, round_id, user_id, review_id,"
                " rejected_by) VALUES (%s, %s, 'bot', %s, 'producer') RETURNING 1", new_id(),
                episode.round_id, rejected_review)
    await query(db, "INSERT INTO audit_log (actor_role, actor_subject, action, target, reason,"
                " details) VALUES ('internal', 'fraud_svc', 'fraud.score', 'x', 'BLOCK: vpn',"
                " %s) RETURNING 1", Jsonb({"user_id": "vpn-user", "round_id": episode.round_id,
                                            "attributes": {"action": "BLOCK", "signals": [
                                                {"name": "vpn", "contribution": 0.4}]}}))
    live = await _report(stack, edge_channel, episode.episode_id)
    assert not live.is_final
    await close_test_round(db, stack.redis_url, episode)
    await _finalized(stack, episode.round_id)
    await _end(stack, episode.episode_id)
    return episode, await _report(stack, edge_channel, episode.episode_id)


async def test_a_scripted_episode_reports_every_figure_exactly(
        stack: Stack, scripted: tuple[TestRound, rpb.GetEpisodeReportResponse]) -> None:
    episode, report = scripted
    assert report.is_final and report.episode_state == "ENDED"
    assert report.privacy_min_voters == 3
    s = report.summary
    assert (s.ledger_votes, s.counted_votes, s.invalidated_votes) == (28, 26, 2)
    assert [(r.reason, r.votes) for r in s.invalidated_by_reason] == [("FRAUD_REJECTED", 2)]
    assert s.unique_voters == 15
    assert (s.free.votes, s.free.voters, s.free.percentage) == (20, 12, 76.9)
    assert (s.paid.votes, s.paid.voters, s.paid.percentage) == (3, 1, 11.5)
    assert (s.sms.votes, s.sms.voters, s.sms.percentage) == (3, 3, 11.5)
    assert (s.app.votes, s.app.voters, s.web.votes, s.web.voters) == (20, 9, 3, 3)

    (round_,) = report.rounds
    assert (round_.state, round_.ledger_votes, round_.votes, round_.invalidated_votes,
            round_.voters) == ("FINALIZED", 28, 26, 2, 15)
    assert list(round_.winner_contestant_ids) == [episode.contestants[0]]
    assert [(c.contestant_id, c.name, c.votes, c.voters, c.percentage)
            for c in round_.contestants] == [
        (episode.contestants[0], "C1", 13, 5, 50.0), (episode.contestants[1], "C2", 7, 4, 26.9),
        (episode.contestants[2], "C3", 6, 6, 23.1)]

    assert [(g.country_code, g.province, g.voters, g.votes) for g in report.geography] == [
        ("unknown", "", 5, 12), ("KH", "Phnom Penh", 4, 8), ("KH", "Siem Reap", 3, 3),
        ("other", "", 3, 3)]
    assert [(d.dimension, d.value, d.voters, d.votes) for d in report.demographics] == [
        ("age_band", "unknown", 8, 15), ("age_band", "18-24", 4, 8),
        ("age_band", "25-34", 3, 3),
        ("gender", "unknown", 8, 15), ("gender", "female", 4, 8), ("gender", "male", 3, 3),
        ("province", "unknown", 8, 15), ("province", "Phnom Penh", 4, 8),
        ("province", "Siem Reap", 3, 3)]

    e = report.engagement
    assert e.votes_per_voter == 1.73
    assert e.multi_round_voter_percentage == 0.0
    assert e.used_all_free_percentage == 6.7  # r1 of 15
    assert e.free_to_paid_percentage == 7.7  # r2 of the 13 who cast a free vote (bot too)
    assert (e.returning_voters, e.returning_voter_percentage) == (2, 13.3)  # r1, r2
    assert [(b.label, b.voters) for b in e.votes_per_voter_distribution] == [
        ("1", 9), ("2-5", 6)]

    f = report.fraud
    assert (f.blocked, f.reviewed, f.pending, f.approved, f.rejected, f.rejected_votes) == (
        1, 2, 1, 0, 1, 2)
    assert [(x.signal, x.blocked, x.reviewed, x.rejected) for x in f.by_signal] == [
        ("velocity", 0, 2, 1), ("device_shared", 0, 1, 1), ("vpn", 1, 0, 0)]

    r = report.revenue
    assert r.packages.available and r.refunds.available
    assert [(x.source, x.tier, x.transactions, x.gross.amount_micros)
            for x in r.packages.lines] == [("apple", "vote_pack_10", 2, 1_980_000),
                                           ("google", "vote_pack_50", 1, 3_990_000)]
    assert r.packages.total.amount_micros == 5_970_000
    assert [(x.source, x.tier, x.transactions, x.gross.amount_micros)
            for x in r.refunds.lines] == [("apple", "vote_pack_10", 1, -990_000)]
    assert r.sms.available and [(x.source, x.transactions, x.gross.amount_micros)
                                for x in r.sms.lines] == [("CELLCARD", 1, 500_000),
                                                          ("SMART", 2, 1_000_000)]
    assert r.complete and r.gross.amount_micros == 4_980_000 + 1_500_000


async def test_the_timeline_and_moments_agree_with_the_ledger(
        stack: Stack, scripted: tuple[TestRound, rpb.GetEpisodeReportResponse]) -> None:
    episode, report = scripted
    rows = await query(stack.database_url,
                       "SELECT user_id, vote_type, channel, count, admitted_ms, contestant_id"
                       " FROM votes WHERE round_id = %s AND user_id <> 'bot'",
                       episode.round_id)
    expected: dict[tuple[int, str, str], list[Any]] = defaultdict(lambda: [0, set()])
    per_minute: dict[int, int] = defaultdict(int)
    for row in rows:
        minute = row["admitted_ms"] - row["admitted_ms"] % 60_000
        bucket = expected[(minute, row["channel"], row["vote_type"])]
        bucket[0] += row["count"]
        bucket[1].add(row["user_id"])
        per_minute[minute] += row["count"]
    got = {(b.start_time.ToMilliseconds(), vote_types_pb2.Channel.Name(b.channel)[8:],
            vote_types_pb2.VoteType.Name(b.vote_type)[10:]): (b.votes, b.voters)
           for b in report.timeline}
    assert got == {key: (votes, len(users)) for key, (votes, users) in expected.items()}
    assert all(b.round_id == episode.round_id for b in report.timeline)
    busiest = max(per_minute.items(), key=lambda item: (item[1], -item[0]))
    assert (report.peaks[0].start_time.ToMilliseconds(), report.peaks[0].votes) == busiest
    assert report.engagement.peak_votes_per_minute == busiest[1]

    kinds = [m.kind for m in report.moments]
    assert kinds[:2] == ["PERFORMANCE_START", "VOTING_OPEN"] or \
        kinds[:2] == ["VOTING_OPEN", "PERFORMANCE_START"]
    assert set(kinds) == {"PERFORMANCE_START", "PERFORMANCE_END", "VOTING_OPEN",
                          "VOTING_CLOSE"}  # the window was shorter than the warning
    times = [m.time.ToMilliseconds() for m in report.moments]
    assert times == sorted(times)
    (performance,) = report.engagement.performances
    first = min(row["admitted_ms"] for row in rows
                if str(row["contestant_id"]) == episode.contestants[0]
                and row["admitted_ms"] >= episode.opens_at_ms)
    assert performance.name == "C1"
    assert performance.first_vote_after.ToMilliseconds() == first - episode.opens_at_ms


async def test_a_final_report_is_computed_once_and_served_as_stored(
        stack: Stack, edge_channel: grpc.aio.Channel,
        scripted: tuple[TestRound, rpb.GetEpisodeReportResponse]) -> None:
    episode, report = scripted
    stored = await query(stack.database_url,
                         "SELECT report FROM episode_reports WHERE episode_id = %s",
                         episode.episode_id)
    assert rpb.GetEpisodeReportResponse.FromString(bytes(stored[0]["report"])) == report
    assert await _report(stack, edge_channel, episode.episode_id) == report


async def test_the_report_is_served_as_json_and_to_operators_only(
        stack: Stack, edge_channel: grpc.aio.Channel,
        scripted: tuple[TestRound, rpb.GetEpisodeReportResponse]) -> None:
    episode, _ = scripted
    path = f"/v1/episodes/{episode.episode_id}/report"
    status, body = await asyncio.to_thread(http, stack, "GET", path,
                                           token(stack, Role.OPERATOR, "producer"))
    assert status == 200, body
    assert body["isFinal"] is True and body["summary"]["countedVotes"] == "26"
    assert body["revenue"]["complete"] is True
    assert body["revenue"]["gross"] == {"currencyCode": "USD", "amountMicros": "6480000"}
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # the edge's RBAC: no ErrorInfo
        await rgrpc.ReportServiceStub(edge_channel).GetEpisodeReport(
            rpb.GetEpisodeReportRequest(episode_id=episode.episode_id),
            metadata=voter(stack, "alice"), timeout=15)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_live_episode_is_provisional_and_follows_the_ledger(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    live = await open_test_round(stack.database_url, stack.redis_url)
    await _vote(stack, edge_channel, live, "live-1", contestant=0, count=2)
    first = await _report(stack, edge_channel, live.episode_id)
    assert not first.is_final and first.episode_state == "LIVE"
    assert (first.summary.counted_votes, first.summary.unique_voters) == (2, 1)
    assert first.rounds[0].state == "OPEN"
    await _vote(stack, edge_channel, live, "live-2", contestant=1)
    async with asyncio.timeout(30):  # a provisional report may be reused for a moment
        for _ in range(1000):
            second = await _report(stack, edge_channel, live.episode_id)
            if second.summary.counted_votes != 2:
                break
            await asyncio.sleep(0.1)
    assert not second.is_final
    assert (second.summary.counted_votes, second.summary.unique_voters) == (3, 2)
    assert [c.votes for c in second.rounds[0].contestants] == [2, 1, 0]
    assert not await query(stack.database_url,
                           "SELECT 1 FROM episode_reports WHERE episode_id = %s",
                           live.episode_id)


async def test_an_empty_episode_reports_zeros(stack: Stack,
                                               edge_channel: grpc.aio.Channel) -> None:
    empty = await open_test_round(stack.database_url, stack.redis_url)
    report = await _report(stack, edge_channel, empty.episode_id)
    assert not report.is_final
    assert report.summary == rpb.ReportSummary(
        free=rpb.VoteCount(), paid=rpb.VoteCount(), sms=rpb.VoteCount(), app=rpb.VoteCount(),
        web=rpb.VoteCount())
    assert not report.timeline and not report.peaks and not report.geography
    assert not report.demographics and not report.engagement.votes_per_voter_distribution
    assert [c.votes for c in report.rounds[0].contestants] == [0, 0, 0]
    await close_test_round(stack.database_url, stack.redis_url, empty)
    await _finalized(stack, empty.round_id)
    await _end(stack, empty.episode_id)
    stored = await _stored(stack, empty.episode_id)  # computed ahead of any request
    final = await _report(stack, edge_channel, empty.episode_id)
    assert final == stored
    assert final.is_final and final.summary.counted_votes == 0
    assert final.rounds[0].state == "FINALIZED" and not final.rounds[0].winner_contestant_ids


async def test_bad_requests_get_reasons(stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    reports = rgrpc.ReportServiceStub(edge_channel)
    code, reason, _ = await refusal(reports.GetEpisodeReport(
        rpb.GetEpisodeReportRequest(episode_id="nope"), metadata=_operator(stack), timeout=15))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    code, reason, _ = await refusal(reports.GetEpisodeReport(
        rpb.GetEpisodeReportRequest(episode_id=new_id()), metadata=_operator(stack),
        timeout=15))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "EPISODE_NOT_FOUND")
    code, reason, _ = await refusal(stub(edge_channel).SetVoterProfile(
        vote_service_pb2.SetVoterProfileRequest(age_band="teen", province="Atlantis"),
        metadata=voter(stack, "profile-tester"), timeout=15))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert not await query(stack.database_url,
                           "SELECT 1 FROM voter_profiles WHERE user_id = 'profile-tester'")
    status, body = await asyncio.to_thread(
        http, stack, "PUT", "/v1/voter-profile", token(stack, Role.VOTER, "profile-tester"),
        {"ageBand": "18-24", "gender": "female", "province": "Phnom Penh"})
    assert (status, body) == (200, {"ageBand": "18-24", "gender": "female",
                                    "province": "Phnom Penh"})
    assert await query(stack.database_url, "SELECT age_band, gender, province FROM"
                       " voter_profiles WHERE user_id = 'profile-tester'") == [
        {"age_band": "18-24", "gender": "female", "province": "Phnom Penh"}]

"""The report's figures that come from outside the ledger's own columns: the place of a voter's
IP (looked up by vote_svc at admission, since the ledger keeps only the IP's keyed hash) and
the peak of concurrent viewers (sync_svc's samples of open WatchShow streams)."""

from __future__ import annotations

import asyncio

import grpc

from ops.stack import Stack
from runtime.access import Role
from televote.results.v1 import report_service_pb2 as rpb
from televote.results.v1 import report_service_pb2_grpc as rgrpc
from tests.conftest import bearer
from tests.support_windows import open_test_round
from tests.sync_support import GrpcWatcher
from tests.vote_support import inside, query, stub, vote_request, voter

#: Addresses of the development GeoIP database's plan (fraud_svc/behaviour.py NETWORKS).
PHNOM_PENH_IP = "100.64.7.{}"
SIEM_REAP_IP = "100.65.7.{}"


async def _report(stack: Stack, channel: grpc.aio.Channel, episode_id: str
                  ) -> rpb.GetEpisodeReportResponse:
    return await rgrpc.ReportServiceStub(channel).GetEpisodeReport(  # type: ignore[no-any-return]
        rpb.GetEpisodeReportRequest(episode_id=episode_id),
        metadata=bearer(stack.settings.state_dir, Role.OPERATOR, "producer"), timeout=60)


async def test_voters_without_gps_are_placed_by_the_ip_seen_at_admission(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    # As the edge calls vote_svc: the client's IP in the header the edge always overwrites.
    async with stack.channel("vote_svc", as_holder="edge") as as_edge:
        for n in range(3):
            for city, ip in (("pp", PHNOM_PENH_IP), ("sr", SIEM_REAP_IP)):
                user = f"ip-{city}-{n}"
                await stub(as_edge).SubmitVote(
                    vote_request(test_round), timeout=15,
                    metadata=(*inside(Role.VOTER, user),
                              ("x-televote-client-ip", ip.format(n + 1))))
    for n in range(3):  # through the edge from 127.0.0.1: not in the database, unknown
        await stub(edge_channel).SubmitVote(vote_request(test_round),
                                            metadata=voter(stack, f"ip-local-{n}"), timeout=15)
    rows = await query(stack.database_url, "SELECT user_id, ip_geo FROM votes"
                       " WHERE round_id = %s ORDER BY user_id", test_round.round_id)
    assert {row["user_id"]: row["ip_geo"] for row in rows} == {
        **{f"ip-pp-{n}": "KH-12" for n in range(3)},
        **{f"ip-sr-{n}": "KH-17" for n in range(3)},
        **{f"ip-local-{n}": None for n in range(3)}}
    report = await _report(stack, edge_channel, test_round.episode_id)
    assert sorted((g.country_code, g.province, g.voters, g.votes)
                  for g in report.geography) == [
        ("KH", "Phnom Penh", 3, 3), ("KH", "Siem Reap", 3, 3), ("unknown", "", 3, 3)]


async def test_the_peak_of_concurrent_viewers_is_the_most_streams_open_at_one_instant(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url)
    other = await open_test_round(stack.database_url, stack.redis_url)
    before = await _report(stack, edge_channel, test_round.episode_id)
    assert before.engagement.peak_concurrent_viewers == 0
    watchers = [GrpcWatcher().start(edge_channel, test_round.episode_id) for _ in range(3)]
    watchers.append(GrpcWatcher().start(edge_channel, other.episode_id))
    try:
        samples: list[dict[str, int]] = []
        async with asyncio.timeout(30):
            while not any(row["viewers"] == 3 for row in samples):
                await asyncio.sleep(0.2)
                samples = await query(
                    stack.database_url, "SELECT sample_ms, sum(viewers)::int AS viewers FROM"
                    " episode_viewer_samples WHERE episode_id = %s GROUP BY 1",
                    test_round.episode_id)
    finally:
        for watcher in watchers:
            await watcher.stop()
    async with asyncio.timeout(30):  # a provisional report may be reused for a moment
        for _ in range(1000):
            report = await _report(stack, edge_channel, test_round.episode_id)
            if report.engagement.peak_concurrent_viewers:
                break
            await asyncio.sleep(0.2)
    peak = max(samples, key=lambda row: (row["viewers"], -row["sample_ms"]))
    assert report.engagement.peak_concurrent_viewers == 3
    assert report.engagement.peak_viewers_minute.ToMilliseconds() == \
        peak["sample_ms"] - peak["sample_ms"] % 60_000

"""results_svc against the real mesh: live views per role, the final result through a close
under concurrent load, one result per round, the export an auditor verifies, receipts."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
import tracemalloc
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.json_format import MessageToDict
from typer.testing import CliRunner

from ops.cli import app
from ops.stack import Stack
from results_svc import audit
from results_svc.config import ResultsConfig
from results_svc.final import Finalizer
from results_svc.signing import Signer
from runtime.access import Role
from runtime.errors import error_info
from runtime.storage import Storage
from televote.results.v1 import results_service_pb2 as rpb
from televote.results.v1 import results_service_pb2_grpc as rgrpc
from tests.conftest import bearer
from tests.support_windows import TestRound, close_test_round, open_test_round
from tests.sync_support import SseWatcher
from tests.vote_support import (
    CLOSED_MS,
    FREE,
    JUDGED_MS,
    OPENS_MS,
    stub,
    vote_request,
    voter,
)


def results_stub(channel: grpc.aio.Channel) -> rgrpc.ResultsServiceStub:
    return rgrpc.ResultsServiceStub(channel)


async def _sql(stack: Stack, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(stack.database_url) as connection:
        cursor = await connection.execute(query, args)
        return await cursor.fetchall() if cursor.description else []


async def _final(channel: grpc.aio.Channel, round_id: str, timeout: float = 30,
                 ) -> rpb.GetFinalResultsResponse:
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await results_stub(channel).GetFinalResults(  # type: ignore[no-any-return]
                    rpb.GetFinalResultsRequest(round_id=round_id), timeout=5)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
            await asyncio.sleep(0.3)


async def _finalized_state(stack: Stack, round_id: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        for _ in range(1000):
            state = await _sql(stack, "SELECT state FROM rounds WHERE round_id = %s", round_id)
            if state == [("FINALIZED",)]:
                return
            await asyncio.sleep(0.3)


async def _open(stack: Stack, contestants: int, visibility: str = "PUBLIC_COUNTS",
                **options: Any) -> TestRound:
    """A round opened the way vote tests open one, with the visibility this test needs."""
    test_round = await open_test_round(stack.database_url, stack.redis_url,
                                       contestants=contestants, **options)
    await _sql(stack, "UPDATE rounds SET visibility = %s WHERE round_id = %s",
               f"RESULTS_VISIBILITY_{visibility}", test_round.round_id)
    return test_round


@pytest.fixture(scope="module")
async def finalized(stack: Stack, edge_channel: grpc.aio.Channel
                    ) -> tuple[TestRound, rpb.GetFinalResultsResponse, dict[str, str]]:
    """A round voted in concurrently by 40 voters while it closes, then finalized."""
    test_round = await _open(stack, 3, free_quota=5)
    accepted: dict[str, str] = {}  # vote_id -> user
    refusals: list[str] = []
    enough = asyncio.Event()

    async def vote_until_closed(user: str) -> None:
        for n in range(8):  # 8 attempts on a quota of 5: the last ones are refused
            try:
                reply = await stub(edge_channel).SubmitVote(
                    vote_request(test_round, contestant=(hash(user) + n) % 3, vote_type=FREE),
                    metadata=voter(stack, user), timeout=10)
                accepted[reply.vote_id] = user
                if len(accepted) >= 80:
                    enough.set()
            except grpc.aio.AioRpcError as error:
                refusals.append(error.details() or "")

    voting = [asyncio.create_task(vote_until_closed(f"results-voter-{i}")) for i in range(40)]
    await asyncio.wait_for(enough.wait(), 20)
    await close_test_round(stack.database_url, stack.redis_url, test_round)  # mid-load
    await asyncio.gather(*voting)
    assert accepted, refusals[:3]
    final = await _final(edge_channel, test_round.round_id)
    return test_round, final, accepted


async def test_the_final_result_equals_an_independent_recount_of_the_ledger(
        stack: Stack, finalized: tuple[TestRound, rpb.GetFinalResultsResponse, dict[str, str]],
) -> None:
    test_round, final, accepted = finalized
    assert final.results.is_final
    ledger = dict(await _sql(
        stack, "SELECT contestant_id::text, sum(count)::bigint FROM votes v, rounds r"
        f" WHERE v.round_id = %s AND r.round_id = v.round_id AND {JUDGED_MS} >= {OPENS_MS}"
        f" AND {JUDGED_MS} < {CLOSED_MS} GROUP BY 1", test_round.round_id))
    got = {s.contestant_id: s.count for s in final.results.standings}
    assert got == {c: ledger.get(c, 0) for c in test_round.contestants}
    assert final.results.total_votes == sum(ledger.values()) > 0
    # Every acknowledged vote is a leaf of the signed tree.
    assert final.digest.tree_size == len(accepted) == final.ledger_votes
    per_user = await _sql(stack, "SELECT user_id, sum(count) FROM votes WHERE round_id = %s"
                          " GROUP BY 1", test_round.round_id)
    assert all(n <= 5 for _, n in per_user)
    ranks = [s.rank for s in final.results.standings]
    assert ranks == sorted(ranks) and ranks[0] == 1
    # Reconciliation at close: the live counters match the ledger; the only votes not
    # counted are those the test helper's close let in after closed_at (it stamps closed_at
    # before it closes the Redis window; sync_svc's close has the same gap, see the report).
    late = await _sql(stack, "SELECT coalesce(sum(count), 0) FROM votes v, rounds r"
                      " WHERE v.round_id = %s AND r.round_id = v.round_id"
                      f" AND {JUDGED_MS} >= {CLOSED_MS}", test_round.round_id)
    assert final.invalidated_votes == late[0][0]
    reconciliation = (await _sql(stack, "SELECT reconciliation FROM round_results"
                                 " WHERE round_id = %s", test_round.round_id))[0][0]
    assert all(d["counter_drift"] == 0 for d in reconciliation["differences"])
    assert set(reconciliation["invalidated_rows_by_reason"]) <= {"OUTSIDE_WINDOW"}
    assert sum(reconciliation["provisional"].values()) == final.ledger_votes
    # Reconciliation at close: the live counters match the ledger; the only votes not
    # counted are those the test helper's close let in after closed_at (it stamps closed_at
    # before it closes the Redis window; sync_svc's close has the same gap, see the report).
    late = await _sql(stack, "SELECT coalesce(sum(count), 0) FROM votes v, rounds r"
                      " WHERE v.round_id = %s AND r.round_id = v.round_id"
                      f" AND {JUDGED_MS} >= {CLOSED_MS}", test_round.round_id)
    assert final.invalidated_votes == late[0][0]
    reconciliation = (await _sql(stack, "SELECT reconciliation FROM round_results"
                                 " WHERE round_id = %s", test_round.round_id))[0][0]
    assert all(d["counter_drift"] == 0 for d in reconciliation["differences"])
    assert set(reconciliation["invalidated_rows_by_reason"]) <= {"OUTSIDE_WINDOW"}
    assert sum(reconciliation["provisional"].values()) == final.ledger_votes
    state = await _sql(stack, "SELECT state FROM rounds WHERE round_id = %s",
                       test_round.round_id)
    assert state == [("FINALIZED",)]
    events = await _sql(stack, "SELECT count(*) FROM show_events WHERE episode_id = %s"
                        " AND event_type = 'SHOW_EVENT_TYPE_RESULTS_READY'",
                        test_round.episode_id)
    assert events == [(1,)]


async def test_replicas_racing_to_finalize_store_and_announce_one_result(
        stack: Stack, edge_channel: grpc.aio.Channel, tmp_path: Path) -> None:
    """Two more finalizers (replicas in this process, with their own keys) race the stack's
    results_svc on a closed round: one result is stored, one RESULTS_READY is announced."""
    test_round = await _open(stack, 2)
    for n in range(3):
        await stub(edge_channel).SubmitVote(vote_request(test_round, contestant=n % 2),
                                            metadata=voter(stack, f"race-{n}"), timeout=10)
    await close_test_round(stack.database_url, stack.redis_url, test_round)
    replicas = []
    for name in ("a", "b"):
        state_dir = tmp_path / name
        config = ResultsConfig(database_url=stack.database_url, redis_url=stack.redis_url,
                               sync_target=stack.target("sync_svc"),
                               televote_state_dir=state_dir, televote_replica=name)
        storage = Storage.from_config(config)
        await storage.connect()
        replicas.append((storage, Finalizer(storage, config, Signer.load_or_create(state_dir))))
    try:
        for _, finalizer in replicas:
            await finalizer.start()
        stored = await asyncio.gather(*(f.finalize(test_round.round_id) for _, f in replicas))
        assert sum(stored) <= 1
        for _, finalizer in replicas:
            await finalizer.announce(test_round.round_id)
        final = await _final(edge_channel, test_round.round_id)
        assert final.results.total_votes == 3
        rows = await _sql(stack, "SELECT count(*), min(root_hash) FROM round_results"
                          " WHERE round_id = %s", test_round.round_id)
        assert rows == [(1, final.digest.root_hash)]
        assert not any([await f.finalize(test_round.round_id) for _, f in replicas])
        events = await _sql(stack, "SELECT count(*) FROM show_events WHERE episode_id = %s"
                            " AND event_type = 'SHOW_EVENT_TYPE_RESULTS_READY'",
                            test_round.episode_id)
        assert events == [(1,)]
    finally:
        for storage, finalizer in replicas:
            await finalizer.stop()
            await storage.close()


async def test_an_export_verifies_and_a_tampered_one_does_not(
        stack: Stack, finalized: tuple[TestRound, rpb.GetFinalResultsResponse, dict[str, str]],
        edge_channel: grpc.aio.Channel, tmp_path: Path) -> None:
    test_round, final, _ = finalized
    out = tmp_path / "ledger.jsonl"
    leaves = await audit.export_round(stack.database_url, test_round.round_id, out)
    assert leaves == final.digest.tree_size
    key = await results_stub(edge_channel).GetLedgerPublicKey(
        rpb.GetLedgerPublicKeyRequest(), timeout=5)
    assert key.key_id == final.digest.key_id
    verdict = audit.verify_export(out, key.public_key.hex())
    assert verdict.ok, verdict.problems
    assert verdict.recount is not None
    assert verdict.recount.counts == {s.contestant_id: s.count
                                      for s in final.results.standings}

    lines = out.read_text().splitlines()
    # vote_svc's leaves are canonical: every one is an L line, given by its fields.
    assert all(line.startswith(("L ", "C ")) for line in lines[1:])
    fields = lines[1].split(" ")
    others = [c for c in test_round.contestants if c != fields[4]]
    fields[4] = others[0]  # one vote moved to another contestant
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    problems = audit.verify_export(tampered, key.public_key.hex()).problems
    assert any("not the signed root" in p for p in problems), problems

    dropped = tmp_path / "dropped.jsonl"  # a vote removed
    dropped.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    assert not audit.verify_export(dropped, key.public_key.hex()).ok

    cli = CliRunner()
    exported = await asyncio.to_thread(
        cli.invoke, app, ["audit", "export", test_round.round_id, "--out",
                          str(tmp_path / "cli.jsonl"), "--database-url", stack.database_url])
    assert exported.exit_code == 0, exported.output
    verified = cli.invoke(app, ["audit", "verify", str(tmp_path / "cli.jsonl"),
                                "--public-key", key.public_key.hex()])
    assert verified.exit_code == 0 and verified.output.startswith("OK"), verified.output
    refused = cli.invoke(app, ["audit", "verify", str(tampered)])
    assert refused.exit_code == 1, refused.output

    header = json.loads(lines[0])
    header["result"]["counts"][others[0]] += 1  # the published result changed
    inflated = tmp_path / "inflated.jsonl"
    inflated.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    assert not audit.verify_export(inflated, key.public_key.hex()).ok


async def test_a_receipt_proof_verifies_offline_and_a_changed_vote_does_not(
        stack: Stack, finalized: tuple[TestRound, rpb.GetFinalResultsResponse, dict[str, str]],
        edge_channel: grpc.aio.Channel) -> None:
    test_round, final, accepted = finalized
    # Every vote's proof (they span many blocks of RESULTS_RECEIPT_BLOCK_LEAVES leaves).
    indexes = set()
    for other in sorted(accepted):
        reply = await results_stub(edge_channel).GetVoteReceipt(
            rpb.GetVoteReceiptRequest(vote_id=other), timeout=5)
        assert reply.proof.root_hash == final.digest.root_hash
        assert reply.proof.tree_size == final.digest.tree_size
        assert audit.verify_receipt_document(MessageToDict(reply),
                                             final.digest.root_hash) == [], other
        indexes.add(reply.proof.leaf_index)
    assert len(indexes) == len(accepted)
    blocks = await _sql(stack, "SELECT count(*) FROM round_result_blocks WHERE round_id = %s",
                        test_round.round_id)
    assert blocks == [(-(-final.digest.tree_size // 4),)]  # served from blocks of 4 leaves
    vote_id = sorted(accepted)[len(accepted) // 2]
    reply = await results_stub(edge_channel).GetVoteReceipt(
        rpb.GetVoteReceiptRequest(vote_id=vote_id), timeout=5)
    assert reply.counted and reply.proof.root_hash == final.digest.root_hash
    document = MessageToDict(reply)
    assert audit.verify_receipt_document(document, final.digest.root_hash) == []
    leaf = json.loads(reply.receipt.leaf_data)
    assert "user_id" not in leaf and accepted[vote_id] not in reply.receipt.leaf_data.decode()
    leaf["contestant_id"] = next(c for c in test_round.contestants
                                 if c != leaf["contestant_id"])
    changed = json.dumps(leaf, sort_keys=True, separators=(",", ":")).encode()
    document["receipt"]["leafData"] = base64.b64encode(changed).decode()
    document["receipt"]["leafHash"] = base64.b64encode(
        audit.leaf_hash(changed)).decode()
    assert "the inclusion proof does not lead to its root" in audit.verify_receipt_document(
        document)


async def test_hidden_rounds_show_each_role_only_what_it_may_see(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await _open(stack, 2, "HIDDEN")
    await stub(edge_channel).SubmitVote(vote_request(test_round, contestant=1),
                                        metadata=voter(stack, "hidden-voter"), timeout=10)
    results = results_stub(edge_channel)
    request = rpb.GetResultsRequest(round_id=test_round.round_id)
    operator = bearer(stack.settings.state_dir, Role.OPERATOR, "producer")
    for visibility, public_counts, public_ranks in (
            ("RESULTS_VISIBILITY_HIDDEN", False, False),
            ("RESULTS_VISIBILITY_STANDINGS_ONLY", False, True),
            ("RESULTS_VISIBILITY_PUBLIC_COUNTS", True, True)):
        await _sql(stack, "UPDATE rounds SET visibility = %s WHERE round_id = %s",
                   visibility, test_round.round_id)
        changed_ms = time.time() * 1000
        for metadata, counts, ranks in (
                ((), public_counts, public_ranks),
                (voter(stack, "hidden-voter"), public_counts, public_ranks),
                (operator, True, True)):
            async with asyncio.timeout(10):  # a reading is shared for a tick: the next one
                for _ in range(1000):
                    got = (await results.GetResults(request, metadata=metadata,
                                                    timeout=5)).results
                    if got.server_time.ToMilliseconds() >= changed_ms:
                        break
                    await asyncio.sleep(0.1)
            assert [s.HasField("count") for s in got.standings] == [counts] * 2, visibility
            assert got.HasField("total_votes") == counts
            assert [s.rank > 0 for s in got.standings] == [ranks] * 2, (visibility, metadata)
            if counts:
                assert got.standings[0].contestant_id == test_round.contestants[1]
                assert got.standings[0].count == 1 and got.total_votes == 1
                assert got.standings[0].percentage == 100.0
                assert got.standings[0].formatted_count == "1"
            assert [s.name for s in got.standings] != ["", ""]
    await _sql(stack, "UPDATE rounds SET visibility = 'RESULTS_VISIBILITY_HIDDEN'"
               " WHERE round_id = %s", test_round.round_id)
    await close_test_round(stack.database_url, stack.redis_url, test_round)
    await _finalized_state(stack, test_round.round_id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await results.GetFinalResults(rpb.GetFinalResultsRequest(round_id=test_round.round_id),
                                      timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    final = await results.GetFinalResults(
        rpb.GetFinalResultsRequest(round_id=test_round.round_id), metadata=operator, timeout=5)
    assert final.results.total_votes == 1


async def test_get_results_calls_in_one_tick_share_one_reading(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await _open(stack, 2)
    results = results_stub(edge_channel)
    request = rpb.GetResultsRequest(round_id=test_round.round_id)
    got = await asyncio.gather(*(results.GetResults(request, timeout=5) for _ in range(8)))
    # One reading per tick (two, if the calls straddle a tick), not one per call.
    assert len({g.results.server_time.ToMilliseconds() for g in got}) <= 2


async def test_streams_get_one_update_per_tick_and_a_stalled_subscriber_costs_nothing(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await _open(stack, 2)
    results = results_stub(edge_channel)
    request = rpb.StreamResultsRequest(round_id=test_round.round_id)
    stalled = results.StreamResults(request)
    first = await stalled.read()  # then never read again
    assert first.sequence == 1
    sse = SseWatcher().start(stack.edge_target, f"/v1/rounds/{test_round.round_id}/live-results")
    reader = results.StreamResults(request)
    updates = [await reader.read() for _ in range(3)]
    assert [u.sequence for u in updates] == [1, 2, 3]
    await stub(edge_channel).SubmitVote(vote_request(test_round, contestant=1),
                                        metadata=voter(stack, "stream-voter"), timeout=10)
    async with asyncio.timeout(5):
        while True:
            update = await reader.read()
            if update.results.total_votes == 1:
                break
    assert update.results.standings[0].rank_change in (0, 1)
    await close_test_round(stack.database_url, stack.redis_url, test_round)
    async with asyncio.timeout(30):
        while not update.results.is_final:
            update = await reader.read()
    assert update.results.total_votes == 1
    assert await reader.read() == grpc.aio.EOF
    stalled.cancel()
    await sse.wait_until(lambda event: event["results"].get("isFinal", False), timeout=10)
    await sse.stop()
    assert [int(e["sequence"]) for e in sse.events[:2]] == [1, 2]
    assert sse.events[-1]["results"]["isFinal"] is True
    assert sse.events[-1]["results"]["totalVotes"] == "1"


async def test_a_subscriber_that_stops_reading_holds_one_update(stack: Stack) -> None:
    """In process: many updates offered to a never-reading subscriber keep one."""
    from results_svc.live import Update
    from runtime import fanout
    tracemalloc.start()
    subscriber: fanout.Latest[Update] = fanout.Latest()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(10_000):
        subscriber.offer(Update({"full": rpb.RoundResults(round_id="x" * 36)}, "full", False))
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 20_000
    assert (await subscriber.take()).views["full"].round_id == "x" * 36
    assert not subscriber.pending



async def test_a_results_replica_restart_ends_streams_cleanly_and_a_reconnect_is_current(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    """A draining replica ends its streams with UNAVAILABLE (a reason the client acts on, at
    once) rather than letting them be cut when its grace period runs out; the client
    reconnects and gets the current standings, votes cast while it was away included."""
    test_round = await _open(stack, 2)
    await stub(edge_channel).SubmitVote(vote_request(test_round, contestant=0),
                                        metadata=voter(stack, "restart-voter-1"), timeout=10)
    host, port = stack.addresses["results_svc"][0]
    request = rpb.StreamResultsRequest(round_id=test_round.round_id)
    async with stack.channel("results_svc", replica_address=(host, port)) as direct:
        stream = results_stub(direct).StreamResults(request)
        first = await stream.read()
        assert first.sequence == 1
        stopping = asyncio.create_task(stack.kill("results_svc", 0, signal.SIGTERM))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async with asyncio.timeout(30):
                while await stream.read() != grpc.aio.EOF:
                    pass
        await stopping
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(ended.value)
    assert info is not None and info.reason == "SERVER_DRAINING"

    await stub(edge_channel).SubmitVote(vote_request(test_round, contestant=1),
                                        metadata=voter(stack, "restart-voter-2"), timeout=10)
    await stack.restart("results_svc", 0)
    async with asyncio.timeout(30):
        while True:  # as an app does: reconnect (through the edge) until a replica answers
            try:
                update = await results_stub(edge_channel).StreamResults(request).read()
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                await asyncio.sleep(0.2)
    assert update.sequence == 1
    assert update.results.total_votes == 2
    assert [s.count for s in update.results.standings] == [1, 1]

"""Votes racing an operator's close: every acknowledged vote lies inside the recorded window.

The final result counts votes received (by the edge, bounded by the round's receive lag
before their admission: results_svc.rules.judged_ms) before the round's recorded close; if
the close time were read before Redis stopped admitting, a vote acknowledged in between would
be dropped from the result (an OK that does not count: invariant 3 and 5 together).
"""

from __future__ import annotations

import asyncio

import grpc

from ops.stack import Stack
from tests.support_windows import TestRound
from tests.sync_support import Operator, seconds
from tests.vote_support import CLOSED_MS, JUDGED_MS, query, stub, vote_request, voter


async def test_every_vote_acknowledged_before_a_close_is_inside_the_recorded_window(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    operator = Operator(stack, edge_channel)
    episode_id, contestants = await operator.episode_with_contestants(2)
    round_id = (await operator.call("CreateRound", episode_id=episode_id,
                                    contestant_ids=contestants)).round.round_id
    await operator.call("StartShow", episode_id=episode_id)
    await operator.call("OpenVoting", round_id=round_id, duration=seconds(60))
    test_round = TestRound(show_id="", episode_id=episode_id, round_id=round_id,
                           contestants=contestants, opens_at_ms=0, closes_at_ms=0)
    votes = stub(edge_channel)
    acknowledged: list[str] = []
    closing = asyncio.Event()
    flowing = asyncio.Event()

    async def keep_voting(user: int) -> None:
        metadata = voter(stack, f"racer-{user}")
        for attempt in range(200):
            try:
                reply = await votes.SubmitVote(
                    vote_request(test_round, contestant=attempt % 2), metadata=metadata,
                    timeout=10)
                acknowledged.append(reply.vote_id)
                if len(acknowledged) >= 20:
                    flowing.set()
            except grpc.aio.AioRpcError:
                if closing.is_set():
                    return  # closed (or out of free votes): stop
                if attempt > 150:
                    return
            await asyncio.sleep(0.01)

    voters = [asyncio.create_task(keep_voting(user)) for user in range(40)]
    # Close while votes are flowing (a fresh mesh may refuse for a moment while vote_svc
    # readies its Redis shards).
    await asyncio.wait_for(flowing.wait(), 30)
    closing.set()
    await operator.call("CloseVoting", round_id=round_id)
    await asyncio.gather(*voters)

    assert acknowledged, "no vote was acknowledged before the close"
    outside = await query(
        stack.database_url,
        "SELECT v.vote_id FROM votes v JOIN rounds r USING (round_id)"
        f" WHERE v.round_id = %s AND {JUDGED_MS} >= {CLOSED_MS}", round_id)
    assert outside == []
    counted = await query(stack.database_url,
                          "SELECT count(*) AS n FROM votes WHERE round_id = %s", round_id)
    assert counted[0]["n"] == len(acknowledged)

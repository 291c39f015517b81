"""FraudScoringService.RejectLedgerVotes: how fraud_svc carries out a BLOCK found when a vote
already in the ledger is scored again (vote_svc's re-scorer calls it)."""

from __future__ import annotations

import uuid

import grpc
import pytest

from ops.stack import Stack
from runtime.access import Principal, Role
from runtime.errors import error_info
from televote.fraud.v1 import (
    fraud_scoring_service_pb2,
    fraud_scoring_service_pb2_grpc,
    fraud_types_pb2,
)
from tests.vote_support import query

INTERNAL = Principal(Role.INTERNAL, "vote_svc").to_metadata()
pb = fraud_scoring_service_pb2


def _block(user: str, round_id: str, action: int = fraud_types_pb2.FRAUD_ACTION_BLOCK,
           ) -> fraud_scoring_service_pb2.LedgerVoteBlock:
    return pb.LedgerVoteBlock(
        vote_id=str(uuid.uuid4()), ref=str(uuid.uuid4()), user_id=user, round_id=round_id,
        score=pb.VoteScore(action=action, score=0.9, decision_id=str(uuid.uuid4()),
                           reasons=[fraud_types_pb2.FraudSignal(name="blocklist")]))


async def test_a_blocked_ledger_vote_is_rejected_once_and_audited(stack: Stack) -> None:
    user, round_id = f"ledger-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    block = _block(user, round_id)
    request = pb.RejectLedgerVotesRequest(votes=[block], rescored_by="vote_svc/test")
    async with stack.channel("fraud_svc", as_holder="vote_svc") as channel:
        stub = fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(channel)
        first = await stub.RejectLedgerVotes(request, metadata=INTERNAL, timeout=10)
        again = await stub.RejectLedgerVotes(request, metadata=INTERNAL, timeout=10)
    assert (first.rejected, list(first.finalized_round_ids)) == (1, [])
    assert again.rejected == 0
    [rejection] = await query(stack.database_url, "SELECT * FROM fraud_rejections"
                              " WHERE round_id = %s", round_id)
    assert (rejection["user_id"], rejection["vote_ref"]) == (user, block.ref)
    audit = await query(stack.database_url, "SELECT * FROM audit_log WHERE action ="
                        " 'fraud.rescore.reject' AND target = %s", block.ref)
    assert len(audit) == 1
    assert audit[0]["details"]["attributes"]["vote_id"] == block.vote_id


@pytest.mark.parametrize("bad", ["not BLOCK", "round not a UUID", "no rescored_by"])
async def test_a_malformed_rejection_is_refused_and_changes_nothing(
        stack: Stack, bad: str) -> None:
    user, round_id = f"ledger-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    block = _block(user, round_id, fraud_types_pb2.FRAUD_ACTION_REVIEW if bad == "not BLOCK"
                   else fraud_types_pb2.FRAUD_ACTION_BLOCK)
    if bad == "round not a UUID":
        block.round_id = "round-1"
    request = pb.RejectLedgerVotesRequest(
        votes=[block], rescored_by="" if bad == "no rescored_by" else "vote_svc/test")
    async with stack.channel("fraud_svc", as_holder="vote_svc") as channel:
        stub = fraud_scoring_service_pb2_grpc.FraudScoringServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RejectLedgerVotes(request, metadata=INTERNAL, timeout=10)
    info = error_info(refused.value)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info is not None and info.reason == "INVALID_REQUEST"
    assert await query(stack.database_url, "SELECT 1 FROM fraud_rejections"
                       " WHERE user_id = %s", user) == []

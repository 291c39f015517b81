"""ResultsService: live results, final results, receipts and the ledger key."""

from __future__ import annotations

import json
from typing import Any

import grpc

from results_svc import store
from results_svc.final import read_final
from results_svc.live import HIDDEN, Live, final_update, public_view
from results_svc.proofs import Proofs
from results_svc.rounds import load_round, round_not_found
from results_svc.signing import Signer, public_pem
from runtime import ids
from runtime.access import Role
from runtime.errors import ApiError
from runtime.fanout import add_servicer
from runtime.interceptors import current_principal
from runtime.protoconv import timestamp, timestamp_ms
from runtime.storage import Storage, fetch_one
from televote.results.v1 import results_service_pb2 as rpb
from televote.results.v1 import results_service_pb2_grpc as rgrpc
from televote.results.v1 import results_types_pb2 as rtypes
from televote.vote.v1 import vote_types_pb2 as vtypes


class ResultsServicer(rgrpc.ResultsServiceServicer):
    def __init__(self, storage: Storage, live: Live, proofs: Proofs, signer: Signer) -> None:
        self._storage = storage
        self._live = live
        self._proofs = proofs
        self._signer = signer

    async def GetResults(self, request: rpb.GetResultsRequest, context: Any
                         ) -> rpb.GetResultsResponse:
        round_id = ids.parse(request.round_id, "round_id")
        update = await self._live.current(round_id)
        return rpb.GetResultsResponse(results=update.for_role(current_principal().role))

    async def StreamResults(self, request: rpb.StreamResultsRequest,  # type: ignore[override]
                            context: Any) -> None:
        """Writes each StreamResultsResponse already serialized (see `register`): thousands of
        streams share one serialization of each tick's update."""
        round_id = ids.parse(request.round_id, "round_id")
        role = current_principal().role
        mailbox = await self._live.subscribe(round_id)
        try:
            sequence = 0
            while True:
                update = await mailbox.take()
                sequence += 1
                await context.write(update.stream_message(role, sequence))
                if update.final:
                    return
        finally:
            self._live.unsubscribe(round_id, mailbox)

    async def GetFinalResults(self, request: rpb.GetFinalResultsRequest, context: Any
                              ) -> rpb.GetFinalResultsResponse:
        round_id = ids.parse(request.round_id, "round_id")
        async with self._storage.pool.connection() as connection:
            info = await load_round(connection, round_id)
            if info is None:
                raise round_not_found(round_id)
            final = await read_final(connection, round_id)
        if final is None or info.state != "FINALIZED":
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "RESULTS_NOT_READY",
                           "the round is not finalized yet")
        if current_principal().role != Role.OPERATOR and public_view(info, True) == HIDDEN:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "RESULTS_NOT_PUBLISHED",
                           "the round's results are hidden until the episode ends")
        update = final_update(info, final, self._live.now_ms())
        return rpb.GetFinalResultsResponse(
            results=update.views["full"], ledger_votes=final.ledger_votes,
            invalidated_votes=final.invalidated_votes,
            winner_contestant_ids=final.winner_ids,
            finalized_at=timestamp(final.finalized_at), digest=digest_of(final))

    async def GetVoteReceipt(self, request: rpb.GetVoteReceiptRequest, context: Any
                             ) -> rpb.GetVoteReceiptResponse:
        vote_id = ids.parse(request.vote_id, "vote_id")
        found = await self._proofs.receipt(vote_id)
        if found is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, "VOTE_NOT_FOUND",
                           f"no vote {vote_id} in the ledger")
        response = rpb.GetVoteReceiptResponse(
            receipt=receipt_of(found.leaf_data, found.receipt_hash))
        if found.final is None or found.proof is None:
            return response
        index, size, path, root = found.proof
        response.counted = found.counted
        response.proof.CopyFrom(rtypes.InclusionProof(
            leaf_index=index, tree_size=size, audit_path=path, root_hash=root))
        response.digest.CopyFrom(digest_of(found.final))
        return response

    async def GetLedgerPublicKey(self, request: rpb.GetLedgerPublicKeyRequest, context: Any
                                 ) -> rpb.GetLedgerPublicKeyResponse:
        key_id = request.key_id or self._signer.key_id
        async with self._storage.pool.connection() as connection:
            row: Any = await fetch_one(connection, store.LEDGER_KEY, (key_id,))
        if row is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND", f"no key {key_id}")
        public = bytes(row["public_key"])
        return rpb.GetLedgerPublicKeyResponse(key_id=key_id, public_key=public,
                                              public_key_pem=public_pem(public),
                                              create_time=timestamp(row["created_at"]))


def digest_of(final: Any) -> rtypes.LedgerDigest:
    return rtypes.LedgerDigest(
        round_id=final.round_id, tree_size=final.tree_size, root_hash=final.root_hash,
        signed_tree_head=final.signed_tree_head, signature=final.signature,
        key_id=final.key_id, signed_at=timestamp(final.signed_at))


def receipt_of(leaf_data: bytes, leaf_hash: bytes) -> vtypes.VoteReceipt:
    """The receipt's fields, read from the leaf vote_svc committed (results_svc never
    re-encodes a leaf)."""
    fields = json.loads(leaf_data)
    return vtypes.VoteReceipt(
        vote_id=fields.get("vote_id", ""), round_id=fields.get("round_id", ""),
        contestant_id=fields.get("contestant_id", ""),
        vote_type=vtypes.VoteType.Value(f"VOTE_TYPE_{fields.get('vote_type', 'UNSPECIFIED')}"),
        count=int(fields.get("count", 0)),
        channel=vtypes.Channel.Value(f"CHANNEL_{fields.get('channel', 'UNSPECIFIED')}"),
        accepted_at=timestamp_ms(int(fields.get("accepted_at_ms", 0))),
        leaf_data=leaf_data, leaf_hash=leaf_hash)


#: add_ResultsServiceServicer_to_server, except that StreamResults sends the bytes its
#: handler writes as they are.
register = add_servicer(rpb.DESCRIPTOR.services_by_name["ResultsService"],
                        prebuilt=["StreamResults"])

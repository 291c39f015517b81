"""ResultsService: live results, final results, receipts and the ledger key."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from results_svc.final import Finalizer, read_final
from results_svc.live import HIDDEN, Live, final_update, public_view
from results_svc.rounds import load_round, parse_uuid, round_not_found
from results_svc.signing import Signer, public_pem
from runtime.access import Role
from runtime.errors import ApiError
from runtime.interceptors import current_principal
from runtime.storage import Storage
from televote.results.v1 import results_service_pb2 as rpb
from televote.results.v1 import results_service_pb2_grpc as rgrpc
from televote.results.v1 import results_types_pb2 as rtypes
from televote.vote.v1 import vote_types_pb2 as vtypes


def _stamp_dt(moment: Any) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _stamp_ms(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


class ResultsServicer(rgrpc.ResultsServiceServicer):
    def __init__(self, storage: Storage, live: Live, finalizer: Finalizer,
                 signer: Signer) -> None:
        self._storage = storage
        self._live = live
        self._finalizer = finalizer
        self._signer = signer

    async def GetResults(self, request: rpb.GetResultsRequest, context: Any
                         ) -> rpb.GetResultsResponse:
        round_id = parse_uuid(request.round_id, "round_id")
        update = await self._live.current(round_id)
        return rpb.GetResultsResponse(results=update.for_role(current_principal().role))

    async def StreamResults(self, request: rpb.StreamResultsRequest,  # type: ignore[override]
                            context: Any) -> AsyncIterator[bytes]:
        """Yields StreamResultsResponse already serialized (see `register`): thousands of
        streams share one serialization of each tick's update."""
        round_id = parse_uuid(request.round_id, "round_id")
        role = current_principal().role
        sequence = 0
        async for update in self._live.subscribe(round_id):
            sequence += 1
            yield update.stream_message(role, sequence)


    async def GetFinalResults(self, request: rpb.GetFinalResultsRequest, context: Any
                              ) -> rpb.GetFinalResultsResponse:
        round_id = parse_uuid(request.round_id, "round_id")
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
            finalized_at=_stamp_dt(final.finalized_at), digest=digest_of(final))

    async def GetVoteReceipt(self, request: rpb.GetVoteReceiptRequest, context: Any
                             ) -> rpb.GetVoteReceiptResponse:
        vote_id = parse_uuid(request.vote_id, "vote_id")
        async with self._storage.pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT round_id::text, leaf_data, receipt_hash FROM votes WHERE vote_id = %s"
                " ORDER BY admitted_ms, receipt_hash LIMIT 1", (vote_id,))
            row: Any = await cursor.fetchone()
            if row is None:
                raise ApiError(grpc.StatusCode.NOT_FOUND, "VOTE_NOT_FOUND",
                               f"no vote {vote_id} in the ledger")
            final = await read_final(connection, row["round_id"])
            invalid = None
            if final is not None:
                cursor = await connection.execute(
                    "SELECT reason FROM round_result_invalid_votes"
                    " WHERE round_id = %s AND vote_id = %s", (row["round_id"], vote_id))
                invalid = await cursor.fetchone()
        leaf_data = bytes(row["leaf_data"])
        response = rpb.GetVoteReceiptResponse(receipt=receipt_of(leaf_data,
                                                                  bytes(row["receipt_hash"])))
        if final is None:
            return response
        tree = await self._finalizer.tree(row["round_id"])
        index = find_leaf(tree.levels[0], bytes(row["receipt_hash"]))
        if index is None:  # committed after the signed tree was taken: not part of it
            return response
        response.counted = invalid is None
        response.proof.CopyFrom(rtypes.InclusionProof(
            leaf_index=index, tree_size=tree.size, audit_path=tree.inclusion_proof(index),
            root_hash=tree.root))
        response.digest.CopyFrom(digest_of(final))
        return response

    async def GetLedgerPublicKey(self, request: rpb.GetLedgerPublicKeyRequest, context: Any
                                 ) -> rpb.GetLedgerPublicKeyResponse:
        key_id = request.key_id or self._signer.key_id
        async with self._storage.pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT public_key, created_at FROM ledger_keys WHERE key_id = %s", (key_id,))
            row: Any = await cursor.fetchone()
        if row is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND", f"no key {key_id}")
        public = bytes(row["public_key"])
        return rpb.GetLedgerPublicKeyResponse(key_id=key_id, public_key=public,
                                              public_key_pem=public_pem(public),
                                              create_time=_stamp_dt(row["created_at"]))


def find_leaf(leaves: list[bytes], leaf: bytes) -> int | None:
    try:
        return leaves.index(leaf)
    except ValueError:
        return None


def digest_of(final: Any) -> rtypes.LedgerDigest:
    return rtypes.LedgerDigest(
        round_id=final.round_id, tree_size=final.tree_size, root_hash=final.root_hash,
        signed_tree_head=final.signed_tree_head, signature=final.signature,
        key_id=final.key_id, signed_at=_stamp_dt(final.signed_at))


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
        accepted_at=_stamp_ms(int(fields.get("accepted_at_ms", 0))),
        leaf_data=leaf_data, leaf_hash=leaf_hash)


def _already_serialized(message: bytes) -> bytes:
    return message


def register(servicer: ResultsServicer, server: grpc.aio.Server) -> None:
    """add_ResultsServiceServicer_to_server, except that StreamResults sends the bytes its
    handler yields as they are."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=getattr(rpb, f"{name}Request").FromString,
            response_serializer=getattr(rpb, f"{name}Response").SerializeToString)
        for name in ("GetResults", "GetFinalResults", "GetVoteReceipt", "GetLedgerPublicKey")}
    handlers["StreamResults"] = grpc.unary_stream_rpc_method_handler(
        servicer.StreamResults, request_deserializer=rpb.StreamResultsRequest.FromString,
        response_serializer=_already_serialized)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "televote.results.v1.ResultsService", handlers),))

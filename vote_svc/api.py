"""vote_svc's servicers: voting for voters, batch submission for gateways, wallet grants,
store purchases and the stores' notifications."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import grpc

from runtime import ids
from runtime.access import Role
from runtime.errors import ApiError, FieldViolation, invalid_argument
from runtime.gateway_time import edge_received_ms, gateway_time_problem, received_time
from runtime.interceptors import current_principal
from runtime.overload import waited_ms
from runtime.protoconv import timestamp
from runtime.storage import Storage
from runtime.vote_results import vote_result
from televote.vote.v1 import (
    vote_gateway_service_pb2,
    vote_gateway_service_pb2_grpc,
    vote_service_pb2,
    vote_service_pb2_grpc,
    vote_types_pb2,
    wallet_admin_service_pb2,
    wallet_admin_service_pb2_grpc,
)
from vote_svc import profiles
from vote_svc.admission import Scripts
from vote_svc.ingest import Ingestor, Result, VoteRequest
from vote_svc.overload import arrival_ms
from vote_svc.packages import PackageCatalogue
from vote_svc.purchases import MAX_RECEIPT_BYTES, STORE_NAMES, Purchases
from vote_svc.validation import check_vote, client_ip
from vote_svc.wallet import balance, grant_votes

MAX_BATCH = 1000
MAX_NOTIFICATION_BYTES = 256 * 1024


class VoteServicer(vote_service_pb2_grpc.VoteServiceServicer):
    """Voters' RPCs: the user is always the token's subject."""

    def __init__(self, storage: Storage, ingestor: Ingestor, catalogue: PackageCatalogue,
                 purchases: Purchases) -> None:
        self._storage = storage
        self._ingestor = ingestor
        self._catalogue = catalogue
        self._purchases = purchases

    async def SubmitVote(self, request: vote_service_pb2.SubmitVoteRequest,
                         context: grpc.aio.ServicerContext[Any, Any],
                         ) -> vote_service_pb2.SubmitVoteResponse:
        metadata = context.invocation_metadata()
        time_left = context.time_remaining()
        # Queue time on this host's clock; lines-open by the edge's (when it received it).
        arrived_here = arrival_ms(waited_ms(metadata, time_left))  # type: ignore[arg-type]
        refusal = self._ingestor.shed(1, time_left, arrived_ms=arrived_here)
        if refusal is not None:
            raise refusal
        received_ms = edge_received_ms(metadata)  # type: ignore[arg-type]
        vote, bad = check_vote(
            request_id=request.request_id, user_id=current_principal().subject,
            round_id=request.round_id, contestant_id=request.contestant_id,
            vote_type=request.vote_type, count=request.count, channel=request.channel,
            client=request.client, has_client=request.HasField("client"),
            ip=client_ip(metadata, context.peer()),  # type: ignore[arg-type]
            gateway=False, received_at=received_time(received_ms))
        if vote is None:
            raise invalid_argument(*bad)
        (result,) = await self._ingestor.submit([vote], arrived_ms=arrived_here)
        if isinstance(result, ApiError):
            raise result
        return vote_service_pb2.SubmitVoteResponse(
            vote_id=result.vote_id, receipt_hash=result.receipt_hash,
            accepted_at=result.accepted_at, free_votes_left=result.free_votes_left,
            paid_balance=result.paid_balance)

    async def GetBalance(self, request: vote_service_pb2.GetBalanceRequest,
                         context: grpc.aio.ServicerContext[Any, Any],
                         ) -> vote_service_pb2.GetBalanceResponse:
        episode_id = ids.parse(request.episode_id, "episode_id", "must be an episode id (UUID)")
        left, quota, paid = await balance(self._storage, current_principal().subject,
                                          episode_id)
        return vote_service_pb2.GetBalanceResponse(
            episode_id=episode_id, free_votes_left=left, free_vote_quota=quota,
            paid_balance=paid)

    async def ListVotePackages(self, request: vote_service_pb2.ListVotePackagesRequest,
                               context: Any) -> vote_service_pb2.ListVotePackagesResponse:
        return vote_service_pb2.ListVotePackagesResponse(
            packages=await self._catalogue.packages())

    async def SetVoterProfile(self, request: vote_service_pb2.SetVoterProfileRequest,
                              context: Any) -> vote_service_pb2.SetVoterProfileResponse:
        profile = profiles.validate(request.age_band, request.gender, request.province)
        stored = await profiles.set_profile(self._storage, current_principal().subject,
                                            profile)
        return vote_service_pb2.SetVoterProfileResponse(
            age_band=stored.age_band, gender=stored.gender, province=stored.province)

    async def PurchaseVotePackage(self, request: vote_service_pb2.PurchaseVotePackageRequest,
                                  context: Any) -> vote_service_pb2.PurchaseVotePackageResponse:
        bad = []
        request_id = ids.canonical(request.request_id)
        if request_id is None:
            bad.append(FieldViolation("request_id", "must be a UUID"))
        if request.store not in STORE_NAMES:
            bad.append(FieldViolation("store", "must be STORE_APPLE or STORE_GOOGLE"))
        if not 1 <= len(request.package_id) <= 64:
            bad.append(FieldViolation("package_id", "1 to 64 characters"))
        if not request.store_receipt:
            bad.append(FieldViolation("store_receipt", "the store's proof of purchase"))
        elif len(request.store_receipt.encode()) > MAX_RECEIPT_BYTES:
            bad.append(FieldViolation("store_receipt", "at most 64 KiB"))
        if bad or request_id is None:
            raise invalid_argument(*bad)
        credit = await self._purchases.purchase(
            current_principal().subject, request_id, STORE_NAMES[request.store],
            request.package_id, request.store_receipt)
        return vote_service_pb2.PurchaseVotePackageResponse(
            purchase_id=credit.purchase_id, store_transaction_id=credit.store_transaction_id,
            votes_credited=credit.votes_credited, paid_balance=credit.paid_balance,
            price=vote_types_pb2.Money(currency_code=credit.currency_code,
                                       amount_micros=credit.price_micros),
            credited_at=timestamp(credit.credited_at))


class StoreNotificationServicer(vote_service_pb2_grpc.StoreNotificationServiceServicer):
    """The stores' pushes: each authenticated here, not by a televote token (see the proto)."""

    def __init__(self, purchases: Purchases) -> None:
        self._purchases = purchases

    async def ReceiveAppleNotification(
            self, request: vote_service_pb2.ReceiveAppleNotificationRequest, context: Any,
    ) -> vote_service_pb2.ReceiveAppleNotificationResponse:
        if not request.signed_payload:
            raise invalid_argument(FieldViolation("signed_payload", "Apple's signed payload"))
        if len(request.signed_payload.encode()) > MAX_NOTIFICATION_BYTES:
            raise invalid_argument(FieldViolation("signed_payload", "at most 256 KiB"))
        await self._purchases.apple_notification(request.signed_payload)
        return vote_service_pb2.ReceiveAppleNotificationResponse()

    async def ReceiveGoogleNotification(
            self, request: vote_service_pb2.ReceiveGoogleNotificationRequest, context: Any,
    ) -> vote_service_pb2.ReceiveGoogleNotificationResponse:
        if not request.HasField("message"):
            raise invalid_argument(FieldViolation("message", "the Pub/Sub message"))
        if request.message.ByteSize() > MAX_NOTIFICATION_BYTES:
            raise invalid_argument(FieldViolation("message", "at most 256 KiB"))
        await self._purchases.google_notification(request.token, request.message,
                                                  request.subscription)
        return vote_service_pb2.ReceiveGoogleNotificationResponse()


class VoteGatewayServicer(vote_gateway_service_pb2_grpc.VoteGatewayServiceServicer):
    """Batches from trusted gateways (SMS service, carriers): each vote names its user."""

    def __init__(self, ingestor: Ingestor) -> None:
        self._ingestor = ingestor

    async def SubmitVotes(self, request: vote_gateway_service_pb2.SubmitVotesRequest,
                          context: grpc.aio.ServicerContext[Any, Any],
                          ) -> vote_gateway_service_pb2.SubmitVotesResponse:
        if not request.votes:
            raise invalid_argument(FieldViolation("votes", "at least one vote is required"))
        if len(request.votes) > MAX_BATCH:
            raise invalid_argument(
                FieldViolation("votes", f"at most {MAX_BATCH} votes per batch"),
                reason="BATCH_TOO_LARGE")
        metadata = context.invocation_metadata()
        time_left = context.time_remaining()
        arrived_here = arrival_ms(waited_ms(metadata, time_left))  # type: ignore[arg-type]
        refusal = self._ingestor.shed(len(request.votes), time_left,
                                      gateway=True, arrived_ms=arrived_here)
        if refusal is not None:  # before validating a thousand votes for nothing
            return vote_gateway_service_pb2.SubmitVotesResponse(
                results=[vote_result(index, refusal) for index in range(len(request.votes))])
        ip = client_ip(metadata, context.peer())  # type: ignore[arg-type]
        arrived = received_time(edge_received_ms(metadata))  # type: ignore[arg-type]
        carrier = current_principal().role == Role.CARRIER
        results: list[Result | None] = [None] * len(request.votes)
        valid: list[tuple[int, VoteRequest]] = []
        for index, gateway_vote in enumerate(request.votes):
            prefix = f"votes[{index}]."
            received, late = self._received_at(gateway_vote, arrived, prefix)
            vote, bad = check_vote(
                request_id=gateway_vote.request_id, user_id=gateway_vote.user_id,
                round_id=gateway_vote.round_id, contestant_id=gateway_vote.contestant_id,
                vote_type=gateway_vote.vote_type, count=gateway_vote.count,
                channel=gateway_vote.channel, client=gateway_vote.client,
                has_client=gateway_vote.HasField("client"), ip=ip, gateway=True,
                prefix=prefix, received_at=received)
            bad += late
            if carrier and vote is not None and not _carrier_may_submit(vote):
                results[index] = ApiError(
                    grpc.StatusCode.PERMISSION_DENIED, "CARRIER_VOTE_NOT_ALLOWED",
                    "a carrier submits only PREMIUM_SMS votes on CHANNEL_SMS for users in the "
                    "SMS namespace (user ids starting with \"sms:\")")
            elif vote is None or bad:
                results[index] = invalid_argument(*bad)
            else:
                if arrived is not None:  # a gateway's own time never judges lines-open
                    vote = dataclasses.replace(vote, edge_received_at=arrived)
                valid.append((index, vote))
        if valid:
            outcomes = await self._ingestor.submit([vote for _, vote in valid], gateway=True,
                                                   arrived_ms=arrived_here)
            for (index, _), outcome in zip(valid, outcomes, strict=True):
                results[index] = outcome
        decided = [result for result in results if result is not None]
        assert len(decided) == len(results)
        return vote_gateway_service_pb2.SubmitVotesResponse(
            results=[vote_result(index, result) for index, result in enumerate(decided)])

    def _received_at(self, vote: vote_gateway_service_pb2.GatewayVote, arrived: datetime | None,
                     prefix: str) -> tuple[datetime | None, list[FieldViolation]]:
        """When the vote was received: the gateway's own time when it gives one that the
        edge's clock allows (runtime/gateway_time.py), else when the edge received the call."""
        if not vote.HasField("received_at"):
            return arrived, []
        stamp = vote.received_at
        if not (0 <= stamp.seconds <= _MAX_TIMESTAMP_S and 0 <= stamp.nanos < 1_000_000_000):
            return arrived, [FieldViolation(prefix + "received_at", "not a valid time")]
        claimed = datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC)
        config = self._ingestor.config
        problem = gateway_time_problem(
            claimed, arrived or datetime.now(UTC),
            max_age_ms=config.vote_gateway_max_age_ms,
            # Inside the mesh (sms_svc) the time is the edge's, read on another host's clock.
            tolerance_ms=0 if arrived is not None else config.vote_gateway_clock_tolerance_ms)
        if problem is not None:
            return arrived, [FieldViolation(prefix + "received_at", problem)]
        return claimed, []


#: 9999-12-31T23:59:59Z, the largest time a Timestamp may hold.
_MAX_TIMESTAMP_S = 253_402_300_799


def _carrier_may_submit(vote: VoteRequest) -> bool:
    """A carrier's token votes only as premium SMS, for subscribers, never as an app user:
    otherwise it could spend an app voter's free votes and paid balance."""
    return (vote.vote_type == "PREMIUM_SMS" and vote.channel == "SMS"
            and vote.user_id.startswith("sms:"))


class WalletAdminServicer(wallet_admin_service_pb2_grpc.WalletAdminServiceServicer):
    """Operators' grants of paid votes, audited."""

    def __init__(self, storage: Storage, scripts: Scripts) -> None:
        self._storage = storage
        self._scripts = scripts

    async def GrantVotes(self, request: wallet_admin_service_pb2.GrantVotesRequest,
                         context: grpc.aio.ServicerContext[Any, Any],
                         ) -> wallet_admin_service_pb2.GrantVotesResponse:
        bad = []
        if not ids.is_id(request.request_id):
            bad.append(FieldViolation("request_id", "must be a UUID"))
        if not request.user_id or len(request.user_id) > 128:
            bad.append(FieldViolation("user_id", "1 to 128 characters"))
        if not 1 <= request.count <= 100_000:
            bad.append(FieldViolation("count", "must be 1 to 100000"))
        if not 1 <= len(request.reason) <= 500:
            bad.append(FieldViolation("reason", "1 to 500 characters"))
        if bad:
            raise invalid_argument(*bad)
        return await grant_votes(self._storage, self._scripts, current_principal(), request)

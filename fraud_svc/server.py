"""fraud_svc's server: internal batch scoring, and the operators' review service."""

from __future__ import annotations

import logging

from fraud_svc.api import FraudReviewServicer, FraudScoringServicer
from fraud_svc.config import FraudConfig
from fraud_svc.features import Policy, Scorer
from fraud_svc.geoip import MaxMindIntel, VpnLists
from fraud_svc.model import Model
from fraud_svc.state import FeatureState
from fraud_svc.store import Blocklist, BlocklistCache
from runtime.server import ServiceHost, run_service
from runtime.storage import Storage
from televote.fraud.v1 import (
    fraud_review_service_pb2,
    fraud_review_service_pb2_grpc,
    fraud_scoring_service_pb2,
    fraud_scoring_service_pb2_grpc,
)

__all__ = ["FraudConfig", "create_server", "main"]

log = logging.getLogger(__name__)


def create_server(config: FraudConfig) -> tuple[ServiceHost, int]:
    storage = Storage.from_config(config)
    host = ServiceHost(config, storage)
    intel = MaxMindIntel(config.fraud_geoip_db, config.fraud_asn_db,
                         VpnLists(config.fraud_vpn_cidrs, config.fraud_vpn_asns))
    if not intel.has_database:
        log.warning("no GeoIP database (FRAUD_GEOIP_DB): country, location and network "
                    "signals say unknown")
    state = FeatureState(storage.redis, config)

    async def mirror_user_blocks(blocklist: Blocklist) -> None:
        # Redis may have been lost since the flags were set: PostgreSQL is the record.
        await state.set_blocked(list(blocklist.users))

    blocklist = BlocklistCache(storage.pool, config.fraud_refresh_seconds,
                               Policy.default(config), mirror_user_blocks)
    host.on_stop(blocklist.stop)
    scorer = Scorer(config, Model.load(config.fraud_model_path))
    scoring = FraudScoringServicer(config, storage.pool, state, intel, blocklist, scorer)
    host.on_drain(scoring.drain)
    host.add(fraud_scoring_service_pb2_grpc.add_FraudScoringServiceServicer_to_server, scoring,
             fraud_scoring_service_pb2.DESCRIPTOR.services_by_name["FraudScoringService"])
    host.add(fraud_review_service_pb2_grpc.add_FraudReviewServiceServicer_to_server,
             FraudReviewServicer(storage.pool, state, blocklist),
             fraud_review_service_pb2.DESCRIPTOR.services_by_name["FraudReviewService"])
    return host, host.bind()


def main() -> None:
    run_service(create_server, FraudConfig)

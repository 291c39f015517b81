"""The load simulator's parts that need no mesh: its plans, its gRPC-Web framing and its
command line. (The seed scenario end to end and the verifier: tests/e2e/test_loadtest.py.)"""

from __future__ import annotations

import base64

import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from typer.testing import CliRunner

from loadtest import grpcweb
from loadtest.plan import LoadConfig, build, shownight_rate, sms_sender
from ops.cli import app


def _trailer(text: str) -> bytes:
    payload = text.encode()
    return bytes([grpcweb.TRAILER_FLAG]) + len(payload).to_bytes(4, "big") + payload


def _status_details(reason: str) -> str:
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="televote"))
    status = status_pb2.Status(code=9, message="no", details=[packed])
    return base64.b64encode(status.SerializeToString()).decode().rstrip("=")


def test_grpcweb_reads_a_message_and_its_trailers() -> None:
    body = grpcweb.frame(b"hello") + _trailer("grpc-status: 0\r\ngrpc-message: \r\n")
    reply = grpcweb.parse(body, {})
    assert (reply.status, reply.messages, reply.reason) == (0, [b"hello"], "")


def test_grpcweb_reads_the_reason_of_an_error_in_trailers_or_headers() -> None:
    details = _status_details("NO_FREE_VOTES")
    in_trailers = grpcweb.parse(_trailer(f"grpc-status: 9\r\ngrpc-status-details-bin: "
                                         f"{details}\r\n"), {})
    trailers_only = grpcweb.parse(b"", {"Grpc-Status": "9", "Grpc-Status-Details-Bin": details})
    assert (in_trailers.status, in_trailers.reason) == (9, "NO_FREE_VOTES")
    assert (trailers_only.status, trailers_only.reason) == (9, "NO_FREE_VOTES")


def test_grpcweb_refuses_a_truncated_body() -> None:
    with pytest.raises(ValueError):
        grpcweb.parse(grpcweb.frame(b"hello")[:-1], {})
    with pytest.raises(ValueError):
        grpcweb.parse(grpcweb.frame(b"hello"), {})  # no status anywhere


def test_seed_plan_is_the_seeds_test_and_funds_exactly_the_paid_votes() -> None:
    plan = build(LoadConfig(users=200, votes_per_user=10, paid_share=0.3, compress=30))
    assert len(plan.shots) == 2000
    assert len({shot.user for shot in plan.shots}) == 200
    assert all(0 <= shot.at < 60 for shot in plan.shots)
    paid = sum(shot.vote_type == "PAID" for shot in plan.shots)
    app = sum(shot.path != "sms" for shot in plan.shots)
    assert 0.24 * app < paid < 0.36 * app and sum(plan.grants.values()) == paid
    assert build(LoadConfig(users=200)).shots[5].request_id == plan.shots[5].request_id


def test_a_fifth_of_the_seeds_voters_text_1255_over_the_three_carriers() -> None:
    plan = build(LoadConfig(users=1000, votes_per_user=2))
    sms = [shot for shot in plan.shots if shot.path == "sms"]
    assert 0.15 * len(plan.shots) < len(sms) < 0.25 * len(plan.shots)
    assert {shot.vote_type for shot in sms} == {"PREMIUM_SMS"}
    assert "PREMIUM_SMS" not in {s.vote_type for s in plan.shots if s.path != "sms"}
    assert {sms_sender(shot.user)[0] for shot in sms} == {"SMART", "CELLCARD", "METFONE"}
    assert all(shot.user not in plan.grants for shot in sms)
    retries = build(LoadConfig(scenario="retries", users=200))
    assert all(shot.path != "sms" for shot in retries.shots)


def test_shownight_builds_up_to_the_peak_at_the_close() -> None:
    config = LoadConfig(scenario="shownight", window_s=1800, compress=15, peak_rate=400,
                        spike_s=60)
    rates, performances = shownight_rate(config)
    assert len(performances) == 4 and max(rates) == rates[-1] == 400
    assert rates[0] == pytest.approx(20)  # quiet: 5 % of the peak
    plan = build(config)
    late = [shot for shot in plan.shots if shot.at >= config.wall_window_s]
    assert 0 < len(late) < len(plan.shots) * 0.01  # sent after the close: VOTING_CLOSED


@pytest.mark.parametrize("arguments", [
    ["loadtest", "nosuch"],
    ["loadtest", "seed", "--paths", "grpc,carrier-pigeon"],
    ["loadtest", "seed", "--paid-share", "1.5"],
    ["loadtest", "seed", "--edge", "http://127.0.0.1:1"],  # no stack there: no database
    ["loadtest", "seed", "--replicas", "vote_svc=zero"],
])
def test_bad_command_line_is_a_clear_error(arguments: list[str]) -> None:
    result = CliRunner().invoke(app, arguments, env={"DATABASE_URL": "", "TELEVOTE_STATE_DIR": ""})
    assert result.exit_code == 2, result.output

"""The load simulator's parts that need no mesh: its plans, its gRPC-Web framing and its
command line. (The seed scenario end to end and the verifier: tests/e2e/test_loadtest.py.)"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from typer.testing import CliRunner

from loadtest import grpcweb
from loadtest.driver import Attempt, DriverRecord, merge, shard
from loadtest.plan import LoadConfig, build, shownight_rate, sms_sender
from loadtest.report import generator_figures
from loadtest.transports import OK
from ops.cli import app


def _trailer(text: str) -> bytes:
    payload = text.encode()
    return bytes([grpcweb.TRAILER_FLAG]) + len(payload).to_bytes(4, "big") + payload


def test_grpcweb_trailer_frame_is_what_the_reader_reads() -> None:
    body = grpcweb.frame(b"m") + grpcweb.trailer_frame({"grpc-status": "0",
                                                        "grpc-message": ""})
    assert body.endswith(_trailer("grpc-status:0\r\ngrpc-message:\r\n"))
    assert grpcweb.parse(body, {}).messages == [b"m"]


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
    assert build(LoadConfig(users=200), plan.run_id).shots[5].request_id == \
        plan.shots[5].request_id
    # Another run of the same seed (against the same stack) shares no request id, so no
    # carrier message id that sms_svc would take for a redelivery.
    other = build(LoadConfig(users=200, votes_per_user=10, paid_share=0.3, compress=30))
    assert not {s.request_id for s in other.shots} & {s.request_id for s in plan.shots}


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


# --- the drivers' split and the generator's lag report -----------------------------------


def _attempt(plan_index: int, planned: float, late_ms: float, worker: int = 0,
             first: bool = True) -> Attempt:
    return Attempt(plan_index, planned, late_ms + 5.0, OK, f"v{plan_index}-{first}", "",
                   late_ms=late_ms, first=first, worker=worker)


def test_shards_keep_each_users_votes_in_one_driver_in_plan_order() -> None:
    plan = build(LoadConfig(users=200, votes_per_user=10, window_s=60, compress=1))
    shares = shard(plan.shots, 3)
    assert sum(len(share) for share in shares) == len(plan.shots)
    owners: dict[str, int] = {}
    for worker, share in enumerate(shares):
        assert [index for index, _ in share] == sorted(index for index, _ in share)
        for _, shot in share:
            assert owners.setdefault(shot.user, worker) == worker
    assert len(set(owners.values())) == 3


def test_merge_joins_the_drivers_records_and_refuses_a_user_split_over_two() -> None:
    first = DriverRecord(0, {"a"}, [_attempt(0, 10.0, 0.0), _attempt(2, 12.0, 0.0)], 1.0, 3.0)
    second = DriverRecord(1, {"b"}, [_attempt(1, 11.0, 0.0, worker=1)], 1.0, 3.0)
    assert [a.shot for a in merge([first, second])] == [0, 1, 2]
    with pytest.raises(ValueError, match="more than one worker"):
        merge([first, DriverRecord(1, {"a"}, [], 0.0, 1.0)])


def _lag_report(late_ms: list[float]) -> dict[str, Any]:
    """A 3 s plan of 10 votes a second, sent `late_ms[second]` late."""
    plan = build(LoadConfig(users=3, votes_per_user=10, window_s=3.2, compress=1,
                            paths=("json",), sms_share=0.0))
    for index, shot in enumerate(plan.shots):
        shot.at = index // 10 + (index % 10) / 10
    start = 1000.0
    attempts = [_attempt(index, start + shot.at, late_ms[int(shot.at)])
                for index, shot in enumerate(plan.shots)]
    attempts.append(_attempt(0, start + 5.0, 0.0, first=False))  # a retry is not a send
    record = DriverRecord(0, {s.user for s in plan.shots}, attempts, 0.3, 3.0,
                          waited_for_cpu_s=1.5)
    return generator_figures(plan, attempts, [record], start)


def test_the_report_says_per_second_how_far_the_drivers_fell_behind() -> None:
    report = _lag_report([2.0, 450.0, 3.0])
    assert report["lagged"] and report["lagged_seconds"] == 1
    assert [row["planned"] for row in report["per_second"][:3]] == [10, 10, 10]
    late = report["per_second"][1]
    assert late["late_p99_ms"] == late["late_max_ms"] == 450.0
    # Second 1's votes left 0.45 s late: those planned before 1.55 s still in second 1.
    assert [row["sent"] for row in report["per_second"][:3]] == [10, 6, 14]
    assert report["worst_second"]["second"] == 1
    assert report["drivers"][0]["sends"] == 30 and report["drivers"][0]["requests"] == 31
    assert report["verdict"].startswith("LOAD GENERATOR FELL BEHIND ITS PLAN in 1 of 3 seconds")
    assert "450.0 ms" in report["verdict"] and "not only the platform's" in report["verdict"]
    # Busy a tenth of the time, runnable but waiting for a core half of it: starved.
    assert "busy 10% of the time and waited for a core 50%" in report["verdict"]


def test_a_generator_within_the_threshold_is_said_to_keep_to_its_plan() -> None:
    report = _lag_report([2.0, 40.0, 3.0])
    assert not report["lagged"]
    assert report["verdict"].startswith("Load generator kept to its plan")
    assert "max 40.0 ms" in report["verdict"]

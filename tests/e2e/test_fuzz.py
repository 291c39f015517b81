"""Every public RPC, fuzzed through the edge with Hypothesis (tests/fuzz_support.py): only
documented codes, never INTERNAL, and no state change on a refusal. A few examples per RPC
here; bench/fuzz_bench.py runs many more."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops.stack import Stack
from tests.fuzz_support import (
    GRPC_REFUSALS,
    HTTP_REFUSALS,
    Rpc,
    call_grpc,
    call_json,
    http_path,
    json_body,
    public_rpcs,
    written_counts,
)

EXAMPLES = int(os.environ.get("TELEVOTE_FUZZ_EXAMPLES", "4"))
RPCS = public_rpcs()
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def grpc_channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.edge_target) as channel:
        yield channel


def test_every_routed_rpc_is_fuzzed() -> None:
    assert len(RPCS) >= 35 and all(rpc.path for rpc in RPCS)


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: f"{rpc.service.split('.')[-1]}.{rpc.name}")
def test_json_fuzz_gets_documented_answers_and_refusals_change_nothing(
        stack: Stack, rpc: Rpc) -> None:
    body = json_body(rpc.request) if rpc.has_body else st.none()

    @FUZZ
    @given(path=http_path(rpc), body=body)
    def property_(path: str, body: dict[str, object] | None) -> None:
        before = written_counts(stack)
        status = call_json(stack, rpc, path, body)
        assert status == 200 or status in HTTP_REFUSALS, (status, path, body)
        if status != 200:
            assert written_counts(stack) == before, (status, path, body)

    property_()


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: f"{rpc.service.split('.')[-1]}.{rpc.name}")
def test_protobuf_fuzz_gets_documented_codes_and_refusals_change_nothing(
        stack: Stack, grpc_channel: grpc.Channel, rpc: Rpc) -> None:
    @FUZZ
    @given(payload=st.binary(max_size=300))
    def property_(payload: bytes) -> None:
        before = written_counts(stack)
        code = call_grpc(grpc_channel, stack, rpc, payload)
        assert code == grpc.StatusCode.OK or code in GRPC_REFUSALS, (code, payload)
        if code != grpc.StatusCode.OK:
            assert written_counts(stack) == before, (code, payload)

    property_()

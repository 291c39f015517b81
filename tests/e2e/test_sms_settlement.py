"""The carriers' settlement file and the purge of subscribers' numbers (`televote sms`)."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from ops.stack import Stack
from tests.sms_support import post_sms, records, sms_round
from tests.vote_support import query

pytestmark = pytest.mark.stack


def televote(stack: Stack, *args: str) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "televote"), *args], capture_output=True, text=True,
        env={**os.environ, "DATABASE_URL": stack.database_url}, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_settlement_lists_charged_messages_per_carrier_with_credits_and_totals(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    sent = []
    for carrier, text, msisdn in (("smart", "1", "+85512000001"), ("smart", "2", "+85512000002"),
                                  ("smart", "hello", "+85512000003"),
                                  ("metfone", "V3", "+85597000004")):
        status, body = await asyncio.to_thread(post_sms, stack, carrier, text=text,
                                               msisdn=msisdn)
        assert status == 200, body
        sent.append(body)
    # Fraud review rejects the second Smart vote after the show.
    (vote,) = await query(stack.database_url, "SELECT round_id::text, user_id, request_id"
                          " FROM votes WHERE vote_id = %s", sent[1]["voteId"])
    review = str(uuid.uuid4())
    await query(stack.database_url,
                "INSERT INTO fraud_reviews (review_id, vote_ref, decision_id, user_id, round_id,"
                " score, signals, state) VALUES (%s, %s, '', %s, %s, 0.7, '{}', 'REJECTED')"
                " RETURNING review_id", review, vote["request_id"], vote["user_id"],
                vote["round_id"])
    await query(stack.database_url,
                "INSERT INTO fraud_rejections (rejection_id, round_id, user_id, vote_ref,"
                " review_id, rejected_by) VALUES (%s, %s, %s, %s, %s, 'reviewer')"
                " RETURNING rejection_id", str(uuid.uuid4()), vote["round_id"], vote["user_id"],
                vote["request_id"], review)
    text = await asyncio.to_thread(televote, stack, "sms", "settlement", "--episode",
                                   test_round.episode_id)
    rows = list(csv.DictReader(io.StringIO(text)))
    lines = [(r["carrier"], r["line"], r["vote_id"], r["amount"]) for r in rows]
    assert lines == [
        ("METFONE", "CHARGE", sent[3]["voteId"], "0.500000"),
        ("SMART", "CHARGE", sent[0]["voteId"], "0.500000"),
        ("SMART", "CHARGE", sent[1]["voteId"], "0.500000"),
        ("SMART", "CREDIT", sent[1]["voteId"], "-0.500000"),
        ("METFONE", "TOTAL", "", "0.500000"),
        ("SMART", "TOTAL", "", "0.500000"),
    ]
    assert "12000001" not in text  # subscribers appear as pseudonyms
    smart = await asyncio.to_thread(televote, stack, "sms", "settlement", "--episode",
                                    test_round.episode_id, "--carrier", "smart")
    assert {r["carrier"] for r in csv.DictReader(io.StringIO(smart))} == {"SMART"}


async def test_purge_removes_the_numbers_and_keeps_the_records(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    await sms_round(stack, edge_channel)
    status, body = await asyncio.to_thread(post_sms, stack, "cellcard", text="1",
                                           msisdn="+85511222333", carrier_message_id="purge-me")
    assert status == 200, body
    (row,) = await query(stack.database_url, "SELECT msisdn FROM sms_reply_addresses"
                         " WHERE message_id = %s", body["messageId"])
    assert row["msisdn"] == "+85511222333"
    out = await asyncio.to_thread(televote, stack, "sms", "purge", "--before", "2999-01-01")
    assert out.startswith("removed ")
    assert await query(stack.database_url, "SELECT 1 FROM sms_reply_addresses"
                       " WHERE message_id = %s", body["messageId"]) == []
    (record,) = await records(stack, "cellcard", "purge-me")
    assert record["charged"] and record["pseudonym"]

"""Premium SMS through a real SMS gateway: a message typed at Kannel's fakesmsc (the carrier's
SMSC) travels bearerbox -> smsbox get-url -> edge -> sms_svc -> vote_svc; the reply goes back
through smsbox's sendsms to fakesmsc, and Kannel's delivery report reaches the records."""

from __future__ import annotations

import asyncio
import contextlib
import random
import urllib.parse

import grpc
import pytest

from ops import kannel
from ops.stack import Stack
from tests.sms_support import post_sms, sms_round, sms_votes
from tests.vote_support import query

pytestmark = pytest.mark.stack


class FakeSmsc:
    """Kannel's fakesmsc connected to one carrier's link: sends MO lines, collects MT lines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, stack: Stack, carrier: str, *messages: str):  # type: ignore[no-untyped-def]
        assert stack.kannel is not None
        process = await asyncio.create_subprocess_exec(
            str(kannel.binaries()["fakesmsc"]), "-H", "127.0.0.1",
            "-r", str(stack.kannel.smsc_ports[carrier]), "-i", "0.05",
            "-m", str(len(messages)), *(messages or ["0 0 text none"]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            yield cls(process)
        finally:
            process.kill()
            await process.wait()

    async def reply(self, containing: str, timeout: float = 30.0) -> str:
        """The first MT line fakesmsc printed that contains `containing`."""
        assert self.process.stdout is not None

        async def read() -> str:
            assert self.process.stdout is not None
            while True:
                line = (await self.process.stdout.readline()).decode(errors="replace")
                if not line:
                    raise AssertionError("fakesmsc exited:\n" + "".join(self.lines))
                self.lines.append(line)
                if containing in line and "Got message" in line:
                    return line
        try:
            return await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            raise AssertionError(f"no MT with {containing!r} in:\n{''.join(self.lines)}") from None


async def test_an_mo_typed_at_fakesmsc_is_counted_answered_through_kannel_and_reported(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    # A number of its own: the link also carries replies other tests' messages left queued.
    sender = f"8551{random.randrange(10**7):07d}"
    async with FakeSmsc.connect(stack, "smart", f"{sender} 1255 text V2") as smsc:
        line = await smsc.reply(f"1255 +{sender} ")
    assert "Thank you! Your vote for 2. C2 is counted" in line
    (vote,) = await sms_votes(stack, test_round.round_id)
    (record,) = await query(stack.database_url,
                            "SELECT * FROM sms_records WHERE vote_id = %s", vote["vote_id"])
    assert record["carrier"] == "SMART" and record["outcome"] == "COUNTED" and record["charged"]
    # Kannel's message id (%I) is the carrier message id.
    assert len(record["carrier_message_id"]) == 36
    # The DLRs come back through smsbox's dlr-url: fakesmsc's link reports the SMSC's
    # acceptance (8) and delivery to the phone (1), which smsbox may call back in either
    # order; the record shows the final one. Kannel may still be working through the
    # replies earlier tests queued (a thousand after the batch tests): wait up to a minute.
    for _ in range(600):
        statuses = [row["status"] for row in await query(
            stack.database_url, "SELECT status FROM sms_deliveries WHERE message_id = %s",
            record["message_id"])]
        if len(statuses) == 2:
            break
        await asyncio.sleep(0.1)
    assert sorted(statuses) == ["ACCEPTED", "DELIVERED"]
    (record,) = await query(stack.database_url,
                            "SELECT * FROM sms_records WHERE vote_id = %s", vote["vote_id"])
    assert record["delivery_status"] == "DELIVERED"


async def test_a_khmer_mo_in_ucs2_is_counted_and_answered_in_khmer(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    test_round = await sms_round(stack, edge_channel)
    sender = f"8551{random.randrange(10**7):07d}"
    text = "បោះឆ្នោត ១"  # "vote 1" in Khmer, as a phone sends it: UCS-2
    ucs2 = urllib.parse.quote(text.encode("utf-16-be"), safe="")
    async with FakeSmsc.connect(stack, "cellcard", f"{sender} 1255 ucs2 {ucs2}") as smsc:
        line = await smsc.reply(f"1255 +{sender} ")
    (record,) = await query(stack.database_url,
                            "SELECT * FROM sms_records WHERE round_id = %s", test_round.round_id)
    assert record["text"] == text and record["language"] == "km"
    assert record["outcome"] == "COUNTED" and record["carrier"] == "CELLCARD"
    # The reply went out in UCS-2: fakesmsc prints "<from to ucs-2 BYTES>", form-encoded.
    payload = line.partition(" ucs-2 ")[2].rstrip().removesuffix(">")
    reply = urllib.parse.unquote_to_bytes(payload.replace("+", " ")).decode("utf-16-be")
    assert reply == record["reply_text"] and "C1" in reply


async def test_a_reply_recorded_by_a_replica_killed_before_kannel_took_it_still_arrives(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    """The outbox: the reply is written with the outcome, so a replica that dies after
    recording the outcome and before handing the reply to Kannel loses nothing; the
    restarted replica sends it."""
    assert stack.kannel is not None
    test_round = await sms_round(stack, edge_channel)
    sender = f"8551{random.randrange(10**7):07d}"
    # Kannel's sendsms is down: the replica records the outcome but cannot hand the reply on.
    await stack.kannel.stop_smsbox()
    try:
        status, body = await asyncio.to_thread(post_sms, stack, "smart", text="V3",
                                               msisdn=f"+{sender}")
        assert status == 200 and body["outcome"] == "INBOUND_SMS_OUTCOME_VOTE_COUNTED", body
        await stack.kill("sms_svc")
        (pending,) = await query(stack.database_url,
                                 "SELECT * FROM sms_reply_outbox WHERE message_id = %s",
                                 body["messageId"])
        assert pending["sent_at"] is None
    finally:
        await stack.kannel.start_smsbox()
    async with FakeSmsc.connect(stack, "smart") as smsc:
        await stack.restart("sms_svc")
        line = await smsc.reply(f"1255 +{sender} ")
    assert "Thank you! Your vote for 3. C3 is counted" in line
    # Kannel may pass the reply on before sms_svc has read its answer and marked it sent.
    for _ in range(100):
        (sent,) = await query(stack.database_url,
                              "SELECT * FROM sms_reply_outbox WHERE message_id = %s",
                              body["messageId"])
        if sent["sent_at"] is not None:
            break
        await asyncio.sleep(0.1)
    assert sent["sent_at"] is not None
    assert len(await sms_votes(stack, test_round.round_id)) == 1

"""Premium SMS through a real SMS gateway (`--sms-via kannel`): fakesmsc -> bearerbox ->
smsbox -> edge -> sms_svc, and the reply back through sendsms -> bearerbox -> fakesmsc.

The driver plays fakesmsc itself: it speaks the fake SMSC link's line protocol (what Kannel's
fakesmsc speaks: `SENDER RECEIVER text TEXT` per MO, the MT replies as lines of the same
form on the same connection) over one connection per carrier, because fakesmsc the program
only sends random picks from its arguments at a fixed interval and a link takes one client
at a time. A message's answer is the reply that comes back to its sender: the outcome is
read from the reply's text (sms_svc/replies.py), matched to the sender's oldest message
still waiting. Kannel names the message (its own id), not the driver, so the answer carries
no vote id; the verifier finds each message's vote in the SMS records instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections import deque

from loadtest.transports import ERROR, OK, REFUSED, Answer, Vote
from sms_svc.replies import Outcome, outcome_of

#: The outcome a reply tells -> how the verifier reads it (a vote's refusal reasons).
_REASONS = {Outcome.CLOSED: "VOTING_CLOSED", Outcome.RATE_LIMITED: "RATE_LIMITED",
            Outcome.BLOCKED: "FRAUD_BLOCKED", Outcome.INVALID_FORMAT: "SMS_BAD_FORMAT",
            Outcome.UNKNOWN_CONTESTANT: "INVALID_CONTESTANT"}
SHORT_CODE = "1255"
#: A reply through the gateway may queue behind others on its link: a phone waits longer for
#: its SMS than an app for its answer.
MIN_TIMEOUT_S = 30.0


class KannelSmsClient:
    """MO messages into Kannel's fake SMSC links (one per carrier), replies out of them."""

    def __init__(self, smsc_ports: dict[str, int], host: str = "127.0.0.1") -> None:
        self._ports = {carrier.upper(): port for carrier, port in smsc_ports.items()}
        self._host = host
        self._links: dict[str, asyncio.StreamWriter] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._readers: list[asyncio.Task[None]] = []
        #: sender (digits) -> its messages' answers, oldest first
        self._waiting: dict[str, deque[asyncio.Future[Answer]]] = {}
        self.replies = 0
        self.unmatched_replies = 0
        self._last_line = time.monotonic()

    async def connect(self, quiet_s: float = 1.0, at_most_s: float = 120.0) -> None:
        """Open every carrier's link before voting starts, and read until the links are
        quiet: the gateway delivers what it holds for a link (replies to messages of earlier
        runs, sent while no client was connected; a thousand after a big test) as soon as
        one connects, and they must neither be read as this run's nor delay its messages."""
        for carrier in self._ports:
            await self._link(carrier)
        started = time.monotonic()
        while time.monotonic() - started < at_most_s:
            await asyncio.sleep(quiet_s / 4)
            if time.monotonic() - self._last_line >= quiet_s:
                return

    async def submit(self, vote: Vote, timeout: float) -> Answer:
        sender = vote.msisdn.lstrip("+")
        link = await self._link(vote.carrier)
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(sender, deque()).append(answer)
        link.write(f"{sender} {SHORT_CODE} text V{vote.sms_number}\n".encode())
        await link.drain()
        try:
            return await asyncio.wait_for(asyncio.shield(answer), max(timeout, MIN_TIMEOUT_S))
        except TimeoutError:
            # Still waiting in line: a late reply is matched to it (and dropped), not to
            # the sender's next message.
            return Answer(ERROR, reason="DEADLINE_EXCEEDED")

    async def _link(self, carrier: str) -> asyncio.StreamWriter:
        lock = self._connecting.setdefault(carrier, asyncio.Lock())
        async with lock:
            if carrier not in self._links:
                reader, writer = await asyncio.open_connection(self._host,
                                                               self._ports[carrier])
                self._links[carrier] = writer
                self._readers.append(asyncio.create_task(self._read(reader)))
            return self._links[carrier]

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self._last_line = time.monotonic()
            parts = line.decode(errors="replace").rstrip("\n").split(" ", 3)
            if len(parts) != 4 or parts[0] != SHORT_CODE:
                continue
            _, receiver, kind, data = parts
            text = data if kind == "text" else _decoded(data)
            waiting = self._waiting.get(receiver.lstrip("+"))
            if not waiting:  # a reply to a message of an earlier run
                self.unmatched_replies += 1
                continue
            self.replies += 1
            answer = waiting.popleft()
            if not answer.done():
                answer.set_result(_answer(text))

    async def close(self) -> None:
        for reader in self._readers:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        for writer in self._links.values():
            writer.close()


def _decoded(data: str) -> str:
    raw = urllib.parse.unquote_to_bytes(data)
    try:
        return raw.decode()
    except UnicodeDecodeError:  # a Khmer reply travels as UCS-2
        return raw.decode("utf-16-be", errors="replace")


def _answer(text: str) -> Answer:
    outcome = outcome_of(text)
    if outcome is Outcome.COUNTED:
        return Answer(OK)
    if outcome is None:
        return Answer(ERROR, reason="SMS_REPLY_NOT_UNDERSTOOD")
    return Answer(REFUSED, reason=_REASONS[outcome])

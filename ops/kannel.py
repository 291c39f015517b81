"""A real SMS gateway in front of the edge: Kannel's bearerbox and smsbox, with Kannel's
fakesmsc playing each carrier's SMSC (tests, `televote up --kannel`).

Each carrier has its own fake SMSC link (smsc-id = the carrier's lower-case name) and its
own sms-service: smsbox calls the edge's GET route of ReceiveInboundSms with that carrier's
token for every message the link receives (`get-url`; `max-messages = 0`, so the HTTP answer
is not sent back as an SMS: sms_svc sends the reply itself through smsbox's sendsms, routed
back over the same link, with a `dlr-url` that brings the delivery report to the edge).

Debian packages `kannel` and `kannel-extras` (fakesmsc); scripts/install installs them
where they are missing (as root).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ops import tokens
from ops.processes import Child, free_port
from runtime.access import Role

CARRIERS = ("smart", "cellcard", "metfone")
FAKESMSC = Path("/usr/lib/kannel/test/fakesmsc")
#: How long smsbox waits for the edge, and how often it redelivers a message the edge did
#: not answer with a 2xx (a carrier's redelivery).
HTTP_RETRIES = 5


def binaries() -> dict[str, Path]:
    """Where bearerbox, smsbox and fakesmsc are; raises naming what is missing."""
    found = {name: shutil.which(name, path="/usr/sbin:/usr/bin:/usr/local/sbin")
             for name in ("bearerbox", "smsbox")}
    missing = [name for name, path in found.items() if path is None]
    if not FAKESMSC.exists():
        missing.append(f"fakesmsc ({FAKESMSC}, package kannel-extras)")
    if missing:
        raise RuntimeError(f"Kannel is not installed (missing {', '.join(missing)}): "
                           "apt-get install kannel kannel-extras, or run scripts/install as root")
    return {"bearerbox": Path(str(found["bearerbox"])), "smsbox": Path(str(found["smsbox"])),
            "fakesmsc": FAKESMSC}


def _any_port() -> int:
    # Kannel's fake SMSC and box ports listen on every address: a port free on loopback may
    # still be held on another (a connection from 127.0.0.2 in TIME_WAIT was seen).
    return free_port("0.0.0.0")


@dataclass
class Kannel:
    """Ports and credentials of one Kannel, chosen before anything starts."""

    state_dir: Path
    edge_url: str
    admin_port: int = field(default_factory=_any_port)
    smsbox_port: int = field(default_factory=_any_port)
    sendsms_port: int = field(default_factory=_any_port)
    smsc_ports: dict[str, int] = field(
        default_factory=lambda: {carrier: _any_port() for carrier in CARRIERS})
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    _children: list[Child] = field(default_factory=list)

    @property
    def sendsms_url(self) -> str:
        return f"http://127.0.0.1:{self.sendsms_port}/cgi-bin/sendsms"

    def _token(self, carrier: str) -> str:
        # The gateway runs for a whole season: its tokens outlive a show night.
        return tokens.mint(self.state_dir, Role.CARRIER, carrier, ttl_seconds=90 * 24 * 3600)

    def sms_env(self) -> dict[str, str]:
        """sms_svc's environment for replies through this Kannel."""
        dlr = {carrier.upper(): (
            f"{self.edge_url}/v1/carriers/CARRIER_{carrier.upper()}/delivery-reports?"
            f"access_token={self._token(carrier)}&gateway_dlr_type=%d") for carrier in CARRIERS}
        return {"SMS_KANNEL_SENDSMS_URL": self.sendsms_url, "SMS_KANNEL_USERNAME": "televote",
                "SMS_KANNEL_PASSWORD": self.password, "SMS_KANNEL_DLR_URLS": json.dumps(dlr),
                "SMS_KANNEL_SMSC_IDS": json.dumps(
                    {carrier.upper(): carrier for carrier in CARRIERS})}

    def config(self) -> str:
        logs = self.state_dir / "logs"
        groups = [f"""group = core
admin-port = {self.admin_port}
admin-password = {self.password}
admin-allow-ip = "127.0.0.1"
smsbox-port = {self.smsbox_port}
box-allow-ip = "127.0.0.1"
log-file = "{logs / 'kannel-bearerbox.log'}"
log-level = 1
dlr-storage = internal
"""]
        for carrier, port in self.smsc_ports.items():
            groups.append(f"""group = smsc
smsc = fake
smsc-id = {carrier}
port = {port}
connect-allow-ip = "127.0.0.1"
""")
        groups.append(f"""group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {self.smsbox_port}
sendsms-port = {self.sendsms_port}
sendsms-interface = 127.0.0.1
log-file = "{logs / 'kannel-smsbox.log'}"
log-level = 1
mo-recode = true
http-request-retry = {HTTP_RETRIES}
http-queue-delay = 1
""")
        groups.append(f"""group = sendsms-user
username = televote
password = {self.password}
max-messages = 3
concatenation = true
""")
        for carrier in CARRIERS:
            query = "&".join([
                "carrier_message_id=%I", "msisdn=%p", "short_code=%P", "text=%b",
                f"access_token={urllib.parse.quote(self._token(carrier))}"])
            groups.append(f"""group = sms-service
keyword-regex = .*
catch-all = true
accepted-smsc = {carrier}
max-messages = 0
concatenation = true
get-url = "{self.edge_url}/v1/carriers/CARRIER_{carrier.upper()}/sms?{query}"
""")
        return "\n".join(groups)

    async def start(self, attempts: int = 5) -> None:
        """Start bearerbox, then smsbox. A port picked free may be taken by the time
        bearerbox binds it (other processes on the machine pick too): then bearerbox's own
        ports are picked again. The sendsms port, which sms_svc already knows, stays."""
        found = binaries()
        for attempt in range(attempts):
            try:
                await self._start_once(found)
                return
            except RuntimeError:
                await self.stop()
                if attempt == attempts - 1:
                    raise
                self.admin_port, self.smsbox_port = _any_port(), _any_port()
                self.smsc_ports = {carrier: _any_port() for carrier in CARRIERS}

    async def _start_once(self, found: dict[str, Path]) -> None:
        path = self.state_dir / "kannel.conf"
        path.write_text(self.config())
        path.chmod(0o600)  # it holds carriers' tokens and the sendsms password
        logs = self.state_dir / "logs"
        self._children.append(await Child.spawn(
            "bearerbox", [str(found["bearerbox"]), str(path)], logs))
        await _wait_port(self.smsbox_port, self._children[0])
        for port in self.smsc_ports.values():
            await _wait_port(port, self._children[0])
        await self.start_smsbox()

    async def start_smsbox(self) -> None:
        """Start smsbox (again): the box that calls the edge and takes replies (sendsms)."""
        path = self.state_dir / "kannel.conf"
        child = await Child.spawn("smsbox", [str(binaries()["smsbox"]), str(path)],
                                  self.state_dir / "logs")
        self._children.append(child)
        await _wait_port(self.sendsms_port, child)

    async def stop_smsbox(self) -> None:
        """Stop smsbox alone (as its crash would): sendsms refuses replies meanwhile."""
        for child in [c for c in self._children if c.name == "smsbox"]:
            await child.stop()
            self._children.remove(child)

    async def stop(self) -> None:
        for child in reversed(self._children):
            await child.stop()
        self._children.clear()


async def _wait_port(port: int, child: Child, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.running:
            raise RuntimeError(f"{child.name} exited at start:\n{child.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{child.name} not listening on {port} after {timeout:.0f}s:\n"
                       f"{child.log_tail()}")

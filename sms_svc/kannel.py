"""Replies through Kannel (MT): smsbox's sendsms interface, with a delivery-report URL that
brings Kannel's DLR back to ReceiveDeliveryReport through the edge.

And the configuration of a Kannel that plays a carrier link for tests and `televote up
--kannel`: one bearerbox, one smsbox, one fake SMSC per carrier (Kannel's fakesmsc), smsbox
calling the edge's GET route for every message it receives (`get-url`).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from dataclasses import dataclass

import aiohttp

from sms_svc.store import PendingReply

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KannelReplies:
    """Sends replies to subscribers through smsbox's sendsms."""

    sendsms_url: str
    username: str
    password: str
    #: carrier (SMART, CELLCARD, METFONE) -> the DLR URL template (with %d) for it.
    dlr_urls: dict[str, str]
    #: carrier -> Kannel smsc-id.
    smsc_ids: dict[str, str]

    @classmethod
    def from_config(cls, sendsms_url: str, username: str, password: str, dlr_urls: str,
                    smsc_ids: str) -> KannelReplies | None:
        if not sendsms_url:
            return None
        return cls(sendsms_url, username, password, json.loads(dlr_urls), json.loads(smsc_ids))

    def url(self, *, carrier: str, carrier_message_id: str, msisdn: str, short_code: str,
            text: str) -> str:
        """The sendsms request of one reply."""
        params = {"username": self.username, "password": self.password, "from": short_code,
                  "to": msisdn, "text": text, "charset": "UTF-8"}
        if not text.isascii():  # Khmer: UCS-2 (GSM 7-bit has no Khmer)
            params["coding"] = "2"
        if carrier in self.smsc_ids:
            params["smsc"] = self.smsc_ids[carrier]
        if carrier in self.dlr_urls:
            separator = "&" if "?" in self.dlr_urls[carrier] else "?"
            params["dlr-mask"] = "31"  # delivered, failed, buffered, SMSC accepted, rejected
            params["dlr-url"] = (self.dlr_urls[carrier] + separator + "carrier_message_id="
                                 + urllib.parse.quote(carrier_message_id, safe=""))
        return f"{self.sendsms_url}?{urllib.parse.urlencode(params)}"

    async def send(self, session: aiohttp.ClientSession, reply: PendingReply) -> str | None:
        """Hand one reply to Kannel: None when it took it, else why not (logged)."""
        try:
            async with session.get(self.url(
                    carrier=reply.carrier, carrier_message_id=reply.carrier_message_id,
                    msisdn=reply.msisdn, short_code=reply.short_code, text=reply.text),
                    timeout=aiohttp.ClientTimeout(total=5)) as response:
                body = await response.text()
                if response.status // 100 == 2:
                    return None
                log.warning("kannel refused a reply: %s %s", response.status, body.strip())
                return f"HTTP {response.status}: {body.strip()[:200]}"
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("kannel unreachable for a reply: %r", error)
            return repr(error)

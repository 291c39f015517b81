"""sms_svc's configuration (runtime/config.py: typed, from the environment)."""

from __future__ import annotations

from typing import ClassVar

from runtime.config import ServiceConfig


class SmsConfig(ServiceConfig):
    service_name: ClassVar[str] = "sms_svc"

"""OpenTelemetry traces and metrics, set up before a server or channel is built.

Export is switched by the standard OTEL_* variables: with OTEL_EXPORTER_OTLP_ENDPOINT (or the
per-signal variants) set, or OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER = otlp, spans and
metrics go out over OTLP; `console` prints them. Without any, nothing is sent anywhere (a laptop
has no collector on :4317) and spans are not recorded (sampler always_off unless
OTEL_TRACES_SAMPLER says otherwise), but every RPC still gets a trace id that its logs carry.

RPC spans come from runtime/interceptors.py, not from opentelemetry-instrumentation-grpc: its
aio interceptors wrapped every call in two more layers and cost more CPU than the RPCs they
traced (about +30 % on a no-op call), on the vote path where every microsecond is throughput.
"""

from __future__ import annotations

import os

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

_configured = False


def _exporter_choice(signal: str) -> str:
    explicit = os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if explicit:
        return explicit
    endpoint_set = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    return "otlp" if endpoint_set else "none"


def _span_exporter() -> SpanExporter | None:
    choice = _exporter_choice("traces")
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    return ConsoleSpanExporter() if choice == "console" else None


def _metric_exporter() -> MetricExporter | None:
    choice = _exporter_choice("metrics")
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        return OTLPMetricExporter()
    return ConsoleMetricExporter() if choice == "console" else None


def configure_telemetry(service: str, replica: str) -> None:
    """Install the tracer and meter providers, once per process."""
    global _configured
    if _configured or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    _configured = True
    resource = Resource.create({SERVICE_NAME: service, SERVICE_INSTANCE_ID: replica})
    span_exporter = _span_exporter()
    # Recording spans that nobody exports is pure cost; an explicit sampler choice still wins.
    quiet = span_exporter is None and not os.environ.get("OTEL_TRACES_SAMPLER")
    tracer_provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF if quiet else None)
    if span_exporter is not None:
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(tracer_provider)

    readers: list[MetricReader] = []
    metric_exporter = _metric_exporter()
    if metric_exporter is not None:
        readers.append(PeriodicExportingMetricReader(metric_exporter))
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))

"""OpenTelemetry traces and metrics, set up before a server or channel is built.

Export is switched by the standard OTEL_* variables: with OTEL_EXPORTER_OTLP_ENDPOINT (or the
per-signal variants) set, or OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER = otlp, spans and
metrics go out over OTLP; `console` prints them. Without any, spans are still recorded so logs
carry trace ids, but nothing is sent anywhere (a laptop has no collector on :4317).
"""

from __future__ import annotations

import os

from opentelemetry import metrics, trace
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer
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
    """Install the tracer and meter providers and instrument grpc.aio, once per process."""
    global _configured
    if _configured or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    _configured = True
    resource = Resource.create({SERVICE_NAME: service, SERVICE_INSTANCE_ID: replica})
    tracer_provider = TracerProvider(resource=resource)
    span_exporter = _span_exporter()
    if span_exporter is not None:
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(tracer_provider)

    readers: list[MetricReader] = []
    metric_exporter = _metric_exporter()
    if metric_exporter is not None:
        readers.append(PeriodicExportingMetricReader(metric_exporter))
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))

    GrpcAioInstrumentorServer().instrument()  # type: ignore[no-untyped-call]
    GrpcAioInstrumentorClient().instrument()  # type: ignore[no-untyped-call]

"""OpenTelemetry tracing: on when an OTLP endpoint is configured, absent otherwise.

With `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set,
`configure_tracing` installs an SDK tracer provider that batches spans to that collector over
OTLP/HTTP (protobuf); the SDK reads the other standard variables itself
(`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER`…). Without one, nothing is
installed: no provider, no exporter, no background thread, and the brokers leave the tracing
middleware out (with OpenTelemetry's no-op provider it still costs about 25 µs per message
consumed and per message published, measured here).

The trace context travels in W3C `traceparent` headers: FastStream's `RabbitTelemetryMiddleware`
writes it on every publish and continues it on every consume, FastAPI starts a server span per
request, and the outbox stores the request's `traceparent` with each row so that its relay, which
publishes later from another task, publishes within the request's trace.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit

from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger("herald.tracing")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
TRACEPARENT = "traceparent"
# version-trace_id-span_id-flags (W3C Trace Context); later versions may append fields.
TRACEPARENT_MAX = 128

_PROPAGATOR = TraceContextTextMapPropagator()


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    """Whether spans are to be exported: an OTLP endpoint is set, and neither the SDK nor the
    trace exporter is switched off by the standard variables."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


class RedactQueryStrings(SpanProcessor):
    """Replaces the values of an HTTP span's `url.query` with `REDACTED`, keeping the names: a
    link's credential travels there (the e-mails' unsubscribe token, for one)."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        query = (span.attributes or {}).get("url.query")
        if isinstance(query, str) and query:
            pairs = parse_qsl(query, keep_blank_values=True)
            span.set_attribute("url.query", urlencode([(name, "REDACTED") for name, _ in pairs]))

    def on_end(self, span: ReadableSpan) -> None:
        return None


def build_tracer_provider(
    service_name: str, environ: Mapping[str, str] | None = None
) -> SdkTracerProvider | None:
    """The exporting provider for `service_name`, or None when tracing is not configured (and
    then nothing has been created)."""
    environ = os.environ if environ is None else environ
    if not tracing_enabled(environ):
        return None
    # Imported here: the exporter's modules (protobuf, requests) are only needed when exporting.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # OTEL_SERVICE_NAME, when set, names the service instead (the SDK's own rule).
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = SdkTracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(RedactQueryStrings())  # before the exporter sees the span
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def configure_tracing(service_name: str) -> SdkTracerProvider | None:
    """Install the exporting provider as OpenTelemetry's global one, if tracing is configured.

    Called once, in `main()`, before the application is built: brokers and the HTTP layer pick the
    global provider up then. The SDK flushes the spans still queued when the process exits.
    """
    provider = build_tracer_provider(service_name)
    if provider is None:
        return None
    trace.set_tracer_provider(provider)
    endpoint = urlsplit(
        next(os.environ[name] for name in ENDPOINT_VARIABLES if os.environ.get(name))
    )
    # Scheme, host and port only: never credentials or a query that may be in the URL.
    logger.info(
        "herald.tracing.enabled endpoint=%s://%s:%s",
        endpoint.scheme,
        endpoint.hostname,
        endpoint.port or "",
    )
    return provider


def configured_tracer_provider() -> TracerProvider | None:
    """The global tracer provider if one was installed (by `configure_tracing` or an
    OpenTelemetry distribution), else None: the API's default is a no-op proxy."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider


def telemetry_middleware(tracer_provider: TracerProvider) -> RabbitTelemetryMiddleware:
    """FastStream's tracing middleware: a span per publish and per consume, and the trace
    context carried in each message's headers."""
    return RabbitTelemetryMiddleware(tracer_provider=tracer_provider)


def current_traceparent() -> str | None:
    """The W3C `traceparent` of the current span, or None when no trace is being recorded or
    continued."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    value = carrier.get(TRACEPARENT)
    return value if value is not None and len(value) <= TRACEPARENT_MAX else None


@contextmanager
def continued_trace(traceparent: str | None) -> Iterator[None]:
    """Within the block, spans are children of the span `traceparent` names (when there is one
    and it parses); outside any trace otherwise."""
    if not traceparent:
        yield
        return
    token = otel_context.attach(_PROPAGATOR.extract({TRACEPARENT: traceparent}))
    try:
        yield
    finally:
        otel_context.detach(token)


__all__ = (
    "TRACEPARENT",
    "TRACEPARENT_MAX",
    "RedactQueryStrings",
    "build_tracer_provider",
    "configure_tracing",
    "configured_tracer_provider",
    "continued_trace",
    "current_traceparent",
    "telemetry_middleware",
    "tracing_enabled",
)

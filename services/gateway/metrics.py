"""Gateway metrics (``chatflow_gateway_*``)."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "chatflow_gateway_requests_total",
    "Public HTTP requests by upstream and status",
    ["upstream", "status"],
)
UPSTREAM_SECONDS = Histogram(
    "chatflow_gateway_upstream_seconds",
    "Time until the upstream's response headers arrived",
    ["upstream"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
UPSTREAM_ERRORS = Counter(
    "chatflow_gateway_upstream_errors_total", "Upstream failures by kind", ["upstream", "kind"]
)
RATE_LIMITED = Counter("chatflow_gateway_rate_limited_total", "Requests refused with 429", ["by"])
WS_OPEN = Gauge("chatflow_gateway_ws_open", "WebSocket sessions bridged right now")
WS_SLOW_CLOSED = Counter(
    "chatflow_gateway_ws_slow_consumers_total", "WebSocket sessions closed for not reading (4008)"
)

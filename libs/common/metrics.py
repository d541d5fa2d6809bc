"""Prometheus metrics shared by every service (``chatflow_<subsystem>_<name>_<unit>``)."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter(
    "chatflow_bus_events_consumed_total", "Stream entries handled and acked", ["stream", "group"]
)
EVENTS_FAILED = Counter(
    "chatflow_bus_events_failed_total", "Handler failures and invalid entries", ["stream", "group"]
)
DEAD_LETTERED = Counter(
    "chatflow_bus_dead_lettered_total",
    "Entries moved to the dead-letter stream",
    ["stream", "group"],
)
RECLAIMED = Counter(
    "chatflow_bus_reclaimed_total",
    "Pending entries reclaimed from idle consumers",
    ["stream", "group"],
)
HANDLER_SECONDS = Histogram(
    "chatflow_bus_handler_seconds",
    "Time spent in a stream handler",
    ["group", "type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
OUTBOX_PUBLISHED = Counter("chatflow_outbox_published_total", "Outbox rows published", ["schema"])
OUTBOX_LAG = Gauge(
    "chatflow_outbox_lag_seconds", "Age of the oldest unpublished outbox row", ["schema"]
)

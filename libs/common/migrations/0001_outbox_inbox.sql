-- Shared by every service schema: the transactional outbox and the idempotent-consumer record.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    stream_type text        NOT NULL,
    envelope    text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE processed_events (
    consumer     text        NOT NULL,
    event_id     text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Web Push: one subscription per device (its endpoint), and the pushes waiting to go out.
CREATE TABLE push_subscriptions (
    endpoint   text PRIMARY KEY,
    user_id    text        NOT NULL,
    p256dh     text        NOT NULL,
    auth       text        NOT NULL,
    mailboxes  text[]      NOT NULL DEFAULT '{}',  -- the token's, refreshed on each subscribe
    created_at timestamptz NOT NULL DEFAULT now(),
    last_ok_at timestamptz
);
CREATE INDEX push_subscriptions_user ON push_subscriptions (user_id);
CREATE INDEX push_subscriptions_mailboxes ON push_subscriptions USING gin (mailboxes);

-- At most one pending push per agent and conversation: a newer message replaces the older one.
CREATE TABLE push_pending (
    user_id     text        NOT NULL,
    id_conversa text        NOT NULL,
    mailbox_id  text        NOT NULL,
    title       text        NOT NULL DEFAULT '',
    body        text        NOT NULL DEFAULT '',
    due_at      timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id_conversa)
);
CREATE INDEX push_pending_due ON push_pending (due_at);

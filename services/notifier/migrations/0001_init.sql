-- What the notifier needs to route agents' sends and report their status.

-- The conversation -> mailbox map (and the last state seen), from conversation.* events.
CREATE TABLE conversations (
    id_conversa     text PRIMARY KEY,
    mailbox_id      text        NOT NULL,
    channel         text        NOT NULL DEFAULT 'email',
    subject         text        NOT NULL DEFAULT '',
    status          text        NOT NULL DEFAULT 'open',
    message_count   integer     NOT NULL DEFAULT 0,
    last_message_at timestamptz,
    participants    jsonb       NOT NULL DEFAULT '[]',
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversations_mailbox ON conversations (mailbox_id);

-- One row per send command; (user_id, client_id) makes a retried send frame idempotent.
CREATE TABLE sends (
    send_id     text PRIMARY KEY,
    user_id     text        NOT NULL DEFAULT '',
    client_id   text        NOT NULL DEFAULT '',
    id_conversa text        NOT NULL,
    mailbox_id  text        NOT NULL,
    status      text        NOT NULL DEFAULT 'requested',
    status_rank smallint    NOT NULL DEFAULT 0,
    attempt     integer     NOT NULL DEFAULT 0,
    detail      text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX sends_user_client ON sends (user_id, client_id) WHERE client_id <> '';

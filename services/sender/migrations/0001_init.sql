-- The sender's own view of mailboxes and threads (from events), and its queue of sends.
CREATE TABLE mailboxes (
    id      text PRIMARY KEY,
    address text NOT NULL,
    name    text NOT NULL DEFAULT '',
    active  boolean NOT NULL DEFAULT true
);

CREATE TABLE thread_messages (
    id_conversa text NOT NULL,
    message_id  text NOT NULL,
    mailbox_id  text NOT NULL,
    number      bigint,
    conv_subject text NOT NULL DEFAULT '',
    direction   text NOT NULL,
    sender      jsonb NOT NULL,
    to_addrs    jsonb NOT NULL DEFAULT '[]',
    cc_addrs    jsonb NOT NULL DEFAULT '[]',
    subject     text NOT NULL DEFAULT '',
    date        timestamptz NOT NULL,
    refs        text[] NOT NULL DEFAULT '{}',
    seen_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (id_conversa, message_id)
);

CREATE TABLE sends (
    send_id         uuid PRIMARY KEY,
    client_id       text NOT NULL DEFAULT '',
    user_id         text NOT NULL DEFAULT '',
    id_conversa     text NOT NULL,
    mailbox_id      text NOT NULL,
    state           text NOT NULL CHECK (state IN ('queued', 'sending', 'sent', 'deferred', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    message_id      text,
    mail_from       text,
    recipients      text[] NOT NULL DEFAULT '{}',
    mime            bytea,
    sent_message    jsonb,
    detail          text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sends_due ON sends (next_attempt_at) WHERE state IN ('queued', 'deferred', 'sending');

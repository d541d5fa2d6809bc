-- Ingest keeps every message raw (content-addressed), what it read from it, and its attachments.
CREATE TABLE mailboxes (
    id      text PRIMARY KEY,
    address text NOT NULL UNIQUE,
    name    text NOT NULL DEFAULT '',
    active  boolean NOT NULL DEFAULT true
);

CREATE TABLE blobs (
    sha256 text PRIMARY KEY,
    size   integer NOT NULL,
    data   bytea NOT NULL
);

CREATE TABLE messages (
    id            uuid PRIMARY KEY,
    mailbox_id    text NOT NULL,
    envelope_from text NOT NULL,
    rcpt          text NOT NULL,
    raw_sha256    text NOT NULL REFERENCES blobs (sha256),
    status        text NOT NULL CHECK (status IN ('accepted', 'quarantined')),
    reason        text,
    message_id    text,
    received_at   timestamptz NOT NULL,
    peer          text NOT NULL DEFAULT ''
);
CREATE INDEX messages_mailbox_received ON messages (mailbox_id, received_at DESC);
CREATE INDEX messages_quarantined ON messages (received_at DESC) WHERE status = 'quarantined';

CREATE TABLE attachments (
    id           uuid PRIMARY KEY,
    message_id   uuid NOT NULL REFERENCES messages (id),
    mailbox_id   text NOT NULL,
    sha256       text NOT NULL REFERENCES blobs (sha256),
    filename     text NOT NULL,
    content_type text NOT NULL,
    size         integer NOT NULL,
    content_id   text,
    inline       boolean NOT NULL DEFAULT false
);
CREATE INDEX attachments_message ON attachments (message_id);

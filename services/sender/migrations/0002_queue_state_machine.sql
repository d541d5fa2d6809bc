-- The delivery queue as a state machine that survives crashes (services/sender/delivery.py).
--
-- A mail.send is stored as it came (command) and composed later by the prepare stage, so the
-- stream consumer never blocks on a conversation that has not reached us yet. Each attempt is
-- claimed (state 'sending', attempts + 1, attempt_started_at) and committed before the SMTP
-- transaction; smtp_dot_at is committed just before the final "." of that attempt is written, so
-- after a crash a row with smtp_dot_at NULL provably never reached end-of-data.
ALTER TABLE sends
    ADD COLUMN command            jsonb,
    ADD COLUMN correlation_id     text,
    ADD COLUMN attempt_started_at timestamptz,
    ADD COLUMN smtp_dot_at        timestamptz,
    ADD COLUMN sent_at            timestamptz;

-- A client's retry of one reply (same user, same client_id) is one send. Older duplicates, if
-- any, keep their rows under a client_id that no longer collides.
UPDATE sends s
SET client_id = s.client_id || '#' || s.send_id::text
WHERE s.client_id <> ''
  AND EXISTS (
      SELECT 1 FROM sends o
      WHERE o.user_id = s.user_id AND o.client_id = s.client_id
        AND (o.created_at, o.send_id) < (s.created_at, s.send_id));
CREATE UNIQUE INDEX sends_client_once ON sends (user_id, client_id) WHERE client_id <> '';

-- Sends waiting for their conversation are woken when it arrives.
CREATE INDEX sends_waiting ON sends (id_conversa) WHERE state = 'queued' AND mime IS NULL;

-- One row per finished attempt: the history behind a send's current state.
CREATE TABLE attempts (
    send_id     uuid        NOT NULL REFERENCES sends (send_id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    started_at  timestamptz,
    dot_at      timestamptz,
    finished_at timestamptz NOT NULL DEFAULT now(),
    outcome     text        NOT NULL,
    detail      text        NOT NULL DEFAULT '',
    PRIMARY KEY (send_id, attempt)
);

-- Files a mail.send may attach by id (mail.send carries ids only). Scoped to a mailbox: a send
-- can attach only its own mailbox's files.
CREATE TABLE attachments (
    id           text        PRIMARY KEY,
    mailbox_id   text        NOT NULL,
    filename     text        NOT NULL,
    content_type text        NOT NULL DEFAULT 'application/octet-stream',
    content_id   text,
    data         bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The session advisory lock a live process holds on each send it is delivering: when the process
-- dies, PostgreSQL drops its session and the lock with it, so "sending and not locked" means
-- "its owner is gone" without any timeout.
CREATE FUNCTION send_lock_key(uuid) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT hashtextextended('chatflow.sender:' || $1::text, 0) $$;

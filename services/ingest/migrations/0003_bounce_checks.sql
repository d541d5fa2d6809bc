-- Bounces ingest has read for the Message-ID they report on (services/ingest/bounces.py): one
-- row per stored message looked at, written in the transaction that adds its mail.bounced
-- outbox row, so each bounce is announced once however many replicas scan.
CREATE TABLE bounce_checks (
    message_id          uuid PRIMARY KEY REFERENCES messages (id),
    original_message_id text,
    checked_at          timestamptz NOT NULL DEFAULT now()
);

-- The candidates: what MTAs send DSNs from (RFC 5321 4.5.5: the null reverse-path, which SMTP
-- stores as "<>"; some send as MAILER-DAEMON or postmaster). Partial, so the scan costs nothing
-- on ordinary mail.
CREATE INDEX messages_bounce_candidates ON messages (received_at)
    WHERE status = 'accepted' AND duplicate_of IS NULL
      AND (envelope_from IN ('', '<>') OR lower(envelope_from) LIKE 'mailer-daemon@%'
           OR lower(envelope_from) LIKE 'postmaster@%');

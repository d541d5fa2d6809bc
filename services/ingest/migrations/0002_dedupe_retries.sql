-- A client that retries a message we already committed (it never saw our 250) must not store it
-- twice: the same raw bytes for the same mailbox are one message, forever (for as long as the row
-- exists). A sender's queue keeps retrying for days (Postfix: 5), so any shorter window would let
-- a late retry through; and identical bytes, trace headers included, are never a new message.
--
-- Rows stored twice before this migration are kept and marked as copies of the first one, so the
-- unique index can be built without deleting anything that events already point at.
ALTER TABLE messages ADD COLUMN duplicate_of uuid REFERENCES messages (id);

UPDATE messages m
SET duplicate_of = first.id
FROM (
    SELECT DISTINCT ON (mailbox_id, raw_sha256) id, mailbox_id, raw_sha256
    FROM messages
    ORDER BY mailbox_id, raw_sha256, received_at, id
) AS first
WHERE m.mailbox_id = first.mailbox_id
  AND m.raw_sha256 = first.raw_sha256
  AND m.id <> first.id;

CREATE UNIQUE INDEX messages_mailbox_raw_once ON messages (mailbox_id, raw_sha256)
    WHERE duplicate_of IS NULL;

-- Finding a stored message by its Message-ID (operators, tests, the duplicate report).
CREATE INDEX messages_message_id ON messages (message_id);

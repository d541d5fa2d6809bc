-- The threading rules past Message-IDs: the subject + participants fallback, broadcasts, and the
-- age after which a closed conversation is not reopened.
--
-- messages.subject_key: the normalized subject (services.threader.domain.fallback.subject_key);
--   rows from before this migration keep '' and are never matched by subject.
-- messages.loose: an inbound message that named no other message (no In-Reply-To, References,
--   Thread-Index).  A subject match needs one of the two messages to be loose.
-- messages.marked: its subject marks a continuation (Re:, Fwd: ...).  A subject match needs one
--   of the two messages to be marked.
-- conversations.broadcast: opened by our message To several organisations (or Bcc only): each
--   organisation's replies get a conversation of their own, linked to it.
-- conversations.linked_to: the conversation this one follows (the broadcast it answers, or the
--   closed conversation it came after once that was older than the reopen age).
ALTER TABLE messages
    ADD COLUMN subject_key text NOT NULL DEFAULT '',
    ADD COLUMN loose       boolean NOT NULL DEFAULT false,
    ADD COLUMN marked      boolean NOT NULL DEFAULT false;
CREATE INDEX messages_subject ON messages (mailbox_id, subject_key, date) WHERE subject_key <> '';

ALTER TABLE conversations
    ADD COLUMN broadcast boolean NOT NULL DEFAULT false,
    ADD COLUMN linked_to uuid REFERENCES conversations (id_conversa);

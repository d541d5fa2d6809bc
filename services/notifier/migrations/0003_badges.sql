-- Unread badges (services/notifier/domain/badges.py): per conversation two counters, per agent a
-- marker of what they read; an agent's unread count is in_seq - greatest(cleared_seq, read_seq).
CREATE TABLE badge_conversations (
    id_conversa   text PRIMARY KEY,
    mailbox_id    text        NOT NULL,
    in_seq        bigint      NOT NULL DEFAULT 0,  -- inbound messages so far
    cleared_seq   bigint      NOT NULL DEFAULT 0,  -- in_seq when last closed
    message_count integer     NOT NULL DEFAULT 0,  -- newest count seen: an older close is stale
    merged_into   text,
    last_in_at    timestamptz,                     -- newest inbound message's date
    last_out_at   timestamptz,                     -- newest reply's: answered when >= last_in_at
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- What a connect reads: the conversations that can still be unread for someone.
CREATE INDEX badge_conversations_unread ON badge_conversations (mailbox_id)
    WHERE in_seq > cleared_seq AND merged_into IS NULL;

CREATE TABLE badge_reads (
    user_id     text   NOT NULL,
    id_conversa text   NOT NULL,
    read_seq    bigint NOT NULL,
    PRIMARY KEY (user_id, id_conversa)
);
CREATE INDEX badge_reads_conversation ON badge_reads (id_conversa);

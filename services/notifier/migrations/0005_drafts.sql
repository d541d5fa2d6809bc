-- Collaborative reply drafts (Yjs documents), one per (conversation, draft name).
-- ``epoch`` counts the times the draft was sent: clearing starts a new epoch, and an update or
-- a client copy of an older epoch is refused instead of bringing sent text back.
CREATE TABLE drafts (
    id_conversa   text        NOT NULL,
    draft         text        NOT NULL,
    epoch         integer     NOT NULL DEFAULT 0,
    snapshot      bytea       NOT NULL DEFAULT '',  -- the compacted updates, one Yjs update
    pending       integer     NOT NULL DEFAULT 0,   -- rows in draft_updates not yet compacted
    pending_bytes integer     NOT NULL DEFAULT 0,
    cleared_by    text,                             -- the send that cleared it last
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id_conversa, draft)
);

-- The append-only log since the snapshot; merged into it every N updates and on close.
CREATE TABLE draft_updates (
    id          bigserial   PRIMARY KEY,
    id_conversa text        NOT NULL,
    draft       text        NOT NULL,
    epoch       integer     NOT NULL,
    data        bytea       NOT NULL,
    user_id     text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (id_conversa, draft) REFERENCES drafts ON DELETE CASCADE
);
CREATE INDEX draft_updates_key ON draft_updates (id_conversa, draft, epoch, id);

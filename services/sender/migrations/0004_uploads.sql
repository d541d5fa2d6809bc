-- Agents' uploads (POST /api/attachments): the bytes content-addressed by sha256 in `blobs`
-- (one copy however often a file is uploaded), the upload itself in `attachments` with the name
-- and type it was given, and every mailbox whose agents may send or download it (the uploader's).
CREATE TABLE blobs (
    sha256     text        PRIMARY KEY,
    size       bigint      NOT NULL,
    data       bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE attachments
    ALTER COLUMN data DROP NOT NULL,
    ADD COLUMN sha256    text REFERENCES blobs (sha256),
    ADD COLUMN size      bigint,
    ADD COLUMN mailboxes text[] NOT NULL DEFAULT '{}',
    ADD COLUMN user_id   text NOT NULL DEFAULT '',
    -- Set when a send first queues it; uploads still NULL after upload_orphan_ttl_s are deleted.
    ADD COLUMN used_at   timestamptz,
    ADD CONSTRAINT attachments_has_bytes CHECK (data IS NOT NULL OR sha256 IS NOT NULL);

UPDATE attachments SET mailboxes = ARRAY[mailbox_id], used_at = created_at;

CREATE INDEX attachments_orphans ON attachments (created_at) WHERE used_at IS NULL;
CREATE INDEX attachments_sha256 ON attachments (sha256);

-- The client_id of a REST reply is remembered too (kind 'reply'), beside those of conversations
-- an agent started: a retry answers with the first send instead of making another (which the
-- sender then dropped as a duplicate client_id, in silence), and a client_id reused for
-- another conversation or kind of request is a 409.
ALTER TABLE outbound_starts ADD COLUMN kind text NOT NULL DEFAULT 'start'
    CHECK (kind IN ('start', 'reply'));

-- Conversations an agent started (POST /api/conversations): a retry with the same client_id
-- answers with the conversation and send of the first request instead of opening another.
CREATE TABLE outbound_starts (
    user_id     text        NOT NULL,
    client_id   text        NOT NULL,
    id_conversa uuid        NOT NULL REFERENCES conversations (id_conversa),
    send_id     uuid        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, client_id)
);

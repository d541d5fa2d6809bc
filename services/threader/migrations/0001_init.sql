-- Conversations, their messages (both directions), the Message-ID index used to thread, and reads.
CREATE TABLE conversations (
    id_conversa     uuid PRIMARY KEY,
    number          bigserial UNIQUE,
    mailbox_id      text NOT NULL,
    channel         text NOT NULL DEFAULT 'email',
    subject         text NOT NULL DEFAULT '',
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'pending', 'closed')),
    created_at      timestamptz NOT NULL,
    last_message_at timestamptz NOT NULL,
    last_inbound_at timestamptz,
    message_count   integer NOT NULL DEFAULT 0,
    participants    jsonb NOT NULL DEFAULT '[]',
    merged_into     uuid REFERENCES conversations (id_conversa)
);
CREATE INDEX conversations_list ON conversations (mailbox_id, last_message_at DESC, id_conversa DESC)
    WHERE merged_into IS NULL;

CREATE TABLE messages (
    id           uuid PRIMARY KEY,
    id_conversa  uuid NOT NULL REFERENCES conversations (id_conversa),
    mailbox_id   text NOT NULL,
    channel      text NOT NULL DEFAULT 'email',
    message_id   text NOT NULL,
    direction    text NOT NULL CHECK (direction IN ('in', 'out')),
    sender       jsonb NOT NULL,
    to_addrs     jsonb NOT NULL DEFAULT '[]',
    cc_addrs     jsonb NOT NULL DEFAULT '[]',
    subject      text NOT NULL DEFAULT '',
    date         timestamptz NOT NULL,
    text_body    text NOT NULL DEFAULT '',
    html_body    text NOT NULL DEFAULT '',
    attachments  jsonb NOT NULL DEFAULT '[]',
    status       text,
    in_reply_to  text[] NOT NULL DEFAULT '{}',
    refs         text[] NOT NULL DEFAULT '{}',
    flags        jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (mailbox_id, message_id)
);
CREATE INDEX messages_conversation ON messages (id_conversa, date, created_at);

-- Every Message-ID a conversation knows (its messages' own ids and the ids they reference), so a
-- parent that arrives after its replies finds them.
CREATE TABLE thread_keys (
    mailbox_id  text NOT NULL,
    message_id  text NOT NULL,
    id_conversa uuid NOT NULL REFERENCES conversations (id_conversa),
    PRIMARY KEY (mailbox_id, message_id)
);
CREATE INDEX thread_keys_conversation ON thread_keys (id_conversa);

CREATE TABLE reads (
    user_id     text NOT NULL,
    id_conversa uuid NOT NULL REFERENCES conversations (id_conversa),
    read_at     timestamptz NOT NULL,
    PRIMARY KEY (user_id, id_conversa)
);

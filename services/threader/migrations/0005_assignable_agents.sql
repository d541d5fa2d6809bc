-- Who may be assigned a conversation: the agents of each mailbox and the accounts that are
-- disabled, as auth announces them (membership.changed, user.changed). One row per key; the
-- newest change wins (changed_at is the event's occurred_at), so late or repeated events
-- change nothing.
CREATE TABLE mailbox_agents (
    mailbox_id text        NOT NULL,
    user_id    text        NOT NULL,
    active     boolean     NOT NULL,
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (mailbox_id, user_id)
);

CREATE TABLE agent_accounts (
    user_id    text        PRIMARY KEY,
    active     boolean     NOT NULL,
    changed_at timestamptz NOT NULL
);

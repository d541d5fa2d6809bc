-- Shared by every service schema: who auth says belongs to which mailbox (membership.changed),
-- one row per (mailbox, user), the newest change winning (changed_at is the event's
-- occurred_at). A service answering for a mailbox's data refuses an agent taken out of it at
-- once, though the agent's token lists the mailbox until it expires (libs/common/roster.py).
CREATE TABLE mailbox_agents (
    mailbox_id text        NOT NULL,
    user_id    text        NOT NULL,
    active     boolean     NOT NULL,
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (mailbox_id, user_id)
);

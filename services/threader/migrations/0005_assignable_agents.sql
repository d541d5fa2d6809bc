-- Who may be assigned a conversation: a member of its mailbox (mailbox_agents, shared by every
-- schema: libs/common/migrations) whose account auth has not disabled. Disabled accounts come
-- from user.changed, one row per user; the newest change wins (changed_at is the event's
-- occurred_at), so late or repeated events change nothing.
CREATE TABLE agent_accounts (
    user_id    text        PRIMARY KEY,
    active     boolean     NOT NULL,
    changed_at timestamptz NOT NULL
);

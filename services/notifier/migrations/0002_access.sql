-- Access taken away before the token says so (user.changed / membership.changed with
-- active = false): a restarted replica still refuses these users and these mailboxes.
CREATE TABLE disabled_users (
    user_id text PRIMARY KEY,
    since   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE removed_memberships (
    user_id    text NOT NULL,
    mailbox_id text NOT NULL,
    since      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, mailbox_id)
);

-- The occurred_at of the newest change applied per account (mailbox_id '') or membership:
-- replicas of the group may handle two changes of one user out of order; the older must not win.
CREATE TABLE access_versions (
    user_id    text NOT NULL,
    mailbox_id text NOT NULL DEFAULT '',
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, mailbox_id)
);

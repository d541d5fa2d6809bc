-- Accounts the auth service disabled (user.changed with active = false): their still-valid
-- access tokens are refused at the edge. A re-enabled user's row is deleted.
CREATE TABLE disabled_users (
    user_id text PRIMARY KEY,
    since   timestamptz NOT NULL DEFAULT now()
);

-- The occurred_at of the newest user.changed applied per user: replicas of the consumer group can
-- handle two changes of one user out of order, and the older one must not win.
CREATE TABLE user_versions (
    user_id    text PRIMARY KEY,
    changed_at timestamptz NOT NULL
);

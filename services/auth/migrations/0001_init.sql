-- Auth: the user directory (users, mailboxes, memberships) and the OAuth2 server's state.
-- Every secret we hand out (codes, refresh tokens, client secrets, passwords) is stored hashed.

CREATE TABLE users (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    email         text        NOT NULL UNIQUE CHECK (email = lower(email)),
    name          text        NOT NULL DEFAULT '',
    password_hash text        NOT NULL,                       -- argon2id PHC string
    roles         text[]      NOT NULL DEFAULT '{}' CHECK (roles <@ ARRAY['agent', 'admin']),
    active        boolean     NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE mailboxes (
    id         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    address    text        NOT NULL UNIQUE CHECK (address = lower(address)),
    name       text        NOT NULL DEFAULT '',
    active     boolean     NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    mailbox_id uuid        NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, mailbox_id)
);
CREATE INDEX memberships_mailbox ON memberships (mailbox_id);

CREATE TABLE oauth_clients (
    client_id     text        PRIMARY KEY,
    public        boolean     NOT NULL,
    secret_hash   text,                                       -- argon2id; NULL for public clients
    redirect_uris text[]      NOT NULL DEFAULT '{}',
    grant_types   text[]      NOT NULL DEFAULT '{}',
    scopes        text        NOT NULL DEFAULT '',            -- allowed scopes, space-separated
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (public = (secret_hash IS NULL))
);

CREATE TABLE auth_codes (
    code           text        PRIMARY KEY,                   -- sha256 hex of the code
    client_id      text        NOT NULL REFERENCES oauth_clients (client_id) ON DELETE CASCADE,
    user_id        uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    redirect_uri   text        NOT NULL,
    code_challenge text        NOT NULL,                      -- S256 only
    scope          text        NOT NULL DEFAULT '',
    family_id      uuid,                                      -- refresh family it produced
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz
);
CREATE INDEX auth_codes_expires ON auth_codes (expires_at);

CREATE TABLE refresh_tokens (
    hash              text        PRIMARY KEY,                -- sha256 hex of the token
    family_id         uuid        NOT NULL,                   -- one login; rotation keeps it
    user_id           uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    client_id         text        NOT NULL REFERENCES oauth_clients (client_id) ON DELETE CASCADE,
    scope             text        NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    family_expires_at timestamptz NOT NULL,
    used_at           timestamptz,
    revoked_at        timestamptz
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_family_expires ON refresh_tokens (family_expires_at);

CREATE TABLE signing_keys (
    kid         text        PRIMARY KEY,                      -- RFC 7638 thumbprint
    private_jwk jsonb       NOT NULL,
    public_jwk  jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    retired_at  timestamptz
);
CREATE INDEX signing_keys_active ON signing_keys (created_at) WHERE retired_at IS NULL;

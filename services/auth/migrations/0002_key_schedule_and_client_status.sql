-- Zero-downtime key rotation: a key is published first and signs only from ``signs_from``,
-- once every verifier has had time to refetch the JWKS (services/auth/keys.py).
-- ``retired_at`` may now lie in the future: the moment the next key starts signing.
ALTER TABLE signing_keys ADD COLUMN signs_from timestamptz;
UPDATE signing_keys SET signs_from = created_at;
ALTER TABLE signing_keys
    ALTER COLUMN signs_from SET DEFAULT clock_timestamp(),
    ALTER COLUMN signs_from SET NOT NULL;
CREATE INDEX signing_keys_signs_from ON signing_keys (signs_from);

-- An administrator can disable a client: it then authenticates nowhere.
ALTER TABLE oauth_clients ADD COLUMN active boolean NOT NULL DEFAULT true;

-- Revoking every refresh family of a user when it is disabled.
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id) WHERE revoked_at IS NULL;

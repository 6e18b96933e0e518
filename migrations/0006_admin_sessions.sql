-- Sessions of the admin web page. The cookie carries a signed random id; only its SHA-256 is kept,
-- so reading this table yields no usable cookie. A row ends at logout, at expiry, or as soon as
-- what opened it is gone: the API key revoked, the issuer no longer trusted, the user demoted.
-- depends: 0001_initial 0004_issuers

CREATE TABLE admin_sessions (
  id bytea PRIMARY KEY CHECK (length(id) = 32),
  user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  -- Exactly one of: the API key pasted at login, or the OIDC issuer that signed the user in.
  api_key_id bigint REFERENCES api_keys(id) ON DELETE CASCADE,
  issuer text,
  csrf_token text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL,
  ended_at timestamptz,
  CONSTRAINT admin_sessions_one_origin CHECK ((api_key_id IS NULL) <> (issuer IS NULL))
);
CREATE INDEX admin_sessions_user ON admin_sessions (user_id);

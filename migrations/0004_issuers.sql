-- OAuth: the issuers each tenant trusts, and the users their tokens brought in.
-- depends: 0001_initial

-- An issuer belongs to one tenant only, so a token can never name its user in another.
CREATE TABLE issuers (
  id bigserial PRIMARY KEY,
  tenant_id bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  url text NOT NULL UNIQUE CHECK (url ~ '^https?://[^\s]+$'),
  -- NULL: discovered from the issuer's metadata.
  jwks_url text CHECK (jwks_url ~ '^https?://[^\s]+$'),
  -- NULL: tokens must name the gateway's public MCP URL.
  audience text,
  created_at timestamptz NOT NULL DEFAULT now()
);

-- A user provisioned on the first token of an issuer is found again by (issuer, sub), never by name:
-- a name an issuer puts in a token must not claim an existing account.
ALTER TABLE users ADD COLUMN subject_issuer text;
ALTER TABLE users ADD COLUMN subject text;
ALTER TABLE users ADD CONSTRAINT users_subject_whole CHECK ((subject_issuer IS NULL) = (subject IS NULL));
CREATE UNIQUE INDEX users_subject ON users (tenant_id, subject_issuer, subject) WHERE subject IS NOT NULL;

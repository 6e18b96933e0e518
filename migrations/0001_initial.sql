-- The fleet's first schema: who may connect, with which keys, and where their sandboxes are.
-- depends:

CREATE TABLE tenants (
  id bigserial PRIMARY KEY,
  name text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
  id bigserial PRIMARY KEY,
  tenant_id bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  name text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$'),
  role text NOT NULL DEFAULT 'member' CHECK (role IN ('admin', 'publisher', 'member', 'auditor')),
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (tenant_id, name)
);

-- Only a SHA-256 of the key's secret part is kept; the prefix finds the row without a scan.
CREATE TABLE api_keys (
  id bigserial PRIMARY KEY,
  user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  prefix text NOT NULL UNIQUE,
  secret_sha256 bytea NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  revoked_at timestamptz,
  last_used_at timestamptz
);

CREATE TABLE sandboxes (
  id text PRIMARY KEY,
  user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  backend text NOT NULL,
  state text NOT NULL CHECK (state IN ('Pending', 'Starting', 'Running', 'Hibernating', 'Hibernated',
                                       'Resuming', 'Reclaimed', 'Failed')),
  reason text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  last_used_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX sandboxes_one_live_per_user ON sandboxes (user_id) WHERE state NOT IN ('Reclaimed', 'Failed');

CREATE TABLE audit_entries (
  id bigserial PRIMARY KEY,
  at timestamptz NOT NULL DEFAULT now(),
  tenant text,
  actor text,
  action text NOT NULL,
  target text,
  outcome text NOT NULL,
  detail jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_entries_at ON audit_entries (at);

INSERT INTO tenants (name) VALUES ('default');

-- The tool registry: servers publishers upload, their immutable versions with validation results,
-- admins' approvals pinning every tool definition, definitions that drifted from their pins,
-- embeddings for search, and groups approvals can be bound to.
-- depends: 0001_initial 0002_audit_chain

CREATE EXTENSION IF NOT EXISTS vector;

-- A user's groups, within their tenant (approvals may be bound to a group instead of the whole tenant).
CREATE TABLE user_groups (
  user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
  PRIMARY KEY (user_id, name)
);

-- One row per server name per tenant: the name's last segment is the prefix of its tools.
CREATE TABLE registry_servers (
  id bigserial PRIMARY KEY,
  tenant_id bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  name text NOT NULL CHECK (name ~ '^[a-zA-Z0-9.-]+/[a-zA-Z0-9._-]+$'),
  prefix text NOT NULL,
  builtin boolean NOT NULL DEFAULT false,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (tenant_id, name)
);

-- A version never changes once published: only its validation is filled in after the upload.
CREATE TABLE registry_versions (
  id bigserial PRIMARY KEY,
  server_id bigint NOT NULL REFERENCES registry_servers(id) ON DELETE CASCADE,
  version text NOT NULL,
  manifest jsonb NOT NULL,
  -- NULL for a built-in server, which ships with the product.
  artifact_sha256 text CHECK (artifact_sha256 ~ '^[0-9a-f]{64}$'),
  artifact_bytes bigint,
  published_by bigint REFERENCES users(id) ON DELETE SET NULL,
  published_at timestamptz NOT NULL DEFAULT now(),
  -- validating -> passed | failed
  status text NOT NULL DEFAULT 'validating' CHECK (status IN ('validating', 'passed', 'failed')),
  -- [{check, ok, detail, findings: [...]}]
  validation jsonb NOT NULL DEFAULT '[]'::jsonb,
  -- The definitions the trial run listed: [{name, description, inputSchema, annotations, ...}]
  tools jsonb NOT NULL DEFAULT '[]'::jsonb,
  start_ms integer,
  memory_bytes bigint,
  validated_at timestamptz,
  UNIQUE (server_id, version)
);

-- An approval binds a version to its tenant (group_name NULL) or to one group. At most one live
-- approval per server and scope: approving another version of it replaces the approval.
CREATE TABLE approvals (
  id bigserial PRIMARY KEY,
  version_id bigint NOT NULL REFERENCES registry_versions(id) ON DELETE CASCADE,
  server_id bigint NOT NULL REFERENCES registry_servers(id) ON DELETE CASCADE,
  group_name text CHECK (group_name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
  -- tool's own name -> sha256 of its canonical definition
  pins jsonb NOT NULL,
  override boolean NOT NULL DEFAULT false,
  approved_by text NOT NULL,
  approved_at timestamptz NOT NULL DEFAULT now(),
  revoked_by text,
  revoked_at timestamptz
);
CREATE UNIQUE INDEX approvals_one_live ON approvals (server_id, coalesce(group_name, '')) WHERE revoked_at IS NULL;

-- A live definition that differs from its pin. The tool is withheld until an admin accepts it
-- (resolved_at set, the pin replaced) or the approval goes.
CREATE TABLE tool_drift (
  id bigserial PRIMARY KEY,
  version_id bigint NOT NULL REFERENCES registry_versions(id) ON DELETE CASCADE,
  tool text NOT NULL,
  pinned_sha256 text,
  live_sha256 text NOT NULL,
  live_definition jsonb NOT NULL,
  seen_by bigint REFERENCES users(id) ON DELETE SET NULL,
  first_seen_at timestamptz NOT NULL DEFAULT now(),
  last_seen_at timestamptz NOT NULL DEFAULT now(),
  resolved_by text,
  resolved_at timestamptz,
  UNIQUE (version_id, tool, live_sha256)
);

-- One embedding per tool of a version and model (dimensions differ between models, hence untyped).
CREATE TABLE tool_embeddings (
  version_id bigint NOT NULL REFERENCES registry_versions(id) ON DELETE CASCADE,
  tool text NOT NULL,
  model text NOT NULL,
  embedding vector NOT NULL,
  PRIMARY KEY (version_id, tool, model)
);

-- Calls per tool version, per hour: what the admin page shows as usage.
CREATE TABLE tool_usage (
  version_id bigint NOT NULL REFERENCES registry_versions(id) ON DELETE CASCADE,
  tool text NOT NULL,
  hour timestamptz NOT NULL,
  calls bigint NOT NULL DEFAULT 0,
  errors bigint NOT NULL DEFAULT 0,
  total_ms double precision NOT NULL DEFAULT 0,
  max_ms double precision NOT NULL DEFAULT 0,
  PRIMARY KEY (version_id, tool, hour)
);

-- Approvals changed: gateways refresh what each user may see and tell connected clients.
CREATE FUNCTION registry_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('registry_changed', '');
  RETURN NULL;
END $$;
CREATE TRIGGER approvals_notify AFTER INSERT OR UPDATE OR DELETE ON approvals
  FOR EACH STATEMENT EXECUTE FUNCTION registry_notify();
-- Only an accepted drift changes what users see (a new drift is withheld where it is seen).
CREATE TRIGGER tool_drift_notify AFTER UPDATE OF resolved_at ON tool_drift
  FOR EACH STATEMENT EXECUTE FUNCTION registry_notify();
CREATE TRIGGER user_groups_notify AFTER INSERT OR DELETE ON user_groups
  FOR EACH STATEMENT EXECUTE FUNCTION registry_notify();

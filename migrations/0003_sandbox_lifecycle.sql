-- Sandbox lifecycle: tiers and their quotas, per-tenant caps, the warm pool, hibernation,
-- and requests from the CLI to the running gateway.
-- depends: 0001_initial

-- What one sandbox may use. Every user has a tier; `standard` is the default and cannot be deleted.
CREATE TABLE tiers (
  name text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
  cpus real NOT NULL CHECK (cpus > 0),
  memory_mb integer NOT NULL CHECK (memory_mb >= 64),
  pids integer NOT NULL CHECK (pids >= 16),
  disk_mb integer NOT NULL CHECK (disk_mb >= 16),
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO tiers (name, cpus, memory_mb, pids, disk_mb) VALUES ('standard', 1, 512, 256, 1024);

ALTER TABLE users ADD COLUMN tier text NOT NULL DEFAULT 'standard' REFERENCES tiers(name) ON UPDATE CASCADE;

-- At most this many running sandboxes per tenant at once (NULL: no cap but the node's).
ALTER TABLE tenants ADD COLUMN max_running integer CHECK (max_running >= 0);

-- Warm-pool sandboxes belong to nobody until a user's first call claims them.
ALTER TABLE sandboxes ALTER COLUMN user_id DROP NOT NULL;
ALTER TABLE sandboxes ADD COLUMN tier text;
ALTER TABLE sandboxes ADD COLUMN checkpoint_bytes bigint;
ALTER TABLE sandboxes ADD COLUMN hibernated_at timestamptz;
ALTER TABLE sandboxes ADD COLUMN claimed_at timestamptz;

-- `mcpfleet sandboxes hibernate|resume|reclaim USER`: the CLI asks, the gateway that holds the
-- sandboxes acts (it is woken by NOTIFY sandbox_requests) and writes the outcome back.
CREATE TABLE sandbox_requests (
  id bigserial PRIMARY KEY,
  user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  action text NOT NULL CHECK (action IN ('hibernate', 'resume', 'reclaim')),
  requested_by text NOT NULL,
  requested_at timestamptz NOT NULL DEFAULT now(),
  picked_at timestamptz,
  done_at timestamptz,
  outcome text CHECK (outcome IN ('done', 'nothing to do', 'failed', 'cancelled')),
  message text
);
CREATE INDEX sandbox_requests_pending ON sandbox_requests (requested_at) WHERE done_at IS NULL;

-- Drift is what one sandbox reports. Code in a user's own sandbox can make a server there list
-- whatever it likes, so a report is attributed to the sandbox (user) that made it, and accepting
-- a drifted definition adds it to the definitions the version may offer: the pin that other
-- users' servers still match stays valid.
-- depends: 0005_registry 0007_approval_policies

-- Whose sandboxes listed a drifted definition. One row per drift and user; the number of rows
-- one user may have per version is bounded by the gateway, so a sandbox cannot flood the registry.
CREATE TABLE tool_drift_sightings (
  drift_id bigint NOT NULL REFERENCES tool_drift(id) ON DELETE CASCADE,
  user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  version_id bigint NOT NULL REFERENCES registry_versions(id) ON DELETE CASCADE,
  first_seen_at timestamptz NOT NULL DEFAULT now(),
  last_seen_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (drift_id, user_id)
);
CREATE INDEX tool_drift_sightings_by_sandbox ON tool_drift_sightings (user_id, version_id);
INSERT INTO tool_drift_sightings (drift_id, user_id, version_id, first_seen_at, last_seen_at)
  SELECT id, seen_by, version_id, first_seen_at, last_seen_at FROM tool_drift WHERE seen_by IS NOT NULL;

-- Definitions of a version's tools an admin accepted after approval, besides the pinned ones.
-- They hold for the version, whichever approval of it a user has.
CREATE TABLE accepted_definitions (
  version_id bigint NOT NULL REFERENCES registry_versions(id) ON DELETE CASCADE,
  tool text NOT NULL,
  sha256 text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
  drift_id bigint REFERENCES tool_drift(id) ON DELETE SET NULL,
  accepted_by text NOT NULL,
  accepted_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (version_id, tool, sha256)
);
CREATE TRIGGER accepted_definitions_notify AFTER INSERT OR DELETE ON accepted_definitions
  FOR EACH STATEMENT EXECUTE FUNCTION registry_notify();

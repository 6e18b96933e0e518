-- Approvals as policies by attribute: besides the tenant or a group, an approval may be limited
-- to the users of one tier, and to some of the version's tools.
-- depends: 0005_registry

ALTER TABLE approvals ADD COLUMN tier text REFERENCES tiers(name) ON UPDATE CASCADE;
-- NULL: every tool of the version.
ALTER TABLE approvals ADD COLUMN tools text[];

DROP INDEX approvals_one_live;
CREATE UNIQUE INDEX approvals_one_live ON approvals (server_id, coalesce(group_name, ''), coalesce(tier, ''))
  WHERE revoked_at IS NULL;

-- A user's tier decides what they may run now: gateways recompute it when it changes.
CREATE TRIGGER users_tier_notify AFTER UPDATE OF tier ON users
  FOR EACH STATEMENT EXECUTE FUNCTION registry_notify();

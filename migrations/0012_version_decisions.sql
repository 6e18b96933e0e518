-- A version not approved may be rejected by an admin or withdrawn by its publisher: it stays (its
-- number is taken, versions are immutable) but can no longer be approved.
-- depends: 0011_key_expiry

ALTER TABLE registry_versions DROP CONSTRAINT registry_versions_status_check;
ALTER TABLE registry_versions ADD CONSTRAINT registry_versions_status_check
  CHECK (status IN ('validating', 'passed', 'failed', 'rejected', 'withdrawn'));
ALTER TABLE registry_versions ADD COLUMN decided_by text, ADD COLUMN decision_reason text;

-- The conformance fixture server (io.mcpfleet/conformance) is a test fixture, not product: a tenant
-- runs it only when enabled (`mcpfleet tenants add --with-conformance`, or MCPFLEET_CONFORMANCE=on
-- for every tenant). Fleets made before this see the approvals the gateway made of it on its own
-- revoked; an admin's own approval of it stays.
-- depends: 0009_offerings

ALTER TABLE tenants ADD COLUMN conformance boolean NOT NULL DEFAULT false;

UPDATE approvals SET revoked_at = now(), revoked_by = 'mcpfleet'
 WHERE revoked_at IS NULL AND approved_by = 'mcpfleet'
   AND server_id IN (SELECT id FROM registry_servers WHERE builtin AND name = 'io.mcpfleet/conformance');

-- API keys may expire (`mcpfleet keys create --expires 30d`); an expired key is refused like a
-- revoked one. NULL: the key does not expire.
-- depends: 0010_tenant_conformance

ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;

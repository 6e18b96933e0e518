-- A published version's own dependencies (registry/dependencies.py): the wheels pip resolved at
-- publish (`layer`: [{name, version, sha256, bytes, url}]) and the digest of that set, the read-only
-- layer its sandboxes mount. An approval records the layer digest it approved: a gateway runs a
-- version only with that layer.
-- depends: 0005_registry

ALTER TABLE registry_versions
    ADD COLUMN layer_sha256 text CHECK (layer_sha256 ~ '^[0-9a-f]{64}$'),
    ADD COLUMN layer jsonb NOT NULL DEFAULT '[]'::jsonb;

ALTER TABLE approvals ADD COLUMN layer_sha256 text CHECK (layer_sha256 ~ '^[0-9a-f]{64}$');

-- Named tool sets per user: a client connecting with `/mcp?set=NAME`, or with a key bound to a set,
-- sees only these tools of the ones approved for the user (a set narrows, it never grants).
-- `tools` holds public tool names or `server__*` patterns. A key bound to a set that is later
-- removed is refused at /mcp (no foreign key: removing a set must not widen or revoke a key).
-- depends: 0012_version_decisions

CREATE TABLE tool_sets (
    user_id    bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name       text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    tools      text[] NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, name)
);

ALTER TABLE api_keys ADD COLUMN tool_set text;

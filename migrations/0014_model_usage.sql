-- What the fleet's models answered, summed per user, tenant, server, purpose, model and UTC day
-- (core/models/usage.py), and the daily token quotas the router enforces from it.
-- depends: 0013_tool_sets

-- No foreign key to users: a user removed keeps the record of what they used (the bill outlives the account).
CREATE TABLE model_usage (
    day         date NOT NULL,
    user_id     bigint NOT NULL,
    tenant      text NOT NULL,
    server      text NOT NULL DEFAULT '',  -- the asking server's prefix; '' when the fleet itself asked
    purpose     text NOT NULL CHECK (purpose IN ('tool', 'sampling', 'review', 'search')),
    model       text NOT NULL,
    asks        bigint NOT NULL DEFAULT 0,
    tokens_in   bigint NOT NULL DEFAULT 0,
    tokens_out  bigint NOT NULL DEFAULT 0,
    latency_ms  bigint NOT NULL DEFAULT 0,  -- summed: divided by asks, the mean
    PRIMARY KEY (day, user_id, tenant, server, purpose, model)
);
CREATE INDEX model_usage_tenant_day ON model_usage (tenant, day);

-- Tokens (in and out) a day: per user by their tier, per tenant. NULL: MCPFLEET_MODEL_TOKENS_PER_DAY
-- (users) or MCPFLEET_MODEL_TENANT_TOKENS_PER_DAY (tenants), else no quota.
ALTER TABLE tiers ADD COLUMN model_tokens_per_day bigint CHECK (model_tokens_per_day >= 0);
ALTER TABLE tenants ADD COLUMN model_tokens_per_day bigint CHECK (model_tokens_per_day >= 0);

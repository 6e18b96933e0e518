-- Durable long calls: the tasks of the MCP Tasks extension (io.modelcontextprotocol/tasks, SEP-2663).
-- A tools/call the gateway answers with a task runs on in the background; its state lives here so
-- that any gateway replica answers tasks/get, tasks/update and tasks/cancel, across restarts.
-- A task waiting for its client's input (input_required) lists what is still unanswered in input_requests.
-- A task belongs to one user (and through them to one tenant); only its owner ever sees it.
-- `runner` names the gateway process running it and `heartbeat_at` when that process last said it
-- still was: a working task whose heartbeat is stale lost its runner and is marked failed.
-- depends: 0001_initial

CREATE TABLE mcp_tasks (
    id text PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    tenant_id bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    tool text NOT NULL,
    status text NOT NULL CHECK (status IN ('working', 'input_required', 'completed', 'failed', 'cancelled')),
    status_message text,
    input_requests jsonb,  -- while input_required: what the server asks the client, by key
    result jsonb,
    error jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    ttl_ms bigint NOT NULL CHECK (ttl_ms > 0),
    expires_at timestamptz NOT NULL,
    runner text NOT NULL,
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    CHECK (result IS NULL OR error IS NULL)
);

CREATE INDEX mcp_tasks_expires ON mcp_tasks (expires_at);
CREATE INDEX mcp_tasks_running ON mcp_tasks (runner) WHERE status IN ('working', 'input_required');

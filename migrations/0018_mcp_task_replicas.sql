-- Where a task's call runs, for a tasks/update that reaches another gateway replica: the address
-- (HOST:PORT) of the replica running it, which holds the server waiting for the answers. NULL
-- where gateways are not replicas of a Kubernetes Deployment (one gateway, or `up --replicas`,
-- whose standbys pass every request to the one running the sandboxes).
-- depends: 0017_mcp_tasks

ALTER TABLE mcp_tasks ADD COLUMN runner_address text;

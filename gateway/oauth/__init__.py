"""The gateway as an OAuth 2.1 resource server (MCP authorization, RFC 9728).

Each tenant trusts issuers of its own (`store`); a bearer JWT is verified
against its issuer's keys (`keys`, fetched through `egress`) by `tokens`;
`resource` publishes the protected-resource metadata and answers requests
without a valid token with the challenge clients follow to authorize.
"""

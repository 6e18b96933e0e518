"""What every part of the fleet stands on: settings, the database and its migrations, accounts
and identities, the audit log, the root error type and owned background tasks.

Nothing here imports the gateway, the registry or the sandboxes; they all import this.
"""

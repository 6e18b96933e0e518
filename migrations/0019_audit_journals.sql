-- How far each gateway process's audit journal (core/audit_journal.py) has been written into the
-- chain: the highest sequence number of that journal whose entry is in `audit_entries`. Moved in
-- the same transaction as the entries it covers, so an entry is written once whether its own
-- process drains it, a retry after a lost COMMIT repeats it, or another process replays the
-- journal the dead one left.
-- depends: 0002_audit_chain

CREATE TABLE audit_journals (
  journal text PRIMARY KEY CHECK (journal ~ '^[0-9a-f]{32}$'),
  written_seq bigint NOT NULL CHECK (written_seq >= 0),
  updated_at timestamptz NOT NULL DEFAULT now()
);

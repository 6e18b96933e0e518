-- The audit log becomes a hash chain: each entry carries its predecessor's hash and a hash over
-- that and its own canonical form, so a changed, inserted or removed entry breaks the chain at
-- that point. A one-row head holds the last id and hash, so removing entries from the end is
-- seen too. `mcpfleet audit verify` (core/audit.py) recomputes everything independently.
-- depends: 0001_initial

-- Ids come from the head, under its lock, not from a sequence: a rolled-back append would leave
-- a hole in a sequence, and a hole must mean that an entry was removed.
ALTER TABLE audit_entries ALTER COLUMN id DROP DEFAULT;
DROP SEQUENCE audit_entries_id_seq;
ALTER TABLE audit_entries ADD COLUMN prev_hash bytea, ADD COLUMN hash bytea;

CREATE TABLE audit_head (
  one boolean PRIMARY KEY DEFAULT true CHECK (one),
  last_id bigint NOT NULL,
  last_hash bytea NOT NULL
);
INSERT INTO audit_head (last_id, last_hash) VALUES (0, decode(repeat('00', 32), 'hex'));

-- The canonical form is jsonb's own text of an array, a deterministic function of the values:
-- strings escaped as JSON, the time in UTC with microseconds, and the detail as jsonb prints it
-- (keys in jsonb's order, numbers as stored). core/audit.py builds the same text from a row.
CREATE FUNCTION audit_canonical(id bigint, at timestamptz, tenant text, actor text, action text,
                                target text, outcome text, detail jsonb) RETURNS text
LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_array(id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                           tenant, actor, action, target, outcome, detail)::text
$$;

CREATE FUNCTION audit_hash(prev_hash bytea, canonical text) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $$ SELECT sha256(prev_hash || convert_to(canonical, 'UTF8')) $$;

-- Entries written before the chain existed are chained in id order, renumbered from 1.
DO $$
DECLARE
  r audit_entries;
  n bigint := 0;
  h bytea := decode(repeat('00', 32), 'hex');
  next_hash bytea;
BEGIN
  FOR r IN SELECT * FROM audit_entries ORDER BY id LOOP
    n := n + 1;
    next_hash := audit_hash(h, audit_canonical(n, r.at, r.tenant, r.actor, r.action, r.target, r.outcome, r.detail));
    UPDATE audit_entries SET id = n, prev_hash = h, hash = next_hash WHERE id = r.id;
    h := next_hash;
  END LOOP;
  UPDATE audit_head SET last_id = n, last_hash = h;
END $$;

ALTER TABLE audit_entries ALTER COLUMN prev_hash SET NOT NULL, ALTER COLUMN hash SET NOT NULL;

-- Whatever the INSERT says, id, time and hashes are set here. The head's row lock serializes
-- appends into one chain; it is held until the appending transaction ends, so callers append
-- last. The time is read under that lock, so times rise with ids.
CREATE FUNCTION audit_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  head audit_head;
BEGIN
  SELECT * INTO STRICT head FROM audit_head FOR UPDATE;
  NEW.id := head.last_id + 1;
  NEW.at := clock_timestamp();
  NEW.prev_hash := head.last_hash;
  NEW.hash := audit_hash(NEW.prev_hash, audit_canonical(NEW.id, NEW.at, NEW.tenant, NEW.actor, NEW.action,
                                                        NEW.target, NEW.outcome, NEW.detail));
  UPDATE audit_head SET last_id = NEW.id, last_hash = NEW.hash;
  RETURN NEW;
END $$;

CREATE TRIGGER audit_entries_chain BEFORE INSERT ON audit_entries FOR EACH ROW EXECUTE FUNCTION audit_chain();

CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  -- The head moves only inside audit_chain(), one trigger level further down.
  IF TG_TABLE_NAME = 'audit_head' AND TG_OP = 'UPDATE' AND pg_trigger_depth() > 1 THEN
    RETURN NEW;
  END IF;
  RAISE EXCEPTION 'the audit log is append-only (% on %)', TG_OP, TG_TABLE_NAME
    USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_entries_append_only BEFORE UPDATE OR DELETE ON audit_entries
  FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_entries_no_truncate BEFORE TRUNCATE ON audit_entries
  FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_head_append_only BEFORE INSERT OR UPDATE OR DELETE ON audit_head
  FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head
  FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

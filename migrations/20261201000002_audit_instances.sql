-- Anchors are evidence only if whoever holds a gateway's database login
-- cannot write them for a store of their own making. So:
--
-- * an instance belongs to one login (`pgwarden.audit_instances`). The
--   administrator registers instances (`pgwarden migrate` registers the
--   configuration's `[audit] instance`, and `--register-instance ID` any
--   other, for the service user); a login that has none gets the first
--   instance it anchors, and no other: with the gateway's credentials
--   nobody can start anchoring a new instance (a store cut short and
--   renamed) beside the real one. Registration is serialized (a table
--   lock), so two first anchors racing cannot both win;
-- * an instance that already has anchors (from before this migration) is
--   never taken by a first anchor: which of them is real is for the
--   administrator to say, by registering it;
-- * a checkpoint must look like one (a valid instance name, seq >= 1, 64
--   lowercase hex digits, a time not in the future) and come after the
--   instance's latest (the same checkpoint again is a no-op): no negative
--   or reused seqs, no rows that print as something else.
--
-- A checkpoint for a seq the gateway has not written yet cannot be told
-- from a real one here; `pgwarden audit verify --anchors` points at it by
-- its `anchored_at`, which PostgreSQL sets: earlier than the record it
-- names. `verify --anchors` accepts only anchors of a registered instance.

CREATE TABLE IF NOT EXISTS pgwarden.audit_instances (
    instance text PRIMARY KEY CHECK (instance ~ '^[A-Za-z0-9._:-]{1,64}$'),
    login name NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
REVOKE ALL ON pgwarden.audit_instances FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgwarden.audit_checkpoint(p_instance text, p_seq bigint, p_hash text, p_ts timestamptz)
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    owner name;
    latest bigint;
BEGIN
    IF p_instance IS NULL OR p_instance !~ '^[A-Za-z0-9._:-]{1,64}$' THEN
        RAISE EXCEPTION 'not an instance name: %', quote_literal(coalesce(p_instance, ''))
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_seq IS NULL OR p_seq < 1 OR p_hash IS NULL OR p_hash !~ '^[0-9a-f]{64}$'
        OR p_ts IS NULL OR p_ts > pg_catalog.now() + interval '5 minutes' THEN
        RAISE EXCEPTION 'not a checkpoint: seq %, hash %, ts %', p_seq, quote_literal(coalesce(p_hash, '')), p_ts
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One registration at a time: a first anchor racing another sees it.
    LOCK TABLE pgwarden.audit_instances IN SHARE ROW EXCLUSIVE MODE;
    SELECT i.login INTO owner FROM pgwarden.audit_instances i WHERE i.instance = p_instance;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM pgwarden.audit_instances i WHERE i.login = session_user) THEN
            RAISE EXCEPTION 'login % already anchors another instance; instance % must be registered by the administrator (pgwarden migrate --register-instance %)', session_user, p_instance, p_instance
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF EXISTS (SELECT 1 FROM pgwarden.audit_checkpoints c WHERE c.instance = p_instance) THEN
            RAISE EXCEPTION 'instance % has anchors from before instances were registered; the administrator must register the real one (pgwarden migrate --register-instance %)', p_instance, p_instance
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        INSERT INTO pgwarden.audit_instances (instance, login) VALUES (p_instance, session_user);
    ELSIF owner <> session_user THEN
        RAISE EXCEPTION 'instance % is anchored by another login', p_instance
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT max(c.seq) INTO latest FROM pgwarden.audit_checkpoints c WHERE c.instance = p_instance;
    IF latest IS NOT NULL AND p_seq <= latest THEN
        IF EXISTS (SELECT 1 FROM pgwarden.audit_checkpoints c
                   WHERE c.instance = p_instance AND c.seq = p_seq AND c.hash = p_hash) THEN
            RETURN; -- the same checkpoint again
        END IF;
        RAISE EXCEPTION 'checkpoint % of instance % is not after its latest anchored checkpoint %', p_seq, p_instance, latest
            USING ERRCODE = 'unique_violation';
    END IF;
    INSERT INTO pgwarden.audit_checkpoints (instance, seq, hash, ts)
        VALUES (p_instance, p_seq, p_hash, p_ts);
END
$$;
REVOKE ALL ON FUNCTION pgwarden.audit_checkpoint(text, bigint, text, timestamptz) FROM PUBLIC;

-- Anchors of the audit chain outside the gateway's host: every
-- `checkpoint_interval_s`, and at stop, a gateway appends (instance, seq,
-- hash of the record at seq, its ts). Anyone who rewrites the store on the
-- gateway's host and recomputes the chain (which `audit verify` alone then
-- accepts) or cuts its tail off cannot make it match these rows:
-- `pgwarden audit verify --anchors URL` compares them.
--
-- Only the owner (the administrator running `pgwarden migrate`) can change
-- or remove rows. The service user may only call the SECURITY DEFINER
-- function below, which appends and never overwrites (`pgwarden migrate`
-- grants it EXECUTE); nobody else may call it.

CREATE TABLE IF NOT EXISTS pgwarden.audit_checkpoints (
    instance text NOT NULL,
    seq bigint NOT NULL,
    hash text NOT NULL,
    ts timestamptz NOT NULL,
    anchored_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (instance, seq)
);
REVOKE ALL ON pgwarden.audit_checkpoints FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgwarden.audit_checkpoint(p_instance text, p_seq bigint, p_hash text, p_ts timestamptz)
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    anchored text;
BEGIN
    INSERT INTO pgwarden.audit_checkpoints (instance, seq, hash, ts)
        VALUES (p_instance, p_seq, p_hash, p_ts)
        ON CONFLICT DO NOTHING;
    SELECT c.hash INTO anchored FROM pgwarden.audit_checkpoints c
        WHERE c.instance = p_instance AND c.seq = p_seq;
    IF anchored IS DISTINCT FROM p_hash THEN
        RAISE EXCEPTION 'audit checkpoint % of instance % is already anchored with another hash', p_seq, p_instance
            USING ERRCODE = 'unique_violation';
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pgwarden.audit_checkpoint(text, bigint, text, timestamptz) FROM PUBLIC;

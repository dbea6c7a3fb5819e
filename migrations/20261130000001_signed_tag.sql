-- Signed client tags: the keys pgwarden signs the client-user value with.
-- Only the owner of the pgwarden schema reads the table; the gateway reads
-- the current key through pgwarden.tag_signing_key(), which `pgwarden
-- migrate` lets only the tag reader login run (no mapped role, no pooled
-- login). Keys are created and rotated by `pgwarden migrate`.

CREATE TABLE IF NOT EXISTS pgwarden.tag_keys (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key bytea NOT NULL,
    -- HMAC-SHA-256's padded keys, so SQL can verify with sha256() alone.
    ipad bytea NOT NULL,
    opad bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- NULL: the signing key. Otherwise still accepted until then.
    retire_at timestamptz
);
REVOKE ALL ON pgwarden.tag_keys FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgwarden.tag_signing_key() RETURNS TABLE (id int, key bytea)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$ SELECT t.id, t.key FROM pgwarden.tag_keys t
          WHERE t.retire_at IS NULL ORDER BY t.id DESC LIMIT 1 $$;
REVOKE ALL ON FUNCTION pgwarden.tag_signing_key() FROM PUBLIC;

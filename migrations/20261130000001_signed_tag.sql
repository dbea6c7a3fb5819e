-- Signed client tags: the keys pgwarden signs the client-user value with.
-- Only the owner of the pgwarden schema and the tag reader login (which
-- `pgwarden migrate` grants SELECT; no mapped role, no pooled login) read
-- the table. Keys are created and rotated by `pgwarden migrate`.

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

-- Signed client tags: the keys pgwarden signs the client-user value with.
-- A key is derived from the service password, the database name and the
-- key id (pgwarden and `pgwarden migrate` both derive it); the table keeps
-- only HMAC's padded keys, which only its owner reads. The tag reader login
-- is granted SELECT on the columns id and retire_at (by migrate), to learn
-- which key signs. Keys are created and rotated by `pgwarden migrate`.

CREATE TABLE IF NOT EXISTS pgwarden.tag_keys (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- HMAC-SHA-256's padded keys, so SQL can verify with sha256() alone.
    ipad bytea NOT NULL,
    opad bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- NULL: the signing key. Otherwise still accepted until then.
    retire_at timestamptz
);
REVOKE ALL ON pgwarden.tag_keys FROM PUBLIC;

-- pgwarden's database side: a schema with helpers for row-level security and
-- triggers. Applied by `pgwarden migrate` (sqlx); idempotent by design too.

CREATE SCHEMA IF NOT EXISTS pgwarden;
COMMENT ON SCHEMA pgwarden IS 'Helpers for databases served through the pgwarden gateway';

-- The real client name pgwarden asserted for this transaction, or NULL when
-- the session did not come through pgwarden. `pgwarden migrate` re-creates
-- this function for the configured [identity] client_user_setting.
CREATE OR REPLACE FUNCTION pgwarden.client_user() RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT nullif(pg_catalog.current_setting('app.client_user', true), '') $$;

GRANT USAGE ON SCHEMA pgwarden TO PUBLIC;
GRANT EXECUTE ON FUNCTION pgwarden.client_user() TO PUBLIC;

//! The connection limits PostgreSQL states for a client: its role's
//! (`ALTER ROLE … CONNECTION LIMIT`) and its database's (`ALTER DATABASE …
//! CONNECTION LIMIT`), read on the temporary login connection, as the
//! client, right after PostgreSQL accepted the login
//! (`session::conn_limits` applies them).

/// The limits PostgreSQL states for a client (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub role: Option<usize>,
    pub database: Option<usize>,
}

/// What the gateway asks, as the client, on its temporary login connection,
/// which has the client's startup `options`:
/// - the login role is `session_user` (`options` may set `role`, which
///   changes `current_user`);
/// - `search_path` is set to `pg_catalog` first, and every function and
///   operator is named with its schema: with `-c search_path=public,
///   pg_catalog`, a client's own `public.current_database()` ran at login,
///   unaudited, and chose which limits were read;
/// - `statement_timeout` (which `options` may set) is lifted.
pub const QUERY: &str = "SET search_path = pg_catalog, pg_temp; SET statement_timeout = 0; \
     SELECT r.rolconnlimit, r.rolsuper, d.datconnlimit \
     FROM pg_catalog.pg_roles r, pg_catalog.pg_database d \
     WHERE r.rolname OPERATOR(pg_catalog.=) session_user \
     AND d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()";

impl Limits {
    /// The limits from [`QUERY`]'s row; a value it cannot read is no
    /// limit.
    pub fn from_row(row: &[Option<String>]) -> Limits {
        let limit = |i: usize| {
            let value = row.get(i)?.as_deref()?.parse::<i64>().ok()?;
            usize::try_from(value).ok()
        };
        if row.get(1).and_then(|s| s.as_deref()) == Some("t") {
            return Limits::default();
        }
        Limits {
            role: limit(0),
            database: limit(2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[Option<&str>]) -> Vec<Option<String>> {
        values.iter().map(|v| v.map(str::to_string)).collect()
    }

    #[test]
    fn limits_are_read_as_postgresql_states_them() {
        let read = |v: &[Option<&str>]| Limits::from_row(&row(v));
        assert_eq!(
            read(&[Some("2"), Some("f"), Some("-1")]),
            Limits {
                role: Some(2),
                database: None
            }
        );
        assert_eq!(
            read(&[Some("-1"), Some("f"), Some("0")]),
            Limits {
                role: None,
                database: Some(0)
            }
        );
        // Superusers are held to neither; what cannot be read is no limit.
        assert_eq!(read(&[Some("2"), Some("t"), Some("3")]), Limits::default());
        assert_eq!(read(&[]), Limits::default());
    }
}

//! pgwarden's own connections to PostgreSQL: the socket and what the
//! gateway knows about it (identity, cleanliness, cached statements). A
//! leaf: the pool, the logins and the session build on it.

pub mod conn;
pub mod custody;
pub mod statements;

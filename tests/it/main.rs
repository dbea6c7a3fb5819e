//! pgwarden's integration tests: one binary, a shared throwaway PostgreSQL,
//! and a gateway per test running in-process on port 0.

mod support;

mod auth;
mod identity;
mod pool;
mod protocol;
mod raw;
mod lifecycle;

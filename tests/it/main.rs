//! pgwarden's integration tests: one binary, a shared throwaway PostgreSQL,
//! and a gateway per test running in-process on port 0.

mod support;

mod anchors;
mod architecture;
mod audit;
mod audit_truth;
mod auth;
mod cancel;
mod console;
mod drivers;
mod failover;
mod guard;
mod haproxy;
mod health;
mod hostile;
mod hostile_binds;
mod identity;
mod isolation;
mod lifecycle;
mod limits;
mod lost;
mod migrate;
mod packaging;
mod pipelines;
mod policy;
mod pool;
mod prepared;
mod protocol;
mod raw;
mod retention;
mod shipping;
mod state;
mod tail;

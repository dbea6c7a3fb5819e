//! pgwarden: a PostgreSQL gateway that pools connections on one service user
//! while every transaction runs as the real client's mapped role, and every
//! statement is recorded, with that identity, in a tamper-evident audit log.
//!
//! See DESIGN.md (shared with the project) for the contract; the modules
//! follow its layout.

pub mod audit;
pub mod auth;
pub mod backend;
pub mod client;
pub mod config;
pub mod demo;
pub mod failover;
pub mod identity;
pub mod metrics;
pub mod migrate;
pub mod pool;
pub mod protocol;
pub mod server;
pub mod session;
pub mod tls;

//! Authentication: relaying a client's login to PostgreSQL, and logging the
//! service user in for the pool.
//!
//! pgwarden never verifies a client password itself and never stores one:
//! PostgreSQL decides, over a temporary connection that is closed as soon as
//! it has answered.

pub mod limits;
pub mod logins;
pub mod relay;
pub mod service;

/// Authentication request codes of `AuthenticationXXX` messages.
pub mod codes {
    pub const OK: i32 = 0;
    pub const CLEARTEXT: i32 = 3;
    pub const MD5: i32 = 5;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

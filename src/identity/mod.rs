//! Identity lock-down: which database role a client gets, and what it may
//! not do to change it.
//!
//! - [`assert`] switches a server connection to the client's identity and,
//!   with `verify = "transaction"`, checks it is still there.
//! - [`policy`] maps a client user and database to a database role
//!   (`policies/*.toml`, DESIGN.md section 5).
//! - [`guard`] refuses statements that would change or spoof the identity
//!   pgwarden asserts on each server connection (DESIGN.md 1.7), built on the
//!   byte-level [`lexer`] and [`decode`]; [`guard_cases`] is its adversarial
//!   test table. Its work is linear in the statement's size (a budget per
//!   byte; beyond it a statement is refused).
//!
//! Invariant: apart from [`assert`], nothing in this module talks to the
//! network or the database; the guard and the policy are pure functions of their input and
//! configuration, so the session code can call them on the hot path.
//!
//! # Residual risks of the statement guard
//!
//! The guard sees statement text, nothing else. What it cannot see is left to
//! the other layers: the identity assertion re-applied on every bind,
//! `[identity] verify = "transaction"`, and a service user and mapped roles
//! without privileges to abuse. In particular:
//!
//! 1. **Dynamic SQL assembled at run time.** In DO blocks and function
//!    bodies, string constants are checked as SQL, and when the body uses
//!    `EXECUTE`, constants naming `role`, `authorization`, `set_config` or
//!    the client-user setting, or ending in an unfinished `SET`/`RESET`/
//!    `DISCARD`, are refused. A body that builds the statement from innocent
//!    fragments (`'S' || 'ET R' || 'OLE x'`), from `chr()`/`decode()`, or
//!    from table data passes that heuristic. [`guard::DynamicSql::Refuse`],
//!    the gateway's default (`[identity] allow_dynamic_sql = false`), closes
//!    this for bodies sent through pgwarden by refusing any `EXECUTE` of a
//!    non-constant, bodies in other languages and SQL runners with a
//!    computed query, at the cost of refusing legitimate dynamic DDL.
//! 2. **Functions that already exist.** Calling a function, procedure,
//!    trigger, rule or view created outside pgwarden (or before it) that runs
//!    `SET ROLE` or `set_config` is invisible to the guard. Mitigation:
//!    mapped roles without `CREATE` on schemas and without `TEMP` on the
//!    database (temporary functions in `pg_temp` need only `TEMP`), review
//!    of `SECURITY DEFINER` functions, and `verify = "transaction"`.
//! 3. **Other procedural languages.** A DO or function body in a language
//!    other than PL/pgSQL or SQL (`plperl`, `plv8`...) is only screened for
//!    the words `role`, `authorization`, `reset`, `discard`, `set_config` and
//!    the setting (or refused outright under `DynamicSql::Refuse`).
//! 4. **SQL runners from extensions.** The built-in functions that run SQL
//!    from a string (`query_to_xml` and its variants, `ts_stat`,
//!    `ts_rewrite`, listed by [`runs_sql_argument`]) are checked: a constant
//!    query as SQL, a computed one like dynamic SQL; an extension's function
//!    that runs SQL in the same session is not known to the guard.
//! 5. **Protocol paths outside statement text.** The FunctionCall message
//!    (`F`) calls a function by OID (`set_config` is OID 2078) and must be
//!    refused by the session code; startup `options` such as `-c role=...`
//!    must never reach a pooled server connection.
//! 6. **Conservative refusals.** To stay sound the guard also refuses some
//!    harmless SQL: `set_config` with any non-constant or cast setting name,
//!    any mention of `set_config` that is not a call (`GRANT ... ON FUNCTION
//!    set_config`), the SQL runners with non-constant arguments, strings in
//!    DO/function bodies that themselves contain a protected statement
//!    (`RAISE NOTICE 'RESET ROLE'`), and SQL that only a
//!    `standard_conforming_strings = off` or multi-byte reading of its
//!    backslashes would make dangerous.
//! 7. **Assumptions.** PostgreSQL's default `NAMEDATALEN` (identifiers keep
//!    63 bytes) and the lexical rules of PostgreSQL 15 and 16.

pub mod assert;
mod bodies;
pub mod decode;
pub mod guard;
pub mod guard_cases;
pub mod keywords;
pub mod lexer;
pub mod policy;
mod prefilter;
mod rules;
mod runners;
mod scan;
pub mod tag;

#[cfg(test)]
mod guard_perf_tests;
#[cfg(test)]
mod guard_tests;
#[cfg(test)]
mod lexer_tests;

pub use guard::{DynamicSql, Guard, Violation};
pub use policy::{Policy, PolicyError, Rule};
pub use runners::runs_sql_argument;

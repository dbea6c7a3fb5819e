//! Identity: which database role a client gets (policies), switching a server
//! connection to it (assertion), and refusing statements that would undo it
//! (guard).

pub mod assert;
pub mod guard;
pub mod policy;

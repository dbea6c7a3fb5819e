//! The PostgreSQL frontend/backend protocol, version 3.0, as far as a
//! relaying gateway needs it.
//!
//! Nothing in here does I/O. Frames are peeked by their 5-byte header and
//! relayed as the original bytes; only the few messages that identity, audit
//! and transaction tracking need are decoded, lazily, into borrowed views.

pub mod frame;
pub mod messages;
pub mod sqlstate;
pub mod startup;

pub use frame::{FrameHeader, ProtocolError};
pub use messages::PgError;

//! PostgreSQL's connection limits of a role (`ALTER ROLE … CONNECTION
//! LIMIT`) and of a database (`ALTER DATABASE … CONNECTION LIMIT`), applied
//! to the gateway's own sessions.
//!
//! PostgreSQL counts its backends, and a client of the gateway has none of
//! its own: its login runs on a temporary connection that is closed at
//! once, and its statements on pooled connections of the service user. So
//! the gateway reads both limits on that temporary connection, as the
//! client, right after PostgreSQL accepted the login, and counts its
//! sessions per client user and per database against them. As in
//! PostgreSQL, -1 is no limit, and superusers are not held to either.
//!
//! Invariant: a session is counted from its admission ([`Counts::admit`])
//! until its [`Seat`] is dropped, whichever way it ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::limits::Limits;

/// Which limit a login would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Role,
    Database,
}

/// Sessions open, by name.
type Open = HashMap<Arc<str>, usize>;

/// The sessions open per client user and per database.
#[derive(Debug, Default)]
pub struct Counts {
    open: Mutex<(Open, Open)>,
}

/// One admitted session, counted until dropped.
pub struct Seat {
    counts: Arc<Counts>,
    user: Arc<str>,
    database: Arc<str>,
}

impl Counts {
    /// Admits a session of `user` on `database` if neither limit is
    /// reached; counted until the seat is dropped.
    pub fn admit(
        self: &Arc<Self>,
        user: &Arc<str>,
        database: &Arc<str>,
        limits: Limits,
    ) -> Result<Seat, Over> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (users, databases) = &mut *open;
        let of = |map: &Open, key: &Arc<str>| map.get(key).copied();
        if limits
            .role
            .is_some_and(|max| of(users, user).unwrap_or(0) >= max)
        {
            return Err(Over::Role);
        }
        if limits
            .database
            .is_some_and(|max| of(databases, database).unwrap_or(0) >= max)
        {
            return Err(Over::Database);
        }
        *users.entry(user.clone()).or_default() += 1;
        *databases.entry(database.clone()).or_default() += 1;
        Ok(Seat {
            counts: self.clone(),
            user: user.clone(),
            database: database.clone(),
        })
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|e| e.into_inner());
        let (users, databases) = &mut *open;
        for (map, key) in [(users, &self.user), (databases, &self.database)] {
            if let Some(n) = map.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_counted_until_their_seat_is_dropped() {
        let counts = Arc::new(Counts::default());
        let (alice, bob, app, other) = (
            Arc::from("alice"),
            Arc::from("bob"),
            Arc::from("app"),
            Arc::from("other"),
        );
        let two = Limits {
            role: Some(2),
            database: Some(3),
        };
        let a1 = counts.admit(&alice, &app, two).unwrap();
        let a2 = counts.admit(&alice, &other, two).unwrap();
        assert_eq!(counts.admit(&alice, &app, two).err(), Some(Over::Role));
        let _b1 = counts.admit(&bob, &app, two).unwrap();
        let _b2 = counts.admit(&bob, &app, two).unwrap();
        assert_eq!(counts.admit(&bob, &app, two).err(), Some(Over::Role));
        drop(a2);
        // alice has room again, but `app` holds three.
        assert_eq!(counts.admit(&alice, &app, two).err(), Some(Over::Database));
        assert!(counts.admit(&alice, &other, two).is_ok());
        drop(a1);
        assert!(counts.admit(&alice, &app, Limits::default()).is_ok());
        let open = counts.open.lock().unwrap();
        assert_eq!(open.0.get(&alice), None, "dropped seats leave nothing");
    }
}

//! The identity assertion: every bind of a server connection switches it to
//! the client's mapped role and name, and a failed assertion runs nothing.

use crate::support::{self, cluster, start_gateway, Opts};

#[tokio::test(flavor = "multi_thread")]
async fn statements_run_as_mapped_role_tagged_with_client() {
    let gw = start_gateway(Opts::default()).await;
    let client = gw.connect("alice").await;
    let row = client
        .query_one(
            "SELECT current_user::text, session_user::text, current_setting('app.client_user')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "analyst");
    assert_eq!(row.get::<_, String>(1), "pgwarden_svc");
    assert_eq!(row.get::<_, String>(2), "alice");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_assertion_runs_nothing_and_drops_the_connection() {
    let gw = start_gateway(Opts::default()).await;
    let pg = cluster();
    let marker = format!("ghost_{}", rand::random::<u32>());
    let client = gw.connect("ghost_user").await;
    let err = client
        .batch_execute(&format!("INSERT INTO items VALUES (-1, '{marker}', NULL)"))
        .await
        .expect_err("role does not exist");
    assert_eq!(support::sqlstate(&err), "42501");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("could not switch to role"), "{message}");
    assert_eq!(
        pg.psql(
            "app",
            &format!("SELECT count(*) FROM items WHERE owner = '{marker}'")
        ),
        "0"
    );
    // Extended protocol too.
    let err = client
        .query("SELECT 1", &[])
        .await
        .expect_err("still no role");
    assert_eq!(support::sqlstate(&err), "42501");
    // The session stays usable for its error handling, and the pool holds no
    // connection that saw the failure.
    let total: usize = gw.shared.pools.status().iter().map(|(_, s)| s.size).sum();
    assert_eq!(total, 0, "the server connection was discarded");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_clients_on_one_connection_each_see_only_themselves() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    let bob = gw.connect("bob").await;
    let sql = "SELECT current_user::text || '/' || current_setting('app.client_user') || '/' || pg_backend_pid()";
    let mut pids = std::collections::HashSet::new();
    for i in 0..1000 {
        let (a, b) = if i % 2 == 0 {
            let a = support::one(&alice, sql).await;
            let b = support::one(&bob, sql).await;
            (a, b)
        } else {
            // Interleave transactions: alice's open while bob waits, then swap.
            let a = alice.query_one(sql, &[]).await.unwrap().get::<_, String>(0);
            let b = bob.query_one(sql, &[]).await.unwrap().get::<_, String>(0);
            (a, b)
        };
        assert!(a.starts_with("analyst/alice/"), "iteration {i}: {a}");
        assert!(b.starts_with("engineer/bob/"), "iteration {i}: {b}");
        pids.insert(a.rsplit('/').next().unwrap().to_string());
        pids.insert(b.rsplit('/').next().unwrap().to_string());
    }
    assert_eq!(pids.len(), 1, "one server connection served both clients");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_clients_on_a_small_pool_keep_their_identity() {
    let gw = start_gateway(Opts {
        pool_size: 2,
        ..Opts::default()
    })
    .await;
    let mut tasks = Vec::new();
    for (user, role) in [
        ("alice", "analyst"),
        ("bob", "engineer"),
        ("alice", "analyst"),
        ("bob", "engineer"),
    ] {
        let client = gw.connect(user).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..200 {
                let who = support::one(
                    &client,
                    "SELECT current_user || '/' || current_setting('app.client_user')",
                )
                .await;
                assert_eq!(who, format!("{role}/{user}"));
                let tx = client
                    .query_one(
                        "SELECT current_user::text, current_setting('app.client_user')",
                        &[],
                    )
                    .await
                    .unwrap();
                assert_eq!(tx.get::<_, String>(0), role);
                assert_eq!(tx.get::<_, String>(1), user);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_transaction_catches_identity_changed_inside_a_function() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        verify: true,
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    assert_eq!(support::one(&alice, "SELECT current_user").await, "analyst");
    // The function switches role inside the statement; the statement's own
    // result reaches the client, then the check at commit ends the session.
    let res = alice.simple_query("SELECT sneaky_switch()").await;
    let follow_up = alice.simple_query("SELECT current_user").await;
    let err = match (res, follow_up) {
        (Err(e), _) | (_, Err(e)) => e,
        (Ok(_), Ok(rows)) => panic!("session survived an identity violation: {rows:?}"),
    };
    assert!(
        err.code().map(|c| c.code()) == Some("42501") || err.is_closed(),
        "{err:?}"
    );
    // The tainted server connection was destroyed: bob gets a clean one.
    let bob = gw.connect("bob").await;
    assert_eq!(support::one(&bob, "SELECT current_user").await, "engineer");
    let alice = gw.connect("alice").await;
    assert_eq!(support::one(&alice, "SELECT current_user").await, "analyst");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_transaction_passes_ordinary_work() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        verify: true,
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    for _ in 0..20 {
        assert_eq!(support::one(&alice, "SELECT current_user").await, "analyst");
        alice
            .batch_execute("BEGIN; SELECT 1; COMMIT")
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_catches_a_switch_inside_an_explicit_transaction_at_commit() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        verify: true,
        ..Opts::default()
    })
    .await;
    let alice = gw.connect("alice").await;
    alice.batch_execute("BEGIN").await.unwrap();
    // Inside the transaction the switched role is visible, as PostgreSQL allows...
    let inside = support::one(&alice, "SELECT sneaky_switch(), current_user").await;
    assert_eq!(inside, "engineer");
    // ...and the extended-protocol COMMIT is followed by the pipelined check.
    let commit = alice.execute("COMMIT", &[]).await;
    let follow_up = alice.simple_query("SELECT current_user").await;
    assert!(
        commit.is_err() || follow_up.is_err(),
        "session survived an identity violation"
    );
    let bob = gw.connect("bob").await;
    assert_eq!(support::one(&bob, "SELECT current_user").await, "engineer");
}

const WHO: &str = "SELECT current_user || '/' || current_setting('app.client_user')";

/// The assertion travels in the same write as the client's first message
/// of a transaction, and commits before it: a `ROLLBACK` (or a `BEGIN`
/// then `ROLLBACK`) pipelined behind it, simple or extended, with or
/// without a reset of another session's state in it, cannot undo it and
/// bring back the previous client's identity or the service user's.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_behind_the_assertion_cannot_undo_it() {
    use crate::raw::{cstr, message, RawClient};
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let bob = gw.connect("bob").await;
    let extended = |sql: &str| {
        let mut parse = cstr("");
        parse.extend(cstr(sql));
        parse.extend([0, 0]);
        [
            message(b'P', &parse),
            message(b'B', &[0; 8]),
            message(b'E', &[0; 5]),
        ]
        .concat()
    };
    let burst_simple = message(b'Q', &cstr(&format!("BEGIN; ROLLBACK; {WHO}")));
    let burst_rollback = [extended("ROLLBACK"), extended(WHO), message(b'S', &[])].concat();
    let burst_block = [
        extended("BEGIN"),
        extended("ROLLBACK"),
        extended(WHO),
        message(b'S', &[]),
    ]
    .concat();
    for dirty in [false, true] {
        for burst in [&burst_simple, &burst_rollback, &burst_block] {
            // bob holds the connection last; with a setting of his own,
            // the next client's assertion carries a reset too.
            let prime = match dirty {
                true => "SET work_mem = '1MB'",
                false => "SELECT 1",
            };
            bob.batch_execute(prime).await.unwrap();
            assert_eq!(support::one(&bob, WHO).await, "engineer/bob");
            let mut c = RawClient::login(gw.addr).await;
            c.send_raw(burst).await;
            assert_eq!(
                c.first_value_until_ready().await.as_deref(),
                Some("analyst/clear_user"),
                "dirty: {dirty}, burst: {:?}",
                String::from_utf8_lossy(burst)
            );
            // And the next transaction of the same client.
            c.send(b'Q', &cstr(WHO)).await;
            assert_eq!(
                c.first_value_until_ready().await.as_deref(),
                Some("analyst/clear_user")
            );
        }
    }
}

/// A failed assertion, pipelined ahead of several batches sent at once
/// (a driver's pipeline): none of them runs, each gets 42501, and each
/// later batch is tried on a fresh assertion, never behind a failed one.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_assertion_runs_no_pipelined_batch() {
    let gw = start_gateway(Opts::default()).await;
    let pg = cluster();
    let marker = format!("ghost_pipe_{}", rand::random::<u32>());
    let client = gw.connect("ghost_user").await;
    let insert = format!("INSERT INTO items VALUES (-1, '{marker}', NULL)");
    let statement = client.prepare("SELECT 1").await.expect_err("no role");
    assert_eq!(support::sqlstate(&statement), "42501");
    let (a, b, c) = tokio::join!(
        client.execute(insert.as_str(), &[]),
        client.simple_query(&insert),
        client.execute(insert.as_str(), &[]),
    );
    for err in [a.unwrap_err(), b.unwrap_err(), c.unwrap_err()] {
        assert_eq!(support::sqlstate(&err), "42501", "{err}");
    }
    assert_eq!(
        pg.psql(
            "app",
            &format!("SELECT count(*) FROM items WHERE owner = '{marker}'")
        ),
        "0"
    );
    let total: usize = gw.shared.pools.status().iter().map(|(_, s)| s.size).sum();
    assert_eq!(total, 0, "no connection that saw a failure is kept");
}

/// From a red-team pass (F1): a client whose startup settings differ from
/// the service user's, on a connection reset after another client, changes
/// one back to the service user's value: it is told of the change, as on a
/// direct connection (PostgreSQL reports a change only against what it last
/// reported on the connection, and the assertion's own report is the one
/// that must come last before the client's statements).
#[tokio::test(flavor = "multi_thread")]
async fn a_setting_changed_back_to_the_pools_value_is_reported() {
    let gw = start_gateway(Opts {
        pool_size: 1,
        ..Opts::default()
    })
    .await;
    let default = cluster().psql("app", "SHOW TimeZone");
    let bob = gw.connect("bob").await;
    let mut c = crate::hostile::raw_with(gw.addr, &[("TimeZone", "Asia/Tokyo")]).await;
    for _ in 0..2 {
        // bob leaves a setting behind: the next binding resets first.
        bob.batch_execute("SET work_mem = '2MB'").await.unwrap();
        c.send(
            b'Q',
            &crate::raw::cstr(&format!("SET TimeZone = '{default}'")),
        )
        .await;
        let mut reported = None;
        loop {
            let (tag, body) = c.read_message().await;
            if tag == b'S' && body.starts_with(b"TimeZone\0") {
                reported = Some(String::from_utf8_lossy(&body[9..body.len() - 1]).into_owned());
            }
            if tag == b'Z' {
                break;
            }
        }
        assert_eq!(reported.as_deref(), Some(default.as_str()));
        // Back to its own for the next round.
        c.send(b'Q', &crate::raw::cstr("SET TimeZone = 'Asia/Tokyo'"))
            .await;
        c.until_ready().await;
    }
}

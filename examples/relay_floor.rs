//! The floor under any tokio relay: one client connection to one server
//! connection, bytes copied both ways, nothing parsed, no pool, no audit.
//! `benches/pgbench_compare.py --floor` runs it beside PgBouncer and
//! pgwarden so the CPU a relay built on tokio cannot avoid (the runtime,
//! its reactor and the four socket calls per round trip) is measured in
//! the same run as the rest.
//!
//!     cargo build --release --example relay_floor
//!     target/release/examples/relay_floor LISTEN_ADDR BACKEND_ADDR [WORKER_THREADS]

use tokio::net::{TcpListener, TcpStream};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: relay_floor LISTEN_ADDR BACKEND_ADDR [WORKER_THREADS]");
        std::process::exit(2);
    }
    let (listen, backend) = (args[1].clone(), args[2].clone());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.get(3).and_then(|n| n.parse().ok()).filter(|&n| n > 0) {
        builder.worker_threads(n);
    }
    let runtime = builder.enable_all().build().expect("a tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(&listen)
            .await
            .expect("listen address free");
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let backend = backend.clone();
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(&backend).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
}

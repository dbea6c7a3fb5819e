//! Server to client: the server's messages are read and handed to the core
//! (which decides what the client sees and what each resolves), and the
//! duties it names once they are read are done: the application-name
//! retag, the identity check, the release of the connection.

use super::*;
use crate::session::core::Duty;

impl QueryLoop<'_> {
    pub(super) async fn on_server_data(&mut self) -> Result<(), End> {
        if let confirm::Read::Waiting = self.read_confirmation().await? {
            return Ok(());
        }
        let was_busy = !self.core.seq.owes_nothing();
        while let Some(server) = self.server.as_mut() {
            let frame = match self.core.seq.next_server(&mut server.rbuf) {
                Ok(ServerStep::Frame(frame)) => frame,
                Ok(ServerStep::Idle) => break,
                Err(e) => return Err(self.server_lost(&e.to_string()).await),
            };
            let pid = server.pid;
            if self.core.server_frame(frame, Some((server.state(), pid))) {
                server.mark_broken();
            }
        }
        if self.core.counts.0 + self.core.counts.1 >= 256 {
            self.flush_counts();
        }
        self.flush_client().await?;
        // `Sync`s held during a copy the server failed go out now.
        self.flush_server().await?;
        self.record_results().await;
        if self.core.answered(was_busy, Instant::now()) {
            self.cancel.set_running(false);
            if let Some(at) = self.request_at.take() {
                self.stats.queries += 1;
                self.stats.query_us += at.elapsed().as_micros() as u64;
            }
        }
        while let Some(duty) = self.core.next_duty() {
            match duty {
                Duty::Retag(sql) => {
                    self.core.seq.own_query(&sql);
                    self.flush_server().await?;
                }
                Duty::Verify => self.verify_identity().await?,
                Duty::Release => {
                    self.keep_session_settings().await;
                    // Notifications those exchanges met go out before the
                    // connection does.
                    self.flush_client().await?;
                    self.release().await;
                }
                Duty::Resume => {
                    self.flush_client().await?;
                    self.core.seq.resume();
                    // Boxed: this future is started at every read from the
                    // server, and the client side's would more than double
                    // its size (and the bytes copied at each start).
                    return Box::pin(self.on_client_data()).await;
                }
            }
        }
        if self.idle() {
            self.flush_client().await?;
        }
        Ok(())
    }
}

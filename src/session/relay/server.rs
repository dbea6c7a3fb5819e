//! Server to client: the server's messages are read, routed through the
//! tracker (which decides what the client sees and what each resolves),
//! and the connection is released once the client's work is done.

use super::*;

impl QueryLoop<'_> {
    pub(super) async fn on_server_data(&mut self) -> Result<(), End> {
        let was_busy = !self.core.seq.owes_nothing();
        while let Some(server) = self.server.as_mut() {
            match self.core.seq.next_server(&mut server.rbuf) {
                Ok(ServerStep::Frame(frame)) => self.on_server_frame(frame),
                Ok(ServerStep::Idle) => break,
                Err(e) => return Err(self.server_lost(&e.to_string()).await),
            }
        }
        self.flush_client().await?;
        // `Sync`s held during a copy the server failed go out now.
        self.flush_server().await?;
        self.record_results().await;
        if self.core.seq.owes_nothing() {
            self.core.carried.settled();
            self.cancel.set_running(false);
            self.core.clock.answered(was_busy, Instant::now());
        }
        // Not inside an unsynced batch: after an error there the server
        // would skip the gateway's query and never answer it.
        let quiet =
            self.core.seq.owes_nothing() && !self.core.seq.copy_in() && !self.core.seq.unsynced();
        if self.core.carried.wants_retag() && quiet {
            self.retag_application_name();
            self.flush_server().await?;
        }
        if self.idle() && self.core.seq.tx_status() == b'I' && self.needs_verify {
            self.verify_identity().await?;
        }
        if self.mode == PoolMode::Transaction && self.core.seq.releasable() {
            self.keep_session_settings().await;
            // Notifications those exchanges met go out before the
            // connection does.
            self.flush_client().await?;
            self.release().await;
        } else if self.idle() {
            self.flush_client().await?;
        }
        if self.core.seq.may_resume() {
            self.core.seq.resume();
            self.on_client_data().await?;
        }
        Ok(())
    }

    fn on_server_frame(&mut self, mut frame: BytesMut) {
        let tag = frame[0];
        tracing::trace!(parent: &self.span, tag = %(tag as char), len = frame.len(), "server frame");
        match tag {
            b'S' => self.on_parameter_status(&frame[5..]),
            // A notification this session's own connection sent names the
            // process the client knows, as on a direct connection.
            b'A' if frame.len() >= 9 => {
                let pid = i32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]);
                if self.server.as_ref().is_some_and(|s| s.pid == pid) {
                    frame[5..9].copy_from_slice(&self.client_pid.to_be_bytes());
                }
            }
            _ => {}
        }
        if tag == b'E' {
            let fatal = messages::parse_error_fields(&frame[5..])
                .is_ok_and(|f| matches!(f.severity.as_str(), "FATAL" | "PANIC"));
            if fatal {
                if let Some(server) = self.server.as_mut() {
                    server.mark_broken();
                }
            }
        }
        let mut cache = CacheEffects::default();
        let before = self.core.results.count();
        let route = self
            .core
            .seq
            .server_frame(&frame, self.core.results.resolved(), &mut cache);
        if self.core.auditing() && route != Route::Drop {
            let status = (tag == b'Z').then(|| frame[5]);
            self.core.results.server_said(tag, status, before);
        }
        self.apply_cache_effects(cache);
        if tag == b'Z' && route == Route::Forward && frame.get(5) == Some(&b'I') {
            self.core.counts.0 += 1;
            if self.core.counts.0 + self.core.counts.1 >= 256 {
                self.flush_counts();
            }
        }
    }

    /// What the server's answer did to the connection's statement cache
    /// (the client's own names the sequencer put back).
    fn apply_cache_effects(&mut self, cache: CacheEffects) {
        if let Some(server) = self.server.as_mut() {
            for key in cache.not_prepared {
                server.statements.remove(key);
            }
            if cache.stale {
                server.statements.mark_uncertain();
                statements::found_stale();
            }
        }
    }
}

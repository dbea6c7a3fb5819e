//! Server to client: the server's messages are read, routed through the
//! tracker (which decides what the client sees and what each resolves),
//! and the connection is released once the client's work is done.

use super::*;

impl QueryLoop<'_> {
    pub(super) async fn on_server_data(&mut self) -> Result<(), End> {
        let was_busy = !self.tracker.is_empty();
        while let Some(server) = self.server.as_mut() {
            let rbuf = &mut server.rbuf;
            if self.server_passthrough > 0 {
                let n = self.server_passthrough.min(rbuf.len());
                if n == 0 {
                    break;
                }
                self.to_client.extend_from_slice(&rbuf.split_to(n));
                self.server_passthrough -= n;
                continue;
            }
            let header = match FrameHeader::peek(rbuf, MAX_SERVER_FRAME) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(self.server_lost(&e.to_string()).await),
            };
            if matches!(header.tag, b'D' | b'd')
                && header.total > STREAM_THRESHOLD
                && rbuf.len() < header.total
            {
                if header.tag == b'D' {
                    self.tracker.data_row();
                }
                let n = rbuf.len();
                self.to_client.extend_from_slice(&rbuf.split_to(n));
                self.server_passthrough = header.total - n;
                continue;
            }
            let frame = match split_frame(rbuf, MAX_SERVER_FRAME) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(self.server_lost(&e.to_string()).await),
            };
            self.on_server_frame(frame);
        }
        self.flush_client().await?;
        self.record_results().await;
        if self.tracker.is_empty() {
            self.encoding_in_flux = false;
            self.cancel.set_running(false);
            self.cancel_note = None;
            self.query_started = None;
            if was_busy {
                self.last_activity = Instant::now();
            }
        }
        if self.retag_application_name && self.tracker.is_empty() && !self.copy_in {
            self.retag_application_name();
            self.flush_server().await?;
        }
        if self.idle() && self.tx_status == b'I' && self.needs_verify {
            self.verify_identity().await?;
        }
        if self.mode == PoolMode::Transaction && !self.pinned && self.idle() {
            self.keep_session_settings().await;
            // Notifications those exchanges met go out before the
            // connection does.
            self.flush_client().await?;
            self.release().await;
        } else if self.idle() {
            self.flush_client().await?;
        }
        if self.deferred && self.tracker.is_empty() {
            self.deferred = false;
            self.on_client_data().await?;
        }
        Ok(())
    }

    fn on_server_frame(&mut self, mut frame: BytesMut) {
        let tag = frame[0];
        tracing::trace!(parent: &self.span, tag = %(tag as char), len = frame.len(), "server frame");
        match tag {
            b'Z' if frame.len() == 6 => {
                self.tx_status = frame[5];
                self.copy_in = false;
                self.tx_opaque &= self.tx_status != b'I';
            }
            b'G' => {
                self.copy_in = true;
                // A COPY started by `Execute` ends at the first `Sync` the
                // client sends after the copy (any `Sync` before is ignored
                // by the server): until then nothing may be released.
                if self.tracker.front_is_execute() {
                    self.unsynced = true;
                }
            }
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
        let before = self.resolved.len();
        let route = self
            .tracker
            .on_server(tag, &frame[5..], &mut self.resolved, &mut cache);
        if self.auditing && route != Route::Drop {
            match tag {
                b'Z' => self
                    .marks
                    .push((self.resolved.len(), Mark::Ready(frame[5]))),
                b'E' if self.resolved.len() == before => self.marks.push((before, Mark::Error)),
                _ => {}
            }
        }
        self.apply_cache_effects(cache);
        if tag == b'Z' && route == Route::Forward && frame.get(5) == Some(&b'I') {
            self.counts.0 += 1;
            if self.counts.0 + self.counts.1 >= 256 {
                self.flush_counts();
            }
        }
        match route {
            Route::Forward => self.to_client.extend_from_slice(&frame),
            Route::Drop => {}
            Route::Replace(error) => error.encode(&mut self.to_client),
        }
        self.tracker
            .emit_synthetic(self.tx_status, &mut self.to_client);
    }

    /// What the server's answer did to the client's statements and portals
    /// and to the connection's statement cache.
    fn apply_cache_effects(&mut self, cache: CacheEffects) {
        for restore in cache.portals {
            let (name, previous) = *restore;
            match previous {
                Some(portal) => self.portals.insert(name, portal),
                None => self.portals.remove(&name),
            };
        }
        for restore in cache.restore {
            let (name, previous) = *restore;
            match previous {
                Some(statement) => self.statements.insert(name, statement),
                None => self.statements.remove(&name),
            };
        }
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

//! How the server's completions, errors and `ReadyForQuery` resolve what
//! the tracker holds: each audited statement's outcome, and what a failed
//! batch skipped.

use super::*;

impl Tracker {
    pub(super) fn on_complete(
        &mut self,
        tag: Option<String>,
        rows: Option<u64>,
        resolved: &mut Vec<Resolved>,
    ) {
        match self.queue.front_mut() {
            Some(Expect::Query {
                pending,
                more,
                tag: t,
                rows: r,
                pieces,
                ..
            }) => match more.pop_front() {
                Some(mut next) => {
                    if let Some(next) = next.as_mut() {
                        next.started = Instant::now();
                    }
                    if let Some(done) = std::mem::replace(pending, next) {
                        let done = Resolved {
                            pending: done,
                            outcome: Outcome::Ok { tag, rows },
                        };
                        match pieces {
                            Some(pieces) => pieces.done.push(done),
                            None => resolved.push(done),
                        }
                    }
                }
                None => {
                    if let Some(pieces) = pieces {
                        pieces.extra |= pieces.last_done;
                        pieces.last_done = true;
                    }
                    *t = tag;
                    *r = rows;
                }
            },
            Some(Expect::Execute { .. }) => {
                // The rows this Execute sent: a portal stopped at its row
                // limit (`PortalSuspended`, no tag) has sent that many, and
                // a row-returning statement's count is what the client got.
                let sent = std::mem::take(&mut self.rows_sent);
                let rows = if tag.is_none() || sent > 0 {
                    Some(sent)
                } else {
                    rows
                };
                if let Some(Expect::Execute {
                    pending: Some(pending),
                }) = self.queue.pop_front()
                {
                    resolved.push(Resolved {
                        pending,
                        outcome: Outcome::Ok { tag, rows },
                    });
                }
            }
            _ => {}
        }
    }

    pub(super) fn on_error(
        &mut self,
        body: &[u8],
        resolved: &mut Vec<Resolved>,
        cache: &mut CacheEffects,
    ) -> Route {
        let fields = messages::parse_error_fields(body).unwrap_or_default();
        let mut route = Route::Forward;
        match self.queue.front_mut() {
            Some(Expect::Query { blocked, error, .. }) => {
                if let Some(b) = blocked.take() {
                    return Route::Replace(*b);
                }
                error.get_or_insert(Box::new(fields));
                return Route::Forward;
            }
            // An error at Sync (a failed implicit commit) or outside any request.
            Some(Expect::Sync) | None => return Route::Forward,
            Some(_) => {}
        }
        // An extended-protocol message failed: it and everything up to the
        // next Sync is over. A failed `Parse`, `Bind` or `Describe` is the
        // failure of the statement the batch goes on to execute: its
        // `Execute` gets this error, not "not executed".
        let mut failed = self.queue.pop_front();
        if let Some(Expect::Bind { portal, .. } | Expect::Close { portal, .. }) = failed.as_mut() {
            cache.portals.extend(portal.take());
        }
        if matches!(failed, Some(Expect::Bind { key: Some(_), .. }))
            && messages::stale_plan(&fields)
        {
            cache.stale = true;
        }
        let mut cause = match failed {
            Some(Expect::Execute { .. } | Expect::BlockedParse { .. }) | None => None,
            Some(_) => Some(Outcome::Error {
                code: fields.code.clone(),
                message: fields.message.clone(),
            }),
        };
        let mut after = match &failed {
            Some(
                Expect::Execute {
                    pending: Some(pending),
                }
                | Expect::Bind {
                    pending: Some(pending),
                    ..
                },
            ) => Some(pending.ticket),
            _ => None,
        };
        match failed {
            Some(
                Expect::Execute {
                    pending: Some(pending),
                }
                | Expect::Bind {
                    pending: Some(pending),
                    ..
                },
            ) => resolved.push(Resolved {
                pending,
                outcome: Outcome::Error {
                    code: fields.code.clone(),
                    message: fields.message.clone(),
                },
            }),
            Some(Expect::Parse { key, restore, .. }) => cache.not_parsed(key, restore, true),
            Some(Expect::BlockedParse { error }) => route = Route::Replace(error),
            _ => {}
        }
        self.server_skips = !self.skip_to_sync(resolved, cache, &mut cause, &mut after);
        route
    }

    /// Drops what the server skips after an error, up to the next `Sync`:
    /// every message, a `Query` or `FunctionCall` sent inside the batch too
    /// (PostgreSQL answers none of them). The first audited `Execute`
    /// skipped takes `cause` as its outcome (the error of its own
    /// `Parse`/`Bind`), the others were not executed.
    /// True when it reached a `Sync`.
    fn skip_to_sync(
        &mut self,
        resolved: &mut Vec<Resolved>,
        cache: &mut CacheEffects,
        cause: &mut Option<Outcome>,
        after: &mut Option<u64>,
    ) -> bool {
        while let Some(front) = self.queue.front() {
            if matches!(front, Expect::Sync) {
                return true;
            }
            match self.queue.pop_front() {
                Some(Expect::Query {
                    pending,
                    more,
                    pieces,
                    ..
                }) => {
                    let done = pieces.into_iter().flat_map(|p| p.done).map(|r| r.pending);
                    let all = done.chain(pending).chain(more.into_iter().flatten());
                    for pending in all {
                        resolved.push(Resolved {
                            pending,
                            outcome: Outcome::NotExecuted { after: *after },
                        });
                    }
                }
                Some(Expect::Execute {
                    pending: Some(pending),
                }) => {
                    let outcome = match cause.take() {
                        Some(error) => {
                            after.get_or_insert(pending.ticket);
                            error
                        }
                        None => Outcome::NotExecuted { after: *after },
                    };
                    resolved.push(Resolved { pending, outcome });
                }
                Some(Expect::Bind {
                    pending, portal, ..
                }) => {
                    if let Some(portal) = portal {
                        cache.portals.insert(0, portal);
                    }
                    if let Some(pending) = pending {
                        resolved.push(Resolved {
                            pending,
                            outcome: Outcome::NotExecuted { after: *after },
                        });
                    }
                }
                Some(Expect::Close {
                    portal: Some(portal),
                    ..
                }) => cache.portals.insert(0, portal),
                Some(Expect::Parse { key, restore, .. }) => cache.not_parsed(key, restore, false),
                Some(Expect::SynthParse { restore }) => cache.not_parsed(None, restore, false),
                _ => {}
            }
        }
        false
    }

    /// Whether the last error left the server skipping the client's
    /// messages until a `Sync` not sent yet (cleared by asking).
    pub fn server_skips(&mut self) -> bool {
        std::mem::take(&mut self.server_skips)
    }

    pub(super) fn on_ready(&mut self, resolved: &mut Vec<Resolved>) {
        while let Some(expect) = self.queue.pop_front() {
            match expect {
                Expect::Query {
                    pending,
                    more,
                    tag,
                    rows,
                    error,
                    returned,
                    pieces,
                    ..
                } => {
                    if let Some(pieces) = pieces {
                        let fewer = error.is_none() && !pieces.last_done;
                        if pieces.extra || fewer {
                            let done = pieces.done.into_iter().map(|r| r.pending);
                            let all = done.chain(pending).chain(more.into_iter().flatten());
                            resolved.extend(all.map(|pending| Resolved {
                                pending,
                                outcome: Outcome::Unknown,
                            }));
                            return;
                        }
                        resolved.extend(pieces.done);
                    }
                    let after = pending.as_ref().map(|p| p.ticket);
                    if let Some(pending) = pending {
                        let outcome = match (error, returned) {
                            (Some(e), _) => Outcome::Error {
                                code: e.code,
                                message: e.message,
                            },
                            (None, Some(value)) => Outcome::Returned { value },
                            (None, None) => Outcome::Ok { tag, rows },
                        };
                        resolved.push(Resolved { pending, outcome });
                    }
                    // After an error PostgreSQL runs none of the rest.
                    resolved.extend(more.into_iter().flatten().map(|pending| Resolved {
                        pending,
                        outcome: Outcome::NotExecuted { after },
                    }));
                    return;
                }
                Expect::Sync => return,
                Expect::Execute {
                    pending: Some(pending),
                }
                | Expect::Bind {
                    pending: Some(pending),
                    ..
                } => resolved.push(Resolved {
                    pending,
                    outcome: Outcome::NotExecuted { after: None },
                }),
                _ => {}
            }
        }
    }

    /// Every statement still waiting, for when the server connection is lost.
    pub fn drain(&mut self) -> Vec<Pending> {
        self.queue
            .drain(..)
            .flat_map(|e| match e {
                Expect::Query {
                    pending,
                    more,
                    pieces,
                    ..
                } => pieces
                    .into_iter()
                    .flat_map(|p| p.done)
                    .map(|r| r.pending)
                    .chain(pending)
                    .chain(more.into_iter().flatten())
                    .collect(),
                Expect::Execute { pending } | Expect::Bind { pending, .. } => {
                    pending.into_iter().collect()
                }
                _ => Vec::new(),
            })
            .collect()
    }
}

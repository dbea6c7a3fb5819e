//! `FunctionCall`: an allow-list of the large-object functions, recorded
//! by name with their arguments.

use super::*;

impl QueryLoop<'_> {
    pub(super) async fn on_function_call(&mut self, frame: Bytes) -> Result<(), End> {
        let oid = crate::protocol::frame::Reader::new(&frame[5..], "FunctionCall")
            .i32()
            .map_err(End::from)?;
        let Some(name) = function_call_name(oid) else {
            // The refused call is evidence: its arguments are recorded.
            let text = function_call_text(oid, &frame[5..], self.carried.client_encoding());
            let why = format!(
                "FunctionCall of function OID {oid} is not allowed through pgwarden (only the large-object functions are)"
            );
            let error = self.blocked(text.as_bytes(), &why).await;
            return self.refuse(Flow::Simple, error).await;
        };
        let text = format!("FunctionCall {name} (oid={oid})");
        let params = if self.shared.live().log_parameters {
            messages::function_call_args(&frame[5..], self.carried.client_encoding()).ok()
        } else {
            None
        };
        let pending = match self.audit_and_bind(text.as_bytes(), params).await {
            Ok(p) => p,
            Err(e) => return self.refuse(Flow::Simple, e).await,
        };
        self.note_code(false);
        self.seq.forward_simple(&frame);
        self.seq.expect().query(pending, None);
        Ok(())
    }
}

/// Functions a client may call with the `FunctionCall` message: the
/// large-object functions libpq's `lo_*` use, by their fixed OIDs in
/// `pg_proc`. They run no SQL and change no setting; everything else is
/// refused, so `FunctionCall` cannot reach a function that runs SQL
/// (`query_to_xml`...) or changes a setting.
const FUNCTION_CALL_ALLOWED: &[(i32, &str)] = &[
    (715, "pg_catalog.lo_create"),
    (952, "pg_catalog.lo_open"),
    (953, "pg_catalog.lo_close"),
    (954, "pg_catalog.loread"),
    (955, "pg_catalog.lowrite"),
    (956, "pg_catalog.lo_lseek"),
    (957, "pg_catalog.lo_creat"),
    (958, "pg_catalog.lo_tell"),
    (964, "pg_catalog.lo_unlink"),
    (1004, "pg_catalog.lo_truncate"),
    (3170, "pg_catalog.lo_lseek64"),
    (3171, "pg_catalog.lo_tell64"),
    (3172, "pg_catalog.lo_truncate64"),
];

/// The name of an allowed `FunctionCall` target.
fn function_call_name(oid: i32) -> Option<&'static str> {
    FUNCTION_CALL_ALLOWED
        .iter()
        .find(|(o, _)| *o == oid)
        .map(|(_, name)| *name)
}

/// How a `FunctionCall` appears in the audit log: the function's OID and
/// its arguments (text arguments as text, binary ones in hex).
fn function_call_text(oid: i32, body: &[u8], encoding: &str) -> String {
    let mut text = format!("FunctionCall oid={oid}");
    if let Ok(args) = messages::function_call_args(body, encoding) {
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                a.as_deref()
                    .map_or("NULL".to_string(), |s| format!("{s:?}"))
            })
            .collect();
        text.push_str(&format!(" args=[{}]", shown.join(", ")));
    }
    text
}

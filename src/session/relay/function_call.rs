//! `FunctionCall`: the large-object functions ([`crate::session::checks`]
//! allows only them), recorded by name with their arguments.

use super::*;

impl QueryLoop<'_> {
    pub(super) async fn on_function_call(&mut self, frame: Bytes) -> Result<(), End> {
        let oid = crate::protocol::frame::Reader::new(&frame[5..], "FunctionCall")
            .i32()
            .map_err(End::from)?;
        let encoding = self.carried.client_encoding();
        let checked = crate::session::checks::function_call(oid, || {
            // The refused call is evidence: its arguments are recorded.
            function_call_text(oid, &frame[5..], encoding)
        });
        let name = match checked {
            Ok(name) => name,
            Err(r) => return self.refused(Flow::Simple, r).await,
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

//! What a decision does to the HTTP exchange, whoever carries it out (the sidecar in a
//! `CheckResponse`, the proxy-wasm filter with host calls): the upstream headers an allow
//! sets and removes, and a deny's status, headers and JSON body. Pure; no I/O.

use crate::decision::{Allowed, Denied};

/// Upstream headers that carry the verified identity. The backend trusts them, so a
/// client's own copies must never get through: every one is overwritten or removed.
pub const SUBJECT_HEADER: &str = "x-gitlab-authz-subject";
pub const ISSUER_HEADER: &str = "x-gitlab-authz-issuer";
pub const SCOPES_HEADER: &str = "x-gitlab-authz-scopes";
pub const UNIT_PRIMITIVE_HEADER: &str = "x-gitlab-authz-unit-primitive";
/// Set on an allow that a backend in `mode: dry_run` would otherwise have denied: the reason.
pub const DRY_RUN_HEADER: &str = "x-gitlab-authz-dry-run";
pub const IDENTITY_HEADERS: [&str; 5] = [
    SUBJECT_HEADER,
    ISSUER_HEADER,
    SCOPES_HEADER,
    UNIT_PRIMITIVE_HEADER,
    DRY_RUN_HEADER,
];

/// The upstream headers of an allow: `set` overwrite whatever the client sent under the
/// same name (an empty value included, so it still replaces a smuggled one), `remove` go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamHeaders {
    pub set: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl UpstreamHeaders {
    pub fn of(allowed: &Allowed) -> UpstreamHeaders {
        let mut headers = UpstreamHeaders::default();
        match &allowed.identity {
            // A public route or a dry-run allow: nobody was identified, so no identity
            // header (and no forwarded claim) may reach the backend.
            None => {
                headers.remove = IDENTITY_HEADERS
                    .iter()
                    .map(|&name| name.to_owned())
                    .chain(allowed.removed_headers.iter().map(|h| h.to_string()))
                    .collect();
                if let Some(denied) = &allowed.dry_run {
                    headers.remove.retain(|h| h != DRY_RUN_HEADER);
                    headers.set(DRY_RUN_HEADER, denied.reason.as_str());
                }
            }
            Some(identity) => {
                headers.set(SUBJECT_HEADER, &identity.subject);
                headers.set(ISSUER_HEADER, &identity.issuer);
                headers.set(SCOPES_HEADER, &identity.scopes.join(" "));
                match &identity.unit_primitive {
                    Some(unit_primitive) => headers.set(UNIT_PRIMITIVE_HEADER, unit_primitive),
                    None => headers.remove.push(UNIT_PRIMITIVE_HEADER.to_owned()),
                }
                headers.remove.push(DRY_RUN_HEADER.to_owned());
                for forwarded in &identity.forwarded {
                    match &forwarded.value {
                        Some(value) => headers.set(&forwarded.header, value),
                        None => headers.remove.push(forwarded.header.to_string()),
                    }
                }
            }
        }
        headers
    }

    fn set(&mut self, name: &str, value: &str) {
        self.set.push((name.to_owned(), value.to_owned()));
    }
}

/// A deny as an HTTP response: status, headers (`content-type`, and for 401 and 403 the
/// RFC 6750 challenge) and the JSON body, which never holds the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenyResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: String,
}

impl DenyResponse {
    pub fn of(denied: &Denied) -> DenyResponse {
        let reason = denied.reason;
        let mut headers = vec![("content-type", "application/json")];
        if let Some(challenge) = reason.www_authenticate() {
            headers.push(("www-authenticate", challenge));
        }
        DenyResponse {
            status: reason.http_status(),
            headers,
            body: error_body(reason.as_str(), &denied.message),
        }
    }
}

/// `{"error":"<reason>","message":"<message>"}`, written directly into one buffer.
pub fn error_body(error: &str, message: &str) -> String {
    let mut body = String::with_capacity(32 + error.len() + message.len());
    body.push_str(r#"{"error":"#);
    push_json_string(&mut body, error);
    body.push_str(r#","message":"#);
    push_json_string(&mut body, message);
    body.push('}');
    body
}

/// A JSON string literal (RFC 8259 §7): quotes, backslashes and control characters escaped.
fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                use std::fmt::Write as _;
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

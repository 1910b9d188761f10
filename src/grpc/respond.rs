//! The response side of a Check: a [`Decision`] as Envoy's `CheckResponse` — status
//! codes, the deny body and challenge, the identity headers an allow sets or removes, and
//! the dynamic metadata for Envoy's access log. Pure functions, tested without a network.

use std::sync::OnceLock;

use prost_types::{Struct, Value, value::Kind};

use crate::decision::{Allowed, Decision, Denied, DenyReason};
use crate::proto::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use crate::proto::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response::HttpResponse,
};
use crate::proto::envoy::r#type::v3::HttpStatus;
use crate::proto::google::rpc;

pub use crate::respond::{
    DRY_RUN_HEADER, ISSUER_HEADER, SCOPES_HEADER, SUBJECT_HEADER, UNIT_PRIMITIVE_HEADER,
};
use crate::respond::{UpstreamHeaders, error_body};

// google.rpc.Code values. Envoy only tells 0 (allow) from the rest (deny), but the code
// also lands in its logs and stats, so a deny says what kind it is.
const CODE_OK: i32 = 0;
const CODE_INVALID_ARGUMENT: i32 = 3;
const CODE_PERMISSION_DENIED: i32 = 7;
const CODE_UNAVAILABLE: i32 = 14;
const CODE_UNAUTHENTICATED: i32 = 16;

/// The `CheckResponse` for a decision. The gRPC call itself succeeds for every decision;
/// allow or deny is carried in `status` and the HTTP response.
pub fn to_response(decision: &Decision) -> CheckResponse {
    match decision {
        Decision::Allow(allowed) => allow_response(allowed),
        Decision::Deny(denied) => deny_response(denied),
    }
}

fn allow_response(allowed: &Allowed) -> CheckResponse {
    let mut metadata = Metadata::new(if allowed.dry_run.is_some() {
        "dry_run"
    } else {
        "allow"
    });
    metadata.put("backend", &allowed.backend);
    let upstream = UpstreamHeaders::of(allowed);
    let ok = OkHttpResponse {
        headers: upstream
            .set
            .iter()
            .map(|(name, value)| overwrite(name, value))
            .collect(),
        headers_to_remove: upstream.remove,
        ..Default::default()
    };
    match &allowed.identity {
        None => {
            if let Some(denied) = &allowed.dry_run {
                metadata.put("reason", denied.reason.as_str());
            }
        }
        Some(identity) => {
            if let Some(unit_primitive) = &identity.unit_primitive {
                metadata.put("unit_primitive", unit_primitive);
            }
            metadata.put("subject", &identity.subject);
            metadata.put("issuer", &identity.issuer);
            metadata.put("scopes", &identity.scopes.join(" "));
            if let Some(jti) = &identity.jti {
                metadata.put("jti", jti);
            }
        }
    }
    CheckResponse {
        status: Some(rpc::Status {
            code: CODE_OK,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(ok)),
        dynamic_metadata: Some(metadata.0),
    }
}

fn deny_response(denied: &Denied) -> CheckResponse {
    let reason = denied.reason;
    let template = DenyTemplate::of(reason);
    let denied_response = DeniedHttpResponse {
        status: Some(HttpStatus {
            code: template.http_status,
        }),
        headers: template.headers.clone(),
        body: error_body(reason.as_str(), &denied.message),
    };
    let mut metadata = Metadata::new("deny");
    metadata.put("reason", reason.as_str());
    if let Some(backend) = &denied.backend {
        metadata.put("backend", backend);
    }
    CheckResponse {
        status: Some(rpc::Status {
            code: template.rpc_code,
            message: reason.as_str().to_owned(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(denied_response)),
        dynamic_metadata: Some(metadata.0),
    }
}

/// What every deny of one reason shares, built once: its statuses and its headers.
struct DenyTemplate {
    http_status: i32,
    rpc_code: i32,
    headers: Vec<HeaderValueOption>,
}

impl DenyTemplate {
    fn of(reason: DenyReason) -> &'static DenyTemplate {
        static TEMPLATES: OnceLock<Vec<DenyTemplate>> = OnceLock::new();
        let templates = TEMPLATES.get_or_init(|| {
            DenyReason::ALL
                .iter()
                .map(|&reason| {
                    let mut headers = vec![overwrite("content-type", "application/json")];
                    if let Some(challenge) = reason.www_authenticate() {
                        headers.push(overwrite("www-authenticate", challenge));
                    }
                    DenyTemplate {
                        http_status: i32::from(reason.http_status()),
                        rpc_code: rpc_code(reason.http_status()),
                        headers,
                    }
                })
                .collect()
        });
        let index = DenyReason::ALL
            .iter()
            .position(|&r| r == reason)
            .unwrap_or_default();
        &templates[index]
    }
}

fn rpc_code(http_status: u16) -> i32 {
    match http_status {
        400 => CODE_INVALID_ARGUMENT,
        401 => CODE_UNAUTHENTICATED,
        503 => CODE_UNAVAILABLE,
        _ => CODE_PERMISSION_DENIED,
    }
}

/// `OVERWRITE_IF_EXISTS_OR_ADD`: a value the client sent under the same name is replaced,
/// not joined with ours. Empty values are kept (a token may carry no scopes) so that an
/// empty header still replaces a smuggled one.
fn overwrite(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: true,
        ..Default::default()
    }
}

/// The dynamic metadata Envoy hands to its access log, as string fields.
struct Metadata(Struct);

impl Metadata {
    fn new(decision: &str) -> Self {
        let mut metadata = Metadata(Struct::default());
        metadata.put("decision", decision);
        metadata
    }

    fn put(&mut self, key: &str, value: &str) {
        let value = Value {
            kind: Some(Kind::StringValue(value.to_owned())),
        };
        self.0.fields.insert(key.to_owned(), value);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::grpc::test_support::{
        ISSUER, denied_response, header, header_value, metadata, mk_identity, ok_response,
    };
    use crate::respond::IDENTITY_HEADERS;

    #[test]
    fn every_deny_reason_has_its_status_body_and_challenge() {
        for reason in DenyReason::ALL {
            let decision = Decision::deny(reason, "a sentence for the client");
            let response = to_response(&decision);

            let status = response.status.as_ref().expect("status is always set");
            assert_ne!(
                status.code, CODE_OK,
                "{reason}: a deny must not carry code 0"
            );
            let expected_code = match reason.http_status() {
                400 => CODE_INVALID_ARGUMENT,
                401 => CODE_UNAUTHENTICATED,
                403 => CODE_PERMISSION_DENIED,
                503 => CODE_UNAVAILABLE,
                other => panic!("{reason}: unexpected HTTP status {other}"),
            };
            assert_eq!(status.code, expected_code, "{reason}");

            let denied = denied_response(&response);
            let http = denied.status.as_ref().expect("HTTP status is always set");
            assert_eq!(http.code, i32::from(reason.http_status()), "{reason}");
            assert_eq!(
                header_value(&denied.headers, "content-type"),
                Some("application/json")
            );
            assert_eq!(
                header_value(&denied.headers, "www-authenticate"),
                reason.www_authenticate(),
                "{reason}"
            );

            let body: serde_json::Value = serde_json::from_str(&denied.body).expect("body is JSON");
            assert_eq!(
                body,
                serde_json::json!({"error": reason.as_str(), "message": "a sentence for the client"})
            );
            assert_eq!(metadata(&response, "decision").as_deref(), Some("deny"));
            assert_eq!(
                metadata(&response, "reason").as_deref(),
                Some(reason.as_str())
            );
        }
    }

    #[test]
    fn deny_body_escapes_the_message() {
        let decision = Decision::deny(
            DenyReason::HeaderMismatch,
            r#"header "x-gitlab-realm" \ differs"#,
        );
        let body: serde_json::Value =
            serde_json::from_str(&denied_response(&to_response(&decision)).body)
                .expect("body is JSON");
        assert_eq!(body["message"], r#"header "x-gitlab-realm" \ differs"#);
    }

    #[test]
    fn deny_body_is_json_for_any_message() {
        for message in ["tab\tnew\nline\r\u{1}\u{1f}", "é ✓ \u{7f} \"q\" \\", ""] {
            let body: serde_json::Value =
                serde_json::from_str(&error_body("bad_path", message)).expect("body is JSON");
            assert_eq!(
                body,
                serde_json::json!({"error": "bad_path", "message": message})
            );
        }
    }

    #[test]
    fn deny_metadata_names_the_backend_when_a_route_matched() {
        let decision = Decision::Deny(Denied {
            reason: DenyReason::InsufficientScope,
            message: "scope missing".into(),
            backend: Some(Arc::from("ai_gateway")),
            route: None,
            claimed: None,
            refresh_issuer: None,
        });
        let response = to_response(&decision);
        assert_eq!(
            metadata(&response, "backend").as_deref(),
            Some("ai_gateway")
        );
    }

    #[test]
    fn allow_overwrites_identity_headers_and_records_metadata() {
        let decision = Decision::Allow(Allowed {
            backend: Arc::from("ai_gateway"),
            route: None,
            identity: Some(mk_identity(None)),
            dry_run: None,
            removed_headers: Vec::new(),
        });
        let response = to_response(&decision);
        assert_eq!(response.status.as_ref().map(|s| s.code), Some(CODE_OK));

        let ok = ok_response(&response);
        for (key, value) in [
            (SUBJECT_HEADER, "instance-1"),
            (ISSUER_HEADER, ISSUER),
            (SCOPES_HEADER, "code_suggestions duo_chat"),
        ] {
            let option = header(&ok.headers, key).unwrap_or_else(|| panic!("{key} is set"));
            assert_eq!(
                option.header.as_ref().map(|h| h.value.as_str()),
                Some(value)
            );
            assert_eq!(
                option.append_action,
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                "{key}"
            );
            // The deprecated field, when set, would override append_action.
            #[allow(deprecated)]
            let append = option.append;
            assert_eq!(append, None, "{key}");
        }
        // No unit primitive on this route: a client's own header must not pass either.
        assert!(header(&ok.headers, UNIT_PRIMITIVE_HEADER).is_none());
        // Nor a dry-run verdict: this is no dry-run allow.
        assert_eq!(
            ok.headers_to_remove,
            vec![UNIT_PRIMITIVE_HEADER.to_owned(), DRY_RUN_HEADER.to_owned()]
        );

        for (key, value) in [
            ("decision", "allow"),
            ("backend", "ai_gateway"),
            ("subject", "instance-1"),
            ("issuer", ISSUER),
            ("scopes", "code_suggestions duo_chat"),
            ("jti", "jti-1"),
        ] {
            assert_eq!(metadata(&response, key).as_deref(), Some(value), "{key}");
        }
        assert_eq!(metadata(&response, "reason"), None);
    }

    #[test]
    fn allow_with_a_unit_primitive_sets_its_header() {
        let decision = Decision::Allow(Allowed {
            backend: Arc::from("ai_gateway"),
            route: None,
            identity: Some(mk_identity(Some("duo_chat"))),
            dry_run: None,
            removed_headers: Vec::new(),
        });
        let response = to_response(&decision);
        let ok = ok_response(&response);
        let option =
            header(&ok.headers, UNIT_PRIMITIVE_HEADER).expect("unit primitive header is set");
        assert_eq!(
            option.header.as_ref().map(|h| h.value.as_str()),
            Some("duo_chat")
        );
        assert_eq!(
            option.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        assert_eq!(ok.headers_to_remove, vec![DRY_RUN_HEADER.to_owned()]);
        assert_eq!(
            metadata(&response, "unit_primitive").as_deref(),
            Some("duo_chat")
        );
    }

    #[test]
    fn allow_with_no_scopes_still_replaces_a_smuggled_scopes_header() {
        let mut identity = mk_identity(None);
        identity.scopes.clear();
        let response = to_response(&Decision::Allow(Allowed {
            backend: Arc::from("b"),
            route: None,
            identity: Some(identity),
            dry_run: None,
            removed_headers: Vec::new(),
        }));
        let option =
            header(&ok_response(&response).headers, SCOPES_HEADER).expect("scopes header is set");
        assert_eq!(option.header.as_ref().map(|h| h.value.as_str()), Some(""));
        assert!(option.keep_empty_value);
    }

    #[test]
    fn public_allow_removes_smuggled_identity_headers() {
        let response = to_response(&Decision::Allow(Allowed {
            backend: Arc::from("ai_gateway"),
            route: None,
            identity: None,
            dry_run: None,
            removed_headers: Vec::new(),
        }));
        assert_eq!(response.status.as_ref().map(|s| s.code), Some(CODE_OK));
        let ok = ok_response(&response);
        assert!(ok.headers.is_empty());
        let mut removed = ok.headers_to_remove.clone();
        removed.sort();
        let mut expected: Vec<String> = IDENTITY_HEADERS.iter().map(|&h| h.to_owned()).collect();
        expected.sort();
        assert_eq!(removed, expected);
        assert_eq!(metadata(&response, "decision").as_deref(), Some("allow"));
        assert_eq!(
            metadata(&response, "backend").as_deref(),
            Some("ai_gateway")
        );
        assert_eq!(metadata(&response, "subject"), None);
    }

    // --- the unknown-kid retry, with a stand-in for `decide` -----------------------------
}

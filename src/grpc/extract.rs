//! The request side of a Check: what a decision reads from a `CheckRequest` (method,
//! path, headers), borrowed from it where possible. No decision, no response here.

use std::borrow::Cow;
use std::collections::HashMap;

use tonic::Status;

use crate::decision::{Headers, Request};
use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::service::auth::v3::CheckRequest;

/// The parts of a `CheckRequest` a decision reads, borrowed from it where possible.
pub struct CheckInput<'a> {
    method: &'a str,
    path: &'a str,
    headers: HeaderSource<'a>,
}

enum HeaderSource<'a> {
    /// Envoy's default `headers` map, used as it is.
    Map(&'a HashMap<String, String>),
    /// Envoy's `header_map` (with `encode_raw_headers`), values decoded to text (borrowed
    /// unless a value is not UTF-8).
    List(Vec<(&'a str, Cow<'a, str>)>),
}

impl CheckInput<'_> {
    pub fn request(&self) -> Request<'_> {
        let headers: &dyn Headers = match &self.headers {
            HeaderSource::Map(map) => *map,
            HeaderSource::List(list) => list,
        };
        Request {
            method: self.method,
            path: self.path,
            headers,
        }
    }
}

/// Reads what a decision needs from a `CheckRequest`. A request without HTTP attributes is
/// not something we can decide on (it comes from a network-level ext_authz filter, or a
/// client that is not Envoy), so it is the one malformed input: `invalid_argument`.
pub fn to_request(check: &CheckRequest) -> Result<CheckInput<'_>, Status> {
    let http = check
        .attributes
        .as_ref()
        .and_then(|attributes| attributes.request.as_ref())
        .and_then(|request| request.http.as_ref())
        .ok_or_else(|| Status::invalid_argument("CheckRequest has no attributes.request.http"))?;
    let headers = if !http.headers.is_empty() {
        HeaderSource::Map(&http.headers)
    } else {
        let list = http
            .header_map
            .as_ref()
            .map(|map| map.headers.as_slice())
            .unwrap_or_default();
        HeaderSource::List(list.iter().map(header_pair).collect())
    };
    Ok(CheckInput {
        method: &http.method,
        path: &http.path,
        headers,
    })
}

/// `raw_value` is what Envoy fills in a `header_map`; `value` is the older text form.
/// Bytes that are not UTF-8 become U+FFFD rather than dropping the header, so a header
/// that was sent still counts as sent (a missing header can pass a check a wrong one fails).
fn header_pair(header: &HeaderValue) -> (&str, Cow<'_, str>) {
    let value = if header.raw_value.is_empty() {
        Cow::Borrowed(header.value.as_str())
    } else {
        String::from_utf8_lossy(&header.raw_value)
    };
    (header.key.as_str(), value)
}

/// The `CheckRequest` Envoy's ext_authz filter sends for one HTTP request, with its
/// headers in the `headers` map (lower-case names). For clients: the `check` command,
/// tests and benches.
pub fn http_check_request(
    method: &str,
    path: &str,
    headers: std::collections::HashMap<String, String>,
) -> CheckRequest {
    use crate::proto::envoy::service::auth::v3::{AttributeContext, attribute_context};
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: method.to_owned(),
                    path: path.to_owned(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::HeaderValue as Header;
    use crate::grpc::test_support::{mk_check, raw};
    use crate::proto::envoy::service::auth::v3::{AttributeContext, attribute_context};

    #[test]
    fn headers_map_is_used_as_sent() {
        let check = mk_check(
            &[("authorization", "Bearer abc"), ("x-gitlab-realm", "saas")],
            None,
        );
        let input = to_request(&check).expect("http attributes are present");
        let req = input.request();
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/ai/v2/code/completions?x=1");
        assert_eq!(req.headers.get("authorization"), Header::One("Bearer abc"));
        assert_eq!(req.headers.get("x-gitlab-realm"), Header::One("saas"));
        assert_eq!(req.headers.get("x-gitlab-instance-id"), Header::Absent);
    }

    #[test]
    fn header_map_is_used_when_the_map_is_empty() {
        let list = vec![
            raw("authorization", b"Bearer abc"),
            HeaderValue {
                key: "x-gitlab-realm".into(),
                value: "saas".into(),
                ..Default::default()
            },
            raw("x-gitlab-global-user-id", b"1"),
            raw("x-gitlab-global-user-id", b"2"),
            raw("x-gitlab-authentication-type", b"oid\xffc"),
        ];
        let check = mk_check(&[], Some(list));
        let input = to_request(&check).expect("http attributes are present");
        let req = input.request();
        assert_eq!(req.headers.get("authorization"), Header::One("Bearer abc"));
        assert_eq!(
            req.headers.get("x-gitlab-realm"),
            Header::One("saas"),
            "value, not raw_value"
        );
        assert_eq!(req.headers.get("x-gitlab-global-user-id"), Header::Repeated);
        // Not UTF-8: still present (so it fails an equality check) rather than dropped.
        assert_eq!(
            req.headers.get("x-gitlab-authentication-type"),
            Header::One("oid\u{fffd}c")
        );
    }

    #[test]
    fn headers_map_wins_over_header_map() {
        let check = mk_check(
            &[("authorization", "Bearer map")],
            Some(vec![raw("authorization", b"Bearer list")]),
        );
        let input = to_request(&check).expect("http attributes are present");
        assert_eq!(
            input.request().headers.get("authorization"),
            Header::One("Bearer map")
        );
    }

    #[test]
    fn no_headers_at_all_is_an_empty_request_not_an_error() {
        let check = mk_check(&[], None);
        let input = to_request(&check).expect("http attributes are present");
        assert_eq!(input.request().headers.get("authorization"), Header::Absent);
    }

    #[test]
    fn missing_http_attributes_are_invalid_argument() {
        let no_attributes = CheckRequest { attributes: None };
        let no_request = CheckRequest {
            attributes: Some(AttributeContext::default()),
        };
        let no_http = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request::default()),
                ..Default::default()
            }),
        };
        for check in [no_attributes, no_request, no_http] {
            let status = to_request(&check).err().expect("must be rejected");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }
}

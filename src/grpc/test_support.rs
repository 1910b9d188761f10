//! Builders and readers shared by the gRPC module's tests.

use std::sync::Arc;

use prost_types::value::Kind;

use crate::decision::Identity;
use crate::proto::envoy::config::core::v3::{HeaderMap, HeaderValue, HeaderValueOption};
use crate::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    attribute_context, check_response::HttpResponse,
};

pub(super) const ISSUER: &str = "https://issuer.test";

pub(super) fn mk_check(
    headers: &[(&str, &str)],
    header_map: Option<Vec<HeaderValue>>,
) -> CheckRequest {
    let http = attribute_context::HttpRequest {
        method: "POST".into(),
        path: "/ai/v2/code/completions?x=1".into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        header_map: header_map.map(|headers| HeaderMap { headers }),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(http),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

pub(super) fn raw(key: &str, value: &[u8]) -> HeaderValue {
    HeaderValue {
        key: key.into(),
        raw_value: value.to_vec(),
        ..Default::default()
    }
}

pub(super) fn mk_identity(unit_primitive: Option<&str>) -> Identity {
    Identity {
        forwarded: Vec::new(),
        subject: "instance-1".into(),
        issuer: Arc::from(ISSUER),
        scopes: vec!["code_suggestions".into(), "duo_chat".into()],
        jti: Some("jti-1".into()),
        unit_primitive: unit_primitive.map(String::from),
        deprecated: Vec::new(),
    }
}

pub(super) fn ok_response(response: &CheckResponse) -> &OkHttpResponse {
    match &response.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok,
        other => panic!("expected an ok_response, got {other:?}"),
    }
}

pub(super) fn denied_response(response: &CheckResponse) -> &DeniedHttpResponse {
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => denied,
        other => panic!("expected a denied_response, got {other:?}"),
    }
}

pub(super) fn header<'a>(
    options: &'a [HeaderValueOption],
    key: &str,
) -> Option<&'a HeaderValueOption> {
    options
        .iter()
        .find(|o| o.header.as_ref().is_some_and(|h| h.key == key))
}

pub(super) fn header_value<'a>(options: &'a [HeaderValueOption], key: &str) -> Option<&'a str> {
    header(options, key)
        .and_then(|o| o.header.as_ref())
        .map(|h| h.value.as_str())
}

pub(super) fn metadata(response: &CheckResponse, key: &str) -> Option<String> {
    let field = response.dynamic_metadata.as_ref()?.fields.get(key)?;
    match &field.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        other => panic!("metadata {key} is not a string: {other:?}"),
    }
}

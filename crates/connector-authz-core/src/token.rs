//! Finding the bearer token in a request and reading its header and claims, without
//! any cryptography: nothing read here is trusted until `verify` has checked the
//! signature. Parsing is strict: a claim of the wrong JSON type, a duplicate member or a
//! `crit` header makes the token malformed rather than silently ignored.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::{self, DeserializeOwned, Deserializer};
use serde::{Deserialize, Serialize};

use crate::decision::{DenyReason, HeaderValue, Headers};

/// A token failure: the reason and a sentence for the client (never the token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenError {
    pub reason: DenyReason,
    pub message: &'static str,
}

fn malformed(message: &'static str) -> TokenError {
    TokenError {
        reason: DenyReason::MalformedToken,
        message,
    }
}

/// The token of `Authorization: Bearer <token>`: the scheme is matched without regard
/// to case, exactly one Authorization header is accepted, and the token must fit in
/// `max_bytes`.
pub fn bearer(headers: &dyn Headers, max_bytes: usize) -> Result<&str, TokenError> {
    let value = match headers.get("authorization") {
        HeaderValue::Absent => {
            return Err(TokenError {
                reason: DenyReason::MissingToken,
                message: "the request has no Authorization header with a bearer token",
            });
        }
        HeaderValue::Repeated => {
            return Err(malformed(
                "the request has more than one Authorization header",
            ));
        }
        HeaderValue::One(v) => v,
    };
    let value = value.trim_matches([' ', '\t']);
    let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError {
            reason: DenyReason::MissingToken,
            message: "the Authorization header does not use the Bearer scheme",
        });
    }
    let token = rest.trim_start_matches([' ', '\t']);
    if token.is_empty() {
        return Err(malformed(
            "the Authorization header has an empty bearer token",
        ));
    }
    if token.len() > max_bytes {
        return Err(malformed(
            "the bearer token is larger than this service accepts",
        ));
    }
    // One pass over the token for the rare bytes, in chunks that compile to vector code:
    // tokens are about a kilobyte and this runs on every request, cached or not.
    let suspicious = token.as_bytes().chunks(64).any(|chunk| {
        chunk
            .iter()
            .fold(false, |seen, &b| seen | matches!(b, b',' | b' ' | b'\t'))
    });
    if suspicious {
        // Envoy joins repeated headers with a comma, and a JWT never holds one.
        if token.contains(',') {
            return Err(malformed(
                "the request has more than one Authorization header",
            ));
        }
        return Err(malformed("the bearer token contains whitespace"));
    }
    Ok(token)
}

/// The JOSE header members this service reads. `jku`, `x5u`, `jwk` and `x5c` are
/// deliberately not read: keys come only from configuration.
#[derive(Clone, Debug, Deserialize)]
pub struct JoseHeader {
    pub alg: String,
    #[serde(default, deserialize_with = "string_if_present")]
    pub kid: Option<String>,
    #[serde(default, deserialize_with = "string_if_present")]
    pub typ: Option<String>,
    /// Any `crit` member makes the token unusable: we understand no extensions (RFC 7515 §4.1.11).
    #[serde(default)]
    pub crit: Option<serde_json::Value>,
}

/// A header member that, when present, must be a string (RFC 7515 §4.1): `"kid": null`
/// is malformed rather than read as "no kid", which would try the issuer's keys in turn.
fn string_if_present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// `aud`: a string or an array of strings (RFC 7519 §4.1.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims of a Cloud Connector token that a decision reads.
///
/// Serialized with the absent claims left out, so that the JSON reads back as the same
/// claims (the sidecar's `/v1/verify` answer to the proxy-wasm filter).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    #[serde(
        default,
        deserialize_with = "numeric_date",
        skip_serializing_if = "Option::is_none"
    )]
    pub exp: Option<i64>,
    #[serde(
        default,
        deserialize_with = "numeric_date",
        skip_serializing_if = "Option::is_none"
    )]
    pub nbf: Option<i64>,
    #[serde(
        default,
        deserialize_with = "numeric_date",
        skip_serializing_if = "Option::is_none"
    )]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitlab_realm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitlab_instance_id: Option<String>,
}

/// A token's time claims, as `verify::time_window` checks them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Validity {
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
    pub iat: Option<i64>,
}

/// A NumericDate: a JSON number of seconds (fractions allowed, RFC 7519 §2), never a string.
/// Values beyond ±2^53 are clamped: they are "forever" in either direction either way.
fn numeric_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    const LIMIT: f64 = 9_007_199_254_740_992.0;
    let value = serde_json::Number::deserialize(d)?;
    if let Some(i) = value.as_i64() {
        return Ok(Some(i));
    }
    if value.as_u64().is_some() {
        return Ok(Some(i64::MAX));
    }
    match value.as_f64() {
        Some(f) if f.is_finite() => Ok(Some(f.clamp(-LIMIT, LIMIT).floor() as i64)),
        _ => Err(de::Error::custom("a NumericDate must be a finite number")),
    }
}

/// A token split and decoded but not verified.
#[derive(Clone, Debug)]
pub struct UnverifiedToken<'a> {
    pub header: JoseHeader,
    /// `base64url(header) "." base64url(payload)`: what the signature covers.
    pub signing_input: &'a str,
    /// The third segment, still base64url.
    pub signature: &'a str,
    payload: &'a str,
}

/// Splits a compact JWS and reads its header. Only three segments are a JWS: a
/// five-segment JWE or anything else is malformed.
pub fn split(token: &str) -> Result<UnverifiedToken<'_>, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed(
            "the bearer token is not a signed JWT (three base64url segments)",
        ));
    };
    if header.is_empty() || payload.is_empty() || signature.is_empty() {
        return Err(malformed("the bearer token has an empty segment"));
    }
    let header_json = decode_segment(header)?;
    // Checked here, not only when verifying: a token that is not well formed is
    // malformed_token whatever its issuer, and costs no key lookup or RSA operation.
    if URL_SAFE_NO_PAD.decode(signature).is_err() {
        return Err(malformed(
            "the token's signature is not valid unpadded base64url",
        ));
    }
    let header: JoseHeader = json_object(&header_json)
        .ok_or_else(|| malformed("the token header is not a valid JOSE header"))?;
    if header.crit.is_some() {
        return Err(malformed(
            "the token header marks extensions as critical, and none are supported",
        ));
    }
    let signing_input = &token[..token.len() - signature.len() - 1];
    Ok(UnverifiedToken {
        header,
        signing_input,
        signature,
        payload,
    })
}

impl UnverifiedToken<'_> {
    /// Decodes the claims. Their types are checked here; their values after the signature.
    pub fn claims(&self) -> Result<Claims, TokenError> {
        let json = decode_segment(self.payload)?;
        json_object(&json)
            .ok_or_else(|| malformed("the token claims are not valid JSON of the expected types"))
    }
}

/// The values of the claims `names` in a token's payload, for `forward_claims`: a string
/// as it is, a number as its JSON text; `None` for a claim that is absent, null, the empty
/// string or of another type. A value with a control character, or a forwarded claim
/// written twice (a backend could read either), makes the token malformed.
pub fn claim_values(token: &str, names: &[&str]) -> Result<Vec<Option<String>>, TokenError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| malformed("the bearer token is not a signed JWT"))?;
    let json = decode_segment(payload)?;
    let mut de = serde_json::Deserializer::from_slice(&json);
    let values = de::DeserializeSeed::deserialize(ClaimPicker { names }, &mut de)
        .map_err(|_| malformed("the token claims are not valid JSON of the expected types"))?;
    values
        .into_iter()
        .map(|value| match value {
            Some(v) if !crate::decision::claim_fits_header(&v) => Err(malformed(
                "a claim forwarded to the backend contains a control character",
            )),
            v => Ok(v.filter(|v| !v.is_empty())),
        })
        .collect()
}

struct ClaimPicker<'n> {
    names: &'n [&'n str],
}

impl<'de> de::DeserializeSeed<'de> for ClaimPicker<'_> {
    type Value = Vec<Option<String>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> de::Visitor<'de> for ClaimPicker<'_> {
    type Value = Vec<Option<String>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object of claims")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values = vec![None; self.names.len()];
        let mut seen = vec![false; self.names.len()];
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let Some(i) = self.names.iter().position(|n| *n == key) else {
                map.next_value::<de::IgnoredAny>()?;
                continue;
            };
            if std::mem::replace(&mut seen[i], true) {
                return Err(de::Error::custom("a forwarded claim is written twice"));
            }
            values[i] = match map.next_value::<serde_json::Value>()? {
                serde_json::Value::String(s) => Some(s),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            };
        }
        Ok(values)
    }
}

/// Parses a JSON object, and only an object: serde would also fill a struct from a JSON
/// array, position by position, and a signed array is not a JOSE header or a claims set.
fn json_object<T: DeserializeOwned>(json: &[u8]) -> Option<T> {
    if json.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(json).ok()
}

fn decode_segment(segment: &str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| malformed("the bearer token is not valid unpadded base64url"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    fn token(header: &str, claims: &str) -> String {
        format!("{}.{}.c2ln", b64(header), b64(claims))
    }

    #[test]
    fn claim_values_reads_strings_and_numbers_and_refuses_control_characters() {
        let t = token(
            r#"{"alg":"RS256"}"#,
            r#"{"a":"x","n":42,"f":1.5,"z":null,"e":"","b":true,"o":{"k":1}}"#,
        );
        let got = claim_values(&t, &["a", "n", "f", "z", "e", "b", "o", "missing"]).unwrap();
        assert_eq!(
            got,
            vec![
                Some("x".into()),
                Some("42".into()),
                Some("1.5".into()),
                None,
                None,
                None,
                None,
                None
            ]
        );
        for bad in [r#"{"a":"x\ny"}"#, r#"{"a":"x\u0000"}"#, r#"{"a":"\u007f"}"#] {
            let t = token(r#"{"alg":"RS256"}"#, bad);
            assert_eq!(
                claim_values(&t, &["a"]).unwrap_err().reason,
                DenyReason::MalformedToken,
                "{bad}"
            );
        }
        // A control character in a claim that is not forwarded does not matter here.
        let t = token(r#"{"alg":"RS256"}"#, r#"{"a":"ok","b":"x\ny"}"#);
        assert_eq!(claim_values(&t, &["a"]).unwrap(), vec![Some("ok".into())]);
        // A forwarded claim written twice is ambiguous.
        let t = token(r#"{"alg":"RS256"}"#, r#"{"a":"1","a":"2"}"#);
        assert!(claim_values(&t, &["a"]).is_err());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in [
            "Bearer abc.def.ghi",
            "bearer abc.def.ghi",
            "BEARER   abc.def.ghi  ",
        ] {
            assert_eq!(
                bearer(&headers(&[("authorization", v)]), 100).unwrap(),
                "abc.def.ghi"
            );
        }
    }

    #[test]
    fn bearer_failures_have_their_reasons() {
        let reason = |pairs: &[(&str, &str)], max| bearer(&headers(pairs), max).unwrap_err().reason;
        assert_eq!(reason(&[], 100), DenyReason::MissingToken);
        assert_eq!(
            reason(&[("authorization", "Basic dXNlcjpw")], 100),
            DenyReason::MissingToken
        );
        assert_eq!(
            reason(&[("authorization", "Bearer")], 100),
            DenyReason::MalformedToken
        );
        assert_eq!(
            reason(&[("authorization", "Bearer ")], 100),
            DenyReason::MalformedToken
        );
        assert_eq!(
            reason(
                &[
                    ("authorization", "Bearer a.b.c"),
                    ("Authorization", "Bearer a.b.c")
                ],
                100
            ),
            DenyReason::MalformedToken
        );
        assert_eq!(
            reason(&[("authorization", "Bearer a.b.c,Bearer d.e.f")], 100),
            DenyReason::MalformedToken
        );
        assert_eq!(
            reason(&[("authorization", "Bearer a.b.c d")], 100),
            DenyReason::MalformedToken
        );
        assert_eq!(
            reason(&[("authorization", "Bearer abcdefghij")], 5),
            DenyReason::MalformedToken
        );
    }

    #[test]
    fn split_reads_header_and_claims() {
        let t = token(
            r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#,
            r#"{"iss":"https://i","aud":["a","b"],"exp":1.5,"scopes":["x"]}"#,
        );
        let u = split(&t).unwrap();
        assert_eq!(u.header.alg, "RS256");
        assert_eq!(u.header.kid.as_deref(), Some("k1"));
        assert_eq!(u.signature, "c2ln");
        assert!(t.starts_with(u.signing_input) && t.len() == u.signing_input.len() + 5);
        let c = u.claims().unwrap();
        assert_eq!(c.exp, Some(1));
        assert_eq!(c.aud, Some(Audience::Many(vec!["a".into(), "b".into()])));
        assert_eq!(c.scopes.unwrap(), vec!["x"]);
    }

    #[test]
    fn structurally_bad_tokens_are_malformed() {
        let good_header = r#"{"alg":"RS256"}"#;
        let bad = [
            "abc".to_string(),
            "a.b".to_string(),
            format!("{}.{}.c.d.e", b64(good_header), b64("{}")),
            format!("{}..c2ln", b64(good_header)),
            format!("{}=.{}.c2ln", b64(good_header), b64("{}")),
            format!("{}.{}.c2ln", b64(good_header).replace('e', "+"), b64("{}")),
            token(r#"{"kid":"x"}"#, "{}"),
            token(r#"{"alg":"RS256","alg":"none"}"#, "{}"),
            token(r#"{"alg":"RS256","crit":["exp"]}"#, "{}"),
            // A null kid is not "no kid": that would send the token down the kid-less path.
            token(r#"{"alg":"RS256","kid":null}"#, "{}"),
            token(r#"{"alg":"RS256","typ":null}"#, "{}"),
            token(r#"{"alg":"RS256","kid":7}"#, "{}"),
            token("[1]", "{}"),
            // The signature segment is held to the same encoding as the others.
            format!("{}.{}.c2ln=", b64(good_header), b64("{}")),
            format!("{}.{}.c2l+", b64(good_header), b64("{}")),
            format!("{}.{}.c2lu\n", b64(good_header), b64("{}")),
            format!("{}.{}.c2l", b64(good_header), b64("{}")),
            format!("{}.{}.c2ln\u{fffd}", b64(good_header), b64("{}")),
        ];
        for t in &bad {
            assert_eq!(
                split(t).map(|_| ()).unwrap_err().reason,
                DenyReason::MalformedToken,
                "{t}"
            );
        }
    }

    #[test]
    fn claims_of_the_wrong_type_are_malformed() {
        for claims in [
            r#"{"exp":"1700000000"}"#,
            r#"{"aud":{"a":1}}"#,
            r#"{"aud":[["a"]]}"#,
            r#"{"scopes":"duo_chat"}"#,
            r#"{"scopes":["duo_chat",1]}"#,
            r#"{"iss":"a","iss":"b"}"#,
            r#"{"sub":5}"#,
            "not json",
        ] {
            let t = token(r#"{"alg":"RS256"}"#, claims);
            let err = split(&t).unwrap().claims().unwrap_err();
            assert_eq!(err.reason, DenyReason::MalformedToken, "{claims}");
        }
    }

    #[test]
    fn header_and_claims_must_be_json_objects() {
        // serde reads a struct from an array too (positionally): a signed array is not a JWT.
        let err = |t: &str| split(t).map(|_| ()).unwrap_err().reason;
        assert_eq!(
            err(&token(r#"["RS256","k1"]"#, "{}")),
            DenyReason::MalformedToken
        );
        assert_eq!(
            err(&token(r#" ["RS256"]"#, "{}")),
            DenyReason::MalformedToken
        );
        for claims in [r#"["https://i","s",["a"],2000000000]"#, "[]", " []", "null"] {
            let t = token(r#"{"alg":"RS256"}"#, claims);
            let got = split(&t).unwrap().claims().unwrap_err().reason;
            assert_eq!(got, DenyReason::MalformedToken, "{claims}");
        }
        let t = token(" {\"alg\":\"RS256\"} ", " {\"iss\":\"https://i\"}\n");
        assert_eq!(
            split(&t).unwrap().claims().unwrap().iss.as_deref(),
            Some("https://i")
        );
    }

    #[test]
    fn numeric_dates_accept_numbers_of_any_size() {
        let t = token(
            r#"{"alg":"RS256"}"#,
            r#"{"exp":1e300,"nbf":-5,"iat":18446744073709551615}"#,
        );
        let c = split(&t).unwrap().claims().unwrap();
        assert_eq!(c.exp, Some(9_007_199_254_740_992));
        assert_eq!(c.nbf, Some(-5));
        assert_eq!(c.iat, Some(i64::MAX));
    }
}

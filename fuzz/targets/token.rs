//! Target `token`: bytes → an Authorization value → `token::bearer`, then `token::split`
//! and `claims()` on what it returns and on the bytes themselves. Oracles: no panic, and
//! what is accepted has the shape the checks after it rely on.

use connector_authz::token::{self, UnverifiedToken};

use super::env::MAX_TOKEN_BYTES;
use super::input::lossy;

pub fn run(data: &[u8]) {
    let value = lossy(data);
    let headers = vec![("authorization".to_string(), value.clone())];
    if let Ok(bearer) = token::bearer(&headers, MAX_TOKEN_BYTES) {
        assert!(!bearer.is_empty() && bearer.len() <= MAX_TOKEN_BYTES);
        assert!(
            !bearer.contains([',', ' ', '\t']),
            "a bearer token with a comma or blank: {bearer:?}"
        );
        assert!(value.contains(bearer));
        if let Ok(unverified) = token::split(bearer) {
            check_split(bearer, &unverified);
        }
    }
    if let Ok(unverified) = token::split(&value) {
        check_split(&value, &unverified);
    }
}

fn check_split(token: &str, unverified: &UnverifiedToken<'_>) {
    assert_eq!(
        format!("{}.{}", unverified.signing_input, unverified.signature),
        token,
        "signing input and signature do not make up the token"
    );
    assert_eq!(
        token.split('.').count(),
        3,
        "accepted a token that is not three segments"
    );
    assert!(unverified.header.crit.is_none(), "accepted a crit header");
    assert!(
        unverified
            .signature
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "accepted a signature that is not base64url: {:?}",
        unverified.signature
    );
    // Only for the absence of panics: the claims may be anything.
    let _ = unverified.claims();
}

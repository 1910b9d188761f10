//! Checks that need trust: the signature against **one issuer's** keys, then the time
//! window and the audience. The caller has already picked the issuer from the token's
//! `iss`; nothing here ever looks at another issuer's keys.

use jsonwebtoken::Algorithm;

use crate::decision::DenyReason;
use crate::keys::{KeySet, VerifyingKey};
use crate::token::{UnverifiedToken, Validity};

/// A failed check: the reason and a sentence for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyError {
    pub reason: DenyReason,
    pub message: &'static str,
}

fn fail(reason: DenyReason, message: &'static str) -> VerifyError {
    VerifyError { reason, message }
}

/// How many keys of a set a token without `kid` may be tried against, so that a
/// kid-less token cannot make one request cost many verifications.
const MAX_KEYS_TRIED_WITHOUT_KID: usize = 4;

/// Verifies the signature with the issuer's key named by `kid` (or, for a token
/// without `kid`, the first few keys that accept `alg`). Returns the key that verified it.
pub fn signature<'k>(
    token: &UnverifiedToken<'_>,
    alg: Algorithm,
    keys: &'k KeySet,
) -> Result<&'k VerifyingKey, VerifyError> {
    match token.header.kid.as_deref() {
        Some(kid) => {
            let key = keys.by_kid(kid).ok_or_else(|| {
                fail(
                    DenyReason::UnknownKey,
                    "the token's key id is not among its issuer's keys",
                )
            })?;
            if key.alg.is_some_and(|pinned| pinned != alg) {
                return Err(fail(
                    DenyReason::BadSignature,
                    "the token's algorithm is not the one its key is published for",
                ));
            }
            if verifies(token, alg, key) {
                Ok(key)
            } else {
                Err(fail(
                    DenyReason::BadSignature,
                    "the token's signature does not verify",
                ))
            }
        }
        None => candidates_without_kid(keys, alg)
            .find(|k| verifies(token, alg, k))
            .ok_or_else(|| {
                fail(
                    DenyReason::BadSignature,
                    "the token has no key id and no key of its issuer verifies it",
                )
            }),
    }
}

/// The keys a token without `kid` is tried against, in order.
fn candidates_without_kid(keys: &KeySet, alg: Algorithm) -> impl Iterator<Item = &VerifyingKey> {
    keys.keys
        .iter()
        .filter(move |k| k.alg.is_none_or(|pinned| pinned == alg))
        .take(MAX_KEYS_TRIED_WITHOUT_KID)
}

/// Whether [`signature`] would try the key with `fingerprint` for a token with this `kid`
/// and `alg` against `keys`: what a cached verification must still satisfy to be reused.
pub fn would_use_key(keys: &KeySet, kid: Option<&str>, alg: Algorithm, fingerprint: u64) -> bool {
    match kid {
        Some(kid) => keys.by_kid(kid).is_some_and(|key| {
            key.fingerprint == fingerprint && key.alg.is_none_or(|pinned| pinned == alg)
        }),
        None => candidates_without_kid(keys, alg).any(|key| key.fingerprint == fingerprint),
    }
}

fn verifies(token: &UnverifiedToken<'_>, alg: Algorithm, key: &VerifyingKey) -> bool {
    // An error here (a key of another family, a signature that is not base64url) is a
    // signature that does not verify, nothing more.
    jsonwebtoken::crypto::verify(
        token.signature,
        token.signing_input.as_bytes(),
        &key.key,
        alg,
    )
    .unwrap_or(false)
}

/// `exp` must be present and not past; `nbf` and `iat` must not be in the future;
/// each with `leeway` seconds of clock skew.
pub fn time_window(claims: Validity, now: i64, leeway: i64) -> Result<(), VerifyError> {
    let exp = claims
        .exp
        .ok_or_else(|| fail(DenyReason::Expired, "the token has no expiry (exp)"))?;
    if now >= exp.saturating_add(leeway) {
        return Err(fail(DenyReason::Expired, "the token has expired"));
    }
    if claims
        .nbf
        .is_some_and(|nbf| nbf > now.saturating_add(leeway))
    {
        return Err(fail(
            DenyReason::NotYetValid,
            "the token is not valid yet (nbf)",
        ));
    }
    if claims
        .iat
        .is_some_and(|iat| iat > now.saturating_add(leeway))
    {
        return Err(fail(
            DenyReason::NotYetValid,
            "the token was issued in the future (iat)",
        ));
    }
    Ok(())
}

/// `aud` (a string or each of an array's) must contain the backend's audience.
pub fn audience(aud: Option<&[Box<str>]>, expected: &str) -> Result<(), VerifyError> {
    match aud {
        Some(aud) if aud.iter().any(|a| **a == *expected) => Ok(()),
        Some(_) => Err(fail(
            DenyReason::WrongAudience,
            "the token is meant for another audience",
        )),
        None => Err(fail(
            DenyReason::WrongAudience,
            "the token has no audience (aud)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: Option<i64>, nbf: Option<i64>, iat: Option<i64>) -> Validity {
        Validity { exp, nbf, iat }
    }

    #[test]
    fn time_window_applies_leeway_on_both_sides() {
        let now = 1_000_000;
        assert!(time_window(claims(Some(now + 1), None, None), now, 0).is_ok());
        assert_eq!(
            time_window(claims(Some(now), None, None), now, 0)
                .unwrap_err()
                .reason,
            DenyReason::Expired
        );
        assert!(time_window(claims(Some(now - 29), None, None), now, 30).is_ok());
        assert_eq!(
            time_window(claims(Some(now - 30), None, None), now, 30)
                .unwrap_err()
                .reason,
            DenyReason::Expired
        );
        assert_eq!(
            time_window(claims(None, None, None), now, 30)
                .unwrap_err()
                .reason,
            DenyReason::Expired
        );
        assert!(
            time_window(
                claims(Some(now + 60), Some(now + 30), Some(now + 30)),
                now,
                30
            )
            .is_ok()
        );
        assert_eq!(
            time_window(claims(Some(now + 60), Some(now + 31), None), now, 30)
                .unwrap_err()
                .reason,
            DenyReason::NotYetValid
        );
        assert_eq!(
            time_window(claims(Some(now + 60), None, Some(now + 31)), now, 30)
                .unwrap_err()
                .reason,
            DenyReason::NotYetValid
        );
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        assert!(time_window(claims(Some(i64::MAX), Some(i64::MIN), None), 0, i64::MAX).is_ok());
        assert_eq!(
            time_window(claims(Some(i64::MIN), None, None), 0, 30)
                .unwrap_err()
                .reason,
            DenyReason::Expired
        );
    }

    #[test]
    fn audience_is_one_of_the_strings_held() {
        let aud = |all: &[&str]| all.iter().map(|&a| Box::from(a)).collect::<Vec<Box<str>>>();
        let expected = "gitlab-ai-gateway";
        assert!(audience(Some(&aud(&["gitlab-ai-gateway"])), expected).is_ok());
        assert!(audience(Some(&aud(&["x", "gitlab-ai-gateway"])), expected).is_ok());
        for other in [&["x"][..], &[], &["gitlab-ai-gateway-x"], &["gitlab-ai"]] {
            assert_eq!(
                audience(Some(&aud(other)), expected).unwrap_err().reason,
                DenyReason::WrongAudience,
                "{other:?}"
            );
        }
        assert_eq!(
            audience(None, expected).unwrap_err().reason,
            DenyReason::WrongAudience
        );
    }

    fn key(kid: Option<&str>, alg: Option<Algorithm>, fingerprint: u64) -> VerifyingKey {
        VerifyingKey {
            kid: kid.map(str::to_string),
            alg,
            key: jsonwebtoken::DecodingKey::from_secret(b"unused"),
            fingerprint,
        }
    }

    fn set(keys: Vec<VerifyingKey>) -> KeySet {
        KeySet::new(keys, crate::keys::KeySource::File, std::time::UNIX_EPOCH)
    }

    #[test]
    fn a_cached_verification_needs_the_same_key_under_its_kid() {
        let rs = Algorithm::RS256;
        let published = set(vec![key(Some("k1"), None, 1), key(Some("k2"), Some(rs), 2)]);
        assert!(would_use_key(&published, Some("k1"), rs, 1));
        assert!(would_use_key(&published, Some("k2"), rs, 2));
        // Another key published under the same kid: the old verification says nothing.
        let replaced = set(vec![key(Some("k1"), None, 9)]);
        assert!(!would_use_key(&replaced, Some("k1"), rs, 1));
        // The same key under another kid is not the key the token names.
        assert!(!would_use_key(&published, Some("k1"), rs, 2));
        assert!(!would_use_key(&published, Some("k3"), rs, 1));
        // The key is now pinned to another algorithm.
        let pinned = set(vec![key(Some("k1"), Some(Algorithm::ES256), 1)]);
        assert!(!would_use_key(&pinned, Some("k1"), rs, 1));
    }

    #[test]
    fn a_kid_less_verification_needs_its_key_among_those_tried() {
        let rs = Algorithm::RS256;
        // The first keys that accept RS256, in order; a key pinned to ES256 is skipped.
        let mut keys = vec![key(None, Some(Algorithm::ES256), 100)];
        keys.extend((1..=6).map(|n| key(None, None, n)));
        let published = set(keys);
        for tried in 1..=4 {
            assert!(would_use_key(&published, None, rs, tried), "key {tried}");
        }
        assert!(
            !would_use_key(&published, None, rs, 5),
            "past the keys tried"
        );
        assert!(!would_use_key(&published, None, rs, 100), "pinned to ES256");
        assert!(would_use_key(&published, None, Algorithm::ES256, 100));
    }
}

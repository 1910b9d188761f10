//! Parsing a JSON Web Key Set (RFC 7517) into a [`KeySet`].
//!
//! This module owns the rules for which published keys we trust: only asymmetric
//! signature keys (RSA of at least 2048 bits, EC P-256 / P-384, OKP Ed25519) whose `use`
//! (when set) is `sig` and whose `key_ops` (when set) include `verify`, never symmetric keys
//! or `none`. A key that breaks a rule is skipped with a warning rather than failing the whole
//! set, because issuers publish keys for other purposes (encryption, other services) next to
//! their signing keys and one odd key must not take the others down. A set that ends up
//! with no usable key at all is an error: an empty key set would turn every token into
//! `unknown_key` while looking healthy.
//!
//! No I/O happens here; `fetch` gets the bytes and hands them over.

use std::collections::HashSet;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::algorithm::parse_algorithm;

use super::{KeySet, KeySource, VerifyingKey};

/// Smallest RSA modulus we accept; smaller keys are factorable in practice.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus we accept; aws-lc refuses to verify with larger ones, and a huge
/// modulus makes every verification slow.
pub const MAX_RSA_BITS: usize = 8192;

/// Bounds on what an issuer may send us, so that a broken or hostile endpoint cannot make
/// us allocate or loop without limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyLimits {
    /// Largest key set (or discovery) document in bytes.
    pub max_document_bytes: usize,
    /// Most entries in a key set's `keys` array.
    pub max_keys: usize,
}

impl Default for KeyLimits {
    fn default() -> Self {
        // Real issuers publish one to three keys in a couple of KiB; these bounds leave
        // ample room for rotation while keeping memory per issuer small.
        Self {
            max_document_bytes: 64 * 1024,
            max_keys: 100,
        }
    }
}

/// A key set that passed the rules, with what was skipped on the way.
#[derive(Clone, Debug)]
pub struct ParsedKeySet {
    /// The usable keys; never empty.
    pub key_set: KeySet,
    /// One sentence per skipped key, for the log.
    pub warnings: Vec<String>,
    /// The accepted keys as a JWKS document (`{"keys": [...]}`), reduced to the members
    /// that matter for verification. Parsing it again yields the same keys, so it is what
    /// a cache file should hold.
    pub accepted_jwks: Value,
}

impl ParsedKeySet {
    /// [`Self::accepted_jwks`] serialized, ready to write to a cache file.
    pub fn accepted_jwks_bytes(&self) -> Vec<u8> {
        // serde_json's default map is sorted, so the same keys always give the same bytes.
        serde_json::to_vec_pretty(&self.accepted_jwks).unwrap_or_default()
    }
}

/// Why a whole key set was rejected.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("key set is larger than the limit of {limit} bytes; real key sets are a few KiB")]
    TooLarge { limit: usize },
    #[error("key set is not valid JSON ({0}); is the URL really a JWKS endpoint?")]
    NotJson(#[source] serde_json::Error),
    #[error("key set has no \"keys\" array; expected a JWKS document like {{\"keys\": [...]}}")]
    NoKeysArray,
    #[error("key set has {count} keys, more than the limit of {limit}")]
    TooManyKeys { count: usize, limit: usize },
    #[error("key set has no usable signing key{}", summarize(.warnings))]
    NoUsableKeys { warnings: Vec<String> },
}

fn summarize(warnings: &[String]) -> String {
    match warnings.len() {
        0 => String::new(),
        n => format!(" ({n} skipped: {})", warnings.join("; ")),
    }
}

/// Parses a JWKS document. Skipped keys come back as warnings; the set fails only when it
/// is malformed as a whole, over a limit, or left with no usable key.
pub fn parse_key_set(
    bytes: &[u8],
    source: KeySource,
    loaded_at: SystemTime,
    limits: &KeyLimits,
) -> Result<ParsedKeySet, JwksError> {
    if bytes.len() > limits.max_document_bytes {
        return Err(JwksError::TooLarge {
            limit: limits.max_document_bytes,
        });
    }
    let document: Value = serde_json::from_slice(bytes).map_err(JwksError::NotJson)?;
    let entries = document
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(JwksError::NoKeysArray)?;
    if entries.len() > limits.max_keys {
        return Err(JwksError::TooManyKeys {
            count: entries.len(),
            limit: limits.max_keys,
        });
    }

    let mut keys = Vec::new();
    let mut accepted = Vec::new();
    let mut warnings = Vec::new();
    let mut seen_kids = HashSet::new();
    for (index, entry) in entries.iter().enumerate() {
        let label = key_label(index, entry);
        match parse_key(entry) {
            Ok(parsed) => {
                if let Some(kid) = &parsed.key.kid
                    && !seen_kids.insert(kid.clone())
                {
                    // Keeping the first is arbitrary but stable; the issuer must fix its set.
                    warnings.push(format!(
                        "{label}: skipped, duplicate kid (the first key with it is used)"
                    ));
                    continue;
                }
                keys.push(parsed.key);
                accepted.push(Value::Object(parsed.jwk));
            }
            Err(reason) => warnings.push(format!("{label}: skipped, {reason}")),
        }
    }

    if keys.is_empty() {
        return Err(JwksError::NoUsableKeys { warnings });
    }
    Ok(ParsedKeySet {
        key_set: KeySet::new(keys, source, loaded_at),
        warnings,
        accepted_jwks: serde_json::json!({ "keys": accepted }),
    })
}

/// `keys[2] (kid "abc")`, with the kid shortened: it comes from the network and ends up
/// in log lines.
fn key_label(index: usize, entry: &Value) -> String {
    match entry.get("kid").and_then(Value::as_str) {
        Some(kid) if kid.chars().count() > 64 => {
            let short: String = kid.chars().take(64).collect();
            format!("keys[{index}] (kid {short:?}…)")
        }
        Some(kid) => format!("keys[{index}] (kid {kid:?})"),
        None => format!("keys[{index}] (no kid)"),
    }
}

struct ParsedKey {
    key: VerifyingKey,
    /// The members that define the key, for the cache document.
    jwk: Map<String, Value>,
}

/// One JWK → a verifying key, or the reason (a phrase) it is skipped.
fn parse_key(entry: &Value) -> Result<ParsedKey, String> {
    let object = entry.as_object().ok_or("it is not a JSON object")?;
    let kid = optional_str(object, "kid")?;
    if let Some(usage) = optional_str(object, "use")?
        && usage != "sig"
    {
        return Err(format!("\"use\" is {usage:?}, not \"sig\""));
    }
    if let Some(ops) = object.get("key_ops") {
        let ops = ops
            .as_array()
            .filter(|ops| ops.iter().all(Value::is_string))
            .ok_or("\"key_ops\" is not an array of strings")?;
        if !ops.iter().any(|op| op == "verify") {
            return Err("\"key_ops\" does not include \"verify\"".into());
        }
    }
    let alg = match optional_str(object, "alg")? {
        None => None,
        Some(name) => Some(parse_algorithm(name).map_err(|why| format!("\"alg\": {why}"))?),
    };
    let kty = required_str(object, "kty")?;

    let (alg, key, fingerprint, members): (_, _, _, &[&str]) = match kty {
        "RSA" => {
            if let Some(alg) = alg
                && !is_rsa_algorithm(alg)
            {
                return Err(format!("\"alg\" {alg:?} does not fit an RSA key"));
            }
            let (key, fingerprint) = rsa_key(object)?;
            (
                alg,
                key,
                fingerprint,
                &["kty", "kid", "use", "key_ops", "alg", "n", "e"],
            )
        }
        "EC" => {
            let (curve_alg, key, fingerprint) = ec_key(object)?;
            if let Some(alg) = alg
                && alg != curve_alg
            {
                return Err(format!("\"alg\" {alg:?} does not fit the key's curve"));
            }
            // The curve fixes the algorithm, so pin it even when the JWK leaves `alg` out.
            (
                Some(curve_alg),
                key,
                fingerprint,
                &["kty", "kid", "use", "key_ops", "alg", "crv", "x", "y"],
            )
        }
        "OKP" => {
            let (key, fingerprint) = ed25519_key(object)?;
            if alg.is_some_and(|alg| alg != Algorithm::EdDSA) {
                return Err("\"alg\" does not fit an Ed25519 key (EdDSA does)".into());
            }
            (
                Some(Algorithm::EdDSA),
                key,
                fingerprint,
                &["kty", "kid", "use", "key_ops", "alg", "crv", "x"],
            )
        }
        "oct" => return Err("symmetric (\"oct\") keys are never accepted".into()),
        other => {
            return Err(format!(
                "key type {other:?} is not supported (RSA, EC and OKP Ed25519 are)"
            ));
        }
    };

    let jwk = members
        .iter()
        .filter_map(|&name| {
            object
                .get(name)
                .map(|value| (name.to_owned(), value.clone()))
        })
        .collect();
    Ok(ParsedKey {
        key: VerifyingKey {
            kid: kid.map(str::to_owned),
            alg,
            key,
            fingerprint,
        },
        jwk,
    })
}

fn optional_str<'a>(object: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, String> {
    match object.get(name) {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(format!("\"{name}\" is not a string")),
    }
}

fn required_str<'a>(object: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    optional_str(object, name)?.ok_or_else(|| format!("\"{name}\" is missing"))
}

fn is_rsa_algorithm(alg: Algorithm) -> bool {
    matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
    )
}

fn base64url_member(object: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let text = required_str(object, name)?;
    // RFC 7518 says unpadded, but some publishers pad; the padding carries no information.
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| format!("\"{name}\" is not base64url"))
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

fn rsa_key(object: &Map<String, Value>) -> Result<(DecodingKey, u64), String> {
    let n = base64url_member(object, "n")?;
    let e = base64url_member(object, "e")?;
    let n = strip_leading_zeros(&n);
    let e = strip_leading_zeros(&e);

    let bits = match n.first() {
        Some(&top) => (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    };
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA modulus has {bits} bits; at least {MIN_RSA_BITS} are required"
        ));
    }
    if bits > MAX_RSA_BITS {
        return Err(format!(
            "RSA modulus has {bits} bits; at most {MAX_RSA_BITS} are supported"
        ));
    }
    // A valid public exponent is odd and at least 3; anything longer than 32 bits is
    // refused by aws-lc at verification time, so it would only fail later and obscurely.
    let exponent_ok = !e.is_empty() && e.len() <= 4 && e[e.len() - 1] & 1 == 1 && e != [1];
    if !exponent_ok {
        return Err("RSA exponent \"e\" is not a valid public exponent".into());
    }

    let fingerprint = fingerprint(&[b"RSA", n, e]);
    Ok((DecodingKey::from_rsa_raw_components(n, e), fingerprint))
}

fn ec_key(object: &Map<String, Value>) -> Result<(Algorithm, DecodingKey, u64), String> {
    let crv = required_str(object, "crv")?;
    let (alg, coordinate_len) = match crv {
        "P-256" => (Algorithm::ES256, 32),
        "P-384" => (Algorithm::ES384, 48),
        other => {
            return Err(format!(
                "EC curve {other:?} is not supported (P-256 and P-384 are)"
            ));
        }
    };
    let x = base64url_member(object, "x")?;
    let y = base64url_member(object, "y")?;
    if x.len() != coordinate_len || y.len() != coordinate_len {
        return Err(format!(
            "EC coordinates must be {coordinate_len} bytes each for {crv}"
        ));
    }
    // jsonwebtoken's aws-lc verifier expects the uncompressed SEC1 point: 0x04 ‖ x ‖ y.
    let mut point = Vec::with_capacity(1 + 2 * coordinate_len);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    // An off-curve point would only fail at verification time; refuse it now.
    if !ec_point_on_curve(alg, &point) {
        return Err(format!("EC point is not on curve {crv}"));
    }
    let fingerprint = fingerprint(&[b"EC", crv.as_bytes(), &x, &y]);
    Ok((alg, DecodingKey::from_ec_der(&point), fingerprint))
}

fn ed25519_key(object: &Map<String, Value>) -> Result<(DecodingKey, u64), String> {
    let crv = required_str(object, "crv")?;
    if crv != "Ed25519" {
        return Err(format!("OKP curve {crv:?} is not supported (Ed25519 is)"));
    }
    let x = base64url_member(object, "x")?;
    if x.len() != 32 {
        return Err("Ed25519 public key \"x\" must be 32 bytes".into());
    }
    // An invalid point would only fail at verification time; refuse it now.
    if !ed25519_point_valid(&x) {
        return Err("Ed25519 public key \"x\" is not a valid point".into());
    }
    let fingerprint = fingerprint(&[b"OKP", crv.as_bytes(), &x]);
    // jsonwebtoken's EdDSA verifier takes the raw 32-byte public key.
    Ok((DecodingKey::from_ed_der(&x), fingerprint))
}

/// Whether an uncompressed SEC1 point lies on the curve of `alg` (ES256 or ES384).
#[cfg(feature = "aws-lc")]
fn ec_point_on_curve(alg: Algorithm, point: &[u8]) -> bool {
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, EcdsaVerificationAlgorithm,
        ParsedPublicKey,
    };
    let verify_alg: &'static EcdsaVerificationAlgorithm = match alg {
        Algorithm::ES256 => &ECDSA_P256_SHA256_FIXED,
        _ => &ECDSA_P384_SHA384_FIXED,
    };
    ParsedPublicKey::new(verify_alg, point).is_ok()
}

/// Whether an uncompressed SEC1 point lies on the curve of `alg` (ES256 or ES384).
#[cfg(all(feature = "rust-crypto", not(feature = "aws-lc")))]
fn ec_point_on_curve(alg: Algorithm, point: &[u8]) -> bool {
    match alg {
        Algorithm::ES256 => p256::PublicKey::from_sec1_bytes(point).is_ok(),
        _ => p384::PublicKey::from_sec1_bytes(point).is_ok(),
    }
}

/// Whether 32 bytes are a valid Ed25519 public point.
#[cfg(feature = "aws-lc")]
fn ed25519_point_valid(x: &[u8]) -> bool {
    use aws_lc_rs::signature::{ED25519, ParsedPublicKey};
    ParsedPublicKey::new(&ED25519, x).is_ok()
}

/// Whether 32 bytes are a valid Ed25519 public point.
#[cfg(all(feature = "rust-crypto", not(feature = "aws-lc")))]
fn ed25519_point_valid(x: &[u8]) -> bool {
    <[u8; 32]>::try_from(x)
        .ok()
        .is_some_and(|bytes| ed25519_dalek::VerifyingKey::from_bytes(&bytes).is_ok())
}

/// First 8 bytes of SHA-256 over the length-prefixed parts, so that a key keeps its
/// fingerprint across refreshes, re-encodings and kid changes.
fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut context = Sha256::new();
    for part in parts {
        context.update((part.len() as u64).to_be_bytes());
        context.update(part);
    }
    let hash = context.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::DevKey;
    use serde_json::json;

    fn test_key(n: usize) -> DevKey {
        let pem = match n {
            1 => include_str!("../../../../tests/fixtures/keys/test-rsa-2048-1.pem"),
            _ => include_str!("../../../../tests/fixtures/keys/test-rsa-2048-2.pem"),
        };
        DevKey::from_pkcs8_pem(pem, format!("test-{n}")).expect("fixture key loads")
    }

    fn small_jwk() -> Value {
        serde_json::from_str(include_str!(
            "../../../../tests/fixtures/keys/test-rsa-1024.public.jwk.json"
        ))
        .expect("fixture JWK parses")
    }

    fn parse(document: &Value) -> Result<ParsedKeySet, JwksError> {
        let bytes = serde_json::to_vec(document).expect("serializes");
        parse_key_set(
            &bytes,
            KeySource::File,
            SystemTime::UNIX_EPOCH,
            &KeyLimits::default(),
        )
    }

    fn with(jwk: Value, changes: Value) -> Value {
        let mut jwk = jwk;
        for (name, value) in changes.as_object().expect("object") {
            if value.is_null() {
                jwk.as_object_mut().expect("object").remove(name);
            } else {
                jwk[name] = value.clone();
            }
        }
        jwk
    }

    #[test]
    fn accepts_rsa_key_and_verifies_a_dev_token() {
        let key = test_key(1);
        let parsed = parse(&DevKey::key_set_json(&[&key])).expect("valid set");
        assert!(parsed.warnings.is_empty());
        let verifying = parsed.key_set.by_kid("test-1").expect("kid present");
        assert_eq!(verifying.alg, Some(Algorithm::RS256));

        let token = key.sign(&json!({"iss": "https://issuer.test", "sub": "x"}));
        let (message, signature) = token.rsplit_once('.').expect("three parts");
        let ok = jsonwebtoken::crypto::verify(
            signature,
            message.as_bytes(),
            &verifying.key,
            Algorithm::RS256,
        );
        assert!(ok.expect("verifier runs"));
        // Another key's signature must not verify.
        let other = test_key(2).sign(&json!({"sub": "x"}));
        let (message, signature) = other.rsplit_once('.').expect("three parts");
        let ok = jsonwebtoken::crypto::verify(
            signature,
            message.as_bytes(),
            &verifying.key,
            Algorithm::RS256,
        );
        assert!(!ok.expect("verifier runs"));
    }

    #[test]
    fn fingerprint_is_stable_and_ignores_kid_and_padding() {
        let jwk = test_key(1).public_jwk();
        let a = parse(&json!({"keys": [jwk.clone()]})).expect("valid");
        let padded_n = format!("{}==", jwk["n"].as_str().expect("n"));
        let b = parse(&json!({"keys": [with(jwk, json!({"kid": "renamed", "n": padded_n}))]}))
            .expect("valid");
        assert_eq!(a.key_set.keys[0].fingerprint, b.key_set.keys[0].fingerprint);
        let c = parse(&DevKey::key_set_json(&[&test_key(2)])).expect("valid");
        assert_ne!(a.key_set.keys[0].fingerprint, c.key_set.keys[0].fingerprint);
    }

    #[test]
    fn skips_bad_keys_with_a_warning_each_and_keeps_good_ones() {
        let good = test_key(1).public_jwk();
        let document = json!({"keys": [
            with(good.clone(), json!({"kid": "enc", "use": "enc"})),
            small_jwk(),
            with(good.clone(), json!({"kid": "hs", "alg": "HS256"})),
            with(good.clone(), json!({"kid": "none", "alg": "none"})),
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AAAA"},
            with(good.clone(), json!({"kid": "enc-ops", "key_ops": ["encrypt"]})),
            with(good.clone(), json!({"kid": "bad-n", "n": "!!not base64!!"})),
            with(good.clone(), json!({"kid": "no-e", "e": null})),
            with(good.clone(), json!({"kid": "even-e", "e": "AQAA"})),
            with(good.clone(), json!({"kid": "es-on-rsa", "alg": "ES256"})),
            with(good.clone(), json!({"kid": 7})),
            "not an object",
            good.clone(),
            with(test_key(2).public_jwk(), json!({"kid": "test-1"})),
        ]});
        let parsed = parse(&document).expect("one good key");
        assert_eq!(parsed.key_set.keys.len(), 1);
        assert_eq!(parsed.warnings.len(), 14, "{:#?}", parsed.warnings);
        let all = parsed.warnings.join("\n");
        for expected in [
            "(kid \"enc\"): skipped, \"use\" is \"enc\"",
            "(kid \"test-rsa-1024\"): skipped, RSA modulus has 1024 bits",
            "(kid \"hs\"): skipped, \"alg\": \"HS256\" is never accepted",
            "(kid \"none\"): skipped, \"alg\": \"none\" is never accepted",
            "symmetric (\"oct\") keys are never accepted",
            "Ed25519 public key \"x\" must be 32 bytes",
            "(kid \"enc-ops\"): skipped, \"key_ops\" does not include \"verify\"",
            "\"n\" is not base64url",
            "\"e\" is missing",
            "RSA exponent \"e\" is not a valid",
            "does not fit an RSA key",
            "\"kid\" is not a string",
            "keys[12] (no kid): skipped, it is not a JSON object",
            "keys[14] (kid \"test-1\"): skipped, duplicate kid",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in\n{all}");
        }
        // The first key with a duplicated kid wins.
        let kept = &parsed.key_set.keys[0];
        let first = parse(&json!({"keys": [good]})).expect("valid");
        assert_eq!(kept.fingerprint, first.key_set.keys[0].fingerprint);
    }

    #[test]
    fn no_usable_key_is_an_error_that_lists_why() {
        let err = parse(&json!({"keys": []})).expect_err("empty set");
        assert_eq!(err.to_string(), "key set has no usable signing key");
        let err = parse(&json!({"keys": [small_jwk()]})).expect_err("only a small key");
        assert!(
            err.to_string().contains(
                "(1 skipped: keys[0] (kid \"test-rsa-1024\"): skipped, RSA modulus has 1024 bits"
            ),
            "{err}"
        );
    }

    #[test]
    fn whole_document_errors() {
        let limits = KeyLimits::default();
        let at = SystemTime::UNIX_EPOCH;
        assert!(matches!(
            parse_key_set(b"<html>", KeySource::Network, at, &limits),
            Err(JwksError::NotJson(_))
        ));
        assert!(matches!(
            parse(&json!({"key": []})),
            Err(JwksError::NoKeysArray)
        ));
        assert!(matches!(parse(&json!([1, 2])), Err(JwksError::NoKeysArray)));
        assert!(matches!(
            parse(&json!({"keys": {}})),
            Err(JwksError::NoKeysArray)
        ));

        let big = vec![b' '; limits.max_document_bytes + 1];
        assert!(matches!(
            parse_key_set(&big, KeySource::Network, at, &limits),
            Err(JwksError::TooLarge { limit: 65536 })
        ));
        let tight = KeyLimits {
            max_keys: 2,
            ..limits
        };
        let jwk = test_key(1).public_jwk();
        let three =
            serde_json::to_vec(&json!({"keys": [jwk.clone(), jwk.clone(), jwk]})).expect("json");
        let err = parse_key_set(&three, KeySource::Network, at, &tight).expect_err("too many");
        assert_eq!(
            err.to_string(),
            "key set has 3 keys, more than the limit of 2"
        );
    }

    #[test]
    fn accepted_jwks_round_trips_without_extra_members() {
        let jwk = with(
            test_key(1).public_jwk(),
            json!({"x5c": ["MIIB..."], "x5t": "abc"}),
        );
        let document = json!({"keys": [jwk, small_jwk()]});
        let parsed = parse(&document).expect("valid");
        let cached = &parsed.accepted_jwks["keys"];
        assert_eq!(cached.as_array().map(Vec::len), Some(1));
        assert!(cached[0].get("x5c").is_none());
        let again = parse_key_set(
            &parsed.accepted_jwks_bytes(),
            KeySource::Cache,
            SystemTime::UNIX_EPOCH,
            &KeyLimits::default(),
        )
        .expect("cache parses");
        assert!(again.warnings.is_empty());
        assert_eq!(
            again.key_set.keys[0].fingerprint,
            parsed.key_set.keys[0].fingerprint
        );
        assert_eq!(again.key_set.keys[0].kid.as_deref(), Some("test-1"));
        assert_eq!(again.key_set.source, KeySource::Cache);
    }

    #[test]
    fn ec_keys_pin_their_curve_algorithm() {
        // A P-256 public key generated for this test; aws-lc checks it lies on the curve.
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .expect("generates");
        let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
        )
        .expect("parses");
        use aws_lc_rs::signature::KeyPair as _;
        let point = pair.public_key().as_ref();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "kid": "ec",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        let parsed = parse(&json!({"keys": [jwk.clone()]})).expect("valid EC key");
        let key = &parsed.key_set.keys[0];
        assert_eq!(key.alg, Some(Algorithm::ES256));

        let message = b"header.claims";
        let signature = pair.sign(&rng, message).expect("signs");
        let signature = URL_SAFE_NO_PAD.encode(signature.as_ref());
        let ok = jsonwebtoken::crypto::verify(&signature, message, &key.key, Algorithm::ES256);
        assert!(ok.expect("verifier runs"));

        let mismatched = with(jwk.clone(), json!({"alg": "ES384"}));
        let mut off_curve = point[1..65].to_vec();
        off_curve[63] ^= 1;
        let off_curve = with(jwk, json!({"y": URL_SAFE_NO_PAD.encode(&off_curve[32..])}));
        let err = parse(&json!({"keys": [mismatched, off_curve]})).expect_err("both skipped");
        let text = err.to_string();
        assert!(text.contains("does not fit the key's curve"), "{text}");
        assert!(text.contains("EC point is not on curve P-256"), "{text}");
    }

    #[test]
    fn ed25519_keys_verify_eddsa_tokens() {
        use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
        let pair = Ed25519KeyPair::generate().expect("key pair");
        let pkcs8 = pair.to_pkcs8().expect("pkcs8");
        let jwk = json!({
            "kty": "OKP", "crv": "Ed25519", "kid": "ed", "use": "sig", "key_ops": ["verify"],
            "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
        });
        let parsed = parse(&json!({"keys": [jwk.clone()]})).expect("valid Ed25519 key");
        let key = &parsed.key_set.keys[0];
        assert_eq!(key.alg, Some(Algorithm::EdDSA));
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::EdDSA),
            &json!({"sub": "x"}),
            &jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref()),
        )
        .expect("signed");
        let (message, signature) = token.rsplit_once('.').unwrap();
        assert!(
            jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key.key, Algorithm::EdDSA)
                .unwrap()
        );
        let tampered = format!("{message}x");
        assert!(
            !jsonwebtoken::crypto::verify(
                signature,
                tampered.as_bytes(),
                &key.key,
                Algorithm::EdDSA
            )
            .unwrap_or(false)
        );
        // Another curve, a wrong `alg` and a short key are skipped with the reason.
        for (changes, reason) in [
            (
                json!({"crv": "X25519"}),
                "OKP curve \"X25519\" is not supported",
            ),
            (json!({"alg": "RS256"}), "does not fit an Ed25519 key"),
            (json!({"x": "AAAA"}), "must be 32 bytes"),
            (json!({"key_ops": ["sign"]}), "does not include \"verify\""),
            (
                json!({"key_ops": "verify"}),
                "\"key_ops\" is not an array of strings",
            ),
        ] {
            let err = parse(&json!({"keys": [with(jwk.clone(), changes)]})).expect_err(reason);
            assert!(err.to_string().contains(reason), "{err}");
        }
    }
}

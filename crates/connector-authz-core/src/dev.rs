//! The development and test signing key: an RSA key pair that signs RS256 tokens the way
//! a GitLab issuer does, and publishes its public half as a JWK.
//!
//! It exists for `serve --dev`, `mint` and the tests. Nothing in the request path signs
//! anything; production only ever verifies.

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

/// What went wrong making, reading or using a development key.
#[derive(Debug, thiserror::Error)]
pub enum DevKeyError {
    #[error("could not generate an RSA key pair")]
    Generate,
    #[error(
        "this PEM holds a PKCS#1 \"RSA PRIVATE KEY\"; convert it with \
         `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8.pem` and use that"
    )]
    Pkcs1Pem,
    #[error(
        "no \"-----BEGIN PRIVATE KEY-----\" block found; expected an unencrypted PKCS#8 PEM file"
    )]
    NoPem,
    #[error("the PEM block is not valid base64")]
    PemBase64,
    #[error("not an RSA private key of 2048 to 8192 bits in PKCS#8 form: {0}")]
    Rejected(String),
    #[error("could not encode the key as PKCS#8")]
    Encode,
    #[error("could not sign the token")]
    Sign,
}

/// An RSA signing key with its `kid`.
pub struct DevKey {
    kid: String,
    pair: KeyPair,
    /// Base64url of the public modulus and exponent, computed once for [`Self::public_jwk`].
    n: String,
    e: String,
}

impl std::fmt::Debug for DevKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl DevKey {
    /// A fresh RSA-2048 key. Takes a noticeable moment in debug builds; tests should
    /// prefer the fixed keys under `tests/fixtures/keys/`.
    pub fn generate(kid: impl Into<String>) -> Result<Self, DevKeyError> {
        let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|_| DevKeyError::Generate)?;
        Ok(Self::from_pair(pair, kid.into()))
    }

    /// Reads an unencrypted PKCS#8 DER private key.
    pub fn from_pkcs8_der(der: &[u8], kid: impl Into<String>) -> Result<Self, DevKeyError> {
        let pair = KeyPair::from_pkcs8(der).map_err(|e| DevKeyError::Rejected(e.to_string()))?;
        Ok(Self::from_pair(pair, kid.into()))
    }

    /// Reads an unencrypted PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`), the
    /// format of [`Self::to_pkcs8_pem`] and of `openssl genpkey`.
    pub fn from_pkcs8_pem(pem: &str, kid: impl Into<String>) -> Result<Self, DevKeyError> {
        Self::from_pkcs8_der(&pem_decode(pem)?, kid)
    }

    /// The private key as PKCS#8 PEM, so that `mint --key FILE` can reuse it.
    pub fn to_pkcs8_pem(&self) -> Result<String, DevKeyError> {
        let der = self.pair.as_der().map_err(|_| DevKeyError::Encode)?;
        Ok(pem_encode(der.as_ref()))
    }

    fn from_pair(pair: KeyPair, kid: String) -> Self {
        let public = pair.public_key();
        let n = URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero());
        let e = URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero());
        Self { kid, pair, n, e }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK, shaped like the keys GitLab.com and CustomersDot publish.
    pub fn public_jwk(&self) -> Value {
        json!({
            "kty": "RSA",
            "kid": self.kid,
            "use": "sig",
            "alg": "RS256",
            "n": self.n,
            "e": self.e,
        })
    }

    /// A JWKS document (`{"keys": [...]}`) publishing these keys.
    pub fn key_set_json(keys: &[&DevKey]) -> Value {
        json!({ "keys": keys.iter().map(|key| key.public_jwk()).collect::<Vec<_>>() })
    }

    /// These keys as the key set an issuer holds once [`Self::key_set_json`] is parsed, as
    /// fetched from `source` at `loaded_at`.
    ///
    /// # Panics
    /// Never for keys made here: their JWKS is always a valid key set.
    pub fn key_set(
        keys: &[&DevKey],
        source: crate::keys::KeySource,
        loaded_at: std::time::SystemTime,
    ) -> crate::keys::KeySet {
        let jwks = Self::key_set_json(keys).to_string();
        crate::keys::jwks::parse_key_set(
            jwks.as_bytes(),
            source,
            loaded_at,
            &crate::keys::jwks::KeyLimits::default(),
        )
        .expect("a dev key's JWKS is a valid key set")
        .key_set
    }

    /// An RS256 JWT with header `{"alg":"RS256","typ":"JWT","kid":<kid>}`.
    ///
    /// # Panics
    /// Only if aws-lc fails to sign with a key it has already validated; see
    /// [`Self::try_sign_with_header`] for the fallible form.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        self.sign_with_header(&header, claims)
    }

    /// Like [`Self::sign`] with a header of the caller's choosing, for tests that forge
    /// headers (another `alg`, a wrong `kid`). The signature is always RS256.
    ///
    /// # Panics
    /// As [`Self::sign`].
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        self.try_sign_with_header(header, claims)
            .expect("RSA signing with an already validated key does not fail")
    }

    /// The fallible form of [`Self::sign_with_header`].
    pub fn try_sign_with_header(
        &self,
        header: &Value,
        claims: &Value,
    ) -> Result<String, DevKeyError> {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.pair.public_modulus_len()];
        let rng = aws_lc_rs::rand::SystemRandom::new();
        self.pair
            .sign(&RSA_PKCS1_SHA256, &rng, message.as_bytes(), &mut signature)
            .map_err(|_| DevKeyError::Sign)?;
        Ok(format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

fn pem_encode(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut pem = String::with_capacity(body.len() + body.len() / 64 + 64);
    pem.push_str(PEM_BEGIN);
    pem.push('\n');
    // RFC 7468: lines of 64 characters. Base64 output is ASCII, so byte chunks are chars.
    for line in body.as_bytes().chunks(64) {
        pem.extend(line.iter().map(|&b| char::from(b)));
        pem.push('\n');
    }
    pem.push_str(PEM_END);
    pem.push('\n');
    pem
}

fn pem_decode(pem: &str) -> Result<Vec<u8>, DevKeyError> {
    if pem.contains("-----BEGIN RSA PRIVATE KEY-----") {
        return Err(DevKeyError::Pkcs1Pem);
    }
    let start = pem.find(PEM_BEGIN).ok_or(DevKeyError::NoPem)? + PEM_BEGIN.len();
    let end = pem[start..].find(PEM_END).ok_or(DevKeyError::NoPem)? + start;
    let body: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    STANDARD.decode(body).map_err(|_| DevKeyError::PemBase64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeySource;
    use crate::keys::jwks::{KeyLimits, parse_key_set};
    use jsonwebtoken::Algorithm;
    use std::time::SystemTime;

    const FIXTURE: &str = include_str!("../../../tests/fixtures/keys/test-rsa-2048-1.pem");

    fn verifies(token: &str, key: &DevKey) -> bool {
        let jwks = serde_json::to_vec(&DevKey::key_set_json(&[key])).expect("json");
        let parsed = parse_key_set(
            &jwks,
            KeySource::Dev,
            SystemTime::UNIX_EPOCH,
            &KeyLimits::default(),
        )
        .expect("dev key set parses");
        let (message, signature) = token.rsplit_once('.').expect("three parts");
        jsonwebtoken::crypto::verify(
            signature,
            message.as_bytes(),
            &parsed.key_set.keys[0].key,
            Algorithm::RS256,
        )
        .expect("verifier runs")
    }

    #[test]
    fn signed_token_verifies_with_the_published_jwk() {
        let key = DevKey::from_pkcs8_pem(FIXTURE, "dev-1").expect("fixture loads");
        let claims = json!({"iss": "https://issuer.test", "scopes": ["duo_chat"]});
        let token = key.sign(&claims);
        assert!(verifies(&token, &key));

        let header = jsonwebtoken::decode_header(&token).expect("header parses");
        assert_eq!(header.alg, Algorithm::RS256);
        assert_eq!(header.kid.as_deref(), Some("dev-1"));
        assert_eq!(header.typ.as_deref(), Some("JWT"));

        // Tampering with the claims breaks the signature.
        let (_, rest) = token.split_once('.').expect("parts");
        let (_, signature) = rest.split_once('.').expect("parts");
        let forged_claims = URL_SAFE_NO_PAD.encode(json!({"iss": "https://evil.test"}).to_string());
        let forged = format!(
            "{}.{forged_claims}.{signature}",
            token.split('.').next().unwrap_or_default()
        );
        assert!(!verifies(&forged, &key));
    }

    #[test]
    fn sign_with_header_keeps_the_forged_header() {
        let key = DevKey::from_pkcs8_pem(FIXTURE, "dev-1").expect("fixture loads");
        let token = key.sign_with_header(&json!({"alg": "HS256", "kid": "other"}), &json!({}));
        let header = jsonwebtoken::decode_header(&token).expect("header parses");
        assert_eq!(header.alg, Algorithm::HS256);
        assert_eq!(header.kid.as_deref(), Some("other"));
    }

    #[test]
    fn pem_round_trip_keeps_the_key() {
        let key = DevKey::from_pkcs8_pem(FIXTURE, "a").expect("fixture loads");
        let pem = key.to_pkcs8_pem().expect("encodes");
        assert!(pem.starts_with(PEM_BEGIN));
        assert!(pem.lines().all(|line| line.len() <= 64));
        let again = DevKey::from_pkcs8_pem(&pem, "b").expect("reloads");
        assert_eq!(key.public_jwk()["n"], again.public_jwk()["n"]);
        assert!(verifies(&again.sign(&json!({})), &key));
    }

    #[test]
    fn generated_key_signs() {
        let key = DevKey::generate("fresh").expect("generates");
        assert_eq!(key.kid(), "fresh");
        assert!(verifies(&key.sign(&json!({"sub": "1"})), &key));
    }

    #[test]
    fn bad_pem_says_what_is_wrong() {
        assert!(matches!(
            DevKey::from_pkcs8_pem("hello", "k"),
            Err(DevKeyError::NoPem)
        ));
        let pkcs1 = "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert!(matches!(
            DevKey::from_pkcs8_pem(pkcs1, "k"),
            Err(DevKeyError::Pkcs1Pem)
        ));
        let garbage = format!("{PEM_BEGIN}\n!!!!\n{PEM_END}\n");
        assert!(matches!(
            DevKey::from_pkcs8_pem(&garbage, "k"),
            Err(DevKeyError::PemBase64)
        ));
        let not_a_key = format!("{PEM_BEGIN}\nAAAA\n{PEM_END}\n");
        assert!(matches!(
            DevKey::from_pkcs8_pem(&not_a_key, "k"),
            Err(DevKeyError::Rejected(_))
        ));
    }
}

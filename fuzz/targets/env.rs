//! The fixed world the `decide` target and the adversarial corpus run in: three issuers
//! with the fixed test keys, one issuer without keys, the AI gateway routes, and a clock
//! stopped at [`NOW`] so that committed seed tokens never expire.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rsa::KeyPair;
use aws_lc_rs::signature::{
    KeyPair as _, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256, RsaPublicKeyComponents,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use connector_authz::config::Config;
use connector_authz::decide::Snapshot;
use connector_authz::keys::jwks::{KeyLimits, parse_key_set};
use connector_authz::keys::{KeySnapshot, KeySource};
use serde_json::{Value, json};

/// The fuzz clock: 2030-03-17. Seed tokens are minted around it.
pub const NOW: u64 = 1_900_000_000;
pub const AUDIENCE: &str = "gitlab-ai-gateway";
/// Keys: test key 1 as `test-key-1` and as `shared`.
pub const ISSUER_A: &str = "https://issuer-a.test";
/// Keys: test key 2 as `test-key-2` and as `shared` (same kid, other key than A's).
pub const ISSUER_B: &str = "https://issuer-b.test";
/// Configured, but its keys never load: `keys_unavailable`.
pub const ISSUER_DOWN: &str = "https://issuer-down.test";
/// The backend's own issuer (user tokens): test key 3 as `test-key-3`.
pub const USER_ISSUER: &str = AUDIENCE;
pub const INSTANCE: &str = "test-instance-id";
/// The leeway of the configuration below (its default).
pub const LEEWAY: u64 = 30;
pub const MAX_TOKEN_BYTES: usize = 8192;
pub const CODE_PATH: &str = "/ai/v2/code/completions";
pub const PROXY_PATH: &str = "/ai/v1/proxy/vertex-ai";
pub const PUBLIC_PREFIX: &str = "/ai/monitoring/";

const FIXTURES: [&str; 3] = [
    include_str!("../../tests/fixtures/keys/test-rsa-2048-1.pem"),
    include_str!("../../tests/fixtures/keys/test-rsa-2048-2.pem"),
    include_str!("../../tests/fixtures/keys/test-rsa-2048-3.pem"),
];

/// An RSA test key that signs arbitrary header and payload text (so a test can write
/// duplicate JSON members), and verifies independently of the code under test.
pub struct Signer {
    pub kid: String,
    pair: KeyPair,
    n: Vec<u8>,
    e: Vec<u8>,
}

impl Signer {
    /// Fixed test key `n` (1..=3) under `kid`.
    pub fn fixture(n: usize, kid: &str) -> Signer {
        let pem = FIXTURES[n - 1];
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(body).expect("fixture PEM is base64");
        let pair = KeyPair::from_pkcs8(&der).expect("fixture is an RSA PKCS#8 key");
        let public = pair.public_key();
        let n = public.modulus().big_endian_without_leading_zero().to_vec();
        let e = public.exponent().big_endian_without_leading_zero().to_vec();
        Signer {
            kid: kid.to_string(),
            pair,
            n,
            e,
        }
    }

    /// `base64url(header).base64url(payload).base64url(RS256 signature)`, texts as given.
    pub fn sign_raw(&self, header: &str, payload: &str) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(self.signature(&input)))
    }

    /// RS256 over `input` as it is (already base64url segments, or anything else).
    pub fn signature(&self, input: &str) -> Vec<u8> {
        let mut signature = vec![0; self.pair.public_modulus_len()];
        let rng = aws_lc_rs::rand::SystemRandom::new();
        self.pair
            .sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut signature)
            .expect("signing with a fixture key works");
        signature
    }

    /// A token with `{"alg":"RS256","typ":"JWT","kid":<kid>}` over `claims`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(
            &json!({"alg": "RS256", "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        self.sign_raw(&header.to_string(), &claims.to_string())
    }

    pub fn public_jwk(&self) -> Value {
        json!({
            "kty": "RSA",
            "kid": self.kid,
            "use": "sig",
            "alg": "RS256",
            "n": URL_SAFE_NO_PAD.encode(&self.n),
            "e": URL_SAFE_NO_PAD.encode(&self.e),
        })
    }

    /// The public key as X.509 SubjectPublicKeyInfo DER.
    pub fn public_spki_der(&self) -> Vec<u8> {
        let components = RsaPublicKeyComponents {
            n: &self.n[..],
            e: &self.e[..],
        };
        components
            .as_der()
            .expect("public key encodes")
            .as_ref()
            .to_vec()
    }

    /// The public key as PEM text, the way an attacker would find it published.
    pub fn public_pem(&self) -> String {
        let body = STANDARD.encode(self.public_spki_der());
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }

    /// The modulus as the JWK's `n` text.
    pub fn jwk_n(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.n)
    }

    /// Does `signature` verify `input` under this key (RS256)? Independent of the crate.
    pub fn verifies(&self, input: &[u8], signature: &[u8]) -> bool {
        RsaPublicKeyComponents {
            n: &self.n[..],
            e: &self.e[..],
        }
        .verify(&RSA_PKCS1_2048_8192_SHA256, input, signature)
        .is_ok()
    }
}

/// The configuration of the fixed world. `jwks_dir` holds `a.json`, `b.json`,
/// `down.json` and `user.json` (only read by a real server, see [`jwks_files`]).
pub fn config_yaml(jwks_dir: &Path, registry: &Path) -> String {
    let file = |name: &str| jwks_dir.join(name).display().to_string();
    format!(
        "listen: {{grpc: 127.0.0.1:0, admin: 127.0.0.1:0}}
issuers:
  - url: {ISSUER_A}
    jwks_file: {a}
  - url: {ISSUER_B}
    jwks_file: {b}
  - url: {ISSUER_DOWN}
    jwks_file: {down}
  - url: {USER_ISSUER}
    jwks_file: {user}
tokens:
  algorithms: [RS256]
  max_bytes: {MAX_TOKEN_BYTES}
unit_primitives: {registry}
enforce_min_version: true
backends:
  - name: ai_gateway
    backend_service: ai_gateway
    routes:
      - prefix: /ai/v2/code/
        require: [complete_code]
      - path: /ai/v1/chat/agent
        methods: [POST]
        require: [duo_chat]
      - prefix: /ai/v1/proxy/
        unit_primitive_header: x-gitlab-unit-primitive
      - path: /ai/v1/models/m:generate
        require: [duo_chat]
      - prefix: /ai/v1/
        require: [complete_code]
      - path: /ai/v2/settings
        methods: [GET]
        require: [duo_chat]
      - prefix: /ai/v2/
        require: [complete_code]
      - prefix: {PUBLIC_PREFIX}
        public: true
",
        a = file("a.json"),
        b = file("b.json"),
        down = file("down.json"),
        user = file("user.json"),
        registry = registry.display(),
    )
}

/// The four key files of [`config_yaml`]: `down.json` is not a key set, so that issuer
/// stays without keys.
pub fn jwks_files(keys: &Keys) -> Vec<(&'static str, String)> {
    vec![
        ("a.json", keys.issuer_a_jwks().to_string()),
        ("b.json", keys.issuer_b_jwks().to_string()),
        ("down.json", "<html>502 Bad Gateway</html>".to_string()),
        ("user.json", keys.user_jwks().to_string()),
    ]
}

/// Every key of the fixed world, by role.
pub struct Keys {
    /// Test key 1 as `test-key-1`: issuer A.
    pub a: Signer,
    /// Test key 1 as `shared`: issuer A.
    pub a_shared: Signer,
    /// Test key 2 as `test-key-2`: issuer B.
    pub b: Signer,
    /// Test key 2 as `shared`: issuer B.
    pub b_shared: Signer,
    /// Test key 3 as `test-key-3`: the user issuer; an attacker's key to A and B.
    pub user: Signer,
}

impl Keys {
    pub fn new() -> Keys {
        Keys {
            a: Signer::fixture(1, "test-key-1"),
            a_shared: Signer::fixture(1, "shared"),
            b: Signer::fixture(2, "test-key-2"),
            b_shared: Signer::fixture(2, "shared"),
            user: Signer::fixture(3, "test-key-3"),
        }
    }

    pub fn issuer_a_jwks(&self) -> Value {
        json!({"keys": [self.a.public_jwk(), self.a_shared.public_jwk()]})
    }

    pub fn issuer_b_jwks(&self) -> Value {
        json!({"keys": [self.b.public_jwk(), self.b_shared.public_jwk()]})
    }

    pub fn user_jwks(&self) -> Value {
        json!({"keys": [self.user.public_jwk()]})
    }

    /// The issuer whose key set holds the key that verifies `input`/`signature`, if any.
    pub fn issuer_that_verifies(&self, input: &[u8], signature: &[u8]) -> Option<&'static str> {
        if self.a.verifies(input, signature) {
            Some(ISSUER_A)
        } else if self.b.verifies(input, signature) {
            Some(ISSUER_B)
        } else if self.user.verifies(input, signature) {
            Some(USER_ISSUER)
        } else {
            None
        }
    }
}

/// The fixed world: keys, and the snapshot `decide` reads.
pub struct Env {
    pub keys: Keys,
    pub snapshot: Snapshot,
    pub registry: PathBuf,
}

impl Env {
    /// `root` is the repository (for the shipped unit primitive registry).
    pub fn new(root: &Path) -> Env {
        let keys = Keys::new();
        let registry = root.join("config/cloud_connector");
        let yaml = config_yaml(Path::new("/nonexistent/connector-authz-keys"), &registry);
        let config = Config::from_yaml(&yaml, &root.join("fuzz/env.yaml"))
            .unwrap_or_else(|e| panic!("the fixed configuration loads: {e}"));
        let loaded_at = UNIX_EPOCH + Duration::from_secs(NOW);
        let mut key_snapshot = KeySnapshot::default();
        for (issuer, jwks) in [
            (ISSUER_A, keys.issuer_a_jwks()),
            (ISSUER_B, keys.issuer_b_jwks()),
            (USER_ISSUER, keys.user_jwks()),
        ] {
            let parsed = parse_key_set(
                jwks.to_string().as_bytes(),
                KeySource::File,
                loaded_at,
                &KeyLimits::default(),
            )
            .expect("the fixed key sets parse");
            key_snapshot = key_snapshot.with_issuer(issuer.into(), Arc::new(parsed.key_set));
        }
        Env {
            keys,
            snapshot: Snapshot::new(Arc::new(config), Arc::new(key_snapshot)),
            registry,
        }
    }

    pub fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new()
    }
}

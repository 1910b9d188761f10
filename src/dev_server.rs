//! `serve --dev`: a sidecar that runs with no files and no network. It makes an
//! ephemeral development signing key, writes its public key set, private key and the
//! shipped unit primitive registry to a fresh temporary directory, loads the embedded
//! template `src/dev_server/dev.yaml.template` against them, and mints a ready-to-use token
//! that carries the claims a GitLab instance's token carries.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::config::{Config, ConfigError};
use crate::dev::DevKey;

const DEV_CONFIG: &str = include_str!("dev_server/dev.yaml.template");
const EMBEDDED_REGISTRY: &[(&str, &str)] =
    include!(concat!(env!("OUT_DIR"), "/embedded_registry.rs"));

/// The dev issuer's name, as its tokens' `iss`.
pub const DEV_ISSUER: &str = "connector-authz-dev";
/// The instance id the dev token is minted for; requests send it as `X-Gitlab-Instance-Id`.
pub const DEV_INSTANCE: &str = "dev-instance";
/// The realm the dev token claims; requests send it as `X-Gitlab-Realm`.
pub const DEV_REALM: &str = "self-managed";
const DEV_KID: &str = "dev-1";
const DEV_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What `serve --dev` prepared: the configuration to serve and what to tell the user.
pub struct DevSetup {
    pub config: Config,
    pub dir: PathBuf,
    pub key_file: PathBuf,
    pub token: String,
    pub scopes: Vec<&'static str>,
}

pub fn prepare() -> anyhow::Result<DevSetup> {
    let dir = std::env::temp_dir().join(format!("connector-authz-dev-{}", std::process::id()));
    prepare_in(&dir)
}

pub fn prepare_in(dir: &Path) -> anyhow::Result<DevSetup> {
    std::fs::create_dir_all(dir)?;
    let key = DevKey::generate(DEV_KID)?;
    let key_file = dir.join("dev-key.pem");
    write_private(&key_file, key.to_pkcs8_pem()?.as_bytes())?;
    std::fs::write(
        dir.join("jwks.json"),
        serde_json::to_vec_pretty(&DevKey::key_set_json(&[&key]))?,
    )?;
    for (relative, contents) in EMBEDDED_REGISTRY {
        let path = dir.join("cloud_connector").join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, contents)?;
    }
    let text = DEV_CONFIG.replace("${DEV_DIR}", &dir.display().to_string());
    std::fs::write(dir.join("dev.yaml"), &text)?;
    let config = Config::from_yaml(&text, &dir.join("dev.yaml")).map_err(|e: ConfigError| {
        anyhow::anyhow!("the embedded dev configuration is invalid: {e}")
    })?;
    let scopes = vec![
        "complete_code",
        "generate_code",
        "duo_chat",
        "documentation_search",
        "include_file_context",
    ];
    let audience = config.backends[0].audience.to_string();
    let token = key.sign(&dev_claims(&audience, &scopes, SystemTime::now()));
    Ok(DevSetup {
        config,
        dir: dir.to_path_buf(),
        key_file,
        token,
        scopes,
    })
}

fn dev_claims(audience: &str, scopes: &[&str], now: SystemTime) -> serde_json::Value {
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    json!({
        "iss": DEV_ISSUER,
        "sub": DEV_INSTANCE,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + DEV_TOKEN_LIFETIME.as_secs(),
        "jti": format!("dev-{now}"),
        "scopes": scopes,
        "gitlab_realm": DEV_REALM,
        "gitlab_instance_id": DEV_INSTANCE,
    })
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(contents)
    }
    #[cfg(not(unix))]
    {
        std::fs::write(path, contents)
    }
}

/// The headers a GitLab instance sends with every Cloud Connector request, for the dev token.
pub const DEV_INSTANCE_HEADERS: [(&str, &str); 3] = [
    ("x-gitlab-instance-id", DEV_INSTANCE),
    ("x-gitlab-realm", DEV_REALM),
    ("x-gitlab-authentication-type", "oidc"),
];

/// [`DEV_INSTANCE_HEADERS`] as `check` arguments.
fn instance_header_args() -> String {
    DEV_INSTANCE_HEADERS
        .iter()
        .map(|(k, v)| format!("--header {k}:{v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl DevSetup {
    /// The banner `serve --dev` prints: the token and the commands to try it.
    pub fn banner(&self) -> String {
        let grpc = self.config.listen.grpc;
        let exe = "connector-authz";
        format!(
            "connector-authz dev mode\n\
             \x20 issuer {DEV_ISSUER} (ephemeral key in {dir}), config {dir}/dev.yaml\n\
             \x20 gRPC ext_authz on {grpc}, admin on {admin}\n\
             \x20 dev token: 24h, instance {DEV_INSTANCE}, scopes {scopes}\n\n\
             export TOKEN={token}\n\n\
             Try it (allowed, then denied for a unit primitive the token lacks):\n\
             \x20 {exe} check --grpc {grpc} --method POST --path /ai/v2/code/completions \\\n\
             \x20     {headers} --token \"$TOKEN\"\n\
             \x20 {exe} check --grpc {grpc} --method POST --path /ai/v1/proxy/vertex-ai \\\n\
             \x20     {headers} --header x-gitlab-unit-primitive:explain_vulnerability --token \"$TOKEN\"\n\
             Mint another token:\n\
             \x20 {exe} mint --key {key} --kid {DEV_KID} --iss {DEV_ISSUER} --aud {aud} --sub {DEV_INSTANCE} --scopes duo_chat \\\n\
             \x20     --claim gitlab_realm={DEV_REALM} --claim gitlab_instance_id={DEV_INSTANCE}\n",
            dir = self.dir.display(),
            admin = self.config.listen.admin,
            scopes = self.scopes.join(","),
            token = self.token,
            key = self.key_file.display(),
            aud = self.config.backends[0].audience,
            headers = instance_header_args(),
        )
    }
}

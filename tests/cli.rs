//! The binary as a person runs it: `serve --dev` answering Checks on the embedded default,
//! `check-config`'s table and errors, and `mint` + `check` against `serve --config`.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use connector_authz::dev::DevKey;
use support::test_key;

const BIN: &str = env!("CARGO_BIN_EXE_connector-authz");
const WAIT: Duration = Duration::from_secs(20);

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// A child process that is stopped (SIGTERM, then kill) when dropped.
struct Sidecar(Child);

impl Sidecar {
    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.0.try_wait().expect("wait on the sidecar") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the sidecar did not stop within {WAIT:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `/readyz` answers 200 (a plain HTTP/1.1 GET: no client to install).
fn wait_ready(admin: SocketAddr) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + WAIT;
    loop {
        let status = std::net::TcpStream::connect(admin).ok().and_then(|mut s| {
            s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head).ok()?;
            Some(head)
        });
        if status.is_some_and(|head| head.ends_with(b" 200")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "http://{admin}/readyz did not answer 200 within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn serve_dev_answers_checks_on_the_embedded_default() {
    let (grpc, admin) = (free_addr(), free_addr());
    let logs = tempfile::NamedTempFile::new().expect("a log file");
    let child = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--grpc",
            &grpc.to_string(),
            "--admin",
            &admin.to_string(),
            "--shutdown-delay",
            "0s",
        ])
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(logs.reopen().expect("reopen the log file"))
        .spawn()
        .expect("serve --dev starts");
    let mut sidecar = Sidecar(child);
    let stdout = sidecar.0.stdout.take().unwrap();
    let banner: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .take_while(|l| !l.starts_with("Mint another token"))
        .collect();
    let token = banner
        .iter()
        .find_map(|l| l.strip_prefix("export TOKEN="))
        .expect("the banner prints the dev token")
        .to_string();
    let dir = banner
        .iter()
        .find_map(|l| l.split("ephemeral key in ").nth(1))
        .and_then(|rest| rest.split(')').next())
        .expect("the banner names its directory")
        .to_string();
    assert!(
        banner
            .iter()
            .any(|l| l.contains(&format!("check --grpc {grpc}"))),
        "{banner:?}"
    );
    wait_ready(admin);

    let grpc_arg = grpc.to_string();
    let check = |extra: &[&str]| {
        let mut args = vec![
            "check",
            "--grpc",
            &grpc_arg,
            "--method",
            "POST",
            "--header",
            "x-gitlab-instance-id:dev-instance",
            "--header",
            "x-gitlab-realm:self-managed",
            "--header",
            "x-gitlab-authentication-type:oidc",
            "--token",
            &token,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let allowed = check(&["--path", "/ai/v2/code/completions"]);
    assert_eq!(allowed.status.code(), Some(0), "{}", text(&allowed.stdout));
    assert!(text(&allowed.stdout).starts_with("allow"));
    let denied = check(&[
        "--path",
        "/ai/v1/proxy/vertex-ai",
        "--header",
        "x-gitlab-unit-primitive:explain_vulnerability",
    ]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        text(&denied.stdout).contains("\"error\":\"insufficient_scope\""),
        "{}",
        text(&denied.stdout)
    );

    assert!(sidecar.terminate().success());
    assert!(
        !Path::new(&dir).exists(),
        "serve --dev must remove {dir} (it holds the dev private key)"
    );
    // stderr is a file, not a terminal: text logs without colour codes (what `kubectl logs`
    // would otherwise show as `[2m…[32m INFO`).
    let logged = std::fs::read_to_string(logs.path()).expect("read the log file");
    assert!(logged.contains("connector-authz is serving"), "{logged}");
    assert!(logged.contains(" INFO "), "{logged}");
    assert!(
        !logged.contains('\x1b'),
        "colour codes in the logs: {logged:?}"
    );
}

fn write_config(dir: &Path, extra_route: &str) -> std::path::PathBuf {
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, DevKey::key_set_json(&[&test_key(1)]).to_string()).unwrap();
    let registry = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cloud_connector");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "issuers:
  - url: https://issuer.test
    jwks_file: {}
unit_primitives: {}
backends:
  - name: ai_gateway
    backend_service: ai_gateway
    routes:
      - path: /ai/v2/code/completions
        methods: [POST]
        require: [complete_code]
      - prefix: /ai/monitoring/
        public: true
{extra_route}",
            jwks.display(),
            registry.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn check_config_prints_what_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let out = run(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains("valid: 1 issuer(s), 1 backend(s), 2 route(s)"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("path /ai/v2/code/completions"))
        .expect("a row per route");
    for cell in [
        "POST",
        "ai_gateway (gitlab-ai-gateway)",
        "complete_code",
        "2024-02-15T00:00:00+00:00",
        "17.3.0",
    ] {
        assert!(row.contains(cell), "{cell} missing in {row}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("prefix /ai/monitoring/") && l.contains("public")),
        "{table}"
    );
}

#[test]
fn check_config_reads_each_jwks_file_and_names_key_sources_in_words() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(
        dir.path().join("keys/good.json"),
        DevKey::key_set_json(&[&test_key(1), &test_key(2)]).to_string(),
    )
    .unwrap();
    let write = |issuers: &str| {
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "issuers:\n{issuers}backends:\n  - name: svc\n    audience: svc\n    routes: [{{prefix: /, require: []}}]\n"
            ),
        )
        .unwrap();
        run(&["check-config", "--config", config.to_str().unwrap()])
    };

    let good = write(
        "  - url: https://issuer.test\n    jwks_file: keys/good.json\n  - url: https://gitlab.com\n    jwks_uri: https://gitlab.com/oauth/discovery/keys\n  - url: https://customers.gitlab.com\n",
    );
    assert_eq!(good.status.code(), Some(0), "{}", text(&good.stderr));
    let out = text(&good.stdout);
    assert!(
        out.contains("2 usable key(s) (test-key-1, test-key-2)"),
        "{out}"
    );
    assert!(
        out.contains("keys from jwks_uri https://gitlab.com/oauth/discovery/keys"),
        "{out}"
    );
    assert!(
        out.contains(
            "keys from OIDC discovery (https://customers.gitlab.com/.well-known/openid-configuration"
        ),
        "{out}"
    );
    assert!(
        !out.contains("JwksUri(") && !out.contains("JwksFile("),
        "{out}"
    );
    assert!(
        out.contains("FREE UNTIL: the registry's cut_off_date"),
        "{out}"
    );

    // Missing: serve would never be ready, so check-config fails, with both paths.
    let missing = write("  - url: https://issuer.test\n    jwks_file: keys/missing.json\n");
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing.stdout));
    let err = text(&missing.stderr);
    let resolved = dir.path().join("keys/missing.json");
    assert!(
        err.contains("jwks_file keys/missing.json (resolved to")
            && err.contains(&resolved.display().to_string()),
        "{err}"
    );
    assert!(err.contains("never be ready"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // Readable, but not a key set serve could use.
    std::fs::write(dir.path().join("keys/empty.json"), r#"{"keys": []}"#).unwrap();
    let unusable = write("  - url: https://issuer.test\n    jwks_file: keys/empty.json\n");
    assert_eq!(unusable.status.code(), Some(2));
    assert!(
        text(&unusable.stderr).contains("no usable signing key"),
        "{}",
        text(&unusable.stderr)
    );
    std::fs::write(dir.path().join("keys/html.json"), "<html>").unwrap();
    let not_json = write("  - url: https://issuer.test\n    jwks_file: keys/html.json\n");
    assert_eq!(not_json.status.code(), Some(2));
    assert!(text(&not_json.stderr).contains("not valid JSON"));
}

#[test]
fn check_config_reads_the_registry_and_warns_when_none_checks_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("jwks.json"),
        DevKey::key_set_json(&[&test_key(1)]).to_string(),
    )
    .unwrap();
    let write = |registry: &str| {
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "issuers: [{{url: https://issuer.test, jwks_file: jwks.json}}]\n{registry}backends:\n  - name: svc\n    audience: gitlab-ai-gateway\n    routes:\n      - {{path: /chat, require: [duo_chta]}}\n      - {{path: /code, require: [complete_code]}}\n"
            ),
        )
        .unwrap();
        run(&["check-config", "--config", config.to_str().unwrap()])
    };
    // No registry: the typo passes, but not silently.
    let unchecked = write("");
    assert_eq!(
        unchecked.status.code(),
        Some(0),
        "{}",
        text(&unchecked.stderr)
    );
    let warning = text(&unchecked.stderr);
    assert!(
        warning.contains("warning: no unit primitive registry")
            && warning.contains("complete_code, duo_chta"),
        "{warning}"
    );
    // With the registry the typo is an error.
    let registry = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cloud_connector");
    let checked = write(&format!("unit_primitives: {}\n", registry.display()));
    assert_eq!(checked.status.code(), Some(2));
    assert!(text(&checked.stderr).contains("duo_chta"));
    assert!(!text(&checked.stderr).contains("warning"));
    // A registry path that does not exist: an error with the path as written and resolved.
    let missing = write("unit_primitives: registry/\n");
    assert_eq!(missing.status.code(), Some(2));
    let err = text(&missing.stderr);
    assert!(
        err.contains("unit_primitives registry/ (resolved to")
            && err.contains(&dir.path().join("registry").display().to_string()),
        "{err}"
    );
}

#[test]
fn check_config_names_the_file_and_line_of_a_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "      - path: /ai/v1/chat/agent\n        require: [duo_chta]\n",
    );
    let out = run(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("duo_chta") && err.contains(&format!("{}:15", config.display())),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn mint_and_check_against_serve_with_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, test_key(1).to_pkcs8_pem().unwrap()).unwrap();
    let (grpc, admin) = (free_addr(), free_addr());
    // One runtime thread (the current-thread scheduler); serve --dev above runs on `auto`.
    let mut sidecar = Sidecar(
        Command::new(BIN)
            .args([
                "--workers",
                "1",
                "serve",
                "--config",
                config.to_str().unwrap(),
                "--grpc",
                &grpc.to_string(),
                "--admin",
                &admin.to_string(),
                "--shutdown-delay",
                "0s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve starts"),
    );
    wait_ready(admin);
    let mint = |scopes: &str| {
        let out = run(&[
            "mint",
            "--key",
            key.to_str().unwrap(),
            "--kid",
            "test-key-1",
            "--iss",
            "https://issuer.test",
            "--aud",
            "gitlab-ai-gateway",
            "--sub",
            "instance-9",
            "--scopes",
            scopes,
            "--ttl",
            "5m",
            "--claim",
            "gitlab_realm=self-managed",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let grpc = grpc.to_string();
    let check = |token: &str, headers: &[&str]| {
        let mut args = vec![
            "check",
            "--grpc",
            &grpc,
            "--method",
            "POST",
            "--path",
            "/ai/v2/code/completions",
            "--token",
            token,
            "--header",
            "x-gitlab-version:17.4.0",
        ];
        for h in headers {
            args.extend_from_slice(&["--header", h]);
        }
        run(&args)
    };
    let token = mint("complete_code,duo_chat");
    let allowed = check(
        &token,
        &[
            "x-gitlab-instance-id:instance-9",
            "x-gitlab-realm:self-managed",
            "x-gitlab-authentication-type:oidc",
        ],
    );
    assert_eq!(allowed.status.code(), Some(0), "{}", text(&allowed.stdout));
    assert!(
        text(&allowed.stdout).contains("x-gitlab-authz-scopes: complete_code duo_chat"),
        "{}",
        text(&allowed.stdout)
    );
    let wrong_realm = check(
        &token,
        &["x-gitlab-instance-id:instance-9", "x-gitlab-realm:saas"],
    );
    assert!(
        text(&wrong_realm.stdout).contains("header_mismatch"),
        "{}",
        text(&wrong_realm.stdout)
    );
    let too_narrow = check(
        &mint("duo_chat"),
        &[
            "x-gitlab-instance-id:instance-9",
            "x-gitlab-realm:self-managed",
            "x-gitlab-authentication-type:oidc",
        ],
    );
    assert!(
        text(&too_narrow.stdout).starts_with("deny 403"),
        "{}",
        text(&too_narrow.stdout)
    );
    assert!(sidecar.terminate().success());
}

#[test]
fn bad_arguments_are_clear_errors_not_panics() {
    let out = run(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--config"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&[
        "mint",
        "--key",
        "/nonexistent.pem",
        "--kid",
        "k",
        "--iss",
        "i",
        "--aud",
        "a",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read /nonexistent.pem"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["check", "--grpc", &free_addr().to_string(), "--path", "/"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot reach connector-authz"),
        "{}",
        text(&out.stderr)
    );
}

/// The shipped manifests run connector-authz with arguments the real command line accepts,
/// JSON logs and a shutdown delay that fits in the pod's grace period: the container added
/// to the backend's pod (envoy/kubernetes/components/connector-authz-in-pod, whose pod's
/// grace period is the base Deployment's) and the shared Deployment. (Which environment
/// variables they may set, and the rendered overlays, are checked by
/// tests/e2e/validate_manifests.py.)
#[test]
fn the_deployment_manifest_arguments_parse() {
    let kubernetes = Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/kubernetes");
    let base_grace = deployment_manifest(&kubernetes.join("base/deployment.yaml"))["spec"]
        ["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64();
    for (file, grace) in [
        (
            "components/connector-authz-in-pod/connector-authz-container.yaml",
            base_grace,
        ),
        ("overlays/shared/deployment.yaml", None),
    ] {
        let doc = deployment_manifest(&kubernetes.join(file));
        let pod = &doc["spec"]["template"]["spec"];
        let grace = pod["terminationGracePeriodSeconds"]
            .as_u64()
            .or(grace)
            .unwrap_or(30);
        assert_serve_arguments_fit(file, pod, grace);
    }
}

fn deployment_manifest(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn assert_serve_arguments_fit(file: &str, pod: &serde_json::Value, grace: u64) {
    use clap::Parser as _;
    use connector_authz::cli::{Cli, Command as Cmd, LogFormat};

    let container = pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "connector-authz")
        .unwrap_or_else(|| panic!("{file}: no connector-authz container"));
    let mut argv = vec!["connector-authz".to_string()];
    argv.extend(
        container["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("string arg").to_string()),
    );
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{file}: {argv:?}: {e}"));
    assert!(
        matches!(cli.log_format, LogFormat::Json),
        "{file}: {argv:?}"
    );
    let Cmd::Serve {
        source,
        shutdown_delay,
        drain_timeout,
        ..
    } = cli.command
    else {
        panic!("{file}: not serve: {argv:?}");
    };
    assert!(source.config.is_some() && !source.dev, "{file}: {argv:?}");
    assert!(
        !shutdown_delay.is_zero(),
        "{file}: rollouts need a shutdown delay"
    );
    assert!(
        Duration::from_secs(grace) > shutdown_delay + drain_timeout,
        "{file}: terminationGracePeriodSeconds {grace} does not cover {shutdown_delay:?} + {drain_timeout:?}"
    );
}

/// Every `*.yaml` under `config/` is a configuration a user can start from: it must pass
/// `check-config` exactly as shipped (templates live elsewhere, such as the dev mode's).
#[test]
fn every_shipped_config_passes_check_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("config/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let out = run(&["check-config", "--config", path.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "check-config {}:\n{}{}",
            path.display(),
            text(&out.stdout),
            text(&out.stderr)
        );
        checked.push(path);
    }
    assert!(
        checked.iter().any(|p| p.ends_with("connector-authz.yaml")),
        "config/connector-authz.yaml is shipped and checked: {checked:?}"
    );
}

use super::*;

const FILE: &str = "/etc/connector-authz/config.yaml";

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(text, Path::new(FILE))
}

/// The error for `text`, asserting it names the file and the expected line.
fn error_at(text: &str, line: u32) -> String {
    let err = load(text).expect_err("the configuration should be refused");
    assert_eq!(err.file, Path::new(FILE), "{err}");
    assert_eq!(err.line, line, "wrong line for: {err}");
    let shown = err.to_string();
    assert!(shown.contains(&format!("{FILE}:{line}")), "{shown}");
    err.message
}

const DESIGN_EXAMPLE: &str = "\
listen:
  grpc: 127.0.0.1:9191
  admin: 127.0.0.1:9192

issuers:
  - url: https://customers.gitlab.com
  - url: https://gitlab.com
    jwks_uri: https://gitlab.com/oauth/discovery/keys
  - url: https://issuer.test
    jwks_file: jwks.json

keys:
  refresh_interval: 24h
  min_refresh_interval: 30s
  fetch_timeout: 5s
  cache_dir: /var/lib/connector-authz

tokens:
  algorithms: [RS256]
  leeway: 30s
  max_bytes: 8192

backends:
  - name: ai_gateway
    audience: gitlab-ai-gateway
    routes:
      - prefix: /ai/v2/code/
        require: [code_suggestions]
      - path: /ai/v1/chat/agent
        methods: [POST]
        require: [duo_chat]
      - prefix: /ai/monitoring/
        public: true
";

#[test]
fn the_design_example_loads_with_its_values() {
    let c = load(DESIGN_EXAMPLE).unwrap();
    assert_eq!(c.listen.grpc.to_string(), "127.0.0.1:9191");
    assert_eq!(c.issuers.len(), 3);
    assert_eq!(c.issuers[0].keys_from, KeysFrom::Discovery);
    assert_eq!(
        c.issuers[1].keys_from,
        KeysFrom::JwksUri("https://gitlab.com/oauth/discovery/keys".into())
    );
    assert_eq!(
        c.issuers[2].keys_from,
        KeysFrom::JwksFile("/etc/connector-authz/jwks.json".into())
    );
    assert_eq!(c.keys.refresh_interval, Duration::from_secs(86_400));
    assert_eq!(c.keys.min_refresh_interval, Duration::from_secs(30));
    assert_eq!(c.tokens.algorithms, vec![Algorithm::RS256]);
    assert_eq!(c.tokens.max_bytes, 8192);
    assert_eq!(&*c.backends[0].audience, "gitlab-ai-gateway");
    assert_eq!(c.routes.routes().len(), 3);
    let chat = c.routes.find("/ai/v1/chat/agent", "POST").unwrap();
    assert_eq!(
        chat.access,
        Access::Token {
            require: vec!["duo_chat".into()],
            require_any: vec![],
            user_tokens: true,
            unit_primitive_header: None
        }
    );
    assert_eq!(chat.line, 29);
    assert!(c.routes.find("/ai/v1/chat/agent", "GET").is_none());
}

#[test]
fn issuers_are_found_with_or_without_a_trailing_slash() {
    let c = load(DESIGN_EXAMPLE).unwrap();
    assert_eq!(
        &*c.issuer("https://customers.gitlab.com/").unwrap().name,
        "https://customers.gitlab.com"
    );
    assert!(c.issuer("https://customers.gitlab.com").is_some());
    assert!(c.issuer("https://customers.gitlab.com//").is_none());
    assert!(c.issuer("https://evil.example").is_none());
}

#[test]
fn defaults_fill_what_is_left_out() {
    let c = load("issuers: [{url: https://gitlab.com}]\nbackends: [{name: b, audience: a, routes: [{prefix: /, require: []}]}]\n").unwrap();
    assert_eq!(c.listen.grpc.to_string(), DEFAULT_GRPC_LISTEN);
    assert_eq!(c.listen.admin.to_string(), DEFAULT_ADMIN_LISTEN);
    assert_eq!(c.keys.fetch_timeout, Duration::from_secs(5));
    assert_eq!(c.tokens.leeway, Duration::from_secs(30));
    assert!(!c.enforce_min_version);
}

fn with_route(route: &str) -> String {
    format!(
        "issuers:\n  - url: https://gitlab.com\nbackends:\n  - name: b\n    audience: a\n    routes:\n{route}"
    )
}

#[test]
fn unknown_keys_are_errors_at_their_line() {
    let msg = error_at(
        "issuers:\n  - url: https://gitlab.com\n    jwks_url: https://x\nbackends: []\n",
        3,
    );
    assert!(msg.contains("jwks_url"), "{msg}");
    error_at("listen:\n  grpc: 127.0.0.1:1\n  admn: 127.0.0.1:2\n", 3);
}

#[test]
fn bad_values_name_their_line_and_the_fix() {
    let base = DESIGN_EXAMPLE;
    let msg = error_at(
        &base.replace("refresh_interval: 24h", "refresh_interval: 24 hours please"),
        13,
    );
    assert!(msg.contains("30s, 5m or 24h"), "{msg}");
    let msg = error_at(&base.replace("grpc: 127.0.0.1:9191", "grpc: localhost"), 2);
    assert!(msg.contains("127.0.0.1:9191"), "{msg}");
    let msg = error_at(
        &base.replace("algorithms: [RS256]", "algorithms: [RS256, HS256]"),
        19,
    );
    assert!(msg.contains("never accepted"), "{msg}");
    error_at(
        &base.replace("algorithms: [RS256]", "algorithms: [none]"),
        19,
    );
    error_at(&base.replace("max_bytes: 8192", "max_bytes: 10"), 21);
    error_at(&base.replace("leeway: 30s", "leeway: 1h"), 20);
    error_at(
        &base.replace("min_refresh_interval: 30s", "min_refresh_interval: 48h"),
        14,
    );
    // Below 1 s the unknown-kid refresh is no longer rate-limited in any useful way.
    for short in ["0s", "500ms"] {
        let msg = error_at(
            &base.replace(
                "min_refresh_interval: 30s",
                &format!("min_refresh_interval: {short}"),
            ),
            14,
        );
        assert!(msg.contains("at least 1s"), "{msg}");
    }
    let msg = error_at(
        &base.replace(
            "min_refresh_interval: 30s",
            "min_refresh_interval: 30s\n  unknown_kid_wait: 0s",
        ),
        15,
    );
    assert!(msg.contains("unknown_kid_wait"), "{msg}");
}

#[test]
fn unknown_kid_wait_defaults_below_envoys_timeout() {
    let c = Config::from_yaml("issuers: [{url: https://issuer.test}]\nbackends: [{name: b, audience: a, routes: [{prefix: /, public: true}]}]\n", Path::new("t.yaml")).unwrap();
    assert_eq!(c.keys.unknown_kid_wait, Duration::from_millis(800));
    let c = Config::from_yaml(
        "issuers: [{url: https://issuer.test}]\nbackends: [{name: b, audience: a, routes: [{prefix: /, public: true}]}]\nkeys:\n  unknown_kid_wait: 250ms\n",
        Path::new("t.yaml"),
    )
    .unwrap();
    assert_eq!(c.keys.unknown_kid_wait, Duration::from_millis(250));
}

#[test]
fn route_patterns_must_be_canonical() {
    let yaml = |pattern: &str| {
        format!(
            "issuers: [{{url: https://issuer.test}}]\nbackends:\n  - name: b\n    audience: a\n    routes:\n      - {pattern}\n        require: [x]\n"
        )
    };
    for (pattern, says) in [
        ("path: /ai/m%3Agenerate", "write it as \"/ai/m:generate\""),
        ("prefix: /%2e%2e/x/", "above the root"),
        ("path: /ai/x;y", "';'"),
        ("prefix: /ai//x/", "write it as \"/ai/x/\""),
        ("path: /ai/x?y", "query"),
    ] {
        let msg = error_at(&yaml(pattern), 6);
        assert!(msg.contains(says), "{pattern}: {msg}");
    }
    let conflict = "issuers: [{url: https://issuer.test}]\nbackends:\n  - name: b\n    audience: a\n    routes:\n      - path: /x/\n        public: true\n      - path: /x\n        require: [y]\n";
    let msg = error_at(conflict, 8);
    assert!(msg.contains("also matches \"/x/\""), "{msg}");
}

#[test]
fn issuer_urls_must_be_https_except_on_loopback() {
    let msg = error_at(
        "issuers:\n  - url: http://gitlab.example\nbackends: []\n",
        2,
    );
    assert!(msg.contains("https"), "{msg}");
    error_at(
        "issuers:\n  - url: https://a\n    jwks_uri: http://10.0.0.1/keys\nbackends: []\n",
        3,
    );
    error_at(
        "issuers:\n  - url: https://a\n    jwks_uri: https://a/k\n    jwks_file: k.json\nbackends: []\n",
        4,
    );
    for ok in [
        "http://127.0.0.1:8080",
        "http://localhost:1",
        "http://[::1]:9/x",
        "https://gitlab.com",
    ] {
        assert_eq!(check_url(ok), Ok(()), "{ok}");
    }
    for bad in [
        "http://127.0.0.1.evil.com",
        "http://user@evil.com",
        "ftp://x",
        "gitlab.com",
        "https://",
    ] {
        assert!(check_url(bad).is_err(), "{bad}");
    }
    // An issuer whose keys come from a file is only a name: it need not be a URL.
    assert!(load("issuers: [{url: gitlab-ai-gateway, jwks_file: k.json}]\nbackends: [{name: b, audience: a, routes: [{prefix: /, require: []}]}]\n").is_ok());
}

#[test]
fn an_issuer_listed_twice_is_an_error() {
    let msg = error_at(
        "issuers:\n  - url: https://gitlab.com\n  - url: https://gitlab.com/\nbackends: []\n",
        3,
    );
    assert!(msg.contains("line 2"), "{msg}");
}

#[test]
fn a_route_needs_exactly_one_of_path_and_prefix() {
    let msg = error_at(&with_route("      - require: [x]\n"), 7);
    assert!(msg.contains("neither path nor prefix"), "{msg}");
    let msg = error_at(
        &with_route("      - path: /a\n        prefix: /b/\n        require: [x]\n"),
        7,
    );
    assert!(msg.contains("both"), "{msg}");
}

#[test]
fn a_route_must_say_what_it_needs() {
    let msg = error_at(&with_route("      - prefix: /a/\n"), 7);
    assert!(msg.contains("public: true"), "{msg}");
    error_at(
        &with_route("      - prefix: /a/\n        public: true\n        require: [x]\n"),
        7,
    );
    let msg = error_at(
        &with_route(
            "      - prefix: /a/\n        unit_primitive_header: x-gitlab-unit-primitive\n",
        ),
        8,
    );
    assert!(msg.contains("registry"), "{msg}");
    let msg = error_at(
        &with_route("      - prefix: /a/\n        methods: [GET, FETCH]\n        require: [x]\n"),
        8,
    );
    assert!(msg.contains("FETCH"), "{msg}");
}

#[test]
fn route_paths_must_be_in_normal_form() {
    let msg = error_at(
        &with_route("      - prefix: /a/../b/\n        require: [x]\n"),
        7,
    );
    assert!(msg.contains("\"/b/\""), "{msg}");
    error_at(
        &with_route("      - path: relative\n        require: [x]\n"),
        7,
    );
    error_at(
        &with_route("      - path: /a?x=1\n        require: [x]\n"),
        7,
    );
    error_at(
        &with_route("      - prefix: /a%2fb/\n        require: [x]\n"),
        7,
    );
}

#[test]
fn a_path_claimed_twice_is_an_error_naming_both_lines() {
    let routes = "      - prefix: /ai/\n        require: [a]\n      - path: /ai/x\n        methods: [GET]\n        require: [a]\n      - path: /ai/x\n        require: [b]\n";
    let msg = error_at(&with_route(routes), 12);
    assert!(
        msg.contains("path /ai/x") && msg.contains("line 9"),
        "{msg}"
    );
    // Different methods for the same path are two routes, not a conflict.
    let split = "      - path: /ai/x\n        methods: [GET]\n        require: [a]\n      - path: /ai/x\n        methods: [POST]\n        require: [b]\n";
    assert!(load(&with_route(split)).is_ok());
}

#[test]
fn a_path_claimed_by_two_backends_is_an_error() {
    let text = "issuers: [{url: https://gitlab.com}]\nbackends:\n  - name: a\n    audience: aud-a\n    routes:\n      - prefix: /x/\n        require: []\n  - name: b\n    audience: aud-b\n    routes:\n      - prefix: /x/\n        require: []\n";
    error_at(text, 11);
}

#[test]
fn backends_need_distinct_names_and_audiences() {
    let two = |n2: &str, a2: &str| {
        format!(
            "issuers: [{{url: https://gitlab.com}}]\nbackends:\n  - name: a\n    audience: aud\n    routes: [{{prefix: /a/, require: []}}]\n  - name: {n2}\n    audience: {a2}\n    routes: [{{prefix: /b/, require: []}}]\n"
        )
    };
    let msg = error_at(&two("b", "aud"), 6);
    assert!(msg.contains("same audience"), "{msg}");
    let msg = error_at(&two("a", "other"), 6);
    assert!(msg.contains("twice"), "{msg}");
    error_at(
        "issuers: [{url: https://gitlab.com}]\nbackends:\n  - name: a\n    routes: [{prefix: /a/, require: []}]\n",
        3,
    );
    error_at(
        "issuers: [{url: https://gitlab.com}]\nbackends:\n  - name: a\n    audience: x\n    backend_service: ai_gateway\n    routes: [{prefix: /a/, require: []}]\n",
        4,
    );
    error_at(
        "issuers: [{url: https://gitlab.com}]\nbackends:\n  - name: a\n    audience: x\n    routes: []\n",
        5,
    );
}

#[test]
fn empty_lists_and_missing_sections_are_errors() {
    error_at("issuers: []\nbackends: []\n", 1);
    error_at("issuers: [{url: https://gitlab.com}]\nbackends: []\n", 2);
    let err = load("backends: []\n").unwrap_err();
    assert!(err.message.contains("issuers"), "{err}");
}

#[test]
fn yaml_bombs_and_deep_nesting_are_refused_quickly() {
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..12 {
        let prev = if i == 0 {
            "a".to_string()
        } else {
            format!("b{}", i - 1)
        };
        bomb.push_str(&format!("b{i}: &b{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
    }
    assert!(load(&bomb).is_err());
    let deep = format!("issuers: {}{}\n", "[".repeat(200), "]".repeat(200));
    assert!(load(&deep).is_err());
}

#[test]
fn an_unreadable_file_is_a_clear_error() {
    let err = Config::load(Path::new("/nonexistent/connector-authz.yaml")).unwrap_err();
    assert!(
        err.to_string().contains("cannot read the configuration"),
        "{err}"
    );
}

#[test]
fn the_token_cache_is_sized_by_two_keys() {
    let c = load(DESIGN_EXAMPLE).unwrap();
    assert_eq!(c.tokens.cache_entries, 10_000);
    assert_eq!(c.tokens.cache_bytes, 32 * 1024 * 1024);
    let sized = DESIGN_EXAMPLE.replace(
        "  max_bytes: 8192\n",
        "  max_bytes: 8192\n  cache_entries: 0\n  cache_bytes: 1048576\n",
    );
    let c = load(&sized).unwrap();
    assert_eq!((c.tokens.cache_entries, c.tokens.cache_bytes), (0, 1 << 20));
    for (bad, what) in [
        ("cache_entries: 20000000", "cache_entries"),
        ("cache_bytes: 1000", "cache_bytes"),
        ("cache_entries: -1", "cache_entries"),
    ] {
        let text = DESIGN_EXAMPLE.replace(
            "  max_bytes: 8192\n",
            &format!("  max_bytes: 8192\n  {bad}\n"),
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains(what), "{bad}: {err}");
    }
}

#[test]
fn listen_tls_files_resolve_relative_to_the_configuration() {
    let text = DESIGN_EXAMPLE.replace(
        "  admin: 127.0.0.1:9192\n",
        "  admin: 127.0.0.1:9192\n  tls:\n    cert_file: tls/tls.crt\n    key_file: /etc/tls/tls.key\n    client_ca_file: ca.crt\n  admin_tls: {cert_file: a.crt, key_file: a.key}\n",
    );
    let c = load(&text).unwrap();
    let tls = c.listen.tls.as_ref().expect("listen.tls is set");
    assert_eq!(
        tls.cert_file.path,
        Path::new("/etc/connector-authz/tls/tls.crt")
    );
    assert_eq!(tls.cert_file.written, Path::new("tls/tls.crt"));
    assert_eq!(tls.cert_file.line, 5);
    assert_eq!(tls.key_file.path, Path::new("/etc/tls/tls.key"));
    assert_eq!(tls.key_file.line, 6);
    let ca = tls.client_ca_file.as_ref().expect("client_ca_file is set");
    assert_eq!(ca.path, Path::new("/etc/connector-authz/ca.crt"));
    assert!(
        ca.shown()
            .contains("resolved to /etc/connector-authz/ca.crt")
    );
    let admin = c
        .listen
        .admin_tls
        .as_ref()
        .expect("listen.admin_tls is set");
    assert_eq!(admin.key_file.path, Path::new("/etc/connector-authz/a.key"));
    assert!(admin.client_ca_file.is_none());
    // Without the keys, both listeners are plain.
    let plain = load(DESIGN_EXAMPLE).unwrap();
    assert!(plain.listen.tls.is_none() && plain.listen.admin_tls.is_none());
}

#[test]
fn listen_tls_mistakes_are_errors_at_their_line() {
    let with_tls = |tls: &str| {
        DESIGN_EXAMPLE.replace(
            "  admin: 127.0.0.1:9192\n",
            &format!("  admin: 127.0.0.1:9192\n{tls}"),
        )
    };
    let msg = error_at(
        &with_tls("  tls:\n    cert_file: a.crt\n    key_file: a.key\n    ca_file: ca.crt\n"),
        7,
    );
    assert!(msg.contains("ca_file"), "{msg}");
    let msg = error_at(&with_tls("  tls:\n    cert_file: a.crt\n"), 5);
    assert!(msg.contains("key_file"), "{msg}");
    let msg = error_at(
        &with_tls("  admin_tls:\n    cert_file: a.crt\n    key_file: \"\"\n"),
        6,
    );
    assert!(msg.contains("listen.admin_tls.key_file is empty"), "{msg}");
    error_at(&with_tls("  tls: /etc/tls\n"), 4);
}

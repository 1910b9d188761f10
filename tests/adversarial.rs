//! The adversarial corpus (tests/corpus: hostile tokens and requests, each with the decision
//! it must get) run through `decide`, through the real gRPC server (both of Envoy's header
//! forms) and through the filter's pipeline. tests/e2e_wasm.rs runs the same table through a
//! real Envoy, with ext_authz and with the proxy-wasm filter.
//!
//! The table is also the `decide` fuzz target's seed corpus: minted at the fuzz clock,
//! every case is a file `fuzz/seeds/decide/case-<name>` (and its Authorization value a
//! `fuzz/seeds/token/case-<name>`). `the_seed_corpus_is_the_case_table` checks that the
//! files are current; `UPDATE_SEEDS=1 cargo test --test adversarial` rewrites them.

mod corpus;
#[path = "../fuzz/targets/mod.rs"]
mod targets;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use connector_authz::config::Config;
use connector_authz::decide::decide;
use connector_authz::decision::{Decision, Request};
use connector_authz::proto::envoy::config::core::v3::{HeaderMap, HeaderValue};
use connector_authz::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
    authorization_client::AuthorizationClient, check_response,
};
use connector_authz::serve::{self, Running};
use corpus::{STD_HEADERS, Table, bytes, cases, real_now, std_headers_plus};
use serde_json::Value;
use targets::env::{CODE_PATH, Env, Keys, NOW, config_yaml, jwks_files};
use targets::input::DecideInput;
use tonic::transport::Channel;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn decision_word(decision: &Decision) -> &'static str {
    decision.reason().map_or("allow", |r| r.as_str())
}

#[test]
fn case_names_are_unique_and_only_controls_are_allowed() {
    let keys = Keys::new();
    let cases = cases(&keys, real_now());
    let mut names = BTreeSet::new();
    for case in &cases {
        assert!(
            names.insert(case.name.to_lowercase()),
            "duplicate case {}",
            case.name
        );
        assert!(
            case.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{} is not a file name",
            case.name
        );
        assert_eq!(
            case.want == "allow",
            case.name.starts_with("control_"),
            "{}: only control_ cases may be allowed",
            case.name
        );
    }
    assert!(cases.len() >= 150, "{} cases", cases.len());
}

#[test]
fn every_case_gets_its_decision_from_decide() {
    let env = Env::new(root());
    let now = real_now();
    let at = UNIX_EPOCH + Duration::from_secs(now);
    let mut wrong = Vec::new();
    for case in cases(&env.keys, now) {
        let list = case.input.text_headers();
        let map = case.input.joined_headers();
        let method = String::from_utf8_lossy(&case.input.method);
        let path = String::from_utf8_lossy(&case.input.path);
        for (form, decision) in [
            (
                "list",
                decide(
                    &env.snapshot,
                    &Request {
                        method: &method,
                        path: &path,
                        headers: &list,
                    },
                    at,
                ),
            ),
            (
                "map",
                decide(
                    &env.snapshot,
                    &Request {
                        method: &method,
                        path: &path,
                        headers: &map,
                    },
                    at,
                ),
            ),
        ] {
            let got = decision_word(&decision);
            if got != case.want {
                wrong.push(format!(
                    "{} ({form}): want {}, got {got}",
                    case.name, case.want
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Every case as the proxy-wasm filter decides it: with the configuration rebuilt from the
/// sidecar's `/v1/snapshot` body and the signature stage answered by `/v1/verify` (both
/// through their JSON), then `decide_verified`. Envoy's own handling of the hostile bytes is
/// left out here (tests/e2e_wasm.rs runs the filter in Envoy).
#[test]
fn every_case_gets_its_decision_through_the_filter() {
    use connector_authz::decide::{Outcome, VerifiedTokens, decide_verified, verify_token};
    use connector_authz::decision::Denied;
    use connector_authz::feed::{FeedSnapshot, VerifyAnswer};
    use connector_authz::token_cache::VerifiedToken;
    use std::sync::Arc;

    struct Answered(Option<(String, Result<Arc<VerifiedToken>, Denied>)>);
    impl VerifiedTokens for Answered {
        fn lookup(&self, raw: &str) -> Option<Result<Arc<VerifiedToken>, Denied>> {
            self.0
                .as_ref()
                .filter(|(token, _)| token == raw)
                .map(|(_, outcome)| outcome.clone())
        }
    }
    struct Asked(std::cell::RefCell<Option<String>>);
    impl VerifiedTokens for Asked {
        fn lookup(&self, raw: &str) -> Option<Result<Arc<VerifiedToken>, Denied>> {
            *self.0.borrow_mut() = Some(raw.to_string());
            None
        }
    }

    let env = Env::new(root());
    let wire = serde_json::to_vec(&FeedSnapshot::of(&env.snapshot)).unwrap();
    let filter = serde_json::from_slice::<FeedSnapshot>(&wire)
        .unwrap()
        .compile()
        .expect("the snapshot compiles")
        .snapshot;
    let now = real_now();
    let at = UNIX_EPOCH + Duration::from_secs(now);
    let mut wrong = Vec::new();
    for case in cases(&env.keys, now) {
        let list = case.input.text_headers();
        let method = String::from_utf8_lossy(&case.input.method);
        let path = String::from_utf8_lossy(&case.input.path);
        let req = Request {
            method: &method,
            path: &path,
            headers: &list,
        };
        let asked = Asked(Default::default());
        let decision = match decide_verified(&filter, &req, at, &asked) {
            Outcome::Decided(decision) => decision,
            Outcome::NeedsVerification => {
                let raw = asked.0.into_inner().expect("the token asked for");
                let answer = VerifyAnswer::of(&verify_token(&env.snapshot, &raw, at));
                let answer: VerifyAnswer =
                    serde_json::from_slice(&serde_json::to_vec(&answer).unwrap()).unwrap();
                let outcome = answer
                    .into_outcome(&filter.config)
                    .expect("a sensible answer");
                match decide_verified(&filter, &req, at, &Answered(Some((raw, outcome)))) {
                    Outcome::Decided(decision) => decision,
                    Outcome::NeedsVerification => panic!("{}: asked twice", case.name),
                }
            }
        };
        let got = decision_word(&decision);
        if got != case.want {
            wrong.push(format!("{}: want {}, got {got}", case.name, case.want));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The real server with the fixed world's key files; every case over gRPC, sent once
/// as Envoy's default `headers` map and once as `header_map` with `raw_value` bytes.
#[tokio::test]
async fn every_case_gets_its_decision_over_grpc() {
    let (running, client, _dir) = start_server().await;
    let keys = Keys::new();
    // The server checks times against its own clock, so the time-relative cases (`exp`
    // 10 s ago, within the 30 s leeway) hold only while the table is fresh: it is minted
    // again once the clock has moved 10 s on, however long the whole run takes.
    let mut minted_at = real_now();
    let mut cases = cases(&keys, minted_at);
    let mut wrong = Vec::new();
    for i in 0..cases.len() {
        if real_now() >= minted_at + 10 {
            minted_at = real_now();
            let fresh = self::cases(&keys, minted_at);
            assert_eq!(fresh[i].name, cases[i].name, "the table's order is fixed");
            cases = fresh;
        }
        let case = &cases[i];
        for raw in [false, true] {
            let response = client
                .clone()
                .check(check_request(&case.input, raw))
                .await
                .expect("Check is a successful RPC")
                .into_inner();
            let got = response_word(&response);
            if got != case.want {
                let form = if raw { "header_map" } else { "headers" };
                wrong.push(format!(
                    "{} ({form}): want {}, got {got}",
                    case.name, case.want
                ));
            }
        }
    }
    running.shutdown().await;
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

async fn start_server() -> (Running, AuthorizationClient<Channel>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = Keys::new();
    for (name, contents) in jwks_files(&keys) {
        std::fs::write(dir.path().join(name), contents).expect("write key file");
    }
    let yaml = config_yaml(dir.path(), &root().join("config/cloud_connector"));
    let config = Config::from_yaml(&yaml, &dir.path().join("config.yaml")).expect("config loads");
    let running = serve::start(config).await.expect("server starts");
    let client = AuthorizationClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .expect("client connects")
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    (running, client, dir)
}

fn check_request(input: &DecideInput, raw: bool) -> CheckRequest {
    let mut http = attribute_context::HttpRequest {
        method: String::from_utf8_lossy(&input.method).into_owned(),
        path: String::from_utf8_lossy(&input.path).into_owned(),
        ..Default::default()
    };
    if raw {
        http.header_map = Some(HeaderMap {
            headers: input
                .headers
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: String::from_utf8_lossy(k).into_owned(),
                    raw_value: v.clone(),
                    ..Default::default()
                })
                .collect(),
        });
    } else {
        http.headers = input.joined_headers();
    }
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

fn response_word(response: &CheckResponse) -> String {
    match &response.http_response {
        Some(check_response::HttpResponse::OkResponse(_)) => "allow".into(),
        Some(check_response::HttpResponse::DeniedResponse(denied)) => {
            let body: Value = serde_json::from_str(&denied.body).expect("JSON body");
            body["error"].as_str().unwrap_or("?").to_string()
        }
        None => "no http_response".into(),
    }
}

/// The seed files are the table minted at the fuzz clock; `UPDATE_SEEDS=1` rewrites them.
#[test]
fn the_seed_corpus_is_the_case_table() {
    let keys = Keys::new();
    let update = std::env::var_os("UPDATE_SEEDS").is_some();
    let mut stale = Vec::new();
    for target in ["decide", "token"] {
        let dir = root().join("fuzz/seeds").join(target);
        std::fs::create_dir_all(&dir).expect("seed directory");
        let mut expected: HashMap<String, Vec<u8>> = HashMap::new();
        for case in cases(&keys, NOW) {
            let contents = match target {
                "decide" => case.input.encode(),
                _ => match case
                    .input
                    .headers
                    .iter()
                    .find(|(k, _)| k == b"authorization")
                {
                    Some((_, value)) => value.clone(),
                    None => continue,
                },
            };
            expected.insert(format!("case-{}", case.name), contents);
        }
        for entry in std::fs::read_dir(&dir).expect("read seeds") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if name.starts_with("case-") && !expected.contains_key(&name) {
                if update {
                    std::fs::remove_file(&path).expect("remove stale seed");
                } else {
                    stale.push(format!("{target}/{name} is no longer a case"));
                }
            }
        }
        for (name, contents) in &expected {
            let path = dir.join(name);
            if std::fs::read(&path).ok().as_ref() != Some(contents) {
                if update {
                    std::fs::write(&path, contents).expect("write seed");
                } else {
                    stale.push(format!("{target}/{name} differs from the table"));
                }
            }
        }
    }
    assert!(
        stale.is_empty(),
        "run `UPDATE_SEEDS=1 cargo test --test adversarial the_seed_corpus`:\n{}",
        stale.join("\n")
    );
}

/// Decides in well under a second whatever the header count or size, and still right.
#[test]
fn a_flood_of_headers_is_decided_correctly() {
    let env = Env::new(root());
    let now = real_now();
    let at = UNIX_EPOCH + Duration::from_secs(now);
    let t = Table {
        keys: &env.keys,
        now,
        cases: Vec::new(),
    };
    let bearer = format!("Bearer {}", t.valid());
    let mut many: Vec<(String, String)> = (0..10_000)
        .map(|i| (format!("x-filler-{i}"), "v".repeat(32)))
        .collect();
    many.push(("authorization".into(), bearer.clone()));
    many.extend(
        STD_HEADERS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let huge_value = "h".repeat(1 << 20);
    let mut huge = vec![("x-huge".to_string(), huge_value.clone())];
    huge.push(("authorization".into(), bearer.clone()));
    huge.extend(
        STD_HEADERS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let huge_token = vec![("authorization".to_string(), format!("Bearer {huge_value}"))];
    let huge_instance = vec![
        ("authorization".to_string(), bearer.clone()),
        ("x-gitlab-instance-id".to_string(), huge_value.clone()),
    ];
    for (name, headers, want) in [
        ("10,000 headers", &many, "allow"),
        ("a 1 MiB header", &huge, "allow"),
        ("a 1 MiB token", &huge_token, "malformed_token"),
        ("a 1 MiB instance id", &huge_instance, "header_mismatch"),
    ] {
        let decision = decide(
            &env.snapshot,
            &Request {
                method: "POST",
                path: CODE_PATH,
                headers,
            },
            at,
        );
        assert_eq!(decision_word(&decision), want, "{name}");
    }
}

#[tokio::test]
async fn a_flood_of_headers_over_grpc_is_answered_correctly() {
    let (running, client, _dir) = start_server().await;
    let keys = Keys::new();
    let t = Table {
        keys: &keys,
        now: real_now(),
        cases: Vec::new(),
    };
    let bearer = format!("Bearer {}", t.valid());
    let mut many = std_headers_plus(&[("authorization", bearer.as_bytes())]);
    let names: Vec<String> = (0..10_000).map(|i| format!("x-filler-{i}")).collect();
    for name in &names {
        many.push((name.as_str(), vec![b'v'; 32]));
    }
    let huge = std_headers_plus(&[
        ("authorization", bearer.as_bytes()),
        ("x-huge", &vec![b'h'; 1 << 20]),
    ]);
    let huge_token =
        std_headers_plus(&[("authorization", &bytes(&[b"Bearer ", &vec![b'a'; 1 << 20]]))]);
    for (name, headers, want) in [
        ("10,000 headers", many, "allow"),
        ("a 1 MiB header", huge, "allow"),
        ("a 1 MiB token", huge_token, "malformed_token"),
    ] {
        let input = DecideInput {
            want: None,
            method: b"POST".to_vec(),
            path: CODE_PATH.as_bytes().to_vec(),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v))
                .collect(),
        };
        for raw in [false, true] {
            let response = client
                .clone()
                .check(check_request(&input, raw))
                .await
                .expect("Check is a successful RPC")
                .into_inner();
            assert_eq!(response_word(&response), want, "{name} (raw {raw})");
        }
    }
    running.shutdown().await;
}

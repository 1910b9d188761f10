//! The proxy-wasm glue: the root context (plugin configuration, snapshot polling) and one
//! HTTP context per request (decide, or pause and ask the sidecar to verify the token).
//! Every decision is [`crate::pipeline::step`]'s; this module only carries it out.
//!
//! One verify call per token is in flight per VM: the first request that needs a token
//! verified makes the call, later ones with the same token wait for its answer, and all of
//! them are decided when it arrives (or fail with 503 `keys_unavailable` when the call
//! fails, times out, or its request goes away first).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use connector_authz_core::decision::Denied;
use connector_authz_core::feed::{CompiledFeed, FeedSnapshot, VerifyAnswer};
use connector_authz_core::token_cache::VerifiedToken;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};

use crate::pipeline::{Step, request_headers, sidecar_unavailable, step};
use crate::plugin_config::PluginConfig;
use crate::token_cache::{TokenDigest, VerifiedCache};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// Verified tokens a VM keeps before `tokens.cache_entries` of the first snapshot applies.
const DEFAULT_CACHE_ENTRIES: usize = 10_000;
/// How often the root looks whether a poll is due (and retries before the first snapshot).
const TICK: Duration = Duration::from_millis(500);

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// What the root and every request of one VM share.
struct Shared {
    /// `None` until a valid plugin configuration is in: every request then fails closed.
    config: Option<Rc<PluginConfig>>,
    feed: Option<Rc<CompiledFeed>>,
    etag: Option<String>,
    cache: VerifiedCache,
    /// Token digest → the requests (context ids) waiting for the verify call in flight.
    inflight: HashMap<TokenDigest, Vec<u32>>,
}

struct Root {
    shared: Rc<RefCell<Shared>>,
    snapshot_call: Option<u32>,
    last_poll: Option<SystemTime>,
    /// The last poll failed: further failures are logged at debug, not at every tick.
    failing: bool,
}

impl Default for Root {
    fn default() -> Self {
        Root {
            shared: Rc::new(RefCell::new(Shared {
                config: None,
                feed: None,
                etag: None,
                cache: VerifiedCache::new(DEFAULT_CACHE_ENTRIES),
                inflight: HashMap::new(),
            })),
            snapshot_call: None,
            last_poll: None,
            failing: false,
        }
    }
}

impl Root {
    /// Logs a failed poll: a warning when polls start failing, then at debug until one works.
    fn poll_failed(&mut self, message: &str) {
        let level = if self.failing {
            LogLevel::Debug
        } else {
            LogLevel::Warn
        };
        self.failing = true;
        log(
            level,
            &format!("connector-authz: {message}; keeping the previous snapshot (if any)"),
        );
    }

    fn poll(&mut self) {
        if self.snapshot_call.is_some() {
            return;
        }
        let shared = self.shared.borrow();
        let Some(config) = &shared.config else { return };
        let mut headers = vec![
            (":method", "GET"),
            (":path", "/v1/snapshot"),
            (":authority", config.authority.as_str()),
        ];
        if let Some(etag) = &shared.etag {
            headers.push(("if-none-match", etag.as_str()));
        }
        let call = self.dispatch_http_call(&config.cluster, headers, None, vec![], config.timeout);
        let cluster = config.cluster.clone();
        drop(shared);
        match call {
            Ok(token) => self.snapshot_call = Some(token),
            Err(status) => self.poll_failed(&format!(
                "cannot ask the sidecar for a snapshot (cluster {cluster:?}): {status:?}"
            )),
        }
        self.last_poll = Some(self.get_current_time());
    }

    fn take_snapshot(&mut self, body: &[u8]) -> Result<(), String> {
        let feed: FeedSnapshot =
            serde_json::from_slice(body).map_err(|e| format!("the snapshot is not valid: {e}"))?;
        let compiled = feed
            .compile()
            .map_err(|e| format!("the snapshot's configuration does not compile: {e}"))?;
        let mut shared = self.shared.borrow_mut();
        shared.cache.retain_current(&compiled);
        if shared.feed.is_none() {
            let entries = compiled.snapshot.config.tokens.cache_entries;
            shared.cache = VerifiedCache::new(entries);
            log(
                LogLevel::Info,
                "connector-authz: first snapshot from the sidecar; deciding requests",
            );
        }
        shared.feed = Some(Rc::new(compiled));
        Ok(())
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        if self.snapshot_call != Some(token) {
            return;
        }
        self.snapshot_call = None;
        let status = self.get_http_call_response_header(":status");
        match status.as_deref() {
            Some("304") => self.failing = false,
            Some("200") => {
                let etag = self.get_http_call_response_header("etag");
                let body = self
                    .get_http_call_response_body(0, body_size)
                    .unwrap_or_default();
                match self.take_snapshot(&body) {
                    Ok(()) => {
                        self.failing = false;
                        self.shared.borrow_mut().etag = etag;
                    }
                    Err(e) => log(
                        LogLevel::Error,
                        &format!("connector-authz: {e}; keeping the previous snapshot (if any)"),
                    ),
                }
            }
            other => self.poll_failed(&format!(
                "the sidecar's snapshot call failed (status {other:?})"
            )),
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match PluginConfig::parse(&bytes) {
            Ok(config) => {
                self.shared.borrow_mut().config = Some(Rc::new(config));
                self.set_tick_period(TICK);
                self.poll();
                true
            }
            Err(e) => {
                self.shared.borrow_mut().config = None;
                log(
                    LogLevel::Critical,
                    &format!(
                        "connector-authz: {e}; the filter refuses every request until it is fixed"
                    ),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let (interval, have_feed) = {
            let shared = self.shared.borrow();
            let Some(config) = &shared.config else { return };
            (config.poll_interval, shared.feed.is_some())
        };
        let due = self.last_poll.is_none_or(|last| {
            self.get_current_time()
                .duration_since(last)
                .unwrap_or_default()
                >= interval
        });
        if due || !have_feed {
            self.poll();
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter {
            id: context_id,
            shared: Rc::clone(&self.shared),
            verifying: None,
        }))
    }
}

struct Filter {
    id: u32,
    shared: Rc<RefCell<Shared>>,
    /// The verify call this request made, and the token it is for.
    verifying: Option<(u32, TokenDigest)>,
}

/// Decides the request of the effective context and carries out the step: a local reply, or
/// the allow's headers (the caller resumes or continues), or the token to verify first.
fn decide_and_apply(
    shared: &Rc<RefCell<Shared>>,
    verified: Option<(TokenDigest, Result<Arc<VerifiedToken>, Denied>)>,
) -> StepTaken {
    // Values as bytes: `get_map` unwraps UTF-8, and Envoy passes obs-text bytes (0x80-0xff)
    // in a value through, so one such header would panic the VM and stop every later request.
    let request =
        request_headers(hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default());
    let now = hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH);
    let (next, config) = {
        let mut guard = shared.borrow_mut();
        let shared = &mut *guard;
        match &shared.config {
            None => (step(None, &mut shared.cache, &request, now, None), None),
            Some(config) => {
                let config = Rc::clone(config);
                let feed = shared.feed.clone();
                let next = step(feed.as_deref(), &mut shared.cache, &request, now, verified);
                (next, Some(config))
            }
        }
    };
    match next {
        Step::Deny { response, facts } => {
            record(config.as_deref(), &facts);
            let _ = hostcalls::send_http_response(
                u32::from(response.status),
                response.headers,
                Some(response.body.as_bytes()),
            );
            StepTaken::Answered
        }
        Step::Allow { headers, facts } => {
            record(config.as_deref(), &facts);
            for (name, value) in &headers.set {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
            }
            // A header the client did not send needs no host call to remove (Envoy's map
            // holds lowercase names, as the request was read a moment ago).
            for name in &headers.remove {
                if request.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
                }
            }
            StepTaken::Allowed
        }
        Step::Verify { digest, raw } => StepTaken::Verify { digest, raw },
    }
}

enum StepTaken {
    Answered,
    Allowed,
    Verify { digest: TokenDigest, raw: String },
}

/// The decision's facts that the plugin configuration names (by default decision, reason
/// and backend) as filter state (`connector_authz.decision`, `.reason`, ...) for the
/// access log. Without a configuration (the filter refuses everything) all are recorded.
fn record(config: Option<&PluginConfig>, facts: &[(&'static str, String)]) {
    for (name, value) in facts {
        if config.is_some_and(|c| !c.records(name)) {
            continue;
        }
        let _ = hostcalls::set_property(
            vec![&format!("connector_authz.{name}")],
            Some(value.as_bytes()),
        );
    }
}

/// Decides a paused request of another context (or this one) with the sidecar's answer.
fn finish(
    shared: &Rc<RefCell<Shared>>,
    context: u32,
    digest: TokenDigest,
    outcome: &Result<Arc<VerifiedToken>, Denied>,
) {
    if hostcalls::set_effective_context(context).is_err() {
        return; // That request is gone.
    }
    match decide_and_apply(shared, Some((digest, outcome.clone()))) {
        StepTaken::Allowed => {
            let _ = hostcalls::resume_http_request();
        }
        StepTaken::Answered => {}
        // Asked again for the token just answered: cannot happen; refuse rather than hang.
        StepTaken::Verify { .. } => {
            let response = connector_authz_core::respond::DenyResponse::of(&sidecar_unavailable());
            let _ = hostcalls::send_http_response(
                u32::from(response.status),
                response.headers,
                Some(response.body.as_bytes()),
            );
        }
    }
}

impl Filter {
    fn verify(&mut self, digest: TokenDigest, raw: &str) -> Action {
        let mut shared = self.shared.borrow_mut();
        if let Some(waiters) = shared.inflight.get_mut(&digest) {
            waiters.push(self.id);
            return Action::Pause;
        }
        let Some(config) = shared.config.clone() else {
            drop(shared);
            return self.fail(digest);
        };
        let headers = vec![
            (":method", "POST"),
            (":path", "/v1/verify"),
            (":authority", config.authority.as_str()),
            ("content-type", "text/plain"),
        ];
        match self.dispatch_http_call(
            &config.cluster,
            headers,
            Some(raw.as_bytes()),
            vec![],
            config.timeout,
        ) {
            Ok(token) => {
                shared.inflight.insert(digest, Vec::new());
                self.verifying = Some((token, digest));
                Action::Pause
            }
            Err(status) => {
                drop(shared);
                log(
                    LogLevel::Warn,
                    &format!(
                        "connector-authz: cannot call the sidecar to verify a token: {status:?}"
                    ),
                );
                self.fail(digest)
            }
        }
    }

    /// Decides this request as if the sidecar had answered that it cannot verify.
    fn fail(&mut self, digest: TokenDigest) -> Action {
        match decide_and_apply(&self.shared, Some((digest, Err(sidecar_unavailable())))) {
            StepTaken::Allowed => Action::Continue,
            _ => Action::Pause,
        }
    }

    /// The sidecar's answer as the signature stage's outcome.
    fn read_answer(&self, body_size: usize) -> Result<Arc<VerifiedToken>, Denied> {
        let status = self.get_http_call_response_header(":status");
        if status.as_deref() != Some("200") {
            log(
                LogLevel::Warn,
                &format!("connector-authz: the sidecar's verify call failed (status {status:?})"),
            );
            return Err(sidecar_unavailable());
        }
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let feed = self.shared.borrow().feed.clone();
        let answer = serde_json::from_slice::<VerifyAnswer>(&body).map_err(|e| e.to_string());
        match (answer, feed) {
            (Ok(answer), Some(feed)) => answer.into_outcome(&feed.snapshot.config).unwrap_or_else(
                |e| {
                    log(
                        LogLevel::Warn,
                        &format!(
                            "connector-authz: the sidecar's verify answer makes no sense here: {e}"
                        ),
                    );
                    Err(sidecar_unavailable())
                },
            ),
            (Err(e), _) => {
                log(
                    LogLevel::Warn,
                    &format!("connector-authz: the sidecar's verify answer is not valid: {e}"),
                );
                Err(sidecar_unavailable())
            }
            (Ok(_), None) => Err(sidecar_unavailable()),
        }
    }
}

impl Context for Filter {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some((call, digest)) = self.verifying.take() else {
            return;
        };
        if call != token {
            return;
        }
        let outcome = self.read_answer(body_size);
        let waiters = self
            .shared
            .borrow_mut()
            .inflight
            .remove(&digest)
            .unwrap_or_default();
        finish(&self.shared, self.id, digest, &outcome);
        for waiter in waiters {
            finish(&self.shared, waiter, digest, &outcome);
        }
        let _ = hostcalls::set_effective_context(self.id);
    }
}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        match decide_and_apply(&self.shared, None) {
            StepTaken::Allowed => Action::Continue,
            StepTaken::Answered => Action::Pause,
            StepTaken::Verify { digest, raw } => self.verify(digest, &raw),
        }
    }

    fn on_log(&mut self) {
        // This request made a verify call and goes away before its answer: whoever waits
        // for the same token is answered now rather than left hanging.
        if let Some((_, digest)) = self.verifying.take() {
            let waiters = self
                .shared
                .borrow_mut()
                .inflight
                .remove(&digest)
                .unwrap_or_default();
            for waiter in waiters {
                finish(&self.shared, waiter, digest, &Err(sidecar_unavailable()));
            }
        }
    }
}

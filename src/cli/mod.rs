//! The command line: `serve`, `check-config`, `explain`, `mint` and `check`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::config::Config;
use crate::dev::DevKey;
use crate::proto::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, check_response,
};
use crate::route::Access;

#[derive(Parser, Debug)]
#[command(
    name = "connector-authz",
    version,
    about = "Envoy ext_authz sidecar for GitLab Cloud Connector service tokens"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the sidecar.
    Serve {
        #[command(flatten)]
        source: ServeArgs,
        #[command(flatten)]
        listen: ListenArgs,
        /// On SIGTERM, how long to keep answering Checks with readiness already off
        /// (`/readyz` 503, gRPC health NOT_SERVING) before draining, so that Kubernetes and
        /// the proxies stop sending first. 0s drains at once. SIGINT, or a second SIGTERM,
        /// skips the rest of it.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        shutdown_delay: Duration,
        /// Then, how long Checks in flight may take to finish.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
    },
    /// Validate a configuration and show what it enforces.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show the decision on one request, and why (exit 0 allow, 1 deny, 2 error).
    Explain(ExplainArgs),
    /// Sign a development token with a PKCS#8 PEM private key (dev and test keys only).
    Mint(MintArgs),
    /// Send one Check to a running sidecar and print the decision.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct ServeArgs {
    /// The configuration file. Reloaded on SIGHUP and when its contents change.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run with an embedded development issuer and the demo routes: no files, no network.
    #[arg(long)]
    pub dev: bool,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The configuration file.
    #[arg(long)]
    pub config: PathBuf,
    #[command(flatten)]
    pub request: RequestArgs,
    /// Fetch the token issuer's keys now, instead of the jwks_files and keys.cache_dir.
    #[arg(long)]
    pub fetch: bool,
}

#[derive(Args, Debug)]
pub struct ListenArgs {
    /// Listen for gRPC here instead of the configuration's `listen.grpc`.
    #[arg(long)]
    pub grpc: Option<SocketAddr>,
    /// Serve /healthz, /readyz and /metrics here instead of the configuration's `listen.admin`.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
}

impl ListenArgs {
    fn apply(&self, config: &mut Config) {
        if let Some(grpc) = self.grpc {
            config.listen.grpc = grpc;
        }
        if let Some(admin) = self.admin {
            config.listen.admin = admin;
        }
    }
}

#[derive(Args, Debug)]
pub struct MintArgs {
    /// PKCS#8 PEM private key (`serve --dev` prints the path of its key).
    #[arg(long)]
    pub key: PathBuf,
    #[arg(long)]
    pub kid: String,
    #[arg(long)]
    pub iss: String,
    #[arg(long)]
    pub aud: String,
    #[arg(long)]
    pub sub: Option<String>,
    /// Unit primitives, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// Lifetime, like 1h or 3d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Extra claims as key=JSON value (a value that is not JSON is taken as a string).
    #[arg(long = "claim", value_parser = parse_key_value::<'='>)]
    pub claims: Vec<(String, String)>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The sidecar's gRPC address.
    #[arg(long, default_value = crate::config::DEFAULT_GRPC_LISTEN)]
    pub grpc: SocketAddr,
    #[command(flatten)]
    pub request: RequestArgs,
}

/// The HTTP request that `check` sends and `explain` decides on.
#[derive(Args, Debug)]
pub struct RequestArgs {
    /// The request path (with its query string, if any), as Envoy would send it.
    #[arg(long)]
    pub path: String,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Sent as `Authorization: Bearer <token>`.
    #[arg(long)]
    pub token: Option<String>,
    /// A request header, as name:value (repeatable).
    #[arg(long = "header", value_parser = parse_key_value::<':'>)]
    pub headers: Vec<(String, String)>,
}

impl RequestArgs {
    /// The headers with lower-case names, and the token as the Authorization header.
    fn header_list(&self) -> Vec<(String, String)> {
        crate::explain::request_headers(self.token.as_deref(), &self.headers)
    }
}

fn parse_key_value<const SEP: char>(s: &str) -> Result<(String, String), String> {
    s.split_once(SEP)
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected name{SEP}value, got {s:?}"))
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            source,
            listen,
            shutdown_delay,
            drain_timeout,
        } => {
            let stop = Stopping {
                delay: shutdown_delay,
                drain: drain_timeout,
            };
            serve(source, listen, stop).await
        }
        Command::CheckConfig { config } => check_config(&config),
        Command::Explain(args) => explain(args).await,
        Command::Mint(args) => mint(args),
        Command::Check(args) => check(args).await,
    }
}

/// How `serve` stops: answer with readiness off for `delay` (after SIGTERM), then drain
/// for at most `drain`.
#[derive(Clone, Copy, Debug)]
struct Stopping {
    delay: Duration,
    drain: Duration,
}

async fn serve(args: ServeArgs, listen: ListenArgs, stop: Stopping) -> anyhow::Result<ExitCode> {
    // Signal handlers go in before anything listens, so that a SIGTERM or SIGHUP sent as
    // soon as the sidecar answers is never met by the default action (exit at once).
    let mut signals = Signals::new()?;
    if args.dev {
        let mut setup = crate::devmode::prepare()?;
        listen.apply(&mut setup.config);
        print_out(&setup.banner())?;
        let result = serve_until_stopped(setup.config, None, stop, &mut signals).await;
        // The directory holds the dev private key: it lives only as long as the server.
        if let Err(e) = std::fs::remove_dir_all(&setup.dir) {
            tracing::warn!(dir = %setup.dir.display(), error = %e, "cannot remove the dev directory");
        }
        result?;
    } else {
        let path = args.config.expect("clap requires --config or --dev");
        let mut config = Config::load(&path)?;
        if let Some(warning) = unchecked_unit_primitives_warning(&config) {
            tracing::warn!("{warning}");
        }
        listen.apply(&mut config);
        serve_until_stopped(config, Some(listen), stop, &mut signals).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Serves until SIGTERM or SIGINT; after SIGTERM keeps answering with readiness off for
/// `stop.delay`; then drains for at most `stop.drain`. With `reload` (the command line's
/// listen overrides, which apply to reloaded configurations too), reloads on SIGHUP and
/// when the configuration file changes.
async fn serve_until_stopped(
    config: Config,
    reload: Option<ListenArgs>,
    stop: Stopping,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let mut running = crate::serve::start(config).await?;
    let reload = match reload {
        Some(listen) => {
            running.adjust_reloads(move |config| listen.apply(config));
            running.watch_config(crate::serve::CONFIG_POLL_INTERVAL);
            true
        }
        None => false,
    };
    let first = loop {
        match signals.next().await {
            Signal::Stop(name) => break name,
            Signal::Reload if reload => {
                tracing::info!("SIGHUP: reloading the configuration");
                // A rejected configuration is logged and counted; the old one keeps serving.
                let _ = running.reload().await;
            }
            Signal::Reload => {
                tracing::warn!("SIGHUP: serve --dev has no configuration file to reload")
            }
        }
    };
    running.stop_being_ready().await;
    // Kubernetes sends SIGTERM and removes the pod from its endpoints at the same time;
    // the proxies learn of it a little later and keep sending until then. A person at a
    // terminal (SIGINT) does not need the wait.
    if first == "SIGTERM" && !stop.delay.is_zero() {
        tracing::info!(
            signal = first,
            delay = %humantime::format_duration(stop.delay),
            "shutting down: not ready, still answering Checks for the shutdown delay"
        );
        let cut_short = async {
            loop {
                if let Signal::Stop(name) = signals.next().await {
                    return name;
                }
                tracing::info!("SIGHUP ignored: shutting down");
            }
        };
        tokio::select! {
            () = tokio::time::sleep(stop.delay) => {}
            name = cut_short => tracing::info!(signal = name, "shutdown delay cut short"),
        }
    }
    tracing::info!(signal = first, drain = %humantime::format_duration(stop.drain), "shutting down: draining");
    running.shutdown_within(stop.drain).await;
    tracing::info!("stopped");
    Ok(())
}

enum Signal {
    Stop(&'static str),
    Reload,
}

/// SIGTERM, SIGINT and SIGHUP, registered when created.
#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let register = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| anyhow::anyhow!("cannot listen for {name}: {e}"))
        };
        Ok(Self {
            term: register(SignalKind::terminate(), "SIGTERM")?,
            int: register(SignalKind::interrupt(), "SIGINT")?,
            hup: register(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.int.recv() => Signal::Stop("SIGINT"),
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Self)
    }

    async fn next(&mut self) -> Signal {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Stop("Ctrl-C")
    }
}

async fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let headers = args.request.header_list();
    let iss = crate::explain::token_issuer(&headers, config.tokens.max_bytes);
    let (keys, notes) = crate::explain::load_keys(&config, args.fetch, iss.as_deref()).await;
    let snapshot =
        crate::decide::Snapshot::new(std::sync::Arc::new(config), std::sync::Arc::new(keys));
    let method = args.request.method.to_ascii_uppercase();
    let request = crate::decision::Request {
        method: &method,
        path: &args.request.path,
        headers: &headers,
    };
    let explanation = crate::explain::explain(&snapshot, &request, SystemTime::now());
    let mut out = explanation.report;
    out.push_str("\nkeys loaded for this explanation:\n");
    for note in notes {
        out.push_str(&format!("  {note}\n"));
    }
    print_out(&out)?;
    Ok(if explanation.decision.is_allow() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Loads the configuration (with the registry it names), reads every `jwks_file` as
/// `serve` would, and prints what it enforces. Exit 0 when `serve` would become ready on
/// the files (network issuers are not contacted), 2 otherwise; warnings do not fail it.
fn check_config(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let mut out = format!(
        "{}: valid: {} issuer(s), {} backend(s), {} route(s)\n",
        path.display(),
        config.issuers.len(),
        config.backends.len(),
        config.routes.routes().len()
    );
    let mut errors = Vec::new();
    for issuer in &config.issuers {
        match key_source(issuer) {
            Ok(line) => out.push_str(&format!("  issuer {}: {line}\n", issuer.name)),
            Err(error) => {
                out.push_str(&format!("  issuer {}: NO KEYS: {error}\n", issuer.name));
                errors.push(format!("issuer {}: {error}", issuer.name));
            }
        }
    }
    match &config.registry {
        Some(registry) => out.push_str(&format!(
            "  unit primitive registry: {} unit primitive(s), {} backend service(s)\n",
            registry.unit_primitives().count(),
            registry.backend_services().count(),
        )),
        None => out.push_str("  unit primitive registry: none (unit_primitives: not set)\n"),
    }
    out.push('\n');
    out.push_str(&route_table(&config));
    out.push_str(ROUTE_TABLE_LEGEND);
    print_out(&out)?;
    if let Some(warning) = unchecked_unit_primitives_warning(&config) {
        eprintln!("warning: {warning}");
    }
    if errors.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for error in &errors {
        eprintln!("connector-authz: {}: {error}", path.display());
    }
    eprintln!(
        "connector-authz: serve would never be ready with this configuration: {} issuer(s) without keys",
        errors.len()
    );
    Ok(ExitCode::from(2))
}

/// Where an issuer's keys come from, in words; a `jwks_file` is read and parsed now, and
/// an error says why `serve` could not use it.
fn key_source(issuer: &crate::config::Issuer) -> Result<String, String> {
    use crate::config::KeysFrom;
    match &issuer.keys_from {
        KeysFrom::Discovery => Ok(format!(
            "keys from OIDC discovery ({}/.well-known/openid-configuration, then its jwks_uri; fetched when serve starts)",
            issuer.url.trim_end_matches('/')
        )),
        KeysFrom::JwksUri(uri) => Ok(format!(
            "keys from jwks_uri {uri} (fetched when serve starts)"
        )),
        KeysFrom::JwksFile(resolved) => {
            let shown = match &issuer.jwks_file_as_written {
                Some(written) => crate::config::shown_path(written, resolved),
                None => resolved.display().to_string(),
            };
            let limits = crate::keys::jwks::KeyLimits::default();
            let parsed = crate::keys::fetch::load_key_file(resolved, &limits)
                .map_err(|e| format!("jwks_file {shown}: {e}"))?;
            let mut kids: Vec<String> = parsed
                .key_set
                .keys
                .iter()
                .map(|k| k.kid.clone().unwrap_or_else(|| "(no kid)".into()))
                .collect();
            kids.sort();
            let mut line = format!(
                "keys from jwks_file {shown}: {} usable key(s) ({})",
                kids.len(),
                kids.join(", ")
            );
            for warning in &parsed.warnings {
                line.push_str(&format!("\n    skipped: {warning}"));
            }
            Ok(line)
        }
    }
}

/// Without a registry nothing checks the spelling of the unit primitives routes require:
/// a typo denies every request that route gets (403 insufficient_scope).
fn unchecked_unit_primitives_warning(config: &Config) -> Option<String> {
    if config.registry.is_some() {
        return None;
    }
    let mut names: Vec<&str> = config
        .routes
        .routes()
        .iter()
        .flat_map(|route| match &route.access {
            Access::Token {
                require,
                require_any,
                ..
            } => require.iter().chain(require_any).map(|r| &**r).collect(),
            Access::Public => Vec::new(),
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return None;
    }
    Some(format!(
        "no unit primitive registry (`unit_primitives:`), so nothing checks that the {} unit primitive(s) the routes require exist: {}. A misspelt one denies every request on its route. Point `unit_primitives:` at the registry: /usr/share/connector-authz/cloud_connector in the container image, config/cloud_connector/ in the repository.",
        names.len(),
        names.join(", ")
    ))
}

/// Printed under the route table.
const ROUTE_TABLE_LEGEND: &str = "
NEEDS: the unit primitives a token's `scopes` must hold (<header>: the one the request names in it).
FREE UNTIL: the registry's cut_off_date, the end of free access: until then GitLab grants the unit
  primitive without a paid add-on; after it only with one of its add-ons. GitLab applies it when it
  issues tokens; connector-authz only checks `scopes`. MIN GITLAB: the registry's min_gitlab_version,
  enforced only with `enforce_min_version: true`. -: not set (or no registry).
";

/// What the configuration enforces, one line per route: pattern, methods, backend
/// (audience), what it needs, and for each unit primitive its free-until date and
/// minimum GitLab version from the registry.
pub fn route_table(config: &Config) -> String {
    let mut rows = vec![[
        "ROUTE".to_string(),
        "METHODS".into(),
        "BACKEND (AUDIENCE)".into(),
        "NEEDS".into(),
        "FREE UNTIL".into(),
        "MIN GITLAB".into(),
    ]];
    for route in config.routes.routes() {
        let backend = &config.backends[route.backend];
        let methods = if route.methods == crate::route::Methods::ANY {
            "any".to_string()
        } else {
            route.methods.names().join(",")
        };
        let (needs, names): (String, Vec<&str>) = match &route.access {
            Access::Public => ("public".into(), vec![]),
            Access::Token {
                require,
                require_any,
                unit_primitive_header,
                ..
            } => {
                let mut needs: Vec<String> = require.iter().map(|r| r.to_string()).collect();
                if !require_any.is_empty() {
                    needs.push(format!("any-of({})", require_any.join(",")));
                }
                if let Some(h) = unit_primitive_header {
                    needs.push(format!("<{h}>"));
                }
                if needs.is_empty() {
                    needs.push("any valid token".into());
                }
                (needs.join(" "), require.iter().map(|r| &**r).collect())
            }
        };
        let registry = config.registry.as_deref();
        let detail = |f: &dyn Fn(&crate::registry::UnitPrimitive) -> Option<String>| {
            let values: Vec<String> = names
                .iter()
                .map(|n| {
                    registry
                        .and_then(|r| r.unit_primitive(n))
                        .and_then(f)
                        .unwrap_or_else(|| "-".into())
                })
                .collect();
            if values.is_empty() {
                "-".to_string()
            } else {
                values.join(" ")
            }
        };
        rows.push([
            route.pattern.to_string(),
            methods,
            format!("{} ({})", backend.name, backend.audience),
            needs,
            detail(&|up| up.cut_off_date.as_ref().map(|d| d.as_str().to_string())),
            detail(&|up| up.min_gitlab_version.as_ref().map(|v| v.to_string())),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn mint(args: MintArgs) -> anyhow::Result<ExitCode> {
    let pem = std::fs::read_to_string(&args.key)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.key.display()))?;
    let key = DevKey::from_pkcs8_pem(&pem, args.kid.clone())?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut claims = json!({
        "iss": args.iss,
        "aud": args.aud,
        "iat": now,
        "nbf": now,
        "exp": now + args.ttl.as_secs(),
        "jti": format!("mint-{now}-{}", std::process::id()),
        "scopes": args.scopes,
    });
    if let Some(sub) = args.sub {
        claims["sub"] = json!(sub);
    }
    for (name, value) in args.claims {
        claims[name] = serde_json::from_str(&value).unwrap_or(json!(value));
    }
    print_out(&format!("{}\n", key.sign(&claims)))?;
    Ok(ExitCode::SUCCESS)
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let request = crate::grpc::http_check_request(
        &args.request.method.to_ascii_uppercase(),
        &args.request.path,
        args.request.header_list().into_iter().collect(),
    );
    let mut client = AuthorizationClient::connect(format!("http://{}", args.grpc))
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach connector-authz at {}: {e}", args.grpc))?;
    let response = client.check(request).await?.into_inner();
    let mut out = String::new();
    let code = match response.http_response {
        Some(check_response::HttpResponse::OkResponse(ok)) => {
            out.push_str("allow\n");
            for h in ok.headers.iter().filter_map(|h| h.header.as_ref()) {
                out.push_str(&format!("  {}: {}\n", h.key, h.value));
            }
            ExitCode::SUCCESS
        }
        Some(check_response::HttpResponse::DeniedResponse(denied)) => {
            let status = denied.status.map_or(0, |s| s.code);
            out.push_str(&format!("deny {status}\n"));
            for h in denied.headers.iter().filter_map(|h| h.header.as_ref()) {
                out.push_str(&format!("  {}: {}\n", h.key, h.value));
            }
            out.push_str(&format!("  {}\n", denied.body));
            ExitCode::from(1)
        }
        None => {
            let code = response.status.map_or(0, |s| s.code);
            out.push_str(if code == 0 { "allow\n" } else { "deny\n" });
            ExitCode::from(u8::from(code != 0))
        }
    };
    print_out(&out)?;
    Ok(code)
}

/// Writes to stdout; a reader that went away (`| head`) ends the output, not the program.
pub fn print_out(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

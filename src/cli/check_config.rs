//! `check-config`: validate a configuration, read its key files, and print the route
//! table it enforces.

use std::path::Path;
use std::process::ExitCode;

use super::print_out;
use crate::config::Config;
use crate::route::Access;

/// Loads the configuration (with the registry it names), reads every `jwks_file` and
/// TLS file as `serve` would, and prints what it enforces. Exit 0 when `serve` would become ready on
/// the files (network issuers are not contacted), 2 otherwise; warnings do not fail it.
pub(super) fn check_config(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    // `serve` refuses to start with an unusable certificate: the same error here.
    crate::tls::check_config(&config)?;
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
    for (key, files) in [
        ("listen.tls", &config.listen.tls),
        ("listen.admin_tls", &config.listen.admin_tls),
    ] {
        if let Some(files) = files {
            out.push_str(&format!(
                "  {key}: certificate {}, key {}, {}\n",
                files.cert_file.shown(),
                files.key_file.shown(),
                match &files.client_ca_file {
                    Some(ca) => format!("client certificates required (CAs from {})", ca.shown()),
                    None => "no client certificates".to_owned(),
                }
            ));
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
pub(super) fn unchecked_unit_primitives_warning(config: &Config) -> Option<String> {
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
fn route_table(config: &Config) -> String {
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

//! Which URLs keys may be fetched from. Only the rule lives here (config validation uses it
//! at load time); the sidecar does the fetching.

use std::net::IpAddr;

/// Whether we may fetch from `url`: `https://` always, plain `http://` only for loopback
/// hosts (tests and local development), nothing else. Config validation uses it too.
pub fn check_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{url:?} is not a valid URL ({e})"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        // Credentials in a URL end up in logs and error messages.
        return Err("URLs with credentials (user:password@) are not allowed".into());
    }
    let host = parsed.host_str().unwrap_or_default();
    match parsed.scheme() {
        "https" if !host.is_empty() => Ok(()),
        "http" if is_loopback(host) => Ok(()),
        "http" => Err(format!(
            "plain http:// is allowed only for loopback hosts (127.0.0.1, ::1, localhost); \
             use https:// for {host}"
        )),
        scheme => Err(format!("scheme {scheme:?} is not supported; use https://")),
    }
}

fn is_loopback(host: &str) -> bool {
    // IPv6 hosts come bracketed from the URL parser.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

//! The property behind the canonical path: for generated route tables and paths, every
//! spelling of a path that a mainstream backend serves with the same handler (escapes of
//! any character in either hex case, a trailing slash, `;` parameters, dot segments, HEAD
//! for GET) is refused or decided by the same route as the plain path.

use proptest::prelude::*;

use super::*;

const SEGMENTS: [&str; 7] = ["ai", "v1", "m:generate", "x", "é", "a.b", "a b"];

fn segments(min: usize, max: usize) -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(prop::sample::select(&SEGMENTS[..]), min..=max)
}

fn joined(segments: &[&str], trailing_slash: bool) -> String {
    let mut path: String = segments.iter().map(|s| format!("/{s}")).collect();
    if trailing_slash || path.is_empty() {
        path.push('/');
    }
    path
}

/// A route: exact or prefix, public or not, and one of four method sets.
fn route_strategy() -> impl Strategy<Value = Route> {
    (
        segments(0, 3),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0..4usize,
    )
        .prop_map(|(segs, exact, slash, public, methods)| {
            let path = joined(&segs, slash);
            let methods = [
                Methods::ANY,
                Methods::parse(["GET"]).unwrap(),
                Methods::parse(["POST"]).unwrap(),
                Methods::parse(["GET", "POST"]).unwrap(),
            ][methods];
            Route {
                pattern: if exact {
                    Pattern::Exact(path)
                } else {
                    Pattern::Prefix(path)
                },
                methods,
                access: if public {
                    Access::Public
                } else {
                    Access::Token {
                        require: vec!["duo_chat".into()],
                        require_any: Vec::new(),
                        user_tokens: true,
                        unit_primitive_header: None,
                    }
                },
                backend: 0,
                line: 0,
                deprecated: Vec::new(),
            }
        })
}

/// Keeps the routes that do not conflict with an earlier one; `line` numbers them.
fn table(candidates: Vec<Route>) -> RouteTable {
    let mut kept: Vec<Route> = Vec::new();
    for mut route in candidates {
        route.line = u32::try_from(kept.len()).unwrap();
        let mut trial = kept.clone();
        trial.push(route);
        if RouteTable::new(trial.clone()).is_ok() {
            kept = trial;
        }
    }
    RouteTable::new(kept).unwrap()
}

fn escape(c: char, upper: bool) -> String {
    let mut buf = [0u8; 4];
    c.encode_utf8(&mut buf)
        .bytes()
        .map(|b| {
            if upper {
                format!("%{b:02X}")
            } else {
                format!("%{b:02x}")
            }
        })
        .collect()
}

/// Spellings of the canonical `path`, and whether each is the trailing-slash one. `at`
/// picks the character or segment that a spelling changes.
fn spellings(path: &str, at: usize, upper: bool) -> Vec<(String, bool)> {
    let chars: Vec<char> = path.chars().collect();
    let i = at % chars.len();
    let mut out = Vec::new();
    // One character escaped, and every character escaped.
    let one: String = chars
        .iter()
        .enumerate()
        .map(|(j, &c)| {
            if j == i {
                escape(c, upper)
            } else {
                c.to_string()
            }
        })
        .collect();
    out.push((one, false));
    out.push((chars.iter().map(|&c| escape(c, upper)).collect(), false));
    // Mixed case within one escape: "%c3%A9".
    out.push((
        chars
            .iter()
            .map(|&c| {
                let e = escape(c, upper);
                if e.len() > 3 {
                    format!("{}{}", &e[..3], e[3..].to_ascii_lowercase())
                } else {
                    e
                }
            })
            .collect(),
        false,
    ));
    if !path.ends_with('/') {
        out.push((format!("{path}/"), true));
        out.push((format!("{path}/."), true));
    }
    // Dot segments and parameters at one slash.
    let slashes: Vec<usize> = path.match_indices('/').map(|(k, _)| k).collect();
    let k = slashes[at % slashes.len()];
    let (head, tail) = path.split_at(k);
    out.push((format!("{head}/.{tail}"), false));
    out.push((format!("{head}/zz/..{tail}"), false));
    out.push((format!("{head}/zz/%2E%2e{tail}"), false));
    out.push((format!("{head}//..{tail}"), false));
    out.push((format!("{head};x=1{tail}"), false));
    out.push((format!("{path};p"), false));
    out.push((format!("{path}?q=/../x;y"), false));
    out
}

fn same(a: Option<&Route>, b: Option<&Route>) -> bool {
    a.map(|r| r.line) == b.map(|r| r.line)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_spelling_is_refused_or_decided_by_the_plain_paths_route(
        routes in prop::collection::vec(route_strategy(), 1..8),
        segs in segments(1, 4),
        slash in any::<bool>(),
        at in any::<usize>(),
        upper in any::<bool>(),
    ) {
        let table = table(routes);
        let plain = joined(&segs, slash);
        prop_assert_eq!(normalize_path(&plain).unwrap(), plain.as_str());
        for method in ["GET", "POST"] {
            let decided = table.find(&plain, method);
            if method == "GET" && decided.is_some() {
                prop_assert!(same(table.find(&plain, "HEAD"), decided), "HEAD {plain}");
            }
            for (spelling, is_slash) in spellings(&plain, at, upper) {
                let Ok(canonical) = normalize_path(&spelling) else { continue };
                let got = table.find(&canonical, method);
                if same(got, decided) {
                    continue;
                }
                // A trailing slash may leave the plain path's route only where the table
                // says so: a public exact path never widens, and a pattern written for
                // `plain/` itself decides that spelling.
                let allowed = is_slash
                    && (table
                        .routes_of_pattern(&canonical)
                        .any(|r| r.pattern.as_str() == format!("{plain}/"))
                        || table.routes().iter().any(|r| {
                            r.pattern == Pattern::Exact(plain.clone()) && r.access == Access::Public
                        }));
                prop_assert!(
                    allowed,
                    "{method} {spelling:?} (canonical {canonical:?}) → {:?}, but {plain:?} → {:?}",
                    got.map(|r| &r.pattern),
                    decided.map(|r| &r.pattern)
                );
            }
        }
    }
}

//! Target `path`: bytes → `normalize_path` → a fixed route table. Oracles: no panic; a
//! canonical path starts with '/', has no empty, `.` or `..` segment, no query, fragment,
//! '%', ';', '\' or control character; normalizing it again changes nothing; and every
//! spelling of it that a backend serves with the same handler (an escape of any character
//! in either hex case, dot segments, a trailing slash, HEAD for GET) is refused or decided
//! by the same route, a trailing slash leaving it only for a pattern written for that
//! spelling or past a public exact path (which never widens).

use std::sync::OnceLock;

use connector_authz::route::{Access, Methods, Pattern, Route, RouteTable, normalize_path};

use super::input::lossy;

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let get = Methods::parse(["GET"]).expect("GET");
        let post = Methods::parse(["POST"]).expect("POST");
        let token = || Access::Token {
            require: vec!["duo_chat".into()],
            require_any: Vec::new(),
            user_tokens: true,
            unit_primitive_header: None,
        };
        let routes = [
            (
                Pattern::Exact("/ai/v1/models/m:generate".into()),
                Methods::ANY,
                token(),
            ),
            (Pattern::Prefix("/ai/v1/".into()), Methods::ANY, token()),
            (Pattern::Exact("/ai/v2/settings".into()), get, token()),
            (Pattern::Prefix("/ai/v2/".into()), Methods::ANY, token()),
            (
                Pattern::Prefix("/ai/monitoring/".into()),
                get,
                Access::Public,
            ),
            (
                Pattern::Exact("/ai/health".into()),
                Methods::ANY,
                Access::Public,
            ),
            (Pattern::Exact("/a".into()), post, token()),
            (Pattern::Prefix("/a/".into()), Methods::ANY, Access::Public),
            (Pattern::Prefix("/é/".into()), Methods::ANY, token()),
            (Pattern::Prefix("/".into()), get, Access::Public),
        ];
        let routes = routes
            .into_iter()
            .enumerate()
            .map(|(line, (pattern, methods, access))| Route {
                pattern,
                methods,
                access,
                backend: 0,
                line: line as u32,
                deprecated: Vec::new(),
            })
            .collect();
        RouteTable::new(routes).expect("the fuzz route table has no conflicts")
    })
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

fn line(route: Option<&Route>) -> Option<u32> {
    route.map(|r| r.line)
}

pub fn run(data: &[u8]) {
    let target = lossy(data);
    let Ok(normalized) = normalize_path(&target) else {
        return;
    };
    let normalized: &str = &normalized;
    assert!(normalized.starts_with('/'), "{target:?} → {normalized:?}");
    assert!(!normalized.contains("//"), "{target:?} → {normalized:?}");
    assert!(
        !normalized.contains(['?', '#', '%', ';', '\\']),
        "{target:?} → {normalized:?}"
    );
    for segment in normalized.split('/') {
        assert!(
            segment != "." && segment != "..",
            "{target:?} → {normalized:?} keeps a dot segment"
        );
    }
    assert!(
        !normalized.contains(|c: char| c.is_ascii_control()),
        "{target:?} → {normalized:?}"
    );
    let again = normalize_path(normalized)
        .unwrap_or_else(|e| panic!("{target:?} → {normalized:?}, which is refused: {e:?}"));
    assert_eq!(&*again, normalized, "normalizing {target:?} twice differs");

    // Same route or refused, for spellings of the canonical path.
    let table = table();
    let upper = data.first().is_some_and(|b| b & 1 == 1);
    let chars: Vec<char> = normalized.chars().collect();
    let mut spellings: Vec<(String, bool)> = Vec::new();
    for i in 0..chars.len().min(64) {
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
        spellings.push((one, false));
    }
    for (k, _) in normalized.match_indices('/').take(16) {
        let (head, tail) = normalized.split_at(k);
        spellings.push((format!("{head}/.{tail}"), false));
        spellings.push((format!("{head}/zz/..{tail}"), false));
        spellings.push((format!("{head}/zz/%2e%2E{tail}"), false));
        spellings.push((format!("{head}//..{tail}"), false));
        spellings.push((format!("{head};p{tail}"), false));
    }
    if !normalized.ends_with('/') {
        spellings.push((format!("{normalized}/"), true));
        spellings.push((format!("{normalized}/."), true));
    }
    for method in ["GET", "POST"] {
        let decided = table.find(normalized, method);
        if method == "GET" && decided.is_some() {
            assert_eq!(
                line(table.find(normalized, "HEAD")),
                line(decided),
                "HEAD {normalized:?}"
            );
        }
        for (spelling, is_slash) in &spellings {
            let Ok(canonical) = normalize_path(spelling) else {
                continue;
            };
            let got = table.find(&canonical, method);
            if line(got) == line(decided) {
                continue;
            }
            let slashed = format!("{normalized}/");
            let allowed = *is_slash
                && (table
                    .routes_of_pattern(&canonical)
                    .any(|r| r.pattern.as_str() == slashed)
                    || table.routes().iter().any(|r| {
                        r.pattern == Pattern::Exact(normalized.to_string())
                            && r.access == Access::Public
                    }));
            assert!(
                allowed,
                "{method} {spelling:?} (canonical {canonical:?}) → {:?}, but {normalized:?} → {:?}",
                got.map(|r| &r.pattern),
                decided.map(|r| &r.pattern)
            );
        }
    }
}

//! The compiled [`RouteTable`]: request path + method → the route that governs it.
//!
//! Paths are normalized before matching ([`normalize_path`]) so that no spelling of a
//! protected path (`/ai/monitoring/../v2/code/x`, `/ai/monitoring/%2e%2e/v2/code/x`,
//! `//ai/v2/code/x`) can land on a public prefix or dodge a longer one. What cannot be
//! normalized safely (an encoded slash, a NUL, `..` above the root) is refused.
//!
//! Matching: an exact `path` beats every `prefix`; among prefixes the longest wins;
//! a route with `methods` only matches those methods, and a route that does not match
//! the method lets the next candidate try.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

/// Why a request path was refused before routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    EncodedSlash,
    Nul,
    ControlCharacter,
    Backslash,
    BadPercentEncoding,
    AboveRoot,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "the request path must start with '/'",
            PathError::EncodedSlash => "the request path contains an encoded slash or backslash",
            PathError::Nul => "the request path contains a NUL byte",
            PathError::ControlCharacter => "the request path contains a control character",
            PathError::Backslash => "the request path contains a backslash",
            PathError::BadPercentEncoding => "the request path has a malformed percent-encoding",
            PathError::AboveRoot => "the request path climbs above the root with '..'",
        }
    }
}

/// The path without its query string or fragment, percent-decoded where the decoding
/// cannot change its meaning (unreserved characters, RFC 3986 §2.3), with repeated
/// slashes merged and dot segments resolved.
///
/// Slashes are merged before dot segments are resolved, as a backend that merges
/// slashes would see it: otherwise `/public//../secret` resolves to `/public/secret`
/// here but to `/secret` behind us.
pub fn normalize_path(target: &str) -> Result<Cow<'_, str>, PathError> {
    let path = match target.find(['?', '#']) {
        Some(end) => &target[..end],
        None => target,
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_plain(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    Ok(Cow::Owned(resolve_segments(&decoded)?))
}

/// True when the path needs no work: no escapes, no empty or dot segments, nothing odd.
fn is_plain(path: &str) -> bool {
    let bytes = path.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' | b'\\' | 0..=0x1f | 0x7f => return false,
            b'/' if i > 0 && bytes[i - 1] == b'/' => return false,
            b'.' if bytes[i - 1] == b'/' => {
                // "/." starts a dot segment when followed by "/", end, or ".".
                match bytes.get(i + 1) {
                    None | Some(b'/') => return false,
                    Some(b'.') if matches!(bytes.get(i + 2), None | Some(b'/')) => return false,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    true
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            0 => return Err(PathError::Nul),
            b'\\' => return Err(PathError::Backslash),
            0x01..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .ok_or(PathError::BadPercentEncoding)?;
                let value = (hex_value(hex[0]).ok_or(PathError::BadPercentEncoding)? << 4)
                    | hex_value(hex[1]).ok_or(PathError::BadPercentEncoding)?;
                match value {
                    0 => return Err(PathError::Nul),
                    b'/' | b'\\' => return Err(PathError::EncodedSlash),
                    v if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') => {
                        out.push(v as char);
                    }
                    v => {
                        // Reserved or non-ASCII: keep it escaped, in one spelling (upper-case hex).
                        out.push('%');
                        out.push(char::from(HEX_UPPER[(v >> 4) as usize]));
                        out.push(char::from(HEX_UPPER[(v & 0xf) as usize]));
                    }
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        // Copy the rest of this run of ordinary bytes at once (keeps UTF-8 intact).
        let run_end = bytes[i..]
            .iter()
            .position(|&c| matches!(c, b'%' | b'\\' | 0..=0x1f | 0x7f))
            .map_or(bytes.len(), |p| i + p);
        out.push_str(&path[i..run_end]);
        i = run_end;
    }
    Ok(out)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn resolve_segments(path: &str) -> Result<String, PathError> {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        trailing_slash = false;
        match segment {
            "" | "." => trailing_slash = true,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// A set of HTTP methods as a bit mask; methods outside the known list never match a
/// route that names its methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Methods(u16);

const METHOD_NAMES: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
];

impl Methods {
    pub const ANY: Methods = Methods(u16::MAX);

    /// Parses a list of method names (case-insensitive); the unknown name is the error.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Methods, String> {
        let mut bits = 0u16;
        for name in names {
            let bit = method_bit(name).ok_or_else(|| name.to_string())?;
            bits |= bit;
        }
        Ok(Methods(bits))
    }

    pub fn contains(self, method: &str) -> bool {
        self == Methods::ANY || method_bit(method).is_some_and(|bit| self.0 & bit != 0)
    }

    pub fn overlaps(self, other: Methods) -> bool {
        self.0 & other.0 != 0
    }

    pub fn names(self) -> Vec<&'static str> {
        METHOD_NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, n)| *n)
            .collect()
    }
}

fn method_bit(name: &str) -> Option<u16> {
    METHOD_NAMES
        .iter()
        .position(|m| m.eq_ignore_ascii_case(name))
        .map(|i| 1 << i)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    pub fn as_str(&self) -> &str {
        match self {
            Pattern::Exact(p) | Pattern::Prefix(p) => p,
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(p) => write!(f, "path {p}"),
            Pattern::Prefix(p) => write!(f, "prefix {p}"),
        }
    }
}

/// What a route asks of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// No token needed.
    Public,
    /// A valid token whose `scopes` hold every unit primitive in `require`, and, when
    /// `unit_primitive_header` is set, the unit primitive that header names.
    Token {
        require: Vec<Arc<str>>,
        unit_primitive_header: Option<Box<str>>,
    },
}

#[derive(Clone, Debug)]
pub struct Route {
    pub pattern: Pattern,
    pub methods: Methods,
    pub access: Access,
    /// Index into the configuration's backends.
    pub backend: usize,
    /// Where the route is written, for messages.
    pub line: u32,
    /// The required unit primitives that the registry marks deprecated (found at load
    /// time, so a request can be logged without a registry lookup).
    pub deprecated: Vec<Arc<str>>,
}

/// Two routes that claim the same path (or prefix) for at least one common method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub first: usize,
    pub second: usize,
}

/// Pattern → indices of the routes that claim it (one per disjoint method set).
type RouteIndex = HashMap<Box<str>, Vec<usize>>;

/// Routes compiled for lookup: exact paths in a map, prefixes in a radix tree, so that the
/// longest matching prefix is found in one walk down the tree. The walk is bounded by the
/// path, not by the number of routes: 10,000 routes cost about what 10 do.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    exact: RouteIndex,
    prefixes: PrefixTree,
}

impl RouteTable {
    /// Builds the table; two routes claiming the same pattern for a common method conflict.
    pub fn new(routes: Vec<Route>) -> Result<RouteTable, Conflict> {
        let mut exact: RouteIndex = HashMap::new();
        let mut prefixes = PrefixTree::default();
        for (index, route) in routes.iter().enumerate() {
            let slot = match &route.pattern {
                Pattern::Exact(p) => exact.entry(p.as_str().into()).or_default(),
                Pattern::Prefix(p) => prefixes.slot(p.as_bytes()),
            };
            if let Some(&first) = slot
                .iter()
                .find(|&&other| routes[other].methods.overlaps(route.methods))
            {
                return Err(Conflict {
                    first,
                    second: index,
                });
            }
            slot.push(index);
        }
        Ok(RouteTable {
            routes,
            exact,
            prefixes,
        })
    }

    /// The route for a normalized path and a method.
    pub fn find(&self, path: &str, method: &str) -> Option<&Route> {
        let pick = |ids: &[usize]| {
            ids.iter()
                .map(|&i| &self.routes[i])
                .find(|r| r.methods.contains(method))
        };
        if let Some(route) = self.exact.get(path).and_then(|ids| pick(ids)) {
            return Some(route);
        }
        // Prefixes of the path come shortest first; the last one that takes the method wins.
        let mut longest = None;
        self.prefixes.each_prefix_of(path.as_bytes(), |ids| {
            if let Some(route) = pick(ids) {
                longest = Some(route);
            }
        });
        longest
    }

    /// The route for a request target as it arrives (normalized first, as `decide`
    /// does); `None` for a malformed path or no match.
    pub fn route_for(&self, target: &str, method: &str) -> Option<&Route> {
        self.find(&normalize_path(target).ok()?, method)
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// A radix tree of byte strings: each edge is labelled with the bytes it consumes, and a
/// node holds the routes whose prefix ends there. Nodes live in one vector (index 0 is the
/// root, with an empty label); children are found by their label's first byte.
#[derive(Clone, Debug)]
struct PrefixTree {
    nodes: Vec<PrefixNode>,
}

#[derive(Clone, Debug, Default)]
struct PrefixNode {
    label: Box<[u8]>,
    /// (first byte of the child's label, child index); at most one per byte.
    children: Vec<(u8, u32)>,
    routes: Vec<usize>,
}

impl Default for PrefixTree {
    fn default() -> Self {
        Self {
            nodes: vec![PrefixNode::default()],
        }
    }
}

impl PrefixTree {
    fn child(&self, node: usize, byte: u8) -> Option<usize> {
        self.nodes[node]
            .children
            .iter()
            .find(|(first, _)| *first == byte)
            .map(|&(_, child)| child as usize)
    }

    fn push(&mut self, node: PrefixNode) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The route list of `prefix`'s node, made (by adding or splitting an edge) if needed.
    fn slot(&mut self, prefix: &[u8]) -> &mut Vec<usize> {
        let mut node = 0;
        let mut rest = prefix;
        while let Some(&first) = rest.first() {
            let Some(child) = self.child(node, first) else {
                let leaf = self.push(PrefixNode {
                    label: rest.into(),
                    ..PrefixNode::default()
                });
                self.nodes[node].children.push((first, leaf as u32));
                node = leaf;
                break;
            };
            let label = &self.nodes[child].label;
            let common = label.iter().zip(rest).take_while(|(a, b)| a == b).count();
            if common < label.len() {
                // Split the edge: node -> mid (the common part) -> child (the remainder).
                let (head, tail) = label.split_at(common);
                let (head, tail): (Box<[u8]>, Box<[u8]>) = (head.into(), tail.into());
                let tail_first = tail[0];
                self.nodes[child].label = tail;
                let mid = self.push(PrefixNode {
                    label: head,
                    children: vec![(tail_first, child as u32)],
                    routes: Vec::new(),
                });
                for entry in &mut self.nodes[node].children {
                    if entry.1 as usize == child {
                        entry.1 = mid as u32;
                    }
                }
                node = mid;
            } else {
                node = child;
            }
            rest = &rest[common..];
        }
        &mut self.nodes[node].routes
    }

    /// Calls `f` with the routes of every prefix of `path` that has some, shortest first.
    fn each_prefix_of(&self, path: &[u8], mut f: impl FnMut(&[usize])) {
        let mut node = 0;
        let mut rest = path;
        loop {
            let routes = &self.nodes[node].routes;
            if !routes.is_empty() {
                f(routes);
            }
            let Some(child) = rest.first().and_then(|&b| self.child(node, b)) else {
                return;
            };
            let Some(after) = rest.strip_prefix(&*self.nodes[child].label) else {
                return;
            };
            node = child;
            rest = after;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize_path(p).map(|c| c.into_owned())
    }

    #[test]
    fn plain_paths_are_borrowed_and_lose_their_query() {
        assert!(matches!(
            normalize_path("/ai/v2/code/completions"),
            Ok(Cow::Borrowed(_))
        ));
        assert_eq!(norm("/ai/v1/x?next=/../y#frag").unwrap(), "/ai/v1/x");
        assert_eq!(norm("/a.b/.c/..d").unwrap(), "/a.b/.c/..d");
    }

    #[test]
    fn dot_segments_and_repeated_slashes_are_resolved() {
        assert_eq!(
            norm("/ai/monitoring/../v2/code/x").unwrap(),
            "/ai/v2/code/x"
        );
        assert_eq!(norm("/ai/./v2//code/").unwrap(), "/ai/v2/code/");
        assert_eq!(
            norm("/ai/monitoring/%2e%2e/v2/code/x").unwrap(),
            "/ai/v2/code/x"
        );
        assert_eq!(norm("/ai/monitoring/%2E./v2").unwrap(), "/ai/v2");
        assert_eq!(norm("/ai/x/..").unwrap(), "/ai/");
        assert_eq!(norm("//").unwrap(), "/");
        // Merged before resolved: the empty segment is not a directory to climb out of.
        assert_eq!(norm("/ai/monitoring//../v2/code").unwrap(), "/ai/v2/code");
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_kept_in_one_spelling() {
        assert_eq!(norm("/ai/%76%32/code").unwrap(), "/ai/v2/code");
        assert_eq!(norm("/ai/a%2cb%3f").unwrap(), "/ai/a%2Cb%3F");
        assert_eq!(norm("/caf%C3%A9/é").unwrap(), "/caf%C3%A9/é");
    }

    #[test]
    fn dangerous_paths_are_refused() {
        assert_eq!(norm("ai/v2"), Err(PathError::NotAbsolute));
        assert_eq!(norm("*"), Err(PathError::NotAbsolute));
        assert_eq!(norm("/ai%2fv2"), Err(PathError::EncodedSlash));
        assert_eq!(norm("/ai%2Fv2"), Err(PathError::EncodedSlash));
        assert_eq!(norm("/ai%5cv2"), Err(PathError::EncodedSlash));
        assert_eq!(norm("/ai\\v2"), Err(PathError::Backslash));
        assert_eq!(norm("/ai%00"), Err(PathError::Nul));
        assert_eq!(norm("/ai\0"), Err(PathError::Nul));
        assert_eq!(norm("/ai\n"), Err(PathError::ControlCharacter));
        assert_eq!(norm("/ai%zz"), Err(PathError::BadPercentEncoding));
        assert_eq!(norm("/ai%2"), Err(PathError::BadPercentEncoding));
        assert_eq!(norm("/../etc"), Err(PathError::AboveRoot));
        assert_eq!(norm("/a/%2e%2e/%2e%2e/b"), Err(PathError::AboveRoot));
    }

    fn route(pattern: Pattern, methods: Methods, backend: usize) -> Route {
        Route {
            pattern,
            methods,
            access: Access::Public,
            backend,
            line: 0,
            deprecated: Vec::new(),
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(vec![
            route(Pattern::Prefix("/ai/".into()), Methods::ANY, 0),
            route(Pattern::Prefix("/ai/v2/code/".into()), Methods::ANY, 1),
            route(
                Pattern::Exact("/ai/v2/code/special".into()),
                Methods::parse(["POST"]).unwrap(),
                2,
            ),
            route(
                Pattern::Prefix("/ai/monitoring/".into()),
                Methods::parse(["get", "HEAD"]).unwrap(),
                3,
            ),
        ])
        .unwrap()
    }

    #[test]
    fn exact_beats_longest_prefix_beats_shorter_prefix() {
        let t = table();
        assert_eq!(t.find("/ai/v2/code/special", "POST").unwrap().backend, 2);
        assert_eq!(t.find("/ai/v2/code/other", "POST").unwrap().backend, 1);
        assert_eq!(t.find("/ai/v1/chat", "POST").unwrap().backend, 0);
        assert!(t.find("/observability/x", "GET").is_none());
        assert!(t.find("/ai", "GET").is_none());
    }

    #[test]
    fn a_method_mismatch_falls_through_to_the_next_candidate() {
        let t = table();
        // The exact route is POST only: a GET goes to the longest prefix.
        assert_eq!(t.find("/ai/v2/code/special", "GET").unwrap().backend, 1);
        assert_eq!(t.find("/ai/monitoring/health", "GET").unwrap().backend, 3);
        assert_eq!(t.find("/ai/monitoring/health", "POST").unwrap().backend, 0);
        assert_eq!(
            t.find("/ai/monitoring/health", "PROPFIND").unwrap().backend,
            0
        );
    }

    #[test]
    fn the_same_pattern_twice_conflicts_only_when_methods_overlap() {
        let get = Methods::parse(["GET"]).unwrap();
        let post = Methods::parse(["POST"]).unwrap();
        assert!(
            RouteTable::new(vec![
                route(Pattern::Exact("/a".into()), get, 0),
                route(Pattern::Exact("/a".into()), post, 0),
                route(Pattern::Prefix("/a".into()), Methods::ANY, 0),
            ])
            .is_ok()
        );
        let err = RouteTable::new(vec![
            route(Pattern::Prefix("/a/".into()), get, 0),
            route(Pattern::Prefix("/b/".into()), get, 0),
            route(Pattern::Prefix("/a/".into()), Methods::ANY, 1),
        ])
        .unwrap_err();
        assert_eq!(
            err,
            Conflict {
                first: 0,
                second: 2
            }
        );
    }

    #[test]
    fn methods_parse_and_report_unknown_names() {
        assert_eq!(
            Methods::parse(["get", "Post"]).unwrap().names(),
            vec!["GET", "POST"]
        );
        assert_eq!(Methods::parse(["FETCH"]).unwrap_err(), "FETCH");
        assert!(Methods::ANY.contains("PROPFIND"));
    }

    /// The radix tree against the definition: among the routes whose prefix starts the
    /// path and that take the method, the longest prefix wins.
    #[test]
    fn longest_prefix_agrees_with_a_scan_of_every_route() {
        let words = ["", "a", "ab", "abc", "b", "ba", "/", "x/", "é", "a/b"];
        let get = Methods::parse(["GET"]).unwrap();
        let post = Methods::parse(["POST"]).unwrap();
        let mut routes = Vec::new();
        for (i, w1) in words.iter().enumerate() {
            for (j, w2) in words.iter().enumerate() {
                let methods = if (i + j) % 3 == 0 { get } else { Methods::ANY };
                routes.push(route(Pattern::Prefix(format!("/{w1}{w2}")), methods, 0));
            }
        }
        // The same prefix twice would conflict: keep the first, then give some GET-only
        // prefixes a second, POST-only route.
        let mut seen = std::collections::HashSet::new();
        routes.retain(|r| seen.insert(r.pattern.as_str().to_string()));
        let posts: Vec<Route> = routes
            .iter()
            .filter(|r| r.methods == get)
            .step_by(2)
            .map(|r| route(r.pattern.clone(), post, 1))
            .collect();
        assert!(!posts.is_empty());
        routes.extend(posts);
        let t = RouteTable::new(routes.clone()).unwrap();
        let mut checked = 0;
        for w1 in words {
            for w2 in words {
                for w3 in ["", "c", "/d", "é/"] {
                    let path = format!("/{w1}{w2}{w3}");
                    for method in ["GET", "POST"] {
                        let expected = routes
                            .iter()
                            .filter(|r| path.starts_with(r.pattern.as_str()))
                            .filter(|r| r.methods.contains(method))
                            .max_by_key(|r| r.pattern.as_str().len())
                            .map(|r| (r.pattern.clone(), r.methods));
                        let found = t
                            .find(&path, method)
                            .map(|r| (r.pattern.clone(), r.methods));
                        assert_eq!(found, expected, "{method} {path}");
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 800);
    }

    #[test]
    fn prefix_lookup_respects_utf8_boundaries() {
        let t =
            RouteTable::new(vec![route(Pattern::Prefix("/ab".into()), Methods::ANY, 0)]).unwrap();
        assert!(t.find("/é", "GET").is_none());
        assert!(t.find("/abc", "GET").is_some());
    }
}

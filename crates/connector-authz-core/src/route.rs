//! The compiled [`RouteTable`]: request path + method → the route that governs it.
//!
//! The sidecar must decide on the path that the backend will serve, whatever the backend's
//! framework, so a request path has one canonical form ([`normalize_path`]) and a path that
//! common backends could read two ways is refused (400 `bad_path`) rather than routed:
//! - the query and fragment are dropped and the path is percent-decoded once; an escaped
//!   `/`, `\`, `%`, `?`, `#`, NUL or control character, and a result that is not valid UTF-8
//!   (overlong forms included), are refused;
//! - a segment with a `;` is refused (servlet containers strip `;params` from a segment,
//!   other frameworks keep them), as is a `..` that climbs above the root or follows an
//!   empty segment (`/a//..` is `/` to a backend that merges slashes first, `/a/` to one
//!   that does not); other dot segments are resolved and repeated slashes merged.
//!
//! Matching ([`RouteTable::find`]): the most specific pattern decides — an exact `path` beats
//! every `prefix`, a longer prefix a shorter one — and among the routes of that one pattern
//! the method chooses (a route for GET also takes HEAD). If none of them takes the method
//! there is no route: a request never falls through to a less specific pattern. A `path: /x`
//! that needs a token also matches `/x/`, since most frameworks serve one handler for both;
//! a public `path:` matches only itself, so a public route never widens.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

/// Why a request path was refused before routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    EncodedSlash,
    EncodedPercent,
    EncodedDelimiter,
    Nul,
    ControlCharacter,
    Backslash,
    BadPercentEncoding,
    NotUtf8,
    SegmentParameter,
    AboveRoot,
    DotsAfterEmptySegment,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "the request path must start with '/'",
            PathError::EncodedSlash => "the request path contains an encoded slash or backslash",
            PathError::EncodedPercent => {
                "the request path contains an encoded '%', which backends that decode twice read differently"
            }
            PathError::EncodedDelimiter => "the request path contains an encoded '?' or '#'",
            PathError::Nul => "the request path contains a NUL byte",
            PathError::ControlCharacter => "the request path contains a control character",
            PathError::Backslash => "the request path contains a backslash",
            PathError::BadPercentEncoding => "the request path has a malformed percent-encoding",
            PathError::NotUtf8 => "the request path does not decode to valid UTF-8",
            PathError::SegmentParameter => {
                "the request path has a ';' in a segment, which some backends strip and others keep"
            }
            PathError::AboveRoot => "the request path climbs above the root with '..'",
            PathError::DotsAfterEmptySegment => {
                "the request path has '..' right after an empty segment ('//..'), which backends resolve two ways"
            }
        }
    }
}

/// The canonical form of a request target: the path without its query string or fragment,
/// percent-decoded once, with repeated slashes merged and dot segments resolved; or why it
/// has none (see the module docs). A canonical path contains no `%`, `;`, `\`, `?` or `#`.
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
    let decoded = decode_once(path)?;
    Ok(Cow::Owned(resolve_segments(&decoded)?))
}

/// True when the path needs no work: no escapes, no empty or dot segments, nothing odd.
fn is_plain(path: &str) -> bool {
    let bytes = path.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' | b'\\' | b';' | 0..=0x1f | 0x7f => return false,
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

/// Percent-decodes every escape once, refusing what must not be decoded; the bytes must
/// then be UTF-8 (which also refuses overlong forms such as `%C0%AE`).
fn decode_once(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let (value, escaped) = if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or(PathError::BadPercentEncoding)?;
            let value = (hex_value(hex[0]).ok_or(PathError::BadPercentEncoding)? << 4)
                | hex_value(hex[1]).ok_or(PathError::BadPercentEncoding)?;
            i += 3;
            (value, true)
        } else {
            i += 1;
            (b, false)
        };
        match value {
            0 => return Err(PathError::Nul),
            0x01..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            b'\\' if !escaped => return Err(PathError::Backslash),
            b'/' | b'\\' if escaped => return Err(PathError::EncodedSlash),
            b'%' => return Err(PathError::EncodedPercent),
            b'?' | b'#' => return Err(PathError::EncodedDelimiter),
            v => out.push(v),
        }
    }
    String::from_utf8(out).map_err(|_| PathError::NotUtf8)
}

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
    // Whether an empty segment came since the last named one (`.` segments in between
    // count as nothing): a `..` there reads two ways.
    let mut after_empty = false;
    for segment in path.split('/').skip(1) {
        if segment.contains(';') {
            return Err(PathError::SegmentParameter);
        }
        trailing_slash = true;
        match segment {
            "" => after_empty = true,
            "." => {}
            ".." => {
                if after_empty {
                    return Err(PathError::DotsAfterEmptySegment);
                }
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => {
                segments.push(s);
                trailing_slash = false;
                after_empty = false;
            }
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
/// route that names its methods. A set with GET also admits HEAD, since frameworks answer
/// HEAD with the GET handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Methods(u16);

const METHOD_NAMES: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
];
const GET: u16 = 1;
const HEAD: u16 = 1 << 1;

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

    /// The methods the set takes: its own, and HEAD when it has GET.
    fn admitted(self) -> u16 {
        if self.0 & GET != 0 {
            self.0 | HEAD
        } else {
            self.0
        }
    }

    pub fn contains(self, method: &str) -> bool {
        self == Methods::ANY || method_bit(method).is_some_and(|bit| self.admitted() & bit != 0)
    }

    pub fn overlaps(self, other: Methods) -> bool {
        self.admitted() & other.admitted() != 0
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
    /// A valid token whose `scopes` hold every unit primitive in `require`, at least one
    /// of `require_any` (when it is not empty), and, when `unit_primitive_header` is set,
    /// the unit primitive that header names. `user_tokens: false` refuses tokens the
    /// backend minted itself.
    Token {
        require: Vec<Arc<str>>,
        require_any: Vec<Arc<str>>,
        user_tokens: bool,
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
    /// The unit primitives of `require` and `require_any` that the registry marks
    /// deprecated (found at load time, so a request can be logged without a registry lookup).
    pub deprecated: Vec<Arc<str>>,
}

/// Two routes that claim the same path (or prefix) for at least one common method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub first: usize,
    pub second: usize,
    /// The path both claim when one of them claims it only through the trailing slash
    /// that a token-requiring `path: /x` also matches (`/x/`).
    pub via_trailing_slash: Option<Box<str>>,
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
    /// Builds the table; two routes claiming the same pattern for a common method conflict,
    /// and so does a `path: /x/` with a token-requiring `path: /x` (which also matches `/x/`).
    pub fn new(routes: Vec<Route>) -> Result<RouteTable, Conflict> {
        let mut exact: RouteIndex = HashMap::new();
        let mut prefixes = PrefixTree::default();
        // Token-requiring exact paths also claim their trailing-slash spelling; those
        // claims go in after the written ones, so that a conflict names the written route.
        let mut widened = Vec::new();
        for (index, route) in routes.iter().enumerate() {
            let slot = match &route.pattern {
                Pattern::Exact(p) => {
                    if !matches!(route.access, Access::Public) && !p.ends_with('/') {
                        widened.push((format!("{p}/").into_boxed_str(), index));
                    }
                    exact.entry(p.as_str().into()).or_default()
                }
                Pattern::Prefix(p) => prefixes.slot(p.as_bytes()),
            };
            claim(&routes, slot, index, None)?;
        }
        for (path, index) in widened {
            let slot = exact.entry(path.clone()).or_default();
            claim(&routes, slot, index, Some(path))?;
        }
        Ok(RouteTable {
            routes,
            exact,
            prefixes,
        })
    }

    /// The route for a canonical path and a method: the most specific pattern that matches
    /// the path decides, and `None` when none matches or none of its routes takes the method.
    pub fn find(&self, path: &str, method: &str) -> Option<&Route> {
        self.find_index(path, method).map(|i| &self.routes[i])
    }

    /// [`find`](Self::find), as an index into [`routes`](Self::routes) (what a
    /// decision carries to name its route).
    pub fn find_index(&self, path: &str, method: &str) -> Option<usize> {
        self.candidates(path)
            .iter()
            .copied()
            .find(|&i| self.routes[i].methods.contains(method))
    }

    /// The routes of the most specific pattern that matches a canonical path, whatever
    /// their methods (for messages that say why no route took a request).
    pub fn routes_of_pattern(&self, path: &str) -> impl Iterator<Item = &Route> {
        self.candidates(path).iter().map(|&i| &self.routes[i])
    }

    fn candidates(&self, path: &str) -> &[usize] {
        match self.exact.get(path) {
            Some(ids) => ids,
            None => self
                .prefixes
                .longest_prefix_of(path.as_bytes())
                .unwrap_or_default(),
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

fn claim(
    routes: &[Route],
    slot: &mut Vec<usize>,
    index: usize,
    via_trailing_slash: Option<Box<str>>,
) -> Result<(), Conflict> {
    if let Some(&first) = slot
        .iter()
        .find(|&&other| routes[other].methods.overlaps(routes[index].methods))
    {
        return Err(Conflict {
            first,
            second: index,
            via_trailing_slash,
        });
    }
    slot.push(index);
    Ok(())
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

    /// The routes of the longest prefix of `path` that has some.
    fn longest_prefix_of(&self, path: &[u8]) -> Option<&[usize]> {
        let mut node = 0;
        let mut rest = path;
        let mut longest = None;
        loop {
            let routes = &self.nodes[node].routes;
            if !routes.is_empty() {
                longest = Some(routes.as_slice());
            }
            let Some(child) = rest.first().and_then(|&b| self.child(node, b)) else {
                return longest;
            };
            let Some(after) = rest.strip_prefix(&*self.nodes[child].label) else {
                return longest;
            };
            node = child;
            rest = after;
        }
    }
}

#[cfg(test)]
mod spellings;
#[cfg(test)]
mod tests;

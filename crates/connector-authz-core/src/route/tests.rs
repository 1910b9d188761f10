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
    assert_eq!(norm("/ai/a//b/..").unwrap(), "/ai/a/");
}

#[test]
fn every_escape_is_decoded_once() {
    assert_eq!(norm("/ai/%76%32/code").unwrap(), "/ai/v2/code");
    assert_eq!(
        norm("/ai/v1/models/m%3Agenerate").unwrap(),
        "/ai/v1/models/m:generate"
    );
    assert_eq!(
        norm("/ai/v1/models/m%3agenerate").unwrap(),
        "/ai/v1/models/m:generate"
    );
    assert_eq!(norm("/ai/a%2cb%20c").unwrap(), "/ai/a,b c");
    assert_eq!(norm("/caf%C3%A9/é").unwrap(), "/café/é");
    // Once: what an escape decodes to is never decoded again.
    assert_eq!(norm("/a/%2541"), Err(PathError::EncodedPercent));
}

#[test]
fn dangerous_paths_are_refused() {
    assert_eq!(norm("ai/v2"), Err(PathError::NotAbsolute));
    assert_eq!(norm("*"), Err(PathError::NotAbsolute));
    assert_eq!(norm("/ai%2fv2"), Err(PathError::EncodedSlash));
    assert_eq!(norm("/ai%2Fv2"), Err(PathError::EncodedSlash));
    assert_eq!(norm("/ai%5cv2"), Err(PathError::EncodedSlash));
    assert_eq!(norm("/ai%25"), Err(PathError::EncodedPercent));
    assert_eq!(norm("/ai%3fx"), Err(PathError::EncodedDelimiter));
    assert_eq!(norm("/ai%23x"), Err(PathError::EncodedDelimiter));
    assert_eq!(norm("/ai\\v2"), Err(PathError::Backslash));
    assert_eq!(norm("/ai%00"), Err(PathError::Nul));
    assert_eq!(norm("/ai\0"), Err(PathError::Nul));
    assert_eq!(norm("/ai\n"), Err(PathError::ControlCharacter));
    assert_eq!(norm("/ai%0a"), Err(PathError::ControlCharacter));
    assert_eq!(norm("/ai%zz"), Err(PathError::BadPercentEncoding));
    assert_eq!(norm("/ai%2"), Err(PathError::BadPercentEncoding));
    assert_eq!(norm("/ai/%ff"), Err(PathError::NotUtf8));
    // Overlong '.' and '/': not UTF-8, so never a dot segment or a separator.
    assert_eq!(norm("/ai/%c0%ae%c0%ae/x"), Err(PathError::NotUtf8));
    assert_eq!(norm("/ai/%c0%af"), Err(PathError::NotUtf8));
    assert_eq!(norm("/ai/%e0%80%ae"), Err(PathError::NotUtf8));
    assert_eq!(norm("/../etc"), Err(PathError::AboveRoot));
    assert_eq!(norm("/a/%2e%2e/%2e%2e/b"), Err(PathError::AboveRoot));
}

#[test]
fn segment_parameters_are_refused() {
    assert_eq!(
        norm("/ai/v1/models/m:generate;x=1"),
        Err(PathError::SegmentParameter)
    );
    assert_eq!(
        norm("/ai/monitoring/..;/v2/code"),
        Err(PathError::SegmentParameter)
    );
    assert_eq!(norm("/a;/b"), Err(PathError::SegmentParameter));
    assert_eq!(norm("/a/b%3b"), Err(PathError::SegmentParameter));
    // In the query a ';' is not part of the path.
    assert_eq!(norm("/a/b?x;y").unwrap(), "/a/b");
}

#[test]
fn dots_right_after_an_empty_segment_are_refused() {
    // Envoy and Istio merge first (→ /ai/v2/monitoring/y); RFC 3986 alone gives /ai/monitoring/y.
    assert_eq!(
        norm("/ai/v2/x//../../monitoring/y"),
        Err(PathError::DotsAfterEmptySegment)
    );
    assert_eq!(norm("//.."), Err(PathError::DotsAfterEmptySegment));
    assert_eq!(norm("/a//./.."), Err(PathError::DotsAfterEmptySegment));
    assert_eq!(norm("/a//%2e%2e"), Err(PathError::DotsAfterEmptySegment));
    assert_eq!(norm("/a//b/..").unwrap(), "/a/");
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

fn token_route(pattern: Pattern, methods: Methods, backend: usize) -> Route {
    Route {
        access: Access::Token {
            require: vec!["duo_chat".into()],
            require_any: Vec::new(),
            user_tokens: true,
            unit_primitive_header: None,
        },
        ..route(pattern, methods, backend)
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
fn the_most_specific_pattern_decides_even_when_its_method_does_not_match() {
    let t = table();
    // The exact route is POST only: a GET is not routed, not sent to the longest prefix.
    assert!(t.find("/ai/v2/code/special", "GET").is_none());
    assert_eq!(t.find("/ai/monitoring/health", "GET").unwrap().backend, 3);
    assert!(t.find("/ai/monitoring/health", "POST").is_none());
    assert!(t.find("/ai/monitoring/health", "PROPFIND").is_none());
}

#[test]
fn a_route_for_get_also_takes_head() {
    let get = Methods::parse(["GET"]).unwrap();
    let t = RouteTable::new(vec![
        token_route(Pattern::Exact("/ai/x".into()), get, 0),
        route(Pattern::Prefix("/ai/".into()), Methods::ANY, 1),
    ])
    .unwrap();
    assert_eq!(t.find("/ai/x", "HEAD").unwrap().backend, 0);
    assert_eq!(t.find("/ai/x", "head").unwrap().backend, 0);
    assert!(t.find("/ai/x", "POST").is_none());
    // Listing HEAD beside GET changes nothing (cargo-mutants: `| HEAD` as `^ HEAD` went unseen).
    let get_head = Methods::parse(["GET", "HEAD"]).unwrap();
    assert!(get_head.contains("HEAD") && get_head.contains("GET"));
    assert!(!get_head.contains("POST"));
    // A separate HEAD route for the same pattern would be claimed twice.
    let head = Methods::parse(["HEAD"]).unwrap();
    assert!(
        RouteTable::new(vec![
            route(Pattern::Exact("/a".into()), get, 0),
            route(Pattern::Exact("/a".into()), head, 1),
        ])
        .is_err()
    );
}

#[test]
fn a_token_path_also_matches_its_trailing_slash_a_public_one_never() {
    let t = RouteTable::new(vec![
        token_route(
            Pattern::Exact("/ai/v1/models/m:generate".into()),
            Methods::ANY,
            0,
        ),
        route(Pattern::Exact("/ai/health".into()), Methods::ANY, 1),
        token_route(Pattern::Prefix("/ai/".into()), Methods::ANY, 2),
        route(
            Pattern::Prefix("/ai/v1/models/m:generate/".into()),
            Methods::ANY,
            3,
        ),
    ])
    .unwrap();
    assert_eq!(
        t.find("/ai/v1/models/m:generate", "POST").unwrap().backend,
        0
    );
    // The slash spelling is the exact path's, even with a prefix written for it.
    assert_eq!(
        t.find("/ai/v1/models/m:generate/", "POST").unwrap().backend,
        0
    );
    assert_eq!(
        t.find("/ai/v1/models/m:generate/x", "POST")
            .unwrap()
            .backend,
        3
    );
    assert_eq!(t.find("/ai/health", "GET").unwrap().backend, 1);
    assert_eq!(t.find("/ai/health/", "GET").unwrap().backend, 2);
}

#[test]
fn a_path_with_a_slash_conflicts_with_the_token_path_that_covers_it() {
    let get = Methods::parse(["GET"]).unwrap();
    let post = Methods::parse(["POST"]).unwrap();
    let err = RouteTable::new(vec![
        route(Pattern::Exact("/a/".into()), Methods::ANY, 0),
        token_route(Pattern::Exact("/a".into()), get, 1),
    ])
    .unwrap_err();
    assert_eq!(
        err,
        Conflict {
            first: 0,
            second: 1,
            via_trailing_slash: Some("/a/".into()),
        }
    );
    // Split by methods they can live side by side; a public `/a` never claims `/a/`.
    let t = RouteTable::new(vec![
        route(Pattern::Exact("/a/".into()), post, 0),
        token_route(Pattern::Exact("/a".into()), get, 1),
        route(Pattern::Exact("/b/".into()), Methods::ANY, 2),
        route(Pattern::Exact("/b".into()), Methods::ANY, 3),
    ])
    .unwrap();
    assert_eq!(t.find("/a/", "GET").unwrap().backend, 1);
    assert_eq!(t.find("/a/", "POST").unwrap().backend, 0);
    assert_eq!(t.find("/b/", "GET").unwrap().backend, 2);
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
            second: 2,
            via_trailing_slash: None,
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

/// The radix tree against the definition: the longest prefix that starts the path
/// decides, and among its routes the one that takes the method.
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
                    let longest = routes
                        .iter()
                        .filter(|r| path.starts_with(r.pattern.as_str()))
                        .map(|r| r.pattern.as_str().len())
                        .max();
                    let expected = routes
                        .iter()
                        .filter(|r| Some(r.pattern.as_str().len()) == longest)
                        .filter(|r| path.starts_with(r.pattern.as_str()))
                        .find(|r| r.methods.contains(method))
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
    let t = RouteTable::new(vec![route(Pattern::Prefix("/ab".into()), Methods::ANY, 0)]).unwrap();
    assert!(t.find("/é", "GET").is_none());
    assert!(t.find("/abc", "GET").is_some());
}

/// The fast path: a path that needs no work is recognized as such. (A wrong `false` only
/// costs the slow path, which gives the same answer, so only these asserts notice it.)
#[test]
fn plain_paths_skip_the_slow_path_and_odd_ones_do_not() {
    for plain in [
        "/",
        "/a./b",
        "/..a",
        "/.well-known",
        "/a/.b",
        "/ai/v2/code/completions",
    ] {
        assert!(is_plain(plain), "{plain} is plain");
    }
    for odd in [
        "//a", "/a//b", "/.", "/./a", "/..", "/../a", "/a/..", "/%41", "/a;b", "/a\\b",
    ] {
        assert!(!is_plain(odd), "{odd} needs normalizing");
    }
}

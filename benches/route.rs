//! Route matching (path normalization + `RouteTable::find`) with 10, 1,000 and 10,000
//! routes (10,000 is the most a configuration may declare).
//!
//!   cargo bench --bench route -- --warm-up-time 1 --measurement-time 3
//!
//! The routes look like an API's: `/ai/<word>/<word>/` prefixes and `/ai/<word>/<word>/op`
//! exact paths with words of 3 to 10 letters, so prefixes come in many lengths, plus one
//! short catch-all prefix `/ai/`. Three lookups: an exact path, a path under a prefix,
//! and a path that only the catch-all matches (every longer prefix length is tried first).

use std::hint::black_box;

use connector_authz::route::{Access, Methods, Pattern, Route, RouteTable, normalize_path};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

/// A pronounceable word of 3 to 10 letters, the same for the same `n` every run.
fn word(n: u64) -> String {
    let mut x = n
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let len = 3 + (x >> 60) % 8;
    let mut w = String::new();
    for i in 0..len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let letters: &[u8] = if i % 2 == 0 {
            b"bcdfghklmnprstvz"
        } else {
            b"aeiou"
        };
        w.push(char::from(
            letters[((x >> 33) % letters.len() as u64) as usize],
        ));
    }
    w
}

/// `n` routes: route `i` (1 ≤ i < n) is a prefix for even `i`, an exact path for odd `i`.
fn table(n: usize) -> RouteTable {
    let mut routes = vec![route(Pattern::Prefix("/ai/".into()))];
    for i in 1..n as u64 {
        let base = format!("/ai/{}{i}/{}/", word(i), word(i * 7 + 3));
        let pattern = if i % 2 == 0 {
            Pattern::Prefix(base)
        } else {
            Pattern::Exact(format!("{base}op"))
        };
        routes.push(route(pattern));
    }
    RouteTable::new(routes).expect("no conflicts")
}

fn route(pattern: Pattern) -> Route {
    Route {
        pattern,
        methods: Methods::parse(["POST"]).expect("method"),
        access: Access::Public,
        backend: 0,
        line: 0,
        deprecated: Vec::new(),
    }
}

fn bench_routes(c: &mut Criterion) {
    // Routes 2 and 3 exist in every table, so each lookup is the same string at every size.
    let exact = format!("/ai/{}3/{}/op", word(3), word(24));
    let prefix = format!("/ai/{}2/{}/completions", word(2), word(17));
    let fallback = "/ai/unknown-service/some/deeper/path".to_string();
    let mut group = c.benchmark_group("route");
    for n in [10, 1_000, 10_000] {
        let t = table(n);
        for (name, path, expect_backend_route) in [
            ("exact", &exact, exact.as_str()),
            ("prefix", &prefix, prefix.as_str()),
            ("fallback", &fallback, "/ai/"),
        ] {
            let found = t
                .find(&normalize_path(path).expect("plain"), "POST")
                .expect("a route matches");
            if name == "fallback" {
                assert_eq!(found.pattern.as_str(), expect_backend_route);
            } else {
                assert_ne!(found.pattern.as_str(), "/ai/", "{name} {path}");
            }
            group.bench_with_input(BenchmarkId::new(name, n), path, |b, path| {
                b.iter(|| {
                    let path = normalize_path(black_box(path)).expect("plain");
                    t.find(&path, "POST").map(|r| r.backend)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_routes);
criterion_main!(benches);

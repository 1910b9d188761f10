//! Target `path`: bytes → `normalize_path`. Oracles: no panic; a normalized path starts
//! with '/', has no empty, `.` or `..` segment and no query or fragment; normalizing it
//! again changes nothing.

use connector_authz::route::normalize_path;

use super::input::lossy;

pub fn run(data: &[u8]) {
    let target = lossy(data);
    let Ok(normalized) = normalize_path(&target) else {
        return;
    };
    let normalized: &str = &normalized;
    assert!(normalized.starts_with('/'), "{target:?} → {normalized:?}");
    assert!(!normalized.contains("//"), "{target:?} → {normalized:?}");
    assert!(
        !normalized.contains(['?', '#']),
        "{target:?} → {normalized:?}"
    );
    for segment in normalized.split('/') {
        assert!(
            segment != "." && segment != "..",
            "{target:?} → {normalized:?} keeps a dot segment"
        );
    }
    assert!(
        !normalized.contains(|c: char| c == '\\' || c.is_ascii_control()),
        "{target:?} → {normalized:?}"
    );
    let again = normalize_path(normalized)
        .unwrap_or_else(|e| panic!("{target:?} → {normalized:?}, which is refused: {e:?}"));
    assert_eq!(&*again, normalized, "normalizing {target:?} twice differs");
}

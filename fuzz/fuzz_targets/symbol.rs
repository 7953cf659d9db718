//! Symbol syntax and entitlement patterns. Invariants: no panic; `validate` accepts
//! exactly 1 to 32 bytes of ASCII letters, digits and `. _ - / : ^`; an entitlement
//! list allows a symbol exactly when one of its patterns matches it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickerd::{auth::Entitlements, symbol};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(2, '\n');
    let name = parts.next().unwrap_or_default();
    let expected = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_/:^".contains(&b));
    assert_eq!(symbol::validate(name).is_ok(), expected, "{name:?}");
    let patterns: Vec<&str> = parts.next().unwrap_or_default().split(' ').collect();
    let allowed = Entitlements::parse(patterns.iter().copied()).allows(name);
    let matches = patterns.iter().any(|p| {
        *p == "*"
            || (!p.is_empty() && *p == name)
            || p.strip_suffix('*')
                .is_some_and(|prefix| !p.is_empty() && name.starts_with(prefix))
    });
    assert_eq!(allowed, matches, "{name:?} against {patterns:?}");
});

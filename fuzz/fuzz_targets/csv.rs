//! The tick CSV format (`ticker publish`, `--feed replay`): arbitrary text, line by
//! line. Invariants: no panic; an accepted line has a valid symbol, a finite positive
//! price and a non-negative timestamp, and writing it back parses to the same tick.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickerd::{feed::csv::parse_line, symbol};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let Ok(Some(tick)) = parse_line(line) else {
            continue;
        };
        assert!(symbol::validate(&tick.symbol).is_ok(), "{tick:?}");
        assert!(tick.price.is_finite() && tick.price > 0.0, "{tick:?}");
        assert!(tick.unix_nanos.is_none_or(|t| t >= 0), "{tick:?}");
        let written = match tick.unix_nanos {
            Some(t) => format!("{},{:?},{t}", tick.symbol, tick.price),
            None => format!("{},{:?}", tick.symbol, tick.price),
        };
        assert_eq!(
            parse_line(&written),
            Ok(Some(tick)),
            "round trip of {written:?}"
        );
    }
});

//! Symbol names: the one syntax rule every entry point (feed, Publish, subscribe, quotes) shares.

use std::{fmt, sync::Arc};

/// A validated symbol name, cheap to clone into every tick and subscription.
pub type Symbol = Arc<str>;

/// Longest accepted symbol, in bytes.
pub const MAX_SYMBOL_LEN: usize = 32;

/// Why a string is not a symbol; its `Display` is the text clients see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SymbolError {
    Empty,
    TooLong(usize),
    BadChar(char),
}

impl fmt::Display for SymbolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SymbolError::Empty => write!(f, "invalid symbol: empty"),
            SymbolError::TooLong(n) => {
                write!(f, "invalid symbol: {n} bytes, at most {MAX_SYMBOL_LEN} allowed")
            }
            SymbolError::BadChar(c) => write!(
                f,
                "invalid symbol: character {c:?} not allowed (ASCII letters, digits and . _ - / : ^ only)"
            ),
        }
    }
}

impl std::error::Error for SymbolError {}

/// Checks `s` against the symbol syntax: 1 to 32 bytes of ASCII letters, digits and `. _ - / : ^`.
pub fn validate(s: &str) -> Result<(), SymbolError> {
    if s.is_empty() {
        return Err(SymbolError::Empty);
    }
    if let Some(c) = s.chars().find(|c| !is_symbol_char(*c)) {
        return Err(SymbolError::BadChar(c));
    }
    if s.len() > MAX_SYMBOL_LEN {
        return Err(SymbolError::TooLong(s.len()));
    }
    Ok(())
}

fn is_symbol_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '^')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for s in [
            "AAPL",
            "BRK.B",
            "ES_F",
            "EUR/USD",
            "NSE:INFY",
            "^GSPC",
            "a-1",
            &"X".repeat(32),
        ] {
            assert_eq!(validate(s), Ok(()), "{s}");
        }
    }

    #[test]
    fn rejects_with_a_reason() {
        assert_eq!(validate(""), Err(SymbolError::Empty));
        assert_eq!(validate(&"X".repeat(33)), Err(SymbolError::TooLong(33)));
        assert_eq!(validate("A B"), Err(SymbolError::BadChar(' ')));
        assert_eq!(validate("ÄPL"), Err(SymbolError::BadChar('Ä')));
        assert!(validate("A\nB")
            .unwrap_err()
            .to_string()
            .contains("not allowed"));
    }
}

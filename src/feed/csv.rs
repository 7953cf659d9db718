//! The tick CSV format shared by `--feed replay:PATH` and `ticker publish`:
//! `symbol,price[,unix_nanos]`, one tick per line; blank lines and `#` comments skipped.

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Lines};

use crate::symbol;

/// What the next line of a tick file holds.
#[derive(Debug)]
pub enum Line {
    Tick(CsvTick),
    /// Line `line` (1-based) is not a tick; `reason` says why.
    Malformed {
        line: u64,
        reason: String,
    },
    /// Reading failed at line `line`.
    Failed {
        line: u64,
        error: std::io::Error,
    },
    End,
}

/// Reads tick lines one by one, numbering them and skipping blanks and comments.
/// `next` is cancel-safe: it only awaits the underlying line reader.
pub struct TickReader<R> {
    lines: Lines<BufReader<R>>,
    line: u64,
}

impl<R: AsyncRead + Unpin> TickReader<R> {
    pub fn new(input: R) -> TickReader<R> {
        TickReader {
            lines: BufReader::new(input).lines(),
            line: 0,
        }
    }

    /// The number of the last line read.
    pub fn line(&self) -> u64 {
        self.line
    }

    pub async fn next(&mut self) -> Line {
        loop {
            let text = match self.lines.next_line().await {
                Ok(Some(text)) => text,
                Ok(None) => return Line::End,
                Err(error) => {
                    return Line::Failed {
                        line: self.line + 1,
                        error,
                    }
                }
            };
            self.line += 1;
            match parse_line(&text) {
                Ok(Some(tick)) => return Line::Tick(tick),
                Ok(None) => continue,
                Err(reason) => {
                    return Line::Malformed {
                        line: self.line,
                        reason,
                    }
                }
            }
        }
    }
}

/// One parsed line.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvTick {
    pub symbol: String,
    pub price: f64,
    /// The line's own timestamp, if it has one.
    pub unix_nanos: Option<i64>,
}

/// Parses one line; `Ok(None)` for blank and comment lines. The error says what is
/// wrong, without the line number (the caller knows it).
pub fn parse_line(line: &str) -> Result<Option<CsvTick>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut fields = line.split(',').map(str::trim);
    let symbol = fields.next().unwrap_or_default();
    symbol::validate(symbol).map_err(|e| e.to_string())?;
    let price = match fields.next() {
        Some(p) => p
            .parse::<f64>()
            .map_err(|_| format!("price {p:?} is not a number"))?,
        None => return Err("missing price: expected symbol,price[,unix_nanos]".into()),
    };
    if !(price.is_finite() && price > 0.0) {
        return Err(format!("price {price} must be finite and positive"));
    }
    let unix_nanos = match fields.next() {
        None | Some("") => None,
        Some(t) => match t.parse::<i64>() {
            Ok(n) if n >= 0 => Some(n),
            _ => {
                return Err(format!(
                    "timestamp {t:?} is not non-negative unix nanoseconds"
                ))
            }
        },
    };
    if fields.next().is_some() {
        return Err("too many fields: expected symbol,price[,unix_nanos]".into());
    }
    Ok(Some(CsvTick {
        symbol: symbol.to_string(),
        price,
        unix_nanos,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_explains_bad_ones() {
        assert_eq!(
            parse_line("AAPL, 189.5, 1700000000000000000"),
            Ok(Some(CsvTick {
                symbol: "AAPL".into(),
                price: 189.5,
                unix_nanos: Some(1_700_000_000_000_000_000)
            }))
        );
        assert_eq!(parse_line("MSFT,1").unwrap().unwrap().unix_nanos, None);
        assert_eq!(parse_line("  # comment"), Ok(None));
        assert_eq!(parse_line(""), Ok(None));
        assert!(parse_line("AAPL").unwrap_err().contains("missing price"));
        assert!(parse_line("AAPL,abc").unwrap_err().contains("not a number"));
        assert!(parse_line("AAPL,-1").unwrap_err().contains("positive"));
        assert!(parse_line("AAPL,NaN").unwrap_err().contains("finite"));
        assert!(parse_line("AA PL,1").unwrap_err().contains("not allowed"));
        assert!(parse_line("AAPL,1,-5").unwrap_err().contains("timestamp"));
        assert!(parse_line("AAPL,1,2,3")
            .unwrap_err()
            .contains("too many fields"));
    }
}

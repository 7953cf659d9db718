//! One subscription of a session: its delivery policy (ALL, CONFLATE, STRICT) parsed
//! from the request, where its live ticks come from, and the in-band notices it can
//! produce (lag, backlog warning, conflated ranges). `session` drives it.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    hub::{Conflator, Fold, Receiver, ResumePoint, SeqWatch, Tick},
    pb::{ticker_request::DeliveryPolicy, ticker_response::Kind, TickerRequest, TickerResponse},
    symbol::Symbol,
};

/// Highest CONFLATE rate accepted, messages per second per symbol.
pub const MAX_CONFLATE_HZ: f64 = 1000.0;

/// Lowest CONFLATE rate accepted: one message per 1,000 s. A lower rate's period does
/// not fit a timer (1e-300 Hz is 1e300 s; found by fuzzing, it panicked the stream).
pub const MIN_CONFLATE_HZ: f64 = 0.001;

/// Deliveries of one subscription between two looks at its backlog.
pub const BACKLOG_CHECK_EVERY: u32 = 16;

/// Ticks a subscription takes from its ring under one lock. Small, so that a stalled
/// stream holds little beside the ring and its loss still shows as a gap.
pub const TAKE_BATCH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    All,
    Strict,
    Conflate { every: Duration },
}

impl Policy {
    /// The policy a request asks for, or why it is refused.
    pub fn of(request: &TickerRequest) -> Result<Policy, String> {
        match DeliveryPolicy::try_from(request.policy) {
            Ok(DeliveryPolicy::All) => Ok(Policy::All),
            Ok(DeliveryPolicy::Strict) => Ok(Policy::Strict),
            Ok(DeliveryPolicy::Conflate) => {
                let hz = request.max_rate_hz;
                if !(hz.is_finite() && (MIN_CONFLATE_HZ..=MAX_CONFLATE_HZ).contains(&hz)) {
                    return Err(format!(
                        "DELIVERY_POLICY_CONFLATE needs max_rate_hz from {MIN_CONFLATE_HZ} to {MAX_CONFLATE_HZ} (got {hz})"
                    ));
                }
                Ok(Policy::Conflate {
                    every: Duration::from_secs_f64(1.0 / hz),
                })
            }
            Err(_) => Err(format!(
                "unknown delivery policy {}: use DELIVERY_POLICY_ALL, _CONFLATE or _STRICT",
                request.policy
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::All => "ALL",
            Policy::Strict => "STRICT",
            Policy::Conflate { .. } => "CONFLATE",
        }
    }
}

/// Where a resuming request left off, if it asks to resume.
pub fn resume_point(request: &TickerRequest) -> Option<ResumePoint> {
    (request.resume_from_seq != 0 || request.epoch != 0).then_some(ResumePoint {
        epoch: request.epoch,
        seq: request.resume_from_seq,
    })
}

/// Live ticks of a subscription.
pub enum Feed {
    /// Every tick through the symbol's ring (ALL, STRICT), taken `TAKE_BATCH` at a time
    /// into `taken`.
    Channel {
        receiver: Receiver,
        taken: VecDeque<Arc<Tick>>,
    },
    /// Folded ranges, taken at most once per `every` (CONFLATE).
    Conflate {
        conflator: Conflator,
        every: Duration,
        next_emit: Instant,
    },
}

pub struct Sub {
    pub symbol: Symbol,
    pub policy: Policy,
    pub feed: Feed,
    /// The symbol's latest seq, read without the symbol's lock, for how far behind
    /// this stream is (/streams).
    pub watch: SeqWatch,
    /// Highest seq delivered (or announced by the snapshot) on this stream.
    pub last_seq: u64,
    /// Deliveries since the backlog was last looked at.
    pub unchecked: u32,
    /// A backlog warning went out and the backlog has not drained since.
    pub warned: bool,
}

/// A conflated range as one message: the latest tick plus what it covers.
pub fn conflated(fold: &Fold) -> TickerResponse {
    TickerResponse {
        first_seq: fold.first_seq,
        count: fold.count,
        high: fold.high,
        low: fold.low,
        ..fold.last.to_response(Kind::Tick)
    }
}

pub fn lagged(symbol: &str, dropped: u64) -> TickerResponse {
    TickerResponse {
        symbol: symbol.to_string(),
        kind: Kind::Lagged as i32,
        dropped,
        detail: format!("stream fell behind: {dropped} oldest ticks of {symbol} dropped"),
        ..Default::default()
    }
}

pub fn backlog(symbol: &str, depth: usize, capacity: usize, age: Duration) -> TickerResponse {
    TickerResponse {
        symbol: symbol.to_string(),
        kind: Kind::Backlog as i32,
        queue_depth: depth as u64,
        queue_age_nanos: age.as_nanos() as u64,
        detail: format!(
            "falling behind on {symbol}: {depth} of {capacity} ticks queued, the oldest {} ms old; \
             past {capacity} the oldest are dropped (STRICT: the stream ends)",
            age.as_millis()
        ),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflate(hz: f64) -> Result<Policy, String> {
        Policy::of(&TickerRequest {
            symbol: "A".into(),
            policy: DeliveryPolicy::Conflate as i32,
            max_rate_hz: hz,
            ..Default::default()
        })
    }

    #[test]
    fn conflate_rates_outside_the_range_are_refused_not_panicked_on() {
        for hz in [1e-300, 0.0009, 0.0, -1.0, 1000.5, f64::NAN, f64::INFINITY] {
            let refused = conflate(hz).expect_err("refused");
            assert!(refused.contains("from 0.001 to 1000"), "{refused}");
        }
        for hz in [MIN_CONFLATE_HZ, 5.0, MAX_CONFLATE_HZ] {
            assert!(matches!(conflate(hz), Ok(Policy::Conflate { .. })));
        }
    }
}

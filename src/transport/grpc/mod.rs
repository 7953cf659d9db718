//! gRPC: the `ticker.v1.TickerStreamService` (`service`), the codecs tonic's generated
//! code uses (`codec`), and `routes`, the layer in front of tonic's router that answers
//! the two streaming RPCs with a body of its own. Sessions (`session`) produce the
//! messages; `wire` frames them.

pub mod codec;
pub mod routes;
pub mod service;

pub use routes::{MessageLimits, StreamRoutesLayer};
pub use service::{AuthGuard, ServiceLimits, TickerService, MAX_QUOTE_SYMBOLS};

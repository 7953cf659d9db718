//! gRPC codecs for the server side. Streamed responses are the session's `Outbound`
//! values: a live tick is written from the bytes the hub encoded once; control messages
//! are encoded here. The server writes its streams with `routes` instead; `OutboundCodec`
//! serves the generated service (`pb`) when it is mounted without that layer.
//! Requests that do not decode become INVALID_ARGUMENT (tonic's prost codec says
//! INTERNAL, which blames the server for a client's bytes): `RequestDecoder`, used by
//! both.

use std::marker::PhantomData;

use bytes::BufMut;
use prost::Message;
use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Status,
};

use crate::session::Outbound;

/// Small buffers: tonic allocates `buffer_size` eagerly per stream, and a tick is
/// under 100 bytes. The yield threshold keeps one batch within one 16 KiB DATA frame.
fn buffer_settings() -> BufferSettings {
    BufferSettings::new(1024, 16 * 1024)
}

/// Encodes `Outbound`, decodes `D`.
pub struct OutboundCodec<D>(PhantomData<fn() -> D>);

impl<D> Default for OutboundCodec<D> {
    fn default() -> Self {
        OutboundCodec(PhantomData)
    }
}

impl<D: Message + Default + Send + 'static> Codec for OutboundCodec<D> {
    type Encode = Outbound;
    type Decode = D;
    type Encoder = OutboundEncoder;
    type Decoder = RequestDecoder<D>;

    fn encoder(&mut self) -> OutboundEncoder {
        OutboundEncoder
    }

    fn decoder(&mut self) -> RequestDecoder<D> {
        RequestDecoder(PhantomData)
    }
}

pub struct OutboundEncoder;

impl Encoder for OutboundEncoder {
    type Item = Outbound;
    type Error = Status;

    fn encode(&mut self, item: Outbound, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Outbound::Tick(tick) => dst.put_slice(tick.encoded()),
            Outbound::Message(msg) => msg
                .encode(dst)
                .map_err(|e| Status::internal(format!("encoding a response failed: {e}")))?,
        }
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}

/// Decodes a request message, blaming the client for bytes that are not one.
pub struct RequestDecoder<D>(PhantomData<fn() -> D>);

impl<D> Default for RequestDecoder<D> {
    fn default() -> Self {
        RequestDecoder(PhantomData)
    }
}

impl<D: Message + Default> Decoder for RequestDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        D::decode(src).map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "request is not a valid {}: {e}",
                std::any::type_name::<D>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("message")
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}

/// Encodes `E` with prost, decodes `D` like `OutboundCodec` (Publish, GetQuotes).
pub struct MessageCodec<E, D>(PhantomData<fn() -> (E, D)>);

impl<E, D> Default for MessageCodec<E, D> {
    fn default() -> Self {
        MessageCodec(PhantomData)
    }
}

impl<E, D> Codec for MessageCodec<E, D>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = tonic_prost::ProstEncoder<E>;
    type Decoder = RequestDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> RequestDecoder<D> {
        RequestDecoder(PhantomData)
    }
}

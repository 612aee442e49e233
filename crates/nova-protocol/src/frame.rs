//! Length-prefixed framing.
//!
//! A frame is a `u32` big-endian payload length followed by that many payload
//! bytes; the payload is one postcard-encoded value. [`FrameReader`] keeps a
//! growable buffer and reads with `read_buf`, so [`FrameReader::read_frame`] is
//! cancel-safe (it can sit in a `tokio::select!` next to other branches
//! without losing bytes). [`FrameWriter`] encodes into one buffer so that a
//! writer task can batch several small frames into one `write` and flush when
//! its queue runs dry.

use bytes::{Buf, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::MAX_FRAME_SIZE;
use crate::messages::{AgentMessage, ClientMessage};
use crate::zero_copy;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// How much buffer space a reader asks the OS to fill at once.
const READ_CHUNK: usize = 256 * 1024;

/// Why a frame could not be read, decoded, encoded or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The underlying stream failed.
    #[error("stream I/O failed")]
    Io(#[from] std::io::Error),
    /// The peer announced (or we tried to send) a payload over the limit.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The announced payload length.
        len: usize,
        /// The limit, [`MAX_FRAME_SIZE`].
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({received} of {expected} bytes received)")]
    Truncated {
        /// Bytes of the frame (header included) that arrived.
        received: usize,
        /// Bytes the frame should have had (header included; 4 if the header itself was cut).
        expected: usize,
    },
    /// The payload is not a valid encoding of the expected message type
    /// (garbage, an unknown message type, or a peer on another schema).
    #[error("malformed frame payload: {0}")]
    Decode(#[source] postcard::Error),
    /// The payload decoded but had bytes left over.
    #[error("malformed frame payload: {0} trailing bytes")]
    TrailingBytes(usize),
    /// A value could not be encoded.
    #[error("could not encode frame: {0}")]
    Encode(#[source] postcard::Error),
}

/// Decodes one frame payload, requiring that it is consumed exactly.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes::<T>(payload).map_err(FrameError::Decode)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(FrameError::TrailingBytes(rest.len()))
    }
}

/// Encodes `value` as one complete frame (header included).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::new();
    encode_into(value, &mut buf)?;
    Ok(buf)
}

/// Appends `value` as one complete frame to `buf`. On error `buf` is left as it was.
pub fn encode_into<T: Serialize>(value: &T, buf: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(e) = postcard::serialize_with_flavor(value, AppendFlavor(buf)) {
        buf.truncate(start);
        return Err(FrameError::Encode(e));
    }
    let len = buf.len() - start - HEADER_LEN;
    if len > MAX_FRAME_SIZE {
        buf.truncate(start);
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_SIZE,
        });
    }
    let header = u32::try_from(len)
        .expect("len <= MAX_FRAME_SIZE fits in u32")
        .to_be_bytes();
    buf[start..start + HEADER_LEN].copy_from_slice(&header);
    Ok(())
}

/// A postcard output flavor that appends to a borrowed `Vec`, so frames can be
/// batched in one buffer without an intermediate copy.
struct AppendFlavor<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendFlavor<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Reads frames from a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a stream.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
        }
    }

    /// Reads the next frame payload; `Ok(None)` on a clean end of stream
    /// (between frames).
    ///
    /// Cancel-safe: dropping the future keeps every byte read so far.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if self.buf.len() >= HEADER_LEN {
                let mut header = [0u8; HEADER_LEN];
                header.copy_from_slice(&self.buf[..HEADER_LEN]);
                let len = u32::from_be_bytes(header) as usize;
                if len > MAX_FRAME_SIZE {
                    return Err(FrameError::TooLarge {
                        len,
                        max: MAX_FRAME_SIZE,
                    });
                }
                if self.buf.len() >= HEADER_LEN + len {
                    self.buf.advance(HEADER_LEN);
                    return Ok(Some(self.buf.split_to(len).freeze()));
                }
                let missing = HEADER_LEN + len - self.buf.len();
                self.buf.reserve(missing.max(READ_CHUNK));
            } else if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let expected = if self.buf.len() >= HEADER_LEN {
                    let mut header = [0u8; HEADER_LEN];
                    header.copy_from_slice(&self.buf[..HEADER_LEN]);
                    HEADER_LEN + u32::from_be_bytes(header) as usize
                } else {
                    HEADER_LEN
                };
                return Err(FrameError::Truncated {
                    received: self.buf.len(),
                    expected,
                });
            }
        }
    }

    /// Reads and decodes the next frame; `Ok(None)` on a clean end of stream.
    pub async fn read_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.read_frame().await? {
            Some(payload) => decode(&payload).map(Some),
            None => Ok(None),
        }
    }

    /// Gives the stream back (any buffered bytes are dropped).
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Writes frames to a byte stream, batching them in one buffer.
///
/// Large data chunks are not copied into the buffer: they are kept by
/// reference ("spliced" in at an offset) and written with `writev`.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
    /// Chunks to write after `buf[..offset]`, in order.
    spliced: Vec<(usize, Bytes)>,
    spliced_len: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a stream.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::with_capacity(64 * 1024),
            spliced: Vec::new(),
            spliced_len: 0,
        }
    }

    /// Encodes `value` into the pending buffer (nothing is written yet).
    pub fn queue<T: Serialize>(&mut self, value: &T) -> Result<(), FrameError> {
        encode_into(value, &mut self.buf)
    }

    /// Queues an agent message; a large data chunk is written by reference.
    pub fn queue_agent_message(&mut self, msg: &AgentMessage) -> Result<(), FrameError> {
        match zero_copy::agent_data_parts(msg) {
            Some((prefix, data)) => self.queue_spliced(&prefix, data),
            None => self.queue(msg),
        }
    }

    /// Queues a host message; a large data chunk is written by reference.
    pub fn queue_client_message(&mut self, msg: &ClientMessage) -> Result<(), FrameError> {
        match zero_copy::client_data_parts(msg) {
            Some((prefix, data)) => self.queue_spliced(&prefix, data),
            None => self.queue(msg),
        }
    }

    /// Queues a frame whose payload is `prefix` followed by `data`.
    fn queue_spliced(&mut self, prefix: &[u8], data: Bytes) -> Result<(), FrameError> {
        let len = prefix.len() + data.len();
        if len > MAX_FRAME_SIZE {
            return Err(FrameError::TooLarge {
                len,
                max: MAX_FRAME_SIZE,
            });
        }
        let header = u32::try_from(len)
            .expect("len <= MAX_FRAME_SIZE fits in u32")
            .to_be_bytes();
        self.buf.extend_from_slice(&header);
        self.buf.extend_from_slice(prefix);
        self.spliced_len += data.len();
        self.spliced.push((self.buf.len(), data));
        Ok(())
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len() + self.spliced_len
    }

    /// Writes everything queued and flushes the stream.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        if self.spliced.is_empty() {
            if !self.buf.is_empty() {
                self.inner.write_all(&self.buf).await?;
            }
        } else {
            let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * self.spliced.len() + 1);
            let mut start = 0;
            for (at, data) in &self.spliced {
                parts.push(&self.buf[start..*at]);
                parts.push(data);
                start = *at;
            }
            parts.push(&self.buf[start..]);
            write_all_vectored(&mut self.inner, &parts).await?;
            self.spliced.clear();
            self.spliced_len = 0;
        }
        self.buf.clear();
        if self.buf.capacity() > 4 * 1024 * 1024 {
            self.buf.shrink_to(64 * 1024);
        }
        self.inner.flush().await?;
        Ok(())
    }

    /// Queues `value` and flushes.
    pub async fn send<T: Serialize>(&mut self, value: &T) -> Result<(), FrameError> {
        self.queue(value)?;
        self.flush().await
    }

    /// Shuts the write side down (after flushing).
    pub async fn shutdown(&mut self) -> Result<(), FrameError> {
        self.flush().await?;
        self.inner.shutdown().await?;
        Ok(())
    }

    /// Gives the stream back (any queued bytes are dropped).
    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Writes all of `parts`, in order, with as few `writev` calls as the stream allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut written = 0;
    while written < total {
        // Skip what is already out, then offer the rest.
        let mut skip = written;
        let mut slices = Vec::with_capacity(parts.len());
        for part in parts {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            slices.push(std::io::IoSlice::new(&part[skip..]));
            skip = 0;
        }
        let n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        written += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn round_trip_many_frames_through_small_reads() {
        let (a, b) = tokio::io::duplex(7);
        let mut writer = FrameWriter::new(a);
        let mut reader = FrameReader::new(b);
        let send = tokio::spawn(async move {
            for i in 0u32..100 {
                let payload = vec![i as u8; i as usize * 13];
                writer
                    .send(&(i, serde_bytes::ByteBuf::from(payload)))
                    .await
                    .unwrap();
            }
        });
        for i in 0u32..100 {
            let (n, data): (u32, serde_bytes::ByteBuf) =
                reader.read_message().await.unwrap().unwrap();
            assert_eq!(n, i);
            assert_eq!(data.len(), i as usize * 13);
            assert!(data.iter().all(|&b| b == i as u8));
        }
        send.await.unwrap();
        assert!(reader.read_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn spliced_data_frames_arrive_intact_among_small_ones() {
        use crate::messages::StreamKind;
        let (a, b) = tokio::io::duplex(4096);
        let mut writer = FrameWriter::new(a);
        let mut reader = FrameReader::new(b);
        let msgs: Vec<AgentMessage> = (0..20u64)
            .map(|i| {
                if i % 3 == 0 {
                    AgentMessage::Credit { id: i, bytes: 7 }
                } else {
                    AgentMessage::Data {
                        id: i,
                        stream: StreamKind::Stderr,
                        data: Bytes::from(vec![i as u8; 10_000 * i as usize + 1]),
                    }
                }
            })
            .collect();
        let expected = msgs.clone();
        let send = tokio::spawn(async move {
            for chunk in msgs.chunks(4) {
                for msg in chunk {
                    writer.queue_agent_message(msg).unwrap();
                }
                writer.flush().await.unwrap();
            }
        });
        for want in expected {
            let payload = reader.read_frame().await.unwrap().unwrap();
            assert_eq!(zero_copy::decode_agent_message(payload).unwrap(), want);
        }
        send.await.unwrap();
    }

    #[tokio::test]
    async fn oversized_length_is_rejected_before_allocation() {
        let bytes = (u32::MAX).to_be_bytes().to_vec();
        let mut reader = FrameReader::new(&bytes[..]);
        match reader.read_frame().await {
            Err(FrameError::TooLarge { len, .. }) => assert_eq!(len, u32::MAX as usize),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error_not_eof() {
        let mut bytes = 10u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[1, 2, 3]);
        let mut reader = FrameReader::new(&bytes[..]);
        match reader.read_frame().await {
            Err(FrameError::Truncated { received, expected }) => {
                assert_eq!((received, expected), (7, 14));
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
        let mut reader = FrameReader::new(&[0u8, 0][..]);
        assert!(matches!(
            reader.read_frame().await,
            Err(FrameError::Truncated { expected: 4, .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut payload = postcard::to_stdvec(&7u32).unwrap();
        payload.push(0);
        assert!(matches!(
            decode::<u32>(&payload),
            Err(FrameError::TrailingBytes(1))
        ));
    }

    #[test]
    fn encoding_refuses_oversized_values() {
        let big = serde_bytes::ByteBuf::from(vec![0u8; MAX_FRAME_SIZE + 1]);
        let mut buf = vec![9u8];
        assert!(matches!(
            encode_into(&big, &mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(buf, vec![9u8], "buffer is restored on error");
    }
}

//! The buffer between the connection's router and the consumer of one output
//! stream.
//!
//! The flow-control window bounds the *bytes* an agent may have in flight on
//! a stream, not the number of chunks. Queued as they arrive, four million
//! one-byte chunks (one window) would cost the host hundreds of megabytes of
//! queue nodes, and every small chunk, being a slice of the frame it was read
//! in, would keep that whole read buffer alive. So small chunks are copied
//! out of their frame and merged into the chunk at the back of the queue
//! (up to [`MERGE_UP_TO`] bytes); only large chunks are kept as slices. A
//! stream's queue therefore holds at most about a window of bytes in a
//! bounded number of chunks, whatever the agent sends.
//!
//! The consumer sees merged data at once: the unfinished back chunk is handed
//! out as soon as the front of the queue is empty.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};

/// Chunks smaller than this are copied out of the frame they arrived in.
const COPY_BELOW: usize = 256 * 1024;
/// Copied chunks are merged into one of at most this many bytes.
const MERGE_UP_TO: usize = 64 * 1024;

#[derive(Debug, Default)]
struct State {
    /// Complete chunks, oldest first.
    chunks: VecDeque<Bytes>,
    /// Small chunks merged together, after everything in `chunks`.
    tail: BytesMut,
    /// The sender is gone: nothing more comes after what is queued.
    ended: bool,
    /// The receiver is gone: pushes are refused.
    receiver_gone: bool,
    /// The consumer waiting for data.
    waker: Option<Waker>,
}

impl State {
    fn flush_tail(&mut self) {
        if !self.tail.is_empty() {
            let tail = std::mem::take(&mut self.tail).freeze();
            self.chunks.push_back(tail);
        }
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing in the critical sections panics; a poisoned lock still
        // holds consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Creates a queue: the router's end and the consumer's end.
pub(crate) fn chunk_queue() -> (ChunkSender, ChunkReceiver) {
    let shared = Arc::new(Shared::default());
    (ChunkSender(shared.clone()), ChunkReceiver(shared))
}

/// The router's end. Dropping it ends the stream after what is queued.
#[derive(Debug)]
pub(crate) struct ChunkSender(Arc<Shared>);

impl ChunkSender {
    /// Queues `data`; `false` (and nothing queued) if the consumer is gone.
    pub(crate) fn push(&self, data: Bytes) -> bool {
        let mut state = self.0.lock();
        if state.receiver_gone {
            return false;
        }
        if data.is_empty() {
            return true;
        }
        if data.len() >= COPY_BELOW {
            state.flush_tail();
            state.chunks.push_back(data);
        } else {
            if state.tail.len() + data.len() > MERGE_UP_TO {
                state.flush_tail();
            }
            state.tail.extend_from_slice(&data);
            if state.tail.len() >= MERGE_UP_TO {
                state.flush_tail();
            }
        }
        state.wake();
        true
    }
}

impl Drop for ChunkSender {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.ended = true;
        state.wake();
    }
}

/// The consumer's end. Dropping it discards what is queued and makes later
/// pushes fail.
#[derive(Debug)]
pub(crate) struct ChunkReceiver(Arc<Shared>);

impl ChunkReceiver {
    /// The next chunk; `None` once the sender is gone and the queue is empty.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut state = self.0.lock();
        if let Some(chunk) = state.chunks.pop_front() {
            return Poll::Ready(Some(chunk));
        }
        if !state.tail.is_empty() {
            return Poll::Ready(Some(std::mem::take(&mut state.tail).freeze()));
        }
        if state.ended {
            return Poll::Ready(None);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next chunk; `None` once the sender is gone and the queue is empty.
    pub(crate) async fn recv(&mut self) -> Option<Bytes> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Whether nothing is queued right now.
    pub(crate) fn is_empty(&self) -> bool {
        let state = self.0.lock();
        state.chunks.is_empty() && state.tail.is_empty()
    }

    /// How many chunks are queued (the merged back chunk counts as one).
    #[cfg(test)]
    fn queued_chunks(&self) -> usize {
        let state = self.0.lock();
        state.chunks.len() + usize::from(!state.tail.is_empty())
    }
}

impl Drop for ChunkReceiver {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.receiver_gone = true;
        state.chunks.clear();
        state.tail = BytesMut::new();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_window_of_one_byte_chunks_is_a_few_dozen_queued_chunks() {
        let (tx, mut rx) = chunk_queue();
        let window = 1024 * 1024;
        for i in 0..window {
            assert!(tx.push(Bytes::from(vec![(i % 251) as u8])));
        }
        assert!(
            rx.queued_chunks() <= window / MERGE_UP_TO + 1,
            "{} chunks queued",
            rx.queued_chunks()
        );
        drop(tx);
        let mut total = 0;
        while let Some(chunk) = rx.recv().await {
            for (j, b) in chunk.iter().enumerate() {
                assert_eq!(*b, ((total + j) % 251) as u8, "order kept");
            }
            total += chunk.len();
        }
        assert_eq!(total, window);
    }

    #[tokio::test]
    async fn large_chunks_pass_as_they_are_and_order_is_kept() {
        let (tx, mut rx) = chunk_queue();
        let big = Bytes::from(vec![7u8; COPY_BELOW]);
        assert!(tx.push(Bytes::from_static(b"a")));
        assert!(tx.push(big.clone()));
        assert!(tx.push(Bytes::from_static(b"b")));
        assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"a"));
        let got = rx.recv().await.unwrap();
        assert_eq!(got.as_ptr(), big.as_ptr(), "not copied");
        assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"b"));
        assert!(rx.is_empty());
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken_and_a_gone_one_refuses_pushes() {
        let (tx, mut rx) = chunk_queue();
        let reader = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        assert!(tx.push(Bytes::from_static(b"x")));
        assert_eq!(reader.await.unwrap(), Some(Bytes::from_static(b"x")));
        // The receiver was dropped with the task.
        assert!(!tx.push(Bytes::from_static(b"y")));
    }
}

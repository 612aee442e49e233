//! What several targets share: one tokio runtime per process (building one
//! per input would dominate the run; it also ignores SIGPIPE, as a Rust
//! `main` does), and a bound on how long an input may
//! keep a stateful target busy.

// Each target uses a part of this module.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

/// How long one input may take before the target calls it a hang. Every
/// peer in these targets closes its end once its input is spent, so a
/// client still waiting after this long is stuck (a finding), not slow.
pub const HANG: Duration = Duration::from_secs(10);

/// A single-threaded runtime with I/O and timers, built once.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // A Rust `main` ignores SIGPIPE; libFuzzer's `main` (C++) does not,
        // so a fake peer writing to a socket the client closed would kill
        // the process instead of getting EPIPE as the daemon would.
        // SAFETY: setting a signal's disposition to SIG_IGN installs no
        // handler code; it runs once, before any socket exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime can be built")
    })
}

/// A reader that hands out a fuzz input as a byte stream, in reads of a
/// size the input's first byte chooses (1 to 64 bytes), so that the framing
/// layer sees frames cut at every boundary.
pub struct ChunkedReader {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
}

impl ChunkedReader {
    pub fn new(input: &[u8]) -> Self {
        let (chunk, data) = match input.split_first() {
            Some((&b, rest)) => (usize::from(b % 64) + 1, rest),
            None => (1, input),
        };
        Self {
            data: data.to_vec(),
            pos: 0,
            chunk,
        }
    }
}

impl tokio::io::AsyncRead for ChunkedReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let end = (self.pos + self.chunk)
            .min(self.data.len())
            .min(self.pos + buf.remaining());
        buf.put_slice(&self.data[self.pos..end]);
        self.pos = end;
        std::task::Poll::Ready(Ok(()))
    }
}

/// A directory for this process's sockets and files, in memory where the
/// machine has `/dev/shm`: on a disk, rewriting a file per input costs a
/// writeback each time (ext4 flushes a truncated file on close) and the
/// target runs a hundred times slower.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("a temporary directory")
    })
    .path()
}

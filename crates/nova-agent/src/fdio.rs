//! Async I/O on raw file descriptors (pipes, PTY masters, vsock sockets,
//! virtio-serial ports) through tokio's `AsyncFd`.
//!
//! Pipes and PTYs are read with [`AsyncFdIo`], which also offers
//! [`AsyncFdIo::read_now`]: one non-blocking `read(2)` that bypasses tokio's
//! cached readiness. After a command's main process exited, the exec task uses
//! it to drain exactly what is in the pipe (a background child still holding
//! the pipe open would otherwise keep the request open forever).
//!
//! [`FdStream`] adapts a connected socket or a character device to
//! `AsyncRead + AsyncWrite` for the protocol code.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Puts `fd` in non-blocking mode, as `AsyncFd` requires.
pub(crate) fn set_nonblocking(fd: impl AsFd) -> io::Result<()> {
    let flags = fcntl_getfl(&fd)?;
    fcntl_setfl(&fd, flags | OFlags::NONBLOCK)?;
    Ok(())
}

/// Registers an owned descriptor with the reactor.
pub(crate) fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is an open descriptor that stays open, and keeps
    // returning the same number from `as_raw_fd`, until it is dropped, which
    // only happens when the `AsyncFd` that now owns it is dropped.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Result of one read attempt.
#[derive(Debug)]
pub(crate) enum ReadOutcome {
    /// Bytes were read.
    Data(Bytes),
    /// End of file (for a PTY master: every slave side is closed).
    Eof,
    /// Nothing there right now (only from [`AsyncFdIo::read_now`]).
    Empty,
}

/// A non-blocking descriptor registered with the tokio reactor.
#[derive(Debug)]
pub(crate) struct AsyncFdIo {
    fd: AsyncFd<OwnedFd>,
    /// A PTY master reports `EIO` once the terminal is gone; that is EOF.
    eio_is_eof: bool,
}

impl AsyncFdIo {
    /// Registers `fd` (made non-blocking).
    pub(crate) fn new(fd: OwnedFd, eio_is_eof: bool) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self {
            fd: register(fd)?,
            eio_is_eof,
        })
    }

    /// The underlying descriptor.
    pub(crate) fn get_ref(&self) -> &OwnedFd {
        self.fd.get_ref()
    }

    /// Waits until at least one byte (or EOF) is there and reads up to `max` bytes.
    pub(crate) async fn read(&self, max: usize) -> io::Result<ReadOutcome> {
        loop {
            let mut guard = self.fd.readable().await?;
            match self.read_now(max) {
                Ok(ReadOutcome::Empty) => guard.clear_ready(),
                other => return other,
            }
        }
    }

    /// One `read(2)` of up to `max` bytes, without waiting.
    pub(crate) fn read_now(&self, max: usize) -> io::Result<ReadOutcome> {
        let mut buf = Vec::with_capacity(max);
        loop {
            match rustix::io::read(self.fd.get_ref(), rustix::buffer::spare_capacity(&mut buf)) {
                Ok(0) => return Ok(ReadOutcome::Eof),
                Ok(n) => {
                    // A short read would otherwise pin the whole allocation
                    // while it waits in a queue; copy it to a tight buffer.
                    let data = if n * 4 < buf.capacity() {
                        Bytes::copy_from_slice(&buf)
                    } else {
                        Bytes::from(buf)
                    };
                    return Ok(ReadOutcome::Data(data));
                }
                Err(rustix::io::Errno::AGAIN) => return Ok(ReadOutcome::Empty),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::IO) if self.eio_is_eof => return Ok(ReadOutcome::Eof),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes some of `data`, waiting until the descriptor accepts bytes.
    pub(crate) async fn write(&self, data: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.writable().await?;
            match rustix::io::write(self.fd.get_ref(), data) {
                Ok(n) => return Ok(n),
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A bidirectional byte stream over one descriptor (a vsock connection or a
/// virtio-serial port).
#[derive(Debug)]
pub(crate) struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    /// Registers `fd` (made non-blocking).
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self { fd: register(fd)? })
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                rustix::io::read(fd.get_ref(), &mut *unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| rustix::io::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| rustix::io::writev(fd.get_ref(), bufs).map_err(io::Error::from))
            {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Sockets are shut down when dropped; a serial port has no half-close.
        Poll::Ready(Ok(()))
    }
}

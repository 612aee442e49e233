//! File upload and download over the agent connection.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::connection::{CloseReason, Command, Route};
use super::{
    AgentClient, ClientError, DEFAULT_READ_LIMIT, OutputStream, StdinWriter, chunks, closed_error,
};
use crate::messages::{ClientMessage, Request, Response, StreamKind};
use crate::{MAX_CHUNK, STREAM_WINDOW};

/// Where the bytes of an upload come from.
pub(crate) enum Source<'a> {
    Bytes(Bytes),
    Reader(Box<dyn AsyncRead + Unpin + Send + 'a>),
}

/// Streams `source` into `path`; returns the bytes the agent wrote.
pub(crate) async fn upload(
    client: &AgentClient,
    path: &str,
    mode: u32,
    append: bool,
    source: Source<'_>,
) -> Result<u64, ClientError> {
    let id = client.next_id();
    let credit = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
    let (done_tx, done_rx) = oneshot::channel();
    let route = Route {
        credit: Some(credit.clone()),
        done: Some(done_tx),
        ..Route::default()
    };
    client.start(
        id,
        Request::WriteFile {
            path: path.to_owned(),
            mode,
            append,
        },
        route,
    )?;
    let mut writer = StdinWriter::new(
        id,
        credit,
        client.inner.commands.clone(),
        client.inner.closed.clone(),
    );
    let sent = match source {
        Source::Bytes(data) => writer.write(data).await.map(|()| 0),
        Source::Reader(mut reader) => copy(&mut reader, &mut writer).await,
    };
    match sent {
        // A failed send means the request already ended (or the connection
        // did): the outcome says why.
        Ok(_) | Err(ClientError::Protocol(_)) => writer.close(),
        Err(e @ ClientError::Io(_)) => {
            // Reading the local source failed: abandon the upload.
            drop(writer);
            let _ = client.send(ClientMessage::Cancel { id });
            let _ = client.await_reply(done_rx).await;
            return Err(e);
        }
        Err(e) => return Err(e),
    }
    match client.await_reply(done_rx).await? {
        Ok(Response::Written { bytes }) => Ok(bytes),
        Ok(other) => Err(super::unexpected("write_file", &other)),
        Err(e) => Err(e),
    }
}

async fn copy(
    reader: &mut (dyn AsyncRead + Unpin + Send + '_),
    writer: &mut StdinWriter,
) -> Result<u64, ClientError> {
    let mut total = 0u64;
    loop {
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut filled = 0;
        // Fill whole chunks where the reader allows, to keep frames large.
        while filled < buf.len() {
            let n = reader.read(&mut buf[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(total);
        }
        buf.truncate(filled);
        total += filled as u64;
        writer.write(Bytes::from(buf)).await?;
    }
}

/// Opens a download of `path`.
pub(crate) async fn download(
    client: &AgentClient,
    path: &str,
) -> Result<FileDownload, ClientError> {
    let id = client.next_id();
    let (opened_tx, opened_rx) = oneshot::channel();
    let (data_tx, data_rx) = chunks::chunk_queue();
    let (done_tx, done_rx) = oneshot::channel();
    let route = Route {
        started: Some(opened_tx),
        stdout: Some(data_tx),
        done: Some(done_tx),
        ..Route::default()
    };
    client.start(
        id,
        Request::ReadFile {
            path: path.to_owned(),
        },
        route,
    )?;
    let (size, _) = client.await_reply(opened_rx).await??;
    let commands = client.inner.commands.clone();
    Ok(FileDownload {
        id,
        size,
        data: OutputStream::new(id, StreamKind::File, data_rx, commands.clone()),
        done: Some(done_rx),
        commands,
        closed: client.inner.closed.clone(),
    })
}

/// A file being streamed from the guest. Dropping it before the end cancels
/// the transfer.
#[derive(Debug)]
pub struct FileDownload {
    id: u64,
    size: u64,
    data: OutputStream,
    done: Option<oneshot::Receiver<Result<Response, ClientError>>>,
    commands: mpsc::UnboundedSender<Command>,
    closed: CloseReason,
}

impl FileDownload {
    /// The file's size when the agent opened it.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk; `Ok(None)` once the whole file arrived. An error the
    /// agent hit while reading is returned here, after the chunks before it.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, ClientError> {
        if let Some(chunk) = self.data.recv().await {
            return Ok(Some(chunk));
        }
        match self.done.take() {
            None => Ok(None),
            Some(done) => match done.await {
                Ok(Ok(Response::ReadDone { .. })) => Ok(None),
                Ok(Ok(other)) => Err(super::unexpected("read_file", &other)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(closed_error(&self.closed)),
            },
        }
    }

    /// Reads the rest of the file into memory, up to [`DEFAULT_READ_LIMIT`]
    /// bytes (see [`FileDownload::collect_limited`]).
    pub async fn collect(self) -> Result<Vec<u8>, ClientError> {
        self.collect_limited(DEFAULT_READ_LIMIT).await
    }

    /// Reads the rest of the file into memory. A file over `limit` bytes
    /// (by its size when opened, or by what arrives) is
    /// [`ClientError::TooLarge`] and the transfer is cancelled; stream it
    /// with [`FileDownload::recv`] instead.
    pub async fn collect_limited(mut self, limit: u64) -> Result<Vec<u8>, ClientError> {
        let too_large = || ClientError::TooLarge {
            what: "the file",
            limit,
            call: "read_file_to_vec",
            instead: "stream it with AgentClient::read_file",
        };
        if self.size > limit {
            return Err(too_large());
        }
        // The size is only a hint (the file may change); cap the reservation.
        let mut out = Vec::with_capacity(usize::try_from(self.size.min(64 << 20)).unwrap_or(0));
        while let Some(chunk) = self.recv().await? {
            if out.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

impl Drop for FileDownload {
    fn drop(&mut self) {
        if self.done.is_some() {
            let _ = self
                .commands
                .send(Command::Send(ClientMessage::Cancel { id: self.id }));
        }
    }
}

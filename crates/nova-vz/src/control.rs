//! The helper's control socket: how the host drives one VZ VM.
//!
//! The helper (`nova-vz-vmm`) listens on the sandbox's `api.sock`; the host
//! connects once and sends one request per line, JSON
//! ([`ControlRequest`]); the helper answers each with one line
//! ([`ControlResponse`]): the VM's state after the operation, or VZ's
//! error. Requests are handled one at a time, in order, on the VM's queue.
//!
//! ```text
//! host (VzVm)                         helper (nova-vz-vmm)
//! {"op":"pause"}\n          ---->     pauseWithCompletionHandler:
//!                           <----     {"result":"done","state":"paused"}\n
//! {"op":"save","path":…}\n  ---->     saveMachineStateToURL:completionHandler:
//!                           <----     {"result":"failed","failure":{…}}\n
//! ```
//!
//! Lines are bounded ([`MAX_LINE`]) both ways.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::UnixStream;

use crate::error::VzFailure;
use crate::state::VzState;

/// Longest line either side sends, bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// One operation on the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Report the state.
    State,
    /// `pauseWithCompletionHandler:`.
    Pause,
    /// `resumeWithCompletionHandler:`.
    Resume,
    /// `saveMachineStateToURL:completionHandler:` (paused VM, macOS 14+).
    Save {
        /// The file to write.
        path: PathBuf,
    },
    /// `requestStopWithError:`: ask the guest to power off.
    RequestStop,
    /// `stopWithCompletionHandler:`: stop at once (the helper then exits).
    Stop,
}

/// The answer to one [`ControlRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Done; the VM's state now.
    Done {
        /// The state.
        state: VzState,
    },
    /// VZ (or the helper) refused.
    Failed {
        /// Why.
        failure: VzFailure,
    },
}

/// A control request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The socket failed.
    #[error("the VZ helper's control socket failed")]
    Io(#[from] std::io::Error),
    /// The helper closed the socket (it exited).
    #[error("the VZ helper closed its control socket")]
    Closed,
    /// A line was not the protocol's.
    #[error("the VZ helper sent something that is not its protocol: {line:?}")]
    Protocol {
        /// What came (cut short).
        line: String,
        /// Why it did not parse.
        #[source]
        source: serde_json::Error,
    },
    /// A line was over [`MAX_LINE`].
    #[error("a control line is over {MAX_LINE} bytes")]
    TooLong,
    /// No answer in time.
    #[error("the VZ helper did not answer within {0:?}")]
    Timeout(Duration),
    /// VZ refused the operation.
    #[error("Virtualization.framework refused: {0}")]
    Vz(#[from] VzFailure),
}

/// The host end of the control socket.
#[derive(Debug)]
pub struct ControlClient {
    stream: BufReader<UnixStream>,
    timeout: Duration,
}

impl ControlClient {
    /// Wraps a connected control socket; each call waits at most `timeout`.
    pub fn new(stream: UnixStream, timeout: Duration) -> Self {
        Self {
            stream: BufReader::new(stream),
            timeout,
        }
    }

    /// Sends `request` and returns the VM's state after it.
    ///
    /// # Errors
    ///
    /// [`ControlError::Vz`] with VZ's error when it refused; the others
    /// when the helper is gone or broken. After a timeout the connection
    /// is out of step and should be dropped.
    pub async fn call(&mut self, request: &ControlRequest) -> Result<VzState, ControlError> {
        let limit = self.timeout;
        let exchange = async {
            write_line(self.stream.get_mut(), request).await?;
            match read_line::<_, ControlResponse>(&mut self.stream).await? {
                Some(ControlResponse::Done { state }) => Ok(state),
                Some(ControlResponse::Failed { failure }) => Err(ControlError::Vz(failure)),
                None => Err(ControlError::Closed),
            }
        };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| ControlError::Timeout(limit))?
    }
}

/// Writes `value` as one JSON line.
///
/// # Errors
///
/// The socket's error, or [`ControlError::TooLong`].
pub async fn write_line<W, T>(writer: &mut W, value: &T) -> Result<(), ControlError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut line = serde_json::to_vec(value).map_err(|source| ControlError::Protocol {
        line: String::new(),
        source,
    })?;
    if line.len() >= MAX_LINE {
        return Err(ControlError::TooLong);
    }
    line.push(b'\n');
    writer.write_all(&line).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one JSON line; `None` at end of stream.
///
/// # Errors
///
/// The socket's error, [`ControlError::TooLong`], or
/// [`ControlError::Protocol`] for a line that does not parse.
pub async fn read_line<R, T>(reader: &mut R) -> Result<Option<T>, ControlError>
where
    R: AsyncBufRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let mut line = Vec::new();
    let read = (&mut *reader)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(if line.len() > MAX_LINE {
            ControlError::TooLong
        } else {
            ControlError::Closed
        });
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|source| ControlError::Protocol {
            line: String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::VZ_ERROR_DOMAIN;

    /// A helper stand-in: answers each request from `answer`.
    async fn serve(stream: UnixStream, answer: impl Fn(ControlRequest) -> ControlResponse) {
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        while let Ok(Some(request)) = read_line::<_, ControlRequest>(&mut read).await {
            if write_line(&mut write, &answer(request)).await.is_err() {
                break;
            }
        }
    }

    #[tokio::test]
    async fn requests_get_states_and_vz_errors_back_in_order() {
        let (host, helper) = UnixStream::pair().unwrap();
        let server = tokio::spawn(serve(helper, |request| match request {
            ControlRequest::Pause => ControlResponse::Done {
                state: VzState::Paused,
            },
            ControlRequest::Save { .. } => ControlResponse::Failed {
                failure: VzFailure::from_ns_error_parts(VZ_ERROR_DOMAIN, 11, "Save failed."),
            },
            _ => ControlResponse::Done {
                state: VzState::Running,
            },
        }));
        let mut client = ControlClient::new(host, Duration::from_secs(10));
        assert_eq!(
            client.call(&ControlRequest::Pause).await.unwrap(),
            VzState::Paused
        );
        let e = client
            .call(&ControlRequest::Save {
                path: "/s/vz.state".into(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ControlError::Vz(f) if f.kind == crate::error::VzErrorKind::Save),
            "{e:?}"
        );
        assert_eq!(
            client.call(&ControlRequest::Resume).await.unwrap(),
            VzState::Running
        );
        drop(client);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_helper_that_exits_is_closed_and_garbage_is_a_protocol_error() {
        let (host, helper) = UnixStream::pair().unwrap();
        drop(helper);
        let mut client = ControlClient::new(host, Duration::from_secs(10));
        let e = client.call(&ControlRequest::State).await.unwrap_err();
        assert!(
            matches!(e, ControlError::Closed | ControlError::Io(_)),
            "{e:?}"
        );

        let (host, mut helper) = UnixStream::pair().unwrap();
        let mut client = ControlClient::new(host, Duration::from_secs(10));
        let garbage = async {
            let mut buf = [0u8; 64];
            let _ = helper.read(&mut buf).await;
            helper.write_all(b"not json\n").await.unwrap();
            helper
        };
        let (answer, _helper) = tokio::join!(client.call(&ControlRequest::State), garbage);
        assert!(
            matches!(answer, Err(ControlError::Protocol { .. })),
            "{answer:?}"
        );
    }

    #[tokio::test]
    async fn an_overlong_line_is_refused_not_buffered() {
        let (mut host, helper) = UnixStream::pair().unwrap();
        let reader = tokio::spawn(async move {
            let mut helper = BufReader::new(helper);
            read_line::<_, ControlRequest>(&mut helper).await
        });
        let big = vec![b'x'; MAX_LINE + 10];
        let _ = host.write_all(&big).await;
        let got = reader.await.unwrap();
        assert!(matches!(got, Err(ControlError::TooLong)), "{got:?}");
    }

    #[test]
    fn the_wire_format_is_frozen() {
        let save = ControlRequest::Save {
            path: "/s/vz.state".into(),
        };
        assert_eq!(
            serde_json::to_string(&save).unwrap(),
            r#"{"op":"save","path":"/s/vz.state"}"#
        );
        assert_eq!(
            serde_json::to_string(&ControlRequest::RequestStop).unwrap(),
            r#"{"op":"request_stop"}"#
        );
        assert_eq!(
            serde_json::to_string(&ControlResponse::Done {
                state: VzState::Paused
            })
            .unwrap(),
            r#"{"result":"done","state":"paused"}"#
        );
    }
}

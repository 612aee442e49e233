//! `nova cp`: one file between the host and a sandbox, either way,
//! streamed (never whole in memory).
//!
//! `ID:/guest/path` names a guest file (a colon before any `/`, as in
//! `docker cp`); anything else is a local path, `-` being stdin or stdout.
//! A destination that is a directory (or ends in `/`) receives the file
//! under its own name. Only regular files are copied: for a tree, pipe a tar
//! archive (`tar c DIR | nova cp - ID:/tmp/dir.tar`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use nova_server::api::files::{FILE_SIZE_HEADER, FileKindView};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::client::{Client, ReqBody};

/// Arguments of `nova cp`.
#[derive(Debug, clap::Args)]
pub(crate) struct CpArgs {
    /// `ID:/guest/path`, a local path, or `-` for stdin.
    src: String,
    /// `ID:/guest/path`, a local path, or `-` for stdout.
    dst: String,
}

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// A guest path in sandbox `id`.
    Guest { id: String, path: String },
    /// A local path.
    Local(PathBuf),
    /// `-`: stdin as a source, stdout as a destination.
    Stdio,
}

impl Target {
    fn parse(raw: &str) -> anyhow::Result<Self> {
        if raw == "-" {
            return Ok(Self::Stdio);
        }
        if let Some((id, path)) = raw.split_once(':')
            && !id.is_empty()
            && !id.contains('/')
        {
            if !path.starts_with('/') {
                bail!("{raw:?}: guest paths are absolute, like {id}:/root/{path}");
            }
            return Ok(Self::Guest {
                id: id.to_owned(),
                path: path.to_owned(),
            });
        }
        Ok(Self::Local(PathBuf::from(raw)))
    }
}

/// Runs `nova cp`.
pub(crate) async fn run(args: &CpArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_env()?;
    match (Target::parse(&args.src)?, Target::parse(&args.dst)?) {
        (Target::Guest { id, path }, dst @ (Target::Local(_) | Target::Stdio)) => {
            download(&client, &id, &path, dst).await?;
        }
        (src @ (Target::Local(_) | Target::Stdio), Target::Guest { id, path }) => {
            upload(&client, src, &id, &path).await?;
        }
        (Target::Guest { .. }, Target::Guest { .. }) => {
            bail!("copying between sandboxes is not supported: copy to the host first")
        }
        _ => bail!("one side must be a sandbox path, ID:/guest/path"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The file name of `path`, for a destination that is a directory.
fn file_name(path: &str) -> anyhow::Result<&str> {
    path.rsplit('/')
        .find(|p| !p.is_empty())
        .with_context(|| format!("{path:?} names no file"))
}

async fn upload(client: &Client, src: Target, id: &str, guest: &str) -> anyhow::Result<()> {
    let (reader, name, mode, len): (Box<dyn AsyncRead + Send + Unpin>, _, _, _) = match &src {
        Target::Local(path) => {
            let meta = tokio::fs::metadata(path)
                .await
                .with_context(|| format!("cannot read {}", path.display()))?;
            if meta.is_dir() {
                bail!(
                    "{} is a directory: nova cp copies files only (pipe a tar archive instead: \
                     tar c DIR | nova cp - {id}:/tmp/dir.tar)",
                    path.display()
                );
            }
            let file = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?;
            use std::os::unix::fs::PermissionsExt;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let len = meta.is_file().then_some(meta.len());
            (
                Box::new(file),
                name,
                Some(meta.permissions().mode() & 0o7777),
                len,
            )
        }
        _ => (Box::new(tokio::io::stdin()), None, None, None),
    };
    let mut dest = guest.to_owned();
    let into_dir = guest.ends_with('/')
        || client
            .stat(id, guest)
            .await
            .is_ok_and(|s| s.kind == FileKindView::Dir);
    if into_dir {
        let name = name.with_context(|| {
            format!("{id}:{guest} is a directory: name the file to write, like {id}:{guest}/file")
        })?;
        dest = format!("{}/{name}", guest.trim_end_matches('/'));
    }
    let stream =
        tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024).map_ok(Frame::data);
    let body: ReqBody = StreamBody::new(stream).boxed_unsync();
    client
        .upload(id, &dest, mode, len, body)
        .await
        .with_context(|| format!("cannot copy to {id}:{dest}"))?;
    Ok(())
}

async fn download(client: &Client, id: &str, guest: &str, dst: Target) -> anyhow::Result<()> {
    let stat = client
        .stat(id, guest)
        .await
        .with_context(|| format!("cannot copy {id}:{guest}"))?;
    if stat.kind == FileKindView::Dir {
        bail!(
            "{id}:{guest} is a directory: nova cp copies files only (tar it in the sandbox \
             and copy the archive: nova exec {id} -- tar cf /tmp/dir.tar -C {guest} .)"
        );
    }
    let response = client
        .download(id, guest)
        .await
        .with_context(|| format!("cannot copy {id}:{guest}"))?;
    let expected = response
        .headers()
        .get(FILE_SIZE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = response.into_body();
    match dst {
        Target::Local(path) => {
            let path = if path.is_dir() {
                path.join(file_name(guest)?)
            } else {
                path
            };
            let mut file = tokio::fs::File::create(&path)
                .await
                .with_context(|| format!("cannot create {}", path.display()))?;
            let copied = copy_body(&mut body, &mut file, expected).await;
            let copied = match copied {
                Ok(()) => file.sync_all().await.map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            if let Err(e) = copied {
                drop(file);
                let _ = tokio::fs::remove_file(&path).await;
                return Err(e.context(format!("cannot copy {id}:{guest} to {}", path.display())));
            }
        }
        _ => {
            let mut stdout = tokio::io::stdout();
            copy_body(&mut body, &mut stdout, expected)
                .await
                .with_context(|| format!("cannot copy {id}:{guest}"))?;
        }
    }
    Ok(())
}

/// Writes a download's body to `out`; a body shorter than the size the
/// daemon announced is an error (the stream broke off).
async fn copy_body(
    body: &mut hyper::body::Incoming,
    out: &mut (impl AsyncWrite + Unpin),
    expected: Option<u64>,
) -> anyhow::Result<()> {
    let mut written = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            out.write_all(&data).await?;
            written += data.len() as u64;
        }
    }
    out.flush().await?;
    if let Some(expected) = expected
        && written < expected
    {
        bail!("the download ended after {written} of {expected} bytes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_colon_before_any_slash_names_a_sandbox() {
        assert_eq!(
            Target::parse("sb-1:/tmp/x").unwrap(),
            Target::Guest {
                id: "sb-1".into(),
                path: "/tmp/x".into()
            }
        );
        assert_eq!(
            Target::parse("./a:b").unwrap(),
            Target::Local("./a:b".into())
        );
        assert_eq!(
            Target::parse("/x/a:b").unwrap(),
            Target::Local("/x/a:b".into())
        );
        assert_eq!(Target::parse("-").unwrap(), Target::Stdio);
        assert!(Target::parse("sb-1:tmp/x").is_err());
    }

    #[test]
    fn file_names_ignore_trailing_slashes() {
        assert_eq!(file_name("/a/b").unwrap(), "b");
        assert_eq!(file_name("/a/b/").unwrap(), "b");
        assert!(file_name("/").is_err());
    }
}

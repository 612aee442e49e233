//! The guest console and VMM logs: written capped, read back as a tail.
//!
//! A guest can print without end, so nothing it writes reaches a file
//! unbounded: the VMM's stdout and stderr are pipes that [`pump`] copies to
//! the sandbox's `console.log` / `vmm.log` up to a cap, then notes the cap
//! once and discards the rest (still reading, so the VMM never blocks on a
//! full pipe). [`tail`] gives the last lines of those files for error
//! messages.

use std::path::{Path, PathBuf};

use nova_core::home::SandboxPaths;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Default cap of each log file, in bytes.
pub const DEFAULT_LOG_CAP: u64 = 4 * 1024 * 1024;

/// How many lines [`tail`] keeps of each file.
const TAIL_LINES: usize = 30;

/// Copies `from` to the file `path` (appending) until `cap` bytes were
/// written, then writes one line saying so and discards the rest until
/// `from` ends. I/O errors on the file stop the copying, never the reading.
pub async fn pump(mut from: impl AsyncRead + Unpin, path: PathBuf, cap: u64) {
    // Owner-only: the guest's console may hold secrets, and with a uid per
    // sandbox the directory is traversable by other users.
    let mut file = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .await
    {
        Ok(file) => Some(file),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open a log file; discarding its output");
            None
        }
    };
    let mut written = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Some(out) = file.as_mut() else { continue };
        let room = usize::try_from(cap.saturating_sub(written)).unwrap_or(usize::MAX);
        let take = n.min(room);
        let mut result = out.write_all(&buf[..take]).await;
        written += take as u64;
        if take < n && result.is_ok() {
            let note = format!("\n[nova: log capped at {cap} bytes; later output discarded]\n");
            result = out.write_all(note.as_bytes()).await;
            if result.is_ok() {
                result = out.flush().await;
            }
            file = None;
        }
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot write a log file; discarding its output");
            file = None;
        }
    }
    if let Some(mut out) = file {
        let _ = out.flush().await;
    }
}

/// The last non-empty lines of the sandbox's `console.log` and `vmm.log`
/// and of each `extra` (label, file), labelled; a placeholder when all are
/// empty. Reads at most the end of each file.
pub fn tail(paths: &SandboxPaths, extra: &[(&str, PathBuf)]) -> String {
    let mut parts = Vec::new();
    let console = tail_lines(&paths.console_log(), TAIL_LINES);
    if !console.is_empty() {
        parts.push(console);
    }
    let vmm = tail_lines(&paths.vmm_log(), TAIL_LINES);
    if !vmm.is_empty() {
        parts.push(format!("vmm: {vmm}"));
    }
    for (label, path) in extra {
        let text = tail_lines(path, TAIL_LINES);
        if !text.is_empty() {
            parts.push(format!("{label}: {text}"));
        }
    }
    if parts.is_empty() {
        "(no console output)".to_owned()
    } else {
        parts.join("\n")
    }
}

/// The last `lines` non-empty lines of a text file ("" if unreadable); reads
/// only its last 64 KiB.
pub fn tail_lines(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const WINDOW: u64 = 64 * 1024;
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > WINDOW && file.seek(SeekFrom::Start(len - WINDOW)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.take(WINDOW).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use nova_core::home::NovaHome;
    use nova_core::id::SandboxId;

    use super::*;

    #[tokio::test]
    async fn a_guest_that_prints_without_end_fills_only_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let (mut tx, rx) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            // 1 MiB of output against a 10 KiB cap: all of it is read.
            for _ in 0..256 {
                tx.write_all(&[b'x'; 4096]).await.unwrap();
            }
        });
        pump(rx, path.clone(), 10 * 1024).await;
        writer.await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&"x".repeat(10 * 1024)));
        assert!(text.ends_with("[nova: log capped at 10240 bytes; later output discarded]\n"));
        assert!(text.len() < 10 * 1024 + 100);
    }

    #[test]
    fn tail_labels_each_log_and_keeps_the_last_lines() {
        let home = tempfile::tempdir().unwrap();
        let paths = NovaHome::at(home.path()).sandbox(&SandboxId::random());
        assert_eq!(tail(&paths, &[]), "(no console output)");
        std::fs::create_dir_all(paths.dir()).unwrap();
        std::fs::write(paths.console_log(), "a\n\nb\nKernel panic\n").unwrap();
        std::fs::write(paths.vmm_log(), "qemu: bad\n").unwrap();
        let extra = paths.dir().join("fc.log");
        std::fs::write(&extra, "fault\n").unwrap();
        assert_eq!(
            tail(&paths, &[("firecracker log", extra)]),
            "a\nb\nKernel panic\nvmm: qemu: bad\nfirecracker log: fault"
        );
        assert_eq!(tail_lines(&paths.console_log(), 2), "b\nKernel panic");
    }
}

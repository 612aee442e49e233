//! The `nova.*` parameters on the kernel command line.
//!
//! | parameter | effect |
//! |---|---|
//! | `nova.hostname=NAME` | hostname (default `nova`) |
//! | `nova.overlay=/dev/vdX` | scratch disk (ext4) for the writable overlay over the read-only root |
//! | `nova.env.KEY=VALUE` | extra default environment variable for every command |
//! | `nova.listen=ADDR` | listen address (`vsock:PORT`, `serial:NAME`, `unix:PATH`); repeatable, replaces the defaults |
//!
//! Anything else on the command line is ignored.

/// The parsed `nova.*` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KernelCmdline {
    pub(crate) hostname: Option<String>,
    pub(crate) overlay: Option<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) listen: Vec<String>,
}

impl KernelCmdline {
    /// Reads `/proc/cmdline` (empty if it cannot be read).
    pub(crate) fn from_proc() -> Self {
        match std::fs::read_to_string("/proc/cmdline") {
            Ok(text) => Self::parse(&text),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read /proc/cmdline; using defaults");
                Self::default()
            }
        }
    }

    /// Parses a command line. Quoting is not supported (none of our values
    /// need spaces).
    pub(crate) fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for word in text.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "nova.hostname" if !value.is_empty() => out.hostname = Some(value.to_owned()),
                "nova.overlay" if !value.is_empty() => out.overlay = Some(value.to_owned()),
                "nova.listen" if !value.is_empty() => out.listen.push(value.to_owned()),
                _ => {
                    if let Some(name) = key.strip_prefix("nova.env.")
                        && !name.is_empty()
                    {
                        out.env.push((name.to_owned(), value.to_owned()));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nova_parameters_and_ignores_the_rest() {
        let c = KernelCmdline::parse(
            "console=ttyS0 reboot=k nova.hostname=box1 nova.overlay=/dev/vdb \
             nova.env.FOO=a=b nova.env.=x nova.listen=vsock:1024 quiet nova.hostname",
        );
        assert_eq!(c.hostname.as_deref(), Some("box1"));
        assert_eq!(c.overlay.as_deref(), Some("/dev/vdb"));
        assert_eq!(c.env, vec![("FOO".to_owned(), "a=b".to_owned())]);
        assert_eq!(c.listen, vec!["vsock:1024".to_owned()]);
        assert_eq!(KernelCmdline::parse(""), KernelCmdline::default());
    }
}

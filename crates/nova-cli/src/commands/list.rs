//! `nova ls`: the daemon's sandboxes as a table, ids, or JSON. Like `docker
//! ps`, only live sandboxes (creating, running, paused, stopping) unless
//! `-a`.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use nova_server::api::sandboxes::{SandboxStateView, SandboxView};

use crate::client::Client;

/// Arguments of `nova ls`.
#[derive(Debug, clap::Args)]
pub(crate) struct ListArgs {
    /// Also stopped and failed sandboxes.
    #[arg(long, short = 'a')]
    all: bool,
    /// Only ids, one a line.
    #[arg(long, short = 'q', conflicts_with = "json")]
    quiet: bool,
    /// The sandboxes as a JSON array (the API's views).
    #[arg(long)]
    json: bool,
    /// Only sandboxes with this label: `KEY=VALUE`, or a bare `KEY` for any
    /// value; repeat to require several.
    #[arg(long = "label", short = 'l', value_name = "KEY[=VALUE]")]
    labels: Vec<String>,
    /// Docker's form of `-l`: `label=KEY=VALUE`.
    #[arg(long, value_name = "label=KEY[=VALUE]", value_parser = parse_filter)]
    filter: Vec<String>,
}

fn parse_filter(raw: &str) -> Result<String, String> {
    raw.strip_prefix("label=")
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("{raw:?}: the only filter is label=KEY[=VALUE]"))
}

/// Runs `nova ls`.
pub(crate) async fn run(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_env()?;
    let selector: Vec<&str> = args
        .labels
        .iter()
        .chain(&args.filter)
        .map(String::as_str)
        .collect();
    let selector = (!selector.is_empty()).then(|| selector.join(","));
    let views: Vec<SandboxView> = client
        .list(selector.as_deref())
        .await?
        .into_iter()
        .filter(|v| args.all || is_live(v.state))
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
    } else if args.quiet {
        for v in &views {
            println!("{}", v.id);
        }
    } else {
        print!("{}", table(&views, now_ms()));
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether a sandbox in `state` holds a VM (or is about to).
pub(crate) fn is_live(state: SandboxStateView) -> bool {
    matches!(
        state,
        SandboxStateView::Creating
            | SandboxStateView::Running
            | SandboxStateView::Paused
            | SandboxStateView::Stopping
    )
}

/// The state as the API spells it.
pub(crate) fn state_name(state: SandboxStateView) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{state:?}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `12 seconds ago`, `3 minutes ago`, ... as Docker writes ages.
fn age(created_at_ms: u64, now_ms: u64) -> String {
    let secs = now_ms.saturating_sub(created_at_ms) / 1000;
    let (n, unit) = match secs {
        0..60 => (secs, "second"),
        60..3600 => (secs / 60, "minute"),
        3600..86_400 => (secs / 3600, "hour"),
        _ => (secs / 86_400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

/// The table `nova ls` prints, a header line first.
fn table(views: &[SandboxView], now_ms: u64) -> String {
    let rows: Vec<[String; 6]> = views
        .iter()
        .map(|v| {
            [
                v.id.clone(),
                v.template.clone(),
                if v.persisted {
                    format!("{} (on disk)", state_name(v.state))
                } else {
                    state_name(v.state)
                },
                age(v.created_at_ms, now_ms),
                v.boot
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |b| format!("{:.0}", b.boot_time_ms)),
                v.labels
                    .iter()
                    .map(|(k, val)| format!("{k}={val}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    let header = ["ID", "TEMPLATE", "STATE", "CREATED", "BOOT_MS", "LABELS"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header.map(str::to_owned)).chain(rows) {
        let line = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| match i {
                // BOOT_MS is a number: right-aligned.
                4 => format!("{cell:>w$}"),
                5 => cell.clone(),
                _ => format!("{cell:<w$}"),
            })
            .collect::<Vec<_>>()
            .join("   ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use nova_server::api::sandboxes::BootView;

    use super::*;

    #[test]
    fn ages_read_like_docker() {
        assert_eq!(age(0, 999), "0 seconds ago");
        assert_eq!(age(0, 1_000), "1 second ago");
        assert_eq!(age(0, 120_000), "2 minutes ago");
        assert_eq!(age(0, 3_600_000), "1 hour ago");
        assert_eq!(age(0, 3 * 86_400_000), "3 days ago");
        assert_eq!(age(5_000, 1_000), "0 seconds ago");
    }

    #[test]
    fn the_table_has_a_header_and_aligned_columns() {
        let view = SandboxView {
            id: "sb-0123456789abc".into(),
            template: "minimal".into(),
            state: SandboxStateView::Running,
            backend: "qemu".into(),
            memory_mb: 256,
            vcpus: 1,
            network: false,
            ports: vec![],
            egress: None,
            labels: BTreeMap::from([("team".into(), "a".into())]),
            created_at_ms: 0,
            expires_at_ms: None,
            boot: Some(BootView {
                boot_time_ms: 141.6,
                spawn_ms: 0.0,
                configure_ms: 0.0,
                guest_ms: 0.0,
                restored: true,
            }),
            from_pool: false,
            persisted: false,
            failure: None,
            agent_version: None,
            kernel_release: None,
        };
        let text = table(&[view], 61_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID "), "{text}");
        assert!(lines[1].starts_with("sb-0123456789abc   minimal"), "{text}");
        assert!(lines[1].contains("running"), "{text}");
        assert!(lines[1].contains("1 minute ago"), "{text}");
        assert!(lines[1].contains(" 142 "), "{text}");
        assert!(lines[1].ends_with("team=a"), "{text}");
        assert_eq!(lines[0].find("STATE"), lines[1].find("running"));
    }

    #[test]
    fn filters_are_label_selectors() {
        assert_eq!(parse_filter("label=a=b").unwrap(), "a=b");
        assert!(parse_filter("status=running").is_err());
    }
}

//! `nova stats`: CPU, memory and processes of sandboxes, once or refreshed
//! every second (`--watch`, until Ctrl-C).
//!
//! CPU% is the VMM's CPU time over wall time between two samples (as `docker
//! stats` computes it): 100% is one host CPU busy, so a guest with N vCPUs
//! can show up to N x 100%. A single report therefore takes two samples,
//! half a second apart.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use futures_util::future::join_all;
use nova_server::api::sandboxes::{SandboxStateView, StatsView};

use crate::client::Client;

/// Arguments of `nova stats`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatsArgs {
    /// The sandboxes; every running one when none is named.
    ids: Vec<String>,
    /// Refresh every second until Ctrl-C.
    #[arg(long, short = 'w', conflicts_with = "json")]
    watch: bool,
    /// One report as JSON: `[{"id", "cpu_percent", "stats": {...}}]`.
    #[arg(long)]
    json: bool,
}

/// Wall time between the two samples of a single report.
const SAMPLE_GAP: Duration = Duration::from_millis(500);
/// Refresh period of `--watch`.
const WATCH_PERIOD: Duration = Duration::from_secs(1);

/// One sandbox's row.
#[derive(Debug, serde::Serialize)]
struct Row {
    id: String,
    /// `None` until two samples exist.
    cpu_percent: Option<f64>,
    stats: StatsView,
}

/// CPU% between two samples of one sandbox (by the daemon's uptime clock).
fn cpu_percent(before: &StatsView, after: &StatsView) -> Option<f64> {
    let wall_ms = after.uptime_ms.checked_sub(before.uptime_ms)?;
    if wall_ms == 0 {
        return None;
    }
    let cpu_us = after.cpu_usage_us.saturating_sub(before.cpu_usage_us);
    Some(cpu_us as f64 / (wall_ms as f64 * 1000.0) * 100.0)
}

/// The ids to report: those named, else every running sandbox.
async fn targets(client: &Client, named: &[String]) -> anyhow::Result<Vec<String>> {
    if !named.is_empty() {
        return Ok(named.to_vec());
    }
    Ok(client
        .list(None)
        .await?
        .into_iter()
        .filter(|v| v.state == SandboxStateView::Running)
        .map(|v| v.id)
        .collect())
}

/// Samples every id at once. A named sandbox that fails is an error; one
/// found by listing that went away meanwhile is left out.
async fn sample(
    client: &Client,
    ids: &[String],
    named: bool,
) -> anyhow::Result<Vec<(String, StatsView)>> {
    let results = join_all(ids.iter().map(|id| client.stats(id))).await;
    let mut out = Vec::new();
    for (id, result) in ids.iter().zip(results) {
        match result {
            Ok(stats) => out.push((id.clone(), stats)),
            Err(e) if named => return Err(anyhow::Error::from(e).context(id.clone())),
            Err(_) => {}
        }
    }
    Ok(out)
}

fn rows(now: Vec<(String, StatsView)>, before: &HashMap<String, StatsView>) -> Vec<Row> {
    now.into_iter()
        .map(|(id, stats)| Row {
            cpu_percent: before.get(&id).and_then(|b| cpu_percent(b, &stats)),
            id,
            stats,
        })
        .collect()
}

fn mib(v: f64) -> String {
    format!("{v:.1}MiB")
}

fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<18} {:>8} {:>24} {:>6}\n",
        "ID", "CPU %", "MEM USED / LIMIT", "PIDS"
    );
    for r in rows {
        let cpu = r
            .cpu_percent
            .map_or_else(|| "-".to_owned(), |c| format!("{c:.2}%"));
        let mem = format!(
            "{} / {}",
            mib(r.stats.memory_usage_mb),
            mib(r.stats.memory_limit_mb as f64)
        );
        let pids = r
            .stats
            .process_count
            .map_or_else(|| "-".to_owned(), |p| p.to_string());
        out.push_str(&format!("{:<18} {cpu:>8} {mem:>24} {pids:>6}\n", r.id));
    }
    out
}

/// Runs `nova stats`.
pub(crate) async fn run(args: &StatsArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_env()?;
    let named = !args.ids.is_empty();
    if !args.watch {
        let ids = targets(&client, &args.ids).await?;
        let first: HashMap<_, _> = sample(&client, &ids, named).await?.into_iter().collect();
        tokio::time::sleep(SAMPLE_GAP).await;
        let rows = rows(sample(&client, &ids, named).await?, &first);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print!("{}", table(&rows));
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Until Ctrl-C, wherever the loop is (waiting, sampling or drawing).
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        result = watch(&client, &args.ids) => result,
        _ = interrupt.recv() => Ok(ExitCode::SUCCESS),
    }
}

/// Redraws the table every [`WATCH_PERIOD`].
async fn watch(client: &Client, named_ids: &[String]) -> anyhow::Result<ExitCode> {
    let named = !named_ids.is_empty();
    let mut before = HashMap::new();
    let mut tick = tokio::time::interval(WATCH_PERIOD);
    loop {
        tick.tick().await;
        let ids = targets(client, named_ids).await?;
        let now = sample(client, &ids, named).await?;
        let next: HashMap<_, _> = now.iter().cloned().collect();
        let rows = rows(now, &before);
        before = next;
        // Clear the screen and draw from the top, like `docker stats`.
        print!("\x1b[2J\x1b[H{}", table(&rows));
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(cpu_usage_us: u64, uptime_ms: u64) -> StatsView {
        StatsView {
            memory_usage_mb: 40.0,
            memory_limit_mb: 256,
            cpu_usage_us,
            uptime_ms,
            vmm_rss_bytes: 0,
            net_rx_bytes: None,
            net_tx_bytes: None,
            process_count: Some(3),
            disk_used_bytes: None,
            load_avg_1m: None,
        }
    }

    #[test]
    fn cpu_percent_is_cpu_time_over_wall_time() {
        // 250 ms of CPU in 500 ms of wall time: half a host CPU.
        assert_eq!(
            cpu_percent(&view(0, 1000), &view(250_000, 1500)),
            Some(50.0)
        );
        assert_eq!(cpu_percent(&view(0, 1000), &view(0, 1000)), None);
        assert_eq!(cpu_percent(&view(0, 2000), &view(0, 1000)), None);
    }

    #[test]
    fn the_table_shows_usage_over_limit() {
        let rows = vec![Row {
            id: "sb-x".into(),
            cpu_percent: Some(12.345),
            stats: view(0, 0),
        }];
        let text = table(&rows);
        assert!(text.starts_with("ID "), "{text}");
        assert!(text.contains("12.35%"), "{text}");
        assert!(text.contains("40.0MiB / 256.0MiB"), "{text}");
        assert!(text.lines().nth(1).unwrap().ends_with(" 3"), "{text}");
    }
}

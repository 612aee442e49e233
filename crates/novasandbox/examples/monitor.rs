//! The seed's monitoring example: a loop printing a sandbox's resource use
//! while it works.
//!
//! `cargo run -p novasandbox --example monitor`

#![allow(clippy::print_stdout, reason = "an example prints its results")]

use std::time::Duration;

use novasandbox::core::SandboxConfig;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let template = std::env::var("NOVA_EXAMPLE_TEMPLATE").unwrap_or_else(|_| "python".into());
    let hypervisor = novasandbox::detect()?;
    let config = SandboxConfig::builder()
        .template_id(template)
        .boot_timeout_ms(60_000)
        .build()?;
    let sandbox = hypervisor.create_sandbox(config).await?;
    // Some work to watch: a busy loop for a few seconds, in the background.
    sandbox
        .execute_command("setsid sh -c 'end=$(($(date +%s)+3)); while [ $(date +%s) -lt $end ]; do :; done' >/dev/null 2>&1 &")
        .await?;
    for _ in 0..5 {
        if !sandbox.is_running().await {
            break;
        }
        let stats = sandbox.get_stats().await?;
        println!(
            "uptime {:>6} ms  memory {:>6.1} MB  cpu {:>9} us  load {:?}",
            sandbox.get_uptime_ms(),
            stats.memory_usage_mb,
            stats.cpu_usage_us,
            stats.guest.map(|g| g.load_avg[0]),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sandbox.stop(false).await?;
    Ok(())
}

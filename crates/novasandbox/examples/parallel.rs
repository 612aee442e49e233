//! The seed's concurrency example: five sandboxes created at once with
//! `join_all`, each running its own command.
//!
//! `cargo run -p novasandbox --example parallel`

#![allow(clippy::print_stdout, reason = "an example prints its results")]

use futures::future::join_all;
use novasandbox::core::SandboxConfig;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let template = std::env::var("NOVA_EXAMPLE_TEMPLATE").unwrap_or_else(|_| "python".into());
    let hypervisor = novasandbox::detect()?;
    let config = SandboxConfig::builder()
        .template_id(template)
        .memory_mb(256)
        .vcpus(1)
        .boot_timeout_ms(120_000)
        .build()?;
    let started = std::time::Instant::now();
    let created = join_all((0..5).map(|_| hypervisor.create_sandbox(config.clone()))).await;
    let sandboxes = created.into_iter().collect::<Result<Vec<_>, _>>()?;
    println!("5 sandboxes ready in {} ms", started.elapsed().as_millis());

    let outputs = join_all(
        sandboxes
            .iter()
            .enumerate()
            .map(|(i, s)| s.execute_command(format!("echo task {i} on $(hostname)"))),
    )
    .await;
    for output in outputs {
        print!("{}", output?.stdout_lossy());
    }
    join_all(sandboxes.iter().map(|s| s.stop(true)))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    println!("all stopped");
    Ok(())
}

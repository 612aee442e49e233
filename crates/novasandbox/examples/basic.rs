//! The seed's first example: create a sandbox, run a command, read its
//! stats, stop it.
//!
//! `cargo run -p novasandbox --example basic` (templates from `make images`;
//! NOVA_EXAMPLE_TEMPLATE picks another template than `python`).

#![allow(clippy::print_stdout, reason = "an example prints its results")]

use novasandbox::core::SandboxConfig;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let template = std::env::var("NOVA_EXAMPLE_TEMPLATE").unwrap_or_else(|_| "python".into());
    let hypervisor = novasandbox::detect()?;
    let config = SandboxConfig::builder()
        .template_id(template)
        .memory_mb(512)
        .vcpus(2)
        // Generous: under software emulation (no hardware KVM) a boot takes seconds.
        .boot_timeout_ms(60_000)
        .build()?;
    let sandbox = hypervisor.create_sandbox(config).await?;
    println!(
        "sandbox {} ready in {} ms",
        sandbox.id(),
        sandbox.boot_time_ms()
    );

    let result = sandbox.execute_command("python3 -c 'print(\"Hello from the sandbox\")' 2>/dev/null || echo 'Hello from the sandbox'").await?;
    print!("{}", result.stdout_lossy());
    println!("exit code {}", result.exit_code());

    let stats = sandbox.get_stats().await?;
    println!(
        "memory: {:.1} MB, cpu: {} us",
        stats.memory_usage_mb, stats.cpu_usage_us
    );

    sandbox.stop(false).await?;
    println!("stopped; running = {}", sandbox.is_running().await);
    Ok(())
}

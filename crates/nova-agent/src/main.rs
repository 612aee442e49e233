//! The `nova-agent` binary: the guest's PID 1. Everything is in the
//! library (`src/lib.rs`), which also lets the fuzz targets reach the
//! session's routing of host messages.

fn main() {
    nova_agent::main();
}

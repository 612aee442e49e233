"""The package version: equal to the Rust crates' (workspace Cargo.toml)."""

__version__ = "0.1.0"

//! `SandboxConfig` from JSON (what `nova run --config`, the library's
//! callers and a template's `<id>.json` hand over), then `validate()`.
//!
//! Properties: nothing panics; a config that validates serializes, parses
//! back to itself and still validates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nova_core::config::SandboxConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = serde_json::from_slice::<SandboxConfig>(data) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    let json = serde_json::to_vec(&config).expect("a valid config serializes");
    let back: SandboxConfig = serde_json::from_slice(&json).expect("a serialized config parses");
    assert_eq!(back, config);
    back.validate()
        .expect("a config that validated still validates");
});

//! The operator's `policy.toml`: `toml::from_str::<Policy>`, then the
//! daemon's whole load (`Policy::load`, which checks the limits), then a
//! default create admitted under the loaded policy.
//!
//! Properties: nothing panics; what admission produces under a policy that
//! loaded validates.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use nova_server::api::sandboxes::CreateSandboxRequest;
use nova_server::policy::{Policy, Usage};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if toml::from_str::<Policy>(text).is_err() {
        return;
    }
    // `load` also runs the checks a daemon applies before it serves.
    let path = common::scratch().join("policy.toml");
    std::fs::write(&path, text).expect("write the policy file");
    let Ok(policy) = Policy::load(&path) else {
        return;
    };
    let request = CreateSandboxRequest::default();
    for defaults in [None, Some((512, 2))] {
        if let Ok(admitted) = policy.admit(&request, defaults) {
            admitted
                .config
                .validate()
                .expect("an admitted config validates");
            let _ = policy.check_totals(Usage::of(&admitted.config));
        }
    }
    let _ = policy.template_allowed("python");
});

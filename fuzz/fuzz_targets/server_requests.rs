//! The daemon's API request bodies, as its handlers take them: the first
//! input byte picks the body, the rest is its JSON.
//!
//! - even: `POST /v1/sandboxes` (`CreateSandboxRequest`), admitted by the
//!   default policy (`Policy::admit`) with and without template defaults;
//! - odd: `POST /v1/sandboxes/{id}/exec` (`ExecBody::to_request`).
//!
//! Properties: nothing panics; whatever the policy admits is a config the
//! runtime accepts (`SandboxConfig::validate`) with a lifetime in range.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use nova_server::api::exec::ExecBody;
use nova_server::api::sandboxes::CreateSandboxRequest;
use nova_server::policy::{Policy, Usage};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        create(body);
    } else if let Ok(exec) = serde_json::from_slice::<ExecBody>(body) {
        let env = BTreeMap::from([("PATH".to_owned(), "/usr/bin:/bin".to_owned())]);
        let _ = exec.to_request(&env);
    }
});

fn create(body: &[u8]) {
    let Ok(request) = serde_json::from_slice::<CreateSandboxRequest>(body) else {
        return;
    };
    let policy = Policy::default();
    for defaults in [None, Some((512, 2)), Some((u32::MAX, u8::MAX))] {
        let Ok(admitted) = policy.admit(&request, defaults) else {
            continue;
        };
        admitted
            .config
            .validate()
            .expect("an admitted config validates");
        assert!(policy.check_timeout(admitted.timeout_secs).is_ok());
        let usage = Usage::of(&admitted.config);
        let _ = policy.check_totals(usage.plus(usage));
    }
}

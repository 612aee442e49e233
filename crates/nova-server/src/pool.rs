//! The warm pool: per template, sandboxes booted (or restored) ahead of time
//! and kept paused, so a create can claim one instead of waiting for a boot.
//!
//! A create is served from the pool only when what it asks for is exactly
//! what the pool's sandboxes were made with (the template with the policy's
//! defaults: no ports, no volumes, the default network): the caller's labels,
//! environment and lifetime are the daemon's record, applied at the claim.
//! A claim takes the oldest ready sandbox, resumes it and wakes the refill
//! loop ([`crate::daemon::Daemon::run_pool`]), which boots replacements in
//! the background through the same admission as every create.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use nova_core::config::SandboxConfig;
use nova_core::id::SandboxId;
use tokio::sync::Notify;

use crate::api::sandboxes::CreateSandboxRequest;
use crate::policy::Policy;

/// The warm pool of every template the policy names.
#[derive(Debug)]
pub struct Pool {
    /// Template id to (wanted size, the config its sandboxes are made with).
    wanted: BTreeMap<String, (usize, SandboxConfig)>,
    ready: Mutex<HashMap<String, VecDeque<SandboxId>>>,
    wake: Notify,
}

impl Pool {
    /// The pool `policy` asks for, each template's sandboxes made with the
    /// size `defaults` gives for it (see [`Policy::admit`]). A template the
    /// policy itself would refuse is logged and left out.
    pub fn new(policy: &Policy, defaults: impl Fn(&str) -> Option<(u32, u8)>) -> Self {
        let mut wanted = BTreeMap::new();
        for (template, &size) in &policy.pool {
            if size == 0 {
                continue;
            }
            let request = CreateSandboxRequest {
                template: Some(template.clone()),
                ..CreateSandboxRequest::default()
            };
            match policy.admit(&request, defaults(template)) {
                Ok(admitted) => {
                    wanted.insert(template.clone(), (size, admitted.config));
                }
                Err(problem) => {
                    tracing::warn!(template, detail = %problem.detail, "no warm pool for this template");
                }
            }
        }
        Self {
            wanted,
            ready: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<SandboxId>>> {
        // Every update is one push or pop: a poisoned lock is still whole.
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The oldest ready sandbox made with exactly `config`, taken out of the
    /// pool; the refill loop is woken.
    pub fn claim(&self, config: &SandboxConfig) -> Option<SandboxId> {
        let (_, made_with) = self.wanted.get(&config.template_id)?;
        if made_with != config {
            return None;
        }
        let id = self.lock().get_mut(&config.template_id)?.pop_front();
        if id.is_some() {
            self.wake.notify_one();
        }
        id
    }

    /// Puts a ready (paused) sandbox of `template` in the pool.
    pub fn add(&self, template: &str, id: SandboxId) {
        self.lock()
            .entry(template.to_owned())
            .or_default()
            .push_back(id);
    }

    /// Takes `id` out of the pool, wherever it is (it was stopped).
    pub fn forget(&self, id: &SandboxId) {
        for queue in self.lock().values_mut() {
            queue.retain(|x| x != id);
        }
        self.wake.notify_one();
    }

    /// Templates whose pool is short, with the config to make one more.
    pub fn short(&self) -> Vec<(String, SandboxConfig)> {
        let ready = self.lock();
        self.wanted
            .iter()
            .filter(|(t, (size, _))| ready.get(*t).map_or(0, VecDeque::len) < *size)
            .map(|(t, (_, config))| (t.clone(), config.clone()))
            .collect()
    }

    /// Ready sandboxes per template.
    pub fn ready_counts(&self) -> Vec<(String, usize)> {
        let ready = self.lock();
        self.wanted
            .keys()
            .map(|t| (t.clone(), ready.get(t).map_or(0, VecDeque::len)))
            .collect()
    }

    /// Whether the policy asks for any pool.
    pub fn is_enabled(&self) -> bool {
        !self.wanted.is_empty()
    }

    /// Waits until a claim or a stop makes the pool short again.
    pub async fn wait(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_create_made_exactly_like_the_pool_claims_from_it() {
        let policy: Policy = toml::from_str("[pool]\nminimal = 2\n").unwrap();
        let pool = Pool::new(&policy, |_| None);
        assert_eq!(pool.short().len(), 1);
        let (_, config) = pool.short().remove(0);
        let id = SandboxId::random();
        pool.add("minimal", id.clone());
        let mut bigger = config.clone();
        bigger.memory_mb *= 2;
        assert_eq!(pool.claim(&bigger), None);
        assert_eq!(pool.claim(&config), Some(id));
        assert_eq!(pool.claim(&config), None);
        assert_eq!(pool.ready_counts(), vec![("minimal".to_owned(), 0)]);
    }
}

//! What the daemon keeps about each sandbox beyond the runtime's own
//! `state.json`: the caller's labels and environment, its lifetime, and
//! whether it waits in the warm pool.
//!
//! One small JSON file per sandbox, `$NOVA_HOME/server/sandboxes/<id>.json`,
//! replaced atomically (write a temporary file, then rename) by the daemon,
//! its only writer. The runtime's sandbox directory stays the truth about
//! what runs; a record only adds the caller's view, so the two cannot
//! disagree about whether a VM exists: a record without a live sandbox is
//! dropped at start-up, a live sandbox without a record gets a fresh one.
//! (SQLite would add a second store to keep consistent with the directories,
//! and a schema, for a handful of fields written once per create.)

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nova_core::id::SandboxId;
use serde::{Deserialize, Serialize};

/// The daemon's record of one sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    /// The caller's labels.
    pub labels: BTreeMap<String, String>,
    /// The caller's environment for every command.
    pub env: BTreeMap<String, String>,
    /// The lifetime asked for, seconds.
    pub timeout_secs: Option<u64>,
    /// When the lifetime ends, milliseconds since the Unix epoch; `None` for
    /// a sandbox waiting in the pool.
    pub expires_at_ms: Option<u64>,
    /// The template whose warm pool this sandbox waits in, until claimed.
    pub pool: Option<String>,
    /// Claimed from the pool.
    pub from_pool: bool,
}

/// The records of every sandbox, in memory and on disk.
#[derive(Debug)]
pub struct Records {
    dir: PathBuf,
    map: Mutex<HashMap<SandboxId, Record>>,
}

impl Records {
    /// Opens (creating) `dir` and reads every record in it; unreadable ones
    /// are logged and skipped.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut map = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse::<SandboxId>().ok())
            else {
                continue;
            };
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
            {
                Ok(record) => {
                    map.insert(id, record);
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "skipping record"),
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            map: Mutex::new(map),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, Record>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every update is one insert or remove), so a poisoned lock is
        // still good.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record of `id`.
    pub fn get(&self, id: &SandboxId) -> Option<Record> {
        self.lock().get(id).cloned()
    }

    /// Every record.
    pub fn all(&self) -> Vec<(SandboxId, Record)> {
        self.lock()
            .iter()
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect()
    }

    /// Stores `record` for `id`, on disk first.
    pub fn put(&self, id: &SandboxId, record: Record) -> std::io::Result<()> {
        self.write(id, &record)?;
        self.lock().insert(id.clone(), record);
        Ok(())
    }

    /// Changes the record of `id` with `change` and stores it; `None` when
    /// there is none.
    pub fn update(
        &self,
        id: &SandboxId,
        change: impl FnOnce(&mut Record),
    ) -> std::io::Result<Option<Record>> {
        let Some(mut record) = self.get(id) else {
            return Ok(None);
        };
        change(&mut record);
        self.put(id, record.clone())?;
        Ok(Some(record))
    }

    /// Forgets `id`.
    pub fn remove(&self, id: &SandboxId) {
        self.lock().remove(id);
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(sandbox = %id, error = %e, "cannot remove record"),
        }
    }

    fn path(&self, id: &SandboxId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn write(&self, id: &SandboxId, record: &Record) -> std::io::Result<()> {
        let path = self.path(id);
        let tmp = self.dir.join(format!(".{id}.json.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?)?;
        file.sync_data()?;
        std::fs::rename(&tmp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_removal_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path()).unwrap();
        let (a, b) = (SandboxId::random(), SandboxId::random());
        let record = Record {
            labels: BTreeMap::from([("team".into(), "x".into())]),
            expires_at_ms: Some(5),
            ..Record::default()
        };
        records.put(&a, record.clone()).unwrap();
        records.put(&b, Record::default()).unwrap();
        records.remove(&b);
        records
            .update(&a, |r| r.expires_at_ms = Some(9))
            .unwrap()
            .unwrap();
        std::fs::write(dir.path().join("junk.json"), "{").unwrap();
        let reopened = Records::open(dir.path()).unwrap();
        assert_eq!(reopened.all().len(), 1);
        assert_eq!(reopened.get(&a).unwrap().expires_at_ms, Some(9));
        assert_eq!(reopened.get(&a).unwrap().labels, record.labels);
        assert!(reopened.get(&b).is_none());
    }
}

//! Finding and removing what sandboxes that died without teardown left:
//! namespaces `/run/netns/nova-<id>`, host veths labelled `nova-net:<id>`,
//! nft tables `inet nova-<id>`.

use crate::error::{HostError, LeftoverError};
use crate::{ALIAS_PREFIX, NAME_PREFIX, firewall, link, netns};

/// What [`clean_leftovers`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeftoverReport {
    /// Namespaces removed (names).
    pub netns: Vec<String>,
    /// Host links removed (names).
    pub links: Vec<String>,
    /// nft tables removed (names).
    pub tables: Vec<String>,
}

impl LeftoverReport {
    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.links.is_empty() && self.tables.is_empty()
    }
}

/// Removes every sandbox network object on this host whose sandbox id
/// `keep` rejects. Objects are found by name: namespaces and nft tables
/// named `nova-<id>`, veths whose alias is `nova-net:<id>`. Call it from the
/// one process that owns the host's sandboxes (the daemon, at start, with
/// the ids it re-attached), since it removes other processes' sandboxes too.
pub async fn clean_leftovers(keep: impl Fn(&str) -> bool) -> Result<LeftoverReport, LeftoverError> {
    let mut report = LeftoverReport::default();

    let tables = tokio::task::spawn_blocking(firewall::list_inet_tables)
        .await
        .map_err(|_| HostError::ThreadPanicked {
            op: "listing nft tables".into(),
        })??;
    for table in tables {
        let Some(id) = table.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        if keep(id) {
            continue;
        }
        let name = table.clone();
        let deleted = tokio::task::spawn_blocking(move || {
            firewall::apply(&firewall::delete_table(&name), "deleting a leftover table")
        })
        .await
        .map_err(|_| HostError::ThreadPanicked {
            op: "deleting a leftover table".into(),
        })?;
        match deleted {
            Ok(()) => report.tables.push(table),
            Err(e) if firewall::is_missing_table(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }

    let host = link::connect()?;
    for l in link::list(&host).await? {
        let Some(id) = l
            .alias
            .as_deref()
            .and_then(|a| a.strip_prefix(ALIAS_PREFIX))
        else {
            continue;
        };
        let is_veth = matches!(l.kind, Some(rtnetlink::packet_route::link::InfoKind::Veth));
        if !l.name.starts_with("nova") || !is_veth || keep(id) {
            continue;
        }
        if link::delete(&host, &l.name).await? {
            report.links.push(l.name);
        }
    }

    for name in netns::list()? {
        let Some(id) = name.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        if keep(id) {
            continue;
        }
        let n = name.clone();
        tokio::task::spawn_blocking(move || netns::delete(&n))
            .await
            .map_err(|_| HostError::ThreadPanicked {
                op: "deleting a leftover namespace".into(),
            })??;
        report.netns.push(name);
    }
    if !report.is_empty() {
        tracing::info!(?report, "removed leftover sandbox networks");
    }
    Ok(report)
}

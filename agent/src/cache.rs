//! The node cache: what the agent keeps of the cluster's Nodes, filled by a
//! kube-runtime watcher and read by the reconciler.
//!
//! Each Node is cut down on arrival to the fields routing needs (a
//! [`Peer`](super::peer::Peer), or this node's [`OwnNode`]) in one map by
//! name: no Node object is kept. kube-runtime's reflector store, even
//! holding the same cut-down entries, was measured here and left out: it
//! keys each entry by an `ObjectRef` and holds it in an `Arc`, which took
//! 1.7 MiB of heap for 5,000 peers where this map takes 1.3 MiB.
//!
//! The watcher's events are taken as the watcher defines them, with no
//! second copy of the cache: `Apply` and `Delete` change one entry; a
//! re-list's `InitApply` applies like `Apply`, and `InitDone` deletes what
//! the re-list did not name, since anything listed before and missing from
//! a re-list is gone. A re-list is thus a burst of changes followed by the
//! deletions it implies, like any other run of events, and the cache stays
//! complete throughout. The reconciler reads nothing before the first
//! `InitDone`: programming from a partial list would remove routes to nodes
//! not yet seen. While the API server is away the cache keeps its last
//! state; the next list brings it up to date.
//!
//! The reconciler is woken only by changes that matter: heartbeats and
//! fields the agent does not read change no entry.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, ResourceExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::metrics::AgentMetrics;
use super::node::{own_node, peer_of, OwnNode};
use super::peer::PeerSet;

/// The cluster as one reconcile sees it.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeSnapshot {
    /// Every peer with a public IP.
    pub(crate) peers: PeerSet,
    /// This node, once the API has listed it.
    pub(crate) own: Option<OwnNode>,
}

/// What the cache holds.
#[derive(Debug, Default)]
struct CacheState {
    nodes: NodeSnapshot,
    /// Set while a re-list is in progress.
    relist: Option<Relist>,
    /// Whether a complete list has been seen.
    synced: bool,
}

/// A re-list in progress.
#[derive(Debug, Default)]
struct Relist {
    /// Peers cached before it and not named by it yet; what is left at
    /// `InitDone` is gone. Empty on the first list, which has nothing to
    /// remove.
    unlisted: BTreeSet<String>,
    /// Whether this node was cached before it and is not named by it yet.
    own_unlisted: bool,
    /// Whether it has changed an entry so far.
    changed: bool,
}

/// The node cache shared by the watch and the reconciler.
#[derive(Debug)]
pub(crate) struct NodeCache {
    own_name: String,
    state: Mutex<CacheState>,
    changed: Notify,
}

impl NodeCache {
    /// An empty cache for the agent of node `own_name`.
    fn new(own_name: String) -> Self {
        NodeCache {
            own_name,
            state: Mutex::default(),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().expect("node cache lock poisoned")
    }

    /// Resolves when a node changed in a way that matters for routing or
    /// set-up. A change made while nobody waits is kept for the next wait.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// A copy of the cache, once a complete list has been seen.
    pub(crate) fn snapshot(&self) -> Option<NodeSnapshot> {
        let state = self.lock();
        state.synced.then(|| state.nodes.clone())
    }

    /// Applies one watch event; wakes the reconciler if it mattered.
    fn observe(&self, event: watcher::Event<Node>) {
        let mut state = self.lock();
        let changed = match event {
            watcher::Event::Init => {
                state.relist = Some(Relist {
                    unlisted: state.nodes.peers.keys().cloned().collect(),
                    own_unlisted: state.nodes.own.is_some(),
                    changed: false,
                });
                false
            }
            watcher::Event::InitApply(node) => {
                let name = node.name_any();
                let changed = self.apply(&mut state.nodes, &name, &node);
                if let Some(relist) = state.relist.as_mut() {
                    if name == self.own_name {
                        relist.own_unlisted = false;
                    } else {
                        relist.unlisted.remove(&name);
                    }
                    relist.changed |= changed;
                }
                false
            }
            watcher::Event::InitDone => {
                let relist = state.relist.take().unwrap_or_default();
                let mut changed = !state.synced || relist.changed;
                for name in &relist.unlisted {
                    changed |= state.nodes.peers.remove(name).is_some();
                }
                if relist.own_unlisted {
                    changed |= state.nodes.own.take().is_some();
                }
                state.synced = true;
                tracing::info!(peers = state.nodes.peers.len(), "node list complete");
                changed
            }
            watcher::Event::Apply(node) => self.apply(&mut state.nodes, &node.name_any(), &node),
            watcher::Event::Delete(node) => {
                let name = node.name_any();
                if name == self.own_name {
                    state.nodes.own.take().is_some()
                } else {
                    state.nodes.peers.remove(&name).is_some()
                }
            }
        };
        drop(state);
        if changed {
            self.changed.notify_one();
        }
    }

    /// Records `node` (called `name`) in `nodes`; true if anything routing
    /// or set-up reads changed.
    fn apply(&self, nodes: &mut NodeSnapshot, name: &str, node: &Node) -> bool {
        if name == self.own_name {
            let fresh = own_node(node);
            let changed = nodes.own.as_ref() != Some(&fresh);
            nodes.own = Some(fresh);
            return changed;
        }
        match peer_of(node) {
            Some(peer) => {
                nodes.peers.insert(name.to_string(), peer.clone()).as_ref() != Some(&peer)
            }
            None => nodes.peers.remove(name).is_some(),
        }
    }
}

/// Starts watching all Nodes into a cache for the agent of node
/// `own_name`. The watch retries with backoff, so an absent API server only
/// delays the first list; failures are logged and counted, never acted on.
pub(crate) fn watch_nodes(
    nodes: Api<Node>,
    own_name: String,
    metrics: AgentMetrics,
) -> (Arc<NodeCache>, JoinHandle<()>) {
    let cache = Arc::new(NodeCache::new(own_name));
    let events = {
        let cache = cache.clone();
        watcher(nodes, watcher::Config::default())
            .default_backoff()
            .for_each(move |event| {
                match event {
                    Ok(event) => cache.observe(event),
                    Err(error) => {
                        metrics.record_error("watch");
                        tracing::warn!(%error, "watching nodes failed; retrying with backoff, the data plane stays as it is");
                    }
                }
                futures::future::ready(())
            })
    };
    (cache, tokio::spawn(events.in_current_span()))
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use serde_json::json;

    use super::*;

    const OWN: &str = "node-a";

    fn node(name: &str, public_ip: Option<&str>) -> Node {
        let mut annotations = serde_json::Map::new();
        annotations.insert("weft.dev/pod-cidr".into(), json!("10.244.1.0/24"));
        if let Some(ip) = public_ip {
            annotations.insert("weft.dev/public-ip".into(), json!(ip));
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
        }))
        .unwrap()
    }

    fn labelled(mut node: Node) -> Node {
        node.metadata
            .labels
            .get_or_insert_default()
            .insert("topology.kubernetes.io/zone".into(), "zone-b".into());
        node
    }

    /// Whether a change was signalled since the last call.
    fn woken(cache: &NodeCache) -> bool {
        cache.changed().now_or_never().is_some()
    }

    fn peer_names(cache: &NodeCache) -> Vec<String> {
        cache
            .snapshot()
            .expect("listed")
            .peers
            .into_keys()
            .collect()
    }

    fn list(cache: &NodeCache, nodes: &[Node]) {
        cache.observe(watcher::Event::Init);
        for node in nodes {
            cache.observe(watcher::Event::InitApply(node.clone()));
        }
        cache.observe(watcher::Event::InitDone);
    }

    #[test]
    fn nothing_shows_before_the_first_list_is_complete() {
        let cache = NodeCache::new(OWN.into());
        cache.observe(watcher::Event::Init);
        cache.observe(watcher::Event::InitApply(node(
            "node-c",
            Some("172.31.0.12"),
        )));
        assert!(cache.snapshot().is_none());
        assert!(!woken(&cache));
        cache.observe(watcher::Event::InitDone);
        assert_eq!(peer_names(&cache), ["node-c"]);
        assert!(woken(&cache), "the first list always wakes the reconciler");
    }

    #[test]
    fn an_empty_first_list_still_wakes_the_reconciler() {
        let cache = NodeCache::new(OWN.into());
        list(&cache, &[]);
        assert!(woken(&cache));
        assert!(cache.snapshot().expect("listed").own.is_none());
    }

    #[test]
    fn only_changes_that_matter_wake_the_reconciler() {
        let cache = NodeCache::new(OWN.into());
        let peer = node("node-b", Some("172.31.0.11"));
        list(&cache, &[node(OWN, None), peer.clone()]);
        assert!(woken(&cache));
        assert!(cache.snapshot().expect("listed").own.is_some());

        cache.observe(watcher::Event::Apply(labelled(peer.clone())));
        assert!(!woken(&cache), "a field routing does not read");
        cache.observe(watcher::Event::Apply(node("node-d", None)));
        assert!(!woken(&cache), "a node with nothing to route to");
        cache.observe(watcher::Event::Delete(node("node-d", None)));
        assert!(!woken(&cache));

        cache.observe(watcher::Event::Apply(node("node-b", Some("172.31.0.99"))));
        assert!(woken(&cache), "a moved peer");
        cache.observe(watcher::Event::Apply(node("node-b", None)));
        assert!(woken(&cache), "a peer that lost its public IP");
        assert!(peer_names(&cache).is_empty());
        cache.observe(watcher::Event::Apply(peer.clone()));
        assert!(woken(&cache));
        cache.observe(watcher::Event::Delete(peer));
        assert!(woken(&cache), "a deleted peer");
        cache.observe(watcher::Event::Delete(node(OWN, None)));
        assert!(woken(&cache), "this node deleted");
        assert!(cache.snapshot().expect("listed").own.is_none());
    }

    #[test]
    fn a_relist_removes_what_it_does_not_name_and_wakes_only_on_a_difference() {
        let cache = NodeCache::new(OWN.into());
        let own = node(OWN, None);
        let b = node("node-b", Some("172.31.0.11"));
        let c = node("node-c", Some("172.31.0.12"));
        list(&cache, &[own.clone(), c.clone(), b.clone()]);
        assert!(woken(&cache));
        assert_eq!(peer_names(&cache), ["node-b", "node-c"], "ordered by name");

        list(&cache, &[own.clone(), c.clone(), labelled(b.clone())]);
        assert!(!woken(&cache), "nothing that matters changed");

        // While re-listing, the cache stays complete.
        cache.observe(watcher::Event::Init);
        cache.observe(watcher::Event::InitApply(b.clone()));
        assert_eq!(peer_names(&cache), ["node-b", "node-c"]);
        // node-c and this node were deleted while the watch was down.
        cache.observe(watcher::Event::InitDone);
        assert!(woken(&cache));
        assert_eq!(peer_names(&cache), ["node-b"]);
        assert!(cache.snapshot().expect("listed").own.is_none());

        list(&cache, &[own, b, node("node-c", Some("172.31.0.99"))]);
        assert!(woken(&cache), "re-listed with a new peer and this node");
        assert_eq!(peer_names(&cache), ["node-b", "node-c"]);
    }
}

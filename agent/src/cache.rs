//! The node cache: what the agent keeps of the cluster's Nodes, filled by
//! a watch ([`crate::watch`]) and read by the reconciler.
//!
//! Each Node is cut down on arrival to the fields routing needs (a
//! [`Peer`](super::peer::Peer), or this node's [`OwnNode`]) in one map by
//! name: no Node object is kept. kube-runtime's reflector store, even
//! holding the same cut-down entries, was measured here and left out: it
//! keys each entry by an `ObjectRef` and holds it in an `Arc`, which took
//! 1.7 MiB of heap for 5,000 peers where this map takes 1.3 MiB.
//!
//! The watch's events change the cache as [`Mirror`] takes them, so it
//! stays complete through a re-list. The reconciler reads nothing before
//! the first list is complete: programming from a partial list would remove
//! routes to nodes not yet seen.
//!
//! The reconciler is woken only by changes that matter: heartbeats and
//! fields the agent does not read change no entry.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;

use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::metrics::AgentMetrics;
use super::node::{own_node, peer_of, OwnNode};
use super::peer::PeerSet;
use super::watch::{watch_into, Entries, Mirror};

/// The cluster as one reconcile sees it.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeSnapshot {
    /// Every peer with a public IP.
    pub(crate) peers: PeerSet,
    /// This node, once the API has listed it.
    pub(crate) own: Option<OwnNode>,
}

/// The cache's entries: this node's fields apart, every peer by name.
#[derive(Debug)]
struct NodeEntries {
    own_name: String,
    nodes: NodeSnapshot,
}

impl Entries for NodeEntries {
    type Object = Node;
    type Key = String;

    fn key(node: &Node) -> String {
        node.name_any()
    }

    fn keys(&self) -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = self.nodes.peers.keys().cloned().collect();
        if self.nodes.own.is_some() {
            keys.insert(self.own_name.clone());
        }
        keys
    }

    /// True if anything routing or set-up reads changed.
    fn put(&mut self, name: String, node: &Node) -> bool {
        if name == self.own_name {
            let fresh = own_node(node);
            let changed = self.nodes.own.as_ref() != Some(&fresh);
            self.nodes.own = Some(fresh);
            return changed;
        }
        match peer_of(node) {
            Some(peer) => self.nodes.peers.insert(name, peer.clone()).as_ref() != Some(&peer),
            None => self.nodes.peers.remove(&name).is_some(),
        }
    }

    fn remove(&mut self, name: &String) -> bool {
        if *name == self.own_name {
            self.nodes.own.take().is_some()
        } else {
            self.nodes.peers.remove(name).is_some()
        }
    }
}

/// The node cache shared by the watch and the reconciler.
#[derive(Debug)]
pub(crate) struct NodeCache {
    state: Mutex<Mirror<NodeEntries>>,
    changed: Notify,
    /// Woken with `changed`, for the policy loop: a `Notify` wakes one
    /// waiter, and the reconciler is the other.
    changed_for_policy: Notify,
}

impl NodeCache {
    /// An empty cache for the agent of node `own_name`.
    fn new(own_name: String) -> Self {
        NodeCache {
            state: Mutex::new(Mirror::new(NodeEntries {
                own_name,
                nodes: NodeSnapshot::default(),
            })),
            changed: Notify::new(),
            changed_for_policy: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Mirror<NodeEntries>> {
        self.state.lock().expect("node cache lock poisoned")
    }

    /// Resolves when a node changed in a way that matters for routing or
    /// set-up. A change made while nobody waits is kept for the next wait.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// A copy of the cache, once a complete list has been seen.
    pub(crate) fn snapshot(&self) -> Option<NodeSnapshot> {
        self.lock().listed().map(|entries| entries.nodes.clone())
    }

    /// Like [`Self::changed`], for the policy loop.
    pub(crate) async fn changed_for_policy(&self) {
        self.changed_for_policy.notified().await;
    }

    /// Every node's pod slices by name (this node's and each peer's), once
    /// a complete list has been seen: what NetworkPolicy checks pod
    /// addresses against. A node with no public IP yet is not a peer and
    /// has none here.
    pub(crate) fn pod_slices(&self) -> Option<BTreeMap<String, Vec<IpNet>>> {
        let state = self.lock();
        let entries = state.listed()?;
        let mut slices: BTreeMap<String, Vec<IpNet>> = entries
            .nodes
            .peers
            .iter()
            .map(|(name, peer)| (name.clone(), peer.pod_cidrs.clone()))
            .collect();
        if let Some(own) = &entries.nodes.own {
            slices.insert(entries.own_name.clone(), own.pod_cidrs.clone());
        }
        Some(slices)
    }

    /// Applies one watch event; wakes the reconciler if it mattered.
    fn observe(&self, event: watcher::Event<Node>) {
        let list_done = matches!(event, watcher::Event::InitDone);
        let mut state = self.lock();
        let changed = state.observe(event);
        if let Some(entries) = state.listed().filter(|_| list_done) {
            tracing::info!(peers = entries.nodes.peers.len(), "node list complete");
        }
        drop(state);
        if changed {
            self.changed.notify_one();
            self.changed_for_policy.notify_one();
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
    let watch = watch_into(
        nodes,
        metrics,
        "watching nodes failed; retrying with backoff, the data plane stays as it is",
        {
            let cache = cache.clone();
            move |event| cache.observe(event)
        },
    );
    (cache, watch)
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

//! What the agent keeps of Pods, Namespaces and NetworkPolicies, filled by
//! three kube-runtime watchers. Each object is cut down on arrival to its
//! compact record ([`super::model`]) in a map by namespace and name; no API
//! object is kept. The watchers' events are taken as the node cache takes
//! them ([`crate::cache`]): `InitDone` removes what a re-list did not name,
//! and nothing is read before all three have listed once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::model::{NamespaceRecord, PodRecord, PolicyError, PolicyRecord};
use crate::metrics::AgentMetrics;

/// Namespace and name.
type Key = (String, String);

/// One kind's records, kept by one watcher.
#[derive(Debug)]
struct Records<R> {
    entries: BTreeMap<Key, R>,
    /// Keys not yet named by a re-list in progress, and whether it changed
    /// an entry so far.
    relist: Option<(BTreeSet<Key>, bool)>,
    synced: bool,
}

impl<R> Default for Records<R> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<R: PartialEq> Records<R> {
    /// Applies one event, cutting objects down with `record` (`None`: the
    /// object holds nothing policy needs); true if an entry changed.
    fn observe<K: Resource>(
        &mut self,
        event: watcher::Event<K>,
        record: impl Fn(&K) -> Option<R>,
    ) -> bool {
        let key = |object: &K| (object.namespace().unwrap_or_default(), object.name_any());
        match event {
            watcher::Event::Init => {
                self.relist = Some((self.entries.keys().cloned().collect(), false));
                false
            }
            watcher::Event::InitApply(object) => {
                let key = key(&object);
                let changed = self.put(key.clone(), record(&object));
                if let Some((unlisted, relist_changed)) = self.relist.as_mut() {
                    unlisted.remove(&key);
                    *relist_changed |= changed;
                }
                false
            }
            watcher::Event::InitDone => {
                let (unlisted, relist_changed) = self.relist.take().unwrap_or_default();
                let mut changed = !self.synced || relist_changed;
                for key in unlisted {
                    changed |= self.entries.remove(&key).is_some();
                }
                self.synced = true;
                changed
            }
            watcher::Event::Apply(object) => self.put(key(&object), record(&object)),
            watcher::Event::Delete(object) => self.entries.remove(&key(&object)).is_some(),
        }
    }

    fn put(&mut self, key: Key, record: Option<R>) -> bool {
        match record {
            Some(record) if self.entries.get(&key) == Some(&record) => false,
            Some(record) => {
                self.entries.insert(key, record);
                true
            }
            None => self.entries.remove(&key).is_some(),
        }
    }
}

/// Everything the policy compiler reads, as one pass sees it.
#[derive(Debug, Clone, Default)]
pub struct PolicyInputs {
    /// Pods on the pod network with addresses.
    pub pods: Vec<PodRecord>,
    /// Namespaces with their labels.
    pub namespaces: Vec<NamespaceRecord>,
    /// NetworkPolicies as the compiler reads them.
    pub policies: Vec<PolicyRecord>,
    /// NetworkPolicies refused, each with why.
    pub refused: Vec<PolicyError>,
}

#[derive(Debug, Default)]
struct State {
    pods: Records<PodRecord>,
    namespaces: Records<NamespaceRecord>,
    policies: Records<Result<PolicyRecord, PolicyError>>,
}

/// The records shared by the watchers and the policy loop.
#[derive(Debug, Default)]
pub struct PolicyCache {
    state: Mutex<State>,
    changed: Notify,
}

impl PolicyCache {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("policy cache lock poisoned")
    }

    /// Resolves when a record changed. A change made while nobody waits is
    /// kept for the next wait.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// A copy of the records, once every watcher has listed once.
    pub fn snapshot(&self) -> Option<PolicyInputs> {
        let state = self.lock();
        if !(state.pods.synced && state.namespaces.synced && state.policies.synced) {
            return None;
        }
        let mut inputs = PolicyInputs {
            pods: state.pods.entries.values().cloned().collect(),
            namespaces: state.namespaces.entries.values().cloned().collect(),
            ..PolicyInputs::default()
        };
        for policy in state.policies.entries.values() {
            match policy {
                Ok(policy) => inputs.policies.push(policy.clone()),
                Err(refused) => inputs.refused.push(refused.clone()),
            }
        }
        Some(inputs)
    }

    fn observe<K: Resource, R: PartialEq>(
        &self,
        event: watcher::Event<K>,
        records: impl Fn(&mut State) -> &mut Records<R>,
        record: impl Fn(&K) -> Option<R>,
    ) {
        let changed = records(&mut self.lock()).observe(event, record);
        if changed {
            self.changed.notify_one();
        }
    }
}

/// Starts the three watches into one cache. Each retries with backoff;
/// failures are logged and counted, and the enforced rules stay as they
/// are meanwhile.
pub fn watch_policy_inputs(
    client: Client,
    metrics: AgentMetrics,
) -> (Arc<PolicyCache>, Vec<JoinHandle<()>>) {
    let cache = Arc::new(PolicyCache::default());
    let tasks = vec![
        spawn_watch(
            Api::<Pod>::all(client.clone()),
            &cache,
            &metrics,
            |state| &mut state.pods,
            PodRecord::of,
        ),
        spawn_watch(
            Api::<Namespace>::all(client.clone()),
            &cache,
            &metrics,
            |state| &mut state.namespaces,
            NamespaceRecord::of,
        ),
        spawn_watch(
            Api::<NetworkPolicy>::all(client),
            &cache,
            &metrics,
            |state| &mut state.policies,
            |policy| Some(PolicyRecord::of(policy)),
        ),
    ];
    (cache, tasks)
}

fn spawn_watch<K, R>(
    api: Api<K>,
    cache: &Arc<PolicyCache>,
    metrics: &AgentMetrics,
    records: fn(&mut State) -> &mut Records<R>,
    record: fn(&K) -> Option<R>,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
    R: PartialEq + 'static,
{
    let (cache, metrics) = (cache.clone(), metrics.clone());
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    // Lists are served from the API server's watch cache (resourceVersion
    // 0, as client-go's informers do), not read page by page from etcd: an
    // agent on every node lists every Pod when it starts.
    let events = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .for_each(move |event| {
            match event {
                Ok(event) => cache.observe(event, records, record),
                Err(error) => {
                    metrics.record_error("watch");
                    tracing::warn!(%error, kind, "watching for network policy failed; retrying with backoff, the enforced rules stay as they are");
                }
            }
            futures::future::ready(())
        });
    tokio::spawn(events.in_current_span())
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use serde_json::json;

    use super::*;

    fn namespace(name: &str, team: &str) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"team": team}}}))
            .unwrap()
    }

    fn names(cache: &PolicyCache) -> Vec<(String, String)> {
        cache
            .snapshot()
            .expect("listed")
            .namespaces
            .into_iter()
            .map(|ns| (ns.name, ns.labels["team"].clone()))
            .collect()
    }

    fn observe(cache: &PolicyCache, event: watcher::Event<Namespace>) {
        cache.observe(event, |state| &mut state.namespaces, NamespaceRecord::of);
    }

    fn list_all_but_namespaces(cache: &PolicyCache) {
        cache.observe(
            watcher::Event::<Pod>::InitDone,
            |s| &mut s.pods,
            PodRecord::of,
        );
        cache.observe(
            watcher::Event::<NetworkPolicy>::InitDone,
            |s| &mut s.policies,
            |p| Some(PolicyRecord::of(p)),
        );
    }

    #[test]
    fn nothing_is_read_before_every_kind_is_listed() {
        let cache = PolicyCache::default();
        observe(&cache, watcher::Event::Init);
        observe(&cache, watcher::Event::InitApply(namespace("x", "red")));
        observe(&cache, watcher::Event::InitDone);
        assert!(cache.snapshot().is_none());
        list_all_but_namespaces(&cache);
        assert_eq!(names(&cache), [("x".into(), "red".into())]);
    }

    #[test]
    fn changes_and_relists_keep_the_records_and_wake_on_differences() {
        let cache = PolicyCache::default();
        list_all_but_namespaces(&cache);
        observe(&cache, watcher::Event::Init);
        observe(&cache, watcher::Event::InitApply(namespace("x", "red")));
        observe(&cache, watcher::Event::InitApply(namespace("y", "blue")));
        observe(&cache, watcher::Event::InitDone);
        assert!(cache.changed().now_or_never().is_some());

        observe(&cache, watcher::Event::Apply(namespace("x", "red")));
        assert!(cache.changed().now_or_never().is_none(), "nothing changed");
        observe(&cache, watcher::Event::Apply(namespace("x", "blue")));
        assert!(cache.changed().now_or_never().is_some());

        // y was deleted while the watch was down.
        observe(&cache, watcher::Event::Init);
        observe(&cache, watcher::Event::InitApply(namespace("x", "blue")));
        observe(&cache, watcher::Event::InitDone);
        assert!(cache.changed().now_or_never().is_some());
        assert_eq!(names(&cache), [("x".into(), "blue".into())]);
    }

    #[test]
    fn refused_policies_are_kept_apart_with_their_reason() {
        let cache = PolicyCache::default();
        let policy: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"namespace": "x", "name": "bad"},
            "spec": {"podSelector": {}, "policyTypes": ["Sideways"]},
        }))
        .unwrap();
        cache.observe(
            watcher::Event::Apply(policy),
            |s| &mut s.policies,
            |p| Some(PolicyRecord::of(p)),
        );
        cache.observe(
            watcher::Event::<Pod>::InitDone,
            |s| &mut s.pods,
            PodRecord::of,
        );
        observe(&cache, watcher::Event::InitDone);
        cache.observe(
            watcher::Event::<NetworkPolicy>::InitDone,
            |s| &mut s.policies,
            |p| Some(PolicyRecord::of(p)),
        );
        let inputs = cache.snapshot().expect("listed");
        assert!(inputs.policies.is_empty());
        assert_eq!(inputs.refused[0].field, "spec.policyTypes");
    }
}

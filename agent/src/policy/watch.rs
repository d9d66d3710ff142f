//! What the agent keeps of Pods, Namespaces and NetworkPolicies, filled by
//! three watches (the agent's module `watch`, which feeds the node cache
//! too). Each object is cut down on arrival to its compact record
//! ([`super::model`]) in a map by namespace and name; no API object is
//! kept. Nothing is read before all three have listed once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::model::{NamespaceRecord, PodRecord, PolicyError, PolicyRecord};
use crate::metrics::AgentMetrics;
use crate::watch::{watch_into, Entries, Mirror};

/// Namespace and name.
type Key = (String, String);

/// One kind's records: each object of kind `K` cut down by `cut` (`None`:
/// the object holds nothing policy needs).
#[derive(Debug)]
struct Records<K, R> {
    entries: BTreeMap<Key, R>,
    cut: fn(&K) -> Option<R>,
}

impl<K, R> Records<K, R> {
    fn new(cut: fn(&K) -> Option<R>) -> Self {
        Self {
            entries: BTreeMap::new(),
            cut,
        }
    }
}

impl<K: Resource, R: PartialEq> Entries for Records<K, R> {
    type Object = K;
    type Key = Key;

    fn key(object: &K) -> Key {
        (object.namespace().unwrap_or_default(), object.name_any())
    }

    fn keys(&self) -> BTreeSet<Key> {
        self.entries.keys().cloned().collect()
    }

    fn put(&mut self, key: Key, object: &K) -> bool {
        match (self.cut)(object) {
            Some(record) if self.entries.get(&key) == Some(&record) => false,
            Some(record) => {
                self.entries.insert(key, record);
                true
            }
            None => self.entries.remove(&key).is_some(),
        }
    }

    fn remove(&mut self, key: &Key) -> bool {
        self.entries.remove(key).is_some()
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

#[derive(Debug)]
struct State {
    pods: Mirror<Records<Pod, PodRecord>>,
    namespaces: Mirror<Records<Namespace, NamespaceRecord>>,
    policies: Mirror<Records<NetworkPolicy, Result<PolicyRecord, PolicyError>>>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            pods: Mirror::new(Records::new(PodRecord::of)),
            namespaces: Mirror::new(Records::new(NamespaceRecord::of)),
            policies: Mirror::new(Records::new(|policy| Some(PolicyRecord::of(policy)))),
        }
    }
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
        let (Some(pods), Some(namespaces), Some(policies)) = (
            state.pods.listed(),
            state.namespaces.listed(),
            state.policies.listed(),
        ) else {
            return None;
        };
        let mut inputs = PolicyInputs {
            pods: pods.entries.values().cloned().collect(),
            namespaces: namespaces.entries.values().cloned().collect(),
            ..PolicyInputs::default()
        };
        for policy in policies.entries.values() {
            match policy {
                Ok(policy) => inputs.policies.push(policy.clone()),
                Err(refused) => inputs.refused.push(refused.clone()),
            }
        }
        Some(inputs)
    }

    /// Applies one event to the records `records` picks; wakes the policy
    /// loop if an entry changed.
    fn observe<E: Entries>(
        &self,
        event: watcher::Event<E::Object>,
        records: impl Fn(&mut State) -> &mut Mirror<E>,
    ) {
        let changed = records(&mut self.lock()).observe(event);
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
        spawn_watch(Api::<Pod>::all(client.clone()), &cache, &metrics, |state| {
            &mut state.pods
        }),
        spawn_watch(
            Api::<Namespace>::all(client.clone()),
            &cache,
            &metrics,
            |state| &mut state.namespaces,
        ),
        spawn_watch(
            Api::<NetworkPolicy>::all(client),
            &cache,
            &metrics,
            |state| &mut state.policies,
        ),
    ];
    (cache, tasks)
}

fn spawn_watch<K, R>(
    api: Api<K>,
    cache: &Arc<PolicyCache>,
    metrics: &AgentMetrics,
    records: fn(&mut State) -> &mut Mirror<Records<K, R>>,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
    R: PartialEq + 'static,
{
    let cache = cache.clone();
    watch_into(
        api,
        metrics.clone(),
        "watching for network policy failed; retrying with backoff, the enforced rules stay as they are",
        move |event| cache.observe(event, records),
    )
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
        cache.observe(event, |state| &mut state.namespaces);
    }

    fn list_all_but_namespaces(cache: &PolicyCache) {
        cache.observe(watcher::Event::<Pod>::InitDone, |s| &mut s.pods);
        cache.observe(watcher::Event::<NetworkPolicy>::InitDone, |s| {
            &mut s.policies
        });
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
        cache.observe(watcher::Event::Apply(policy), |s| &mut s.policies);
        cache.observe(watcher::Event::<Pod>::InitDone, |s| &mut s.pods);
        observe(&cache, watcher::Event::InitDone);
        cache.observe(watcher::Event::<NetworkPolicy>::InitDone, |s| {
            &mut s.policies
        });
        let inputs = cache.snapshot().expect("listed");
        assert!(inputs.policies.is_empty());
        assert_eq!(inputs.refused[0].field, "spec.policyTypes");
    }
}

//! Watching one kind of API object into a cache of what the agent needs of
//! it. The node cache ([`crate::cache`]) and the policy records
//! ([`crate::policy::watch`]) are both kept this way: [`watch_into`] runs
//! the watch, a [`Mirror`] takes its events into the cache's [`Entries`].
//!
//! The watcher's events are taken as the watcher defines them, with no
//! second copy of the cache: `Apply` and `Delete` change one entry; a
//! re-list's `InitApply` applies like `Apply`, and `InitDone` deletes what
//! the re-list did not name, since anything listed before and missing from
//! a re-list is gone. A re-list is thus a burst of changes followed by the
//! deletions it implies, like any other run of events, and the cache stays
//! complete throughout. Nothing is read before the first `InitDone`: a
//! decision made from a partial list would treat the objects not yet seen
//! as gone. While the API server is away the cache keeps its last state;
//! the next list brings it up to date.

use std::collections::BTreeSet;
use std::fmt::Debug;

use futures::StreamExt;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::metrics::AgentMetrics;

/// What a cache keeps of the objects of one kind: an entry cut down from
/// each object that holds anything the agent needs, found by key.
pub(crate) trait Entries {
    /// The kind of API object watched.
    type Object;
    /// What an entry is found by.
    type Key: Ord + Clone + Debug;

    /// The key `object`'s entry is kept under.
    fn key(object: &Self::Object) -> Self::Key;

    /// The keys of every entry held.
    fn keys(&self) -> BTreeSet<Self::Key>;

    /// Records what the agent needs of `object` under `key`, or removes the
    /// entry when the object holds nothing it needs; true if an entry
    /// changed.
    fn put(&mut self, key: Self::Key, object: &Self::Object) -> bool;

    /// Removes the entry under `key`; true if there was one.
    fn remove(&mut self, key: &Self::Key) -> bool;
}

/// Entries kept complete by one watch's events.
#[derive(Debug)]
pub(crate) struct Mirror<E: Entries> {
    entries: E,
    /// Set while a re-list is in progress.
    relist: Option<Relist<E::Key>>,
    /// Whether a complete list has been seen.
    synced: bool,
}

/// A re-list in progress.
#[derive(Debug)]
struct Relist<Key> {
    /// Keys held before it and not named by it yet; what is left at
    /// `InitDone` is gone. Empty on the first list, which has nothing to
    /// remove.
    unlisted: BTreeSet<Key>,
    /// Whether it has changed an entry so far.
    changed: bool,
}

impl<E: Entries> Mirror<E> {
    /// `entries`, not yet listed.
    pub(crate) fn new(entries: E) -> Self {
        Self {
            entries,
            relist: None,
            synced: false,
        }
    }

    /// The entries, once a complete list has been seen.
    pub(crate) fn listed(&self) -> Option<&E> {
        self.synced.then_some(&self.entries)
    }

    /// Applies one watch event; true if an entry changed, and on the end of
    /// the first list even if it was empty, since whoever reads the entries
    /// waits for that list.
    pub(crate) fn observe(&mut self, event: watcher::Event<E::Object>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relist = Some(Relist {
                    unlisted: self.entries.keys(),
                    changed: false,
                });
                false
            }
            watcher::Event::InitApply(object) => {
                let key = E::key(&object);
                let changed = self.entries.put(key.clone(), &object);
                if let Some(relist) = self.relist.as_mut() {
                    relist.unlisted.remove(&key);
                    relist.changed |= changed;
                }
                false
            }
            watcher::Event::InitDone => {
                let mut changed = !self.synced;
                if let Some(relist) = self.relist.take() {
                    changed |= relist.changed;
                    for key in &relist.unlisted {
                        changed |= self.entries.remove(key);
                    }
                }
                self.synced = true;
                changed
            }
            watcher::Event::Apply(object) => self.entries.put(E::key(&object), &object),
            watcher::Event::Delete(object) => self.entries.remove(&E::key(&object)),
        }
    }
}

/// Starts a task that watches every object of `api`'s kind and hands each
/// event to `observe`. The watch retries with backoff, so an absent API
/// server only delays the first list; a failure is counted as a `watch`
/// error and logged with the message `failed`, never acted on.
///
/// Lists are served from the API server's watch cache (kube's
/// `ListSemantic::Any`, `resourceVersion=0`, as client-go's informers
/// list) rather than read from etcd as a quorum read. An agent runs on every
/// node and lists every Node and every Pod when it starts and whenever its
/// watch must start over, so with many nodes and pods this is what keeps a
/// re-list cheap for the API server. A list so served may be a moment
/// behind etcd; the watch that follows starts at the list's resource
/// version and delivers every later change, which keeps the cache fresh.
pub(crate) fn watch_into<K>(
    api: Api<K>,
    metrics: AgentMetrics,
    failed: &'static str,
    mut observe: impl FnMut(watcher::Event<K>) + Send + 'static,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let events = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .for_each(move |event| {
            match event {
                Ok(event) => observe(event),
                Err(error) => {
                    metrics.record_error("watch");
                    tracing::warn!(%error, kind, "{failed}");
                }
            }
            futures::future::ready(())
        });
    tokio::spawn(events.in_current_span())
}

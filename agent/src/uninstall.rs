//! Removing Weft's node state when Weft itself is removed.
//!
//! A stopping agent cannot tell from SIGTERM alone whether it is being
//! restarted (rolling update, eviction, node shutdown: the data plane must
//! stay so pods keep their traffic) or uninstalled (`helm uninstall`,
//! `kubectl delete -f manifests/`: nothing of Weft should stay). It asks its
//! own DaemonSet: gone or being deleted means uninstall.
//!
//! The answer at shutdown is often "401 Unauthorized": an uninstall deletes
//! the ServiceAccount and RBAC in the same sweep as the DaemonSet, before
//! the kubelet gets round to stopping the pods. But a force-deleted agent
//! pod (`kubectl delete pod --force`) gets the same 401, because its bound
//! token dies with the pod object, and tearing the node down then would
//! cut every running pod off `weft0`. So a refused or missing answer only
//! counts as uninstall when the agent's own watch of the DaemonSet already
//! saw it go: the watch connection outlives the credentials, and the
//! DaemonSet is deleted before its pods are. A DaemonSet the agent never
//! saw (a wrong `--daemonset` name) never triggers a teardown.
//!
//! The teardown is netavark's: every step is idempotent, runs whatever the
//! earlier steps did, and its error is collected, not returned early.
//! Routes, return routes, rules, neighbours and FDB entries are not hunted
//! down here: the agent's own dump, plan and apply ([`super::dataplane`])
//! reconcile them to an empty desired state, so uninstall removes exactly
//! what a reconcile counts as Weft's, in the order a removed peer's entries
//! go.

use std::io;
use std::path::{Path, PathBuf};

use super::config::AgentConfig;
use super::dataplane::{Dataplane, DataplaneError, RuleChange, RETURN_TABLE, VXLAN_DEVICE};
use super::guard::TABLE as GUARD_TABLE;
use super::install::{CONFLIST_NAME, PLUGIN_NAME};
use super::masquerade::TABLE;
use super::overlay::{DesiredState, Operation};
use super::policy::nft::TABLE as POLICY_TABLE;
use super::ROUTE_PROTOCOL;
use weft_core::netlink::{Netlink, NetlinkError, Removal};
use weft_core::nft::{self, NftError, HOSTPORT_TABLE};
use weft_core::DEFAULT_BRIDGE;

/// The DaemonSet that runs this agent: whether it still exists decides
/// between restart and uninstall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnDaemonSet {
    /// Its namespace (the pod's, from the downward API).
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// What the agent's watch of its DaemonSet saw over the agent's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DaemonSetSeen {
    /// Never seen: not listed yet, or absent (perhaps a wrong name).
    #[default]
    Never,
    /// Seen, and last seen present.
    Present,
    /// Seen, then deleted or marked for deletion.
    Removed,
}

/// The API's answer to "GET my DaemonSet" at shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonSetAnswer {
    /// It exists and is not being deleted.
    Present,
    /// It exists with a deletionTimestamp (foreground deletion).
    Deleting,
    /// 404.
    NotFound,
    /// 401 or 403: the agent's credentials or RBAC are gone.
    Refused(u16),
    /// No usable answer (timeout, connection, 5xx, ...).
    Unanswered(String),
}

/// What a stopping agent does with the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Leave everything in place for the next agent.
    Restart {
        /// Why, for the log.
        reason: &'static str,
    },
    /// Remove everything Weft put on the node.
    Uninstall {
        /// Why, for the log.
        reason: &'static str,
    },
}

/// Restart or uninstall, from the watch's history and the API's answer.
/// Errs towards restart: a wrong teardown breaks running pods, a missed one
/// leaves files the README says how to remove.
pub fn decide(seen: DaemonSetSeen, answer: &DaemonSetAnswer) -> Shutdown {
    match (answer, seen) {
        (DaemonSetAnswer::Present, _) => Shutdown::Restart {
            reason: "the DaemonSet exists",
        },
        (DaemonSetAnswer::Deleting, _) => Shutdown::Uninstall {
            reason: "the DaemonSet is being deleted",
        },
        (_, DaemonSetSeen::Never) => Shutdown::Restart {
            reason: "the DaemonSet was never seen (check --daemonset and POD_NAMESPACE)",
        },
        (DaemonSetAnswer::NotFound, _) => Shutdown::Uninstall {
            reason: "the DaemonSet was deleted",
        },
        (_, DaemonSetSeen::Removed) => Shutdown::Uninstall {
            reason: "the watch saw the DaemonSet deleted and the API no longer answers this agent",
        },
        (DaemonSetAnswer::Refused(_), DaemonSetSeen::Present) => Shutdown::Restart {
            reason: "the API refused the agent but the DaemonSet was last seen present (a force-deleted pod's token is refused too)",
        },
        (DaemonSetAnswer::Unanswered(_), DaemonSetSeen::Present) => Shutdown::Restart {
            reason: "the API did not answer and the DaemonSet was last seen present",
        },
    }
}

/// One removal step that failed; the other steps still ran.
#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    /// A link, route, neighbour or FDB entry could not be removed.
    #[error("removing {what}: {source}")]
    Netlink {
        /// What was being removed.
        what: String,
        /// Why it failed.
        source: NetlinkError,
    },
    /// What Weft owns in the kernel could not be dumped.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// An nftables table could not be deleted.
    #[error(transparent)]
    Nft(#[from] NftError),
    /// A file could not be read or removed.
    #[error("removing {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
}

/// What [`tear_down`] did.
#[derive(Debug, Default)]
pub struct TeardownReport {
    /// What was removed, in order (things already gone are not listed).
    pub removed: Vec<String>,
    /// Things left on purpose, with the reason.
    pub kept: Vec<String>,
    /// Steps that failed.
    pub errors: Vec<TeardownError>,
}

/// Removes everything Weft put on the node, in the network namespace of
/// `netlink` (and of the calling thread, for `nft`): the conflist first so
/// the runtime stops wiring new pods to a network going away, then the
/// protocol-87 rules and routes (the return table's too), FDB entries and
/// neighbours on `weft.1` (reconciled to nothing), `weft.1` itself, `weft0`, the `inet weft`,
/// `inet weft-hostport`, `inet weft-policy` and `inet weft-guard` tables, the
/// plugin binary (only if it is the agent's copy) and the node file.
/// Running it again finds nothing to do.
pub async fn tear_down(netlink: &Netlink, config: &AgentConfig) -> TeardownReport {
    let mut report = TeardownReport::default();
    report.remove_file(&config.cni_conf_dir.join(CONFLIST_NAME));
    report.empty_dataplane(netlink).await;
    report.remove_link(netlink, VXLAN_DEVICE, "vxlan").await;
    report.remove_link(netlink, DEFAULT_BRIDGE, "bridge").await;
    // Blocking, but only for the few milliseconds nft takes; nothing else
    // runs on a stopping agent. The plugin's hostPort table goes too: the
    // pods it maps to lose their network with the rest.
    for table in [TABLE, HOSTPORT_TABLE, POLICY_TABLE, GUARD_TABLE] {
        match nft::delete_table(table, "delete a table of Weft's") {
            Ok(Removal::Removed) => report.removed.push(format!("nftables table {table}")),
            Ok(Removal::AlreadyGone) => {}
            Err(error) => report.errors.push(error.into()),
        }
    }
    report.remove_plugin(
        &config.cni_bin_dir.join(PLUGIN_NAME),
        &config.cni_plugin_source,
    );
    report.remove_file(&config.node_file);
    report
}

impl TeardownReport {
    fn remove_file(&mut self, path: &Path) {
        match std::fs::remove_file(path) {
            Ok(()) => self.removed.push(path.display().to_string()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => self.errors.push(TeardownError::File {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Removes `installed` only if it has the content of `source`: a `weft`
    /// binary someone else put there is not ours to delete.
    fn remove_plugin(&mut self, installed: &Path, source: &Path) {
        let Ok(present) = std::fs::read(installed) else {
            return;
        };
        match std::fs::read(source) {
            Ok(ours) if ours == present => self.remove_file(installed),
            Ok(_) => self.kept.push(format!(
                "{} (differs from {}, so the agent did not install it)",
                installed.display(),
                source.display()
            )),
            Err(source_error) => self.errors.push(TeardownError::File {
                path: source.to_path_buf(),
                source: source_error,
            }),
        }
    }

    /// Reconciles the kernel to an empty desired state: every entry the
    /// agent's dump counts as Weft's is planned for removal and removed.
    async fn empty_dataplane(&mut self, netlink: &Netlink) {
        let mut dataplane = Dataplane::new(netlink.clone());
        let emptied = async {
            dataplane.adopt_vtep().await?;
            dataplane.reconcile(&DesiredState::default()).await
        };
        match emptied.await {
            Ok(applied) => {
                // An entry gone between dump and delete counts as applied:
                // a race with nothing left behind either way.
                self.removed
                    .extend(applied.rules.iter().map(|change| match change {
                        RuleChange::Delete(rule) => rule.to_string(),
                        // As for operations: named, should one ever be added.
                        RuleChange::Add(_) => format!("{change:?}"),
                    }));
                self.removed
                    .extend(applied.applied.iter().map(removed_entry));
                self.errors
                    .extend(applied.failed.into_iter().map(|(operation, source)| {
                        TeardownError::Netlink {
                            what: removed_entry(&operation),
                            source,
                        }
                    }));
            }
            Err(error) => self.errors.push(error.into()),
        }
    }

    /// Deletes link `name` if it is a `kind` device; a link of another kind
    /// under Weft's name is someone else's.
    async fn remove_link(&mut self, netlink: &Netlink, name: &str, kind: &str) {
        let what = format!("link {name}");
        let link = match netlink.link_by_name(name).await {
            Ok(Some(link)) => link,
            Ok(None) => return,
            Err(source) => {
                self.errors.push(TeardownError::Netlink { what, source });
                return;
            }
        };
        if link.kind.as_deref() != Some(kind) {
            self.kept.push(format!(
                "{what} (a {} device, not Weft's {kind})",
                link.kind.as_deref().unwrap_or("plain")
            ));
            return;
        }
        match netlink.delete_link(link.index).await {
            Ok(Removal::Removed) => self.removed.push(what),
            Ok(Removal::AlreadyGone) => {}
            Err(source) => self.errors.push(TeardownError::Netlink { what, source }),
        }
    }
}

/// How the report names the entry an operation of the empty plan removes.
fn removed_entry(operation: &Operation) -> String {
    match operation {
        Operation::DeleteRoute(route) => {
            format!("route {} proto {ROUTE_PROTOCOL}", route.destination)
        }
        Operation::DeleteReturnRoute(route) => format!(
            "route {} via {} table {RETURN_TABLE} proto {ROUTE_PROTOCOL}",
            route.node_ip, route.vtep
        ),
        Operation::DeleteFdb(entry) => format!(
            "FDB entry {} dst {} on {VXLAN_DEVICE}",
            entry.mac, entry.remote
        ),
        Operation::DeleteNeighbour(neighbour) => format!(
            "neighbour {} lladdr {} on {VXLAN_DEVICE}",
            neighbour.ip, neighbour.mac
        ),
        // A plan towards nothing sets nothing; should one ever, it is
        // still named rather than lost.
        Operation::SetNeighbour(_)
        | Operation::SetFdb(_)
        | Operation::SetRoute(_)
        | Operation::SetReturnRoute(_) => format!("{operation:?}"),
    }
}

pub use api::{answer_of, ask_api, DaemonSetWatch, DaemonSetWatcher};

/// The Kubernetes side: the watch and the shutdown GET.
mod api {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures::StreamExt;
    use k8s_openapi::api::apps::v1::DaemonSet;
    use kube::runtime::watcher::{self, watcher};
    use kube::runtime::WatchStreamExt;
    use kube::{Api, Client};
    use tracing::Instrument;

    use super::{DaemonSetAnswer, DaemonSetSeen, OwnDaemonSet};

    /// Folds watch events of the one DaemonSet into a [`DaemonSetSeen`].
    #[derive(Debug, Default)]
    pub struct DaemonSetWatch {
        seen: DaemonSetSeen,
        /// During a re-list: whether the DaemonSet was in it so far.
        relisting: Option<bool>,
    }

    impl DaemonSetWatch {
        /// What has been seen so far.
        pub fn seen(&self) -> DaemonSetSeen {
            self.seen
        }

        /// Folds one event in; logs when the DaemonSet goes.
        pub fn observe(&mut self, event: &watcher::Event<DaemonSet>) {
            let before = self.seen;
            self.fold(event);
            if self.seen == DaemonSetSeen::Removed && before != DaemonSetSeen::Removed {
                tracing::info!(
                    "the agent's DaemonSet is deleted: stopping now removes Weft from this node"
                );
            }
        }

        fn fold(&mut self, event: &watcher::Event<DaemonSet>) {
            match event {
                watcher::Event::Init => self.relisting = Some(false),
                watcher::Event::InitApply(daemon_set) => {
                    self.relisting = Some(true);
                    self.apply(daemon_set);
                }
                watcher::Event::InitDone => {
                    // Missing from a re-list after being seen: deleted while
                    // the watch was down.
                    if self.relisting.take() == Some(false) && self.seen != DaemonSetSeen::Never {
                        self.seen = DaemonSetSeen::Removed;
                    }
                }
                watcher::Event::Apply(daemon_set) => self.apply(daemon_set),
                watcher::Event::Delete(_) => {
                    if self.seen != DaemonSetSeen::Never {
                        self.seen = DaemonSetSeen::Removed;
                    }
                }
            }
        }

        fn apply(&mut self, daemon_set: &DaemonSet) {
            self.seen = if daemon_set.metadata.deletion_timestamp.is_some() {
                DaemonSetSeen::Removed
            } else {
                DaemonSetSeen::Present
            };
        }
    }

    /// A background watch of the agent's own DaemonSet.
    #[derive(Debug)]
    pub struct DaemonSetWatcher {
        state: Arc<Mutex<DaemonSetWatch>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl DaemonSetWatcher {
        /// Starts watching `own` (a field selector on its name, so RBAC can
        /// limit the agent to that one object).
        pub fn start(client: Client, own: &OwnDaemonSet) -> Self {
            let api: Api<DaemonSet> = Api::namespaced(client, &own.namespace);
            let config = watcher::Config::default().fields(&format!("metadata.name={}", own.name));
            let state = Arc::new(Mutex::new(DaemonSetWatch::default()));
            let events = {
                let state = state.clone();
                watcher(api, config)
                    .default_backoff()
                    .for_each(move |event| {
                        match event {
                            Ok(event) => state
                                .lock()
                                .expect("DaemonSet watch lock poisoned")
                                .observe(&event),
                            Err(error) => tracing::debug!(%error, "watching the agent's DaemonSet failed; retrying"),
                        }
                        futures::future::ready(())
                    })
            };
            DaemonSetWatcher {
                state,
                task: tokio::spawn(events.in_current_span()),
            }
        }

        /// Stops the watch and returns what it saw.
        pub fn stop(self) -> DaemonSetSeen {
            self.task.abort();
            self.state
                .lock()
                .expect("DaemonSet watch lock poisoned")
                .seen()
        }
    }

    /// GETs `own`, giving up after `timeout` so termination is never held up.
    pub async fn ask_api(client: Client, own: &OwnDaemonSet, timeout: Duration) -> DaemonSetAnswer {
        let api: Api<DaemonSet> = Api::namespaced(client, &own.namespace);
        match tokio::time::timeout(timeout, api.get(&own.name)).await {
            Ok(result) => answer_of(result),
            Err(_) => DaemonSetAnswer::Unanswered(format!("no answer within {timeout:?}")),
        }
    }

    /// Classifies the result of the GET.
    pub fn answer_of(result: Result<DaemonSet, kube::Error>) -> DaemonSetAnswer {
        match result {
            Ok(daemon_set) if daemon_set.metadata.deletion_timestamp.is_some() => {
                DaemonSetAnswer::Deleting
            }
            Ok(_) => DaemonSetAnswer::Present,
            Err(kube::Error::Api(status)) => match status.code {
                404 => DaemonSetAnswer::NotFound,
                401 | 403 => DaemonSetAnswer::Refused(status.code),
                _ => DaemonSetAnswer::Unanswered(status.to_string()),
            },
            Err(other) => DaemonSetAnswer::Unanswered(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uninstalls(seen: DaemonSetSeen, answer: DaemonSetAnswer) -> bool {
        matches!(decide(seen, &answer), Shutdown::Uninstall { .. })
    }

    #[test]
    fn a_present_daemon_set_always_means_restart() {
        for seen in [
            DaemonSetSeen::Never,
            DaemonSetSeen::Present,
            DaemonSetSeen::Removed,
        ] {
            assert!(!uninstalls(seen, DaemonSetAnswer::Present), "{seen:?}");
        }
    }

    #[test]
    fn deletion_seen_by_the_api_means_uninstall() {
        assert!(uninstalls(DaemonSetSeen::Never, DaemonSetAnswer::Deleting));
        assert!(uninstalls(
            DaemonSetSeen::Present,
            DaemonSetAnswer::Deleting
        ));
        assert!(uninstalls(
            DaemonSetSeen::Present,
            DaemonSetAnswer::NotFound
        ));
        assert!(uninstalls(
            DaemonSetSeen::Removed,
            DaemonSetAnswer::NotFound
        ));
    }

    #[test]
    fn a_daemon_set_never_seen_never_tears_down_on_not_found() {
        assert!(!uninstalls(DaemonSetSeen::Never, DaemonSetAnswer::NotFound));
    }

    #[test]
    fn refusals_and_silence_follow_the_watch() {
        for answer in [
            DaemonSetAnswer::Refused(401),
            DaemonSetAnswer::Refused(403),
            DaemonSetAnswer::Unanswered("timed out".into()),
        ] {
            assert!(uninstalls(DaemonSetSeen::Removed, answer.clone()));
            assert!(!uninstalls(DaemonSetSeen::Present, answer.clone()));
            assert!(!uninstalls(DaemonSetSeen::Never, answer));
        }
    }

    mod api {
        use k8s_openapi::api::apps::v1::DaemonSet;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use kube::runtime::watcher::Event;

        use super::super::*;

        fn status(code: u16) -> kube::Error {
            kube::Error::Api(
                kube::core::Status::failure("refused", "Test")
                    .with_code(code)
                    .boxed(),
            )
        }

        fn deleting() -> DaemonSet {
            let mut daemon_set = DaemonSet::default();
            daemon_set.metadata.deletion_timestamp = Some(Time(Default::default()));
            daemon_set
        }

        #[test]
        fn status_codes_map_to_answers() {
            assert_eq!(answer_of(Err(status(404))), DaemonSetAnswer::NotFound);
            assert_eq!(answer_of(Err(status(401))), DaemonSetAnswer::Refused(401));
            assert_eq!(answer_of(Err(status(403))), DaemonSetAnswer::Refused(403));
            for code in [409, 429, 500, 503, 504] {
                assert!(
                    matches!(answer_of(Err(status(code))), DaemonSetAnswer::Unanswered(_)),
                    "{code}"
                );
            }
            assert_eq!(
                answer_of(Ok(DaemonSet::default())),
                DaemonSetAnswer::Present
            );
            assert_eq!(answer_of(Ok(deleting())), DaemonSetAnswer::Deleting);
        }

        #[test]
        fn watch_records_presence_then_removal() {
            let mut watch = DaemonSetWatch::default();
            watch.observe(&Event::Init);
            watch.observe(&Event::InitDone);
            assert_eq!(
                watch.seen(),
                DaemonSetSeen::Never,
                "absent from the first list"
            );
            watch.observe(&Event::Delete(DaemonSet::default()));
            assert_eq!(watch.seen(), DaemonSetSeen::Never);
            watch.observe(&Event::Apply(DaemonSet::default()));
            assert_eq!(watch.seen(), DaemonSetSeen::Present);
            watch.observe(&Event::Apply(deleting()));
            assert_eq!(watch.seen(), DaemonSetSeen::Removed);
            watch.observe(&Event::Apply(DaemonSet::default()));
            assert_eq!(watch.seen(), DaemonSetSeen::Present, "re-created");
            watch.observe(&Event::Delete(DaemonSet::default()));
            assert_eq!(watch.seen(), DaemonSetSeen::Removed);
        }

        #[test]
        fn a_relist_without_the_daemon_set_means_it_went() {
            let mut watch = DaemonSetWatch::default();
            watch.observe(&Event::Init);
            watch.observe(&Event::InitApply(DaemonSet::default()));
            watch.observe(&Event::InitDone);
            assert_eq!(watch.seen(), DaemonSetSeen::Present);
            watch.observe(&Event::Init);
            watch.observe(&Event::InitDone);
            assert_eq!(watch.seen(), DaemonSetSeen::Removed);
        }
    }
}

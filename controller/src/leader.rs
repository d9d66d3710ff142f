//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several
//! controller replicas exactly one allocates.
//!
//! The scheme is client-go's: the holder renews `spec.renewTime` every
//! [`LeaseTimings::renew_every`]; a standby takes the lease over once its
//! record has not changed for `spec.leaseDurationSeconds` *as measured on the
//! standby's own clock* (so clock skew between hosts does not matter). Every
//! write is a `replace` carrying the resourceVersion that was read, so two
//! standbys racing for an expired lease cannot both win: the loser gets 409.
//! A holder that cannot renew within [`LeaseTimings::renew_deadline`] stops
//! leading before any standby may take over (deadline < duration).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};

/// How long leases last and how often they are renewed and retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How long a standby waits, after the lease last changed, before taking it.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// How long the holder keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often a standby looks at the lease.
    pub retry_every: Duration,
}

impl Default for LeaseTimings {
    /// 15 s lease, renewed every 5 s, given up after 10 s without renewal,
    /// looked at every 2 s: a killed leader is replaced in 10–17 s.
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
            retry_every: Duration::from_secs(2),
        }
    }
}

/// A Lease request that failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server answered with an error or could not be reached.
    #[error("lease {namespace}/{name}: {action} failed: {source}")]
    Api {
        /// The Lease namespace.
        namespace: String,
        /// The Lease name.
        name: String,
        /// What was being done.
        action: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

/// Why a leader stopped leading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeadershipLost {
    /// Another replica holds the lease now.
    TakenOver,
    /// No renewal succeeded within the renew deadline.
    RenewDeadline,
}

impl std::fmt::Display for LeadershipLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LeadershipLost::TakenOver => "another replica took the lease over",
            LeadershipLost::RenewDeadline => "the lease could not be renewed in time",
        })
    }
}

/// One replica's side of the election.
pub struct LeaderElection {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    timings: LeaseTimings,
    /// The last lease record seen (by resourceVersion) and when it was first
    /// seen locally.
    observed: Option<(String, Instant)>,
    /// The holder named by the last lease record seen.
    holder: Option<String>,
}

/// This replica's identity: the pod name (`POD_NAME`) or hostname, plus the
/// process id, so two replicas on one host still differ.
pub fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "weft-controller".to_owned());
    format!("{host}-{}", std::process::id())
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

impl LeaderElection {
    /// An election on Lease `namespace/name` as `identity`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timings: LeaseTimings,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            timings,
            observed: None,
            holder: None,
        }
    }

    /// This replica's holder identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The timings in use.
    pub fn timings(&self) -> LeaseTimings {
        self.timings
    }

    /// The holder of the lease as last seen (`None`: nobody held it, or it
    /// has not been read yet). It may have expired since: a standby takes an
    /// expired lease over only when it next looks.
    pub fn holder(&self) -> Option<&str> {
        self.holder.as_deref()
    }

    fn api_error(&self, action: &'static str) -> impl FnOnce(kube::Error) -> LeaseError + '_ {
        move |source| LeaseError::Api {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            action,
            source,
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.timings.duration.as_secs()).unwrap_or(i32::MAX)
    }

    fn observe(&mut self, lease: &Lease) {
        self.holder = lease
            .spec
            .as_ref()
            .and_then(|spec| spec.holder_identity.clone())
            .filter(|holder| !holder.is_empty());
        let version = lease.resource_version().unwrap_or_default();
        if self.observed.as_ref().map(|(seen, _)| seen) != Some(&version) {
            self.observed = Some((version, Instant::now()));
        }
    }

    /// One round: takes the lease if it is free or expired, renews it if held
    /// by this replica. Returns whether this replica holds it afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.api_error("get"))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                // Another replica created it first.
                Err(error) if is_conflict(&error) => Ok(false),
                Err(error) => Err(self.api_error("create")(error)),
            };
        };
        self.observe(&lease);
        let mut spec = lease.spec.take().unwrap_or_default();
        let ours = self.holder() == Some(self.identity.as_str());
        if self.holder.is_some() && !ours {
            let lasts = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.timings.duration);
            let since = self.observed.as_ref().map(|(_, at)| at.elapsed());
            if since.is_some_and(|since| since < lasts) {
                return Ok(false);
            }
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.duration_seconds());
        lease.spec = Some(spec);
        // `lease` still carries the resourceVersion we read: the replace is
        // conditional on nobody having written in between.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observe(&written);
                Ok(true)
            }
            Err(error) if is_conflict(&error) => Ok(false),
            Err(error) => Err(self.api_error("update")(error)),
        }
    }

    /// While this replica leads: renews on schedule and returns when
    /// leadership is lost. Callers stop leader-only work when it returns.
    pub async fn keep(&mut self) -> LeadershipLost {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timings.renew_every).await;
            loop {
                let deadline = renewed + self.timings.renew_deadline;
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return LeadershipLost::RenewDeadline;
                }
                match tokio::time::timeout(remaining, self.try_acquire_or_renew()).await {
                    Ok(Ok(true)) => {
                        renewed = Instant::now();
                        break;
                    }
                    Ok(Ok(false)) => return LeadershipLost::TakenOver,
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "renewing the leader lease failed; retrying until the renew deadline");
                        tokio::time::sleep(remaining.min(Duration::from_secs(1))).await;
                    }
                    Err(_) => return LeadershipLost::RenewDeadline,
                }
            }
        }
    }

    /// Gives the lease up (if held) so a standby takes over at once instead
    /// of waiting the lease out.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.api_error("get"))?
        else {
            return Ok(());
        };
        let mut spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        spec.lease_duration_seconds = Some(1);
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            // Someone else wrote it meanwhile: it is no longer ours to give up.
            Err(error) if is_conflict(&error) => Ok(()),
            Err(error) => Err(self.api_error("release")(error)),
        }
    }
}

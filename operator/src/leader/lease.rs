//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go does it: the
//! holder renews every `renew` interval; anyone may take the lease once it has not been
//! renewed for `duration`. Writes use the Lease's resourceVersion, so two replicas never
//! both win. Only status writes and certificate rotation need the leader.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

/// Lease timing.
#[derive(Clone, Debug)]
pub struct Timing {
    pub duration: Duration,
    pub renew: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self { duration: Duration::from_secs(15), renew: Duration::from_secs(2) }
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// One attempt to acquire or renew; `Ok(true)` when we hold the lease afterwards.
async fn attempt(api: &Api<Lease>, name: &str, me: &str, timing: &Timing) -> kube::Result<bool> {
    let seconds = i32::try_from(timing.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_owned()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let held_for =
        spec.lease_duration_seconds.map_or(timing.duration, |s| Duration::from_secs(s.max(0).unsigned_abs().into()));
    let expired = spec.renew_time.as_ref().is_none_or(|t| {
        let age = Timestamp::now().duration_since(t.0);
        age.as_secs() < 0 || age.unsigned_abs() > held_for
    });
    if holder != me && !holder.is_empty() && !expired {
        return Ok(false);
    }
    if holder != me {
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(me.to_owned());
    spec.lease_duration_seconds = Some(seconds);
    spec.renew_time = Some(now());
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Keeps trying to hold the lease and reports leadership on `tx` until `shutdown`; then
/// releases the lease so that another replica takes over at once.
pub async fn run(
    api: Api<Lease>,
    name: String,
    me: String,
    timing: Timing,
    tx: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        let leader = match attempt(&api, &name, &me, &timing).await {
            Ok(true) => {
                last_renewed = Some(tokio::time::Instant::now());
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(error = %e, lease = %name, "leader election: cannot reach the Lease");
                // Step down before someone else may legitimately take over.
                last_renewed.is_some_and(|t| t.elapsed() < timing.duration.saturating_sub(timing.renew))
            }
        };
        if !leader {
            last_renewed = None;
        }
        tx.send_if_modified(|was| {
            if *was != leader {
                tracing::info!(identity = %me, leader, "leadership changed");
                *was = leader;
                true
            } else {
                false
            }
        });
        tokio::select! {
            _ = tokio::time::sleep(timing.renew) => {}
            _ = crate::http::stopped(&mut shutdown) => break,
        }
    }
    if *tx.borrow() {
        let _ = tx.send(false);
        if let Ok(Some(mut lease)) = api.get_opt(&name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(me.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            let _ = api.replace(&name, &PostParams::default(), &lease).await;
        }
    }
}

//! Leadership: the election ([`lease`]) and what only the leader does, one term at a
//! time ([`Leader`]): the McpPolicy controller (status writes), merging the other
//! replicas' acknowledgements, abandoning and expiring approvals, and the [`duties`]
//! (certificates, caBundle, CA ConfigMaps).

pub mod duties;
pub mod lease;

use std::sync::Arc;

use kube::Client;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::{mpsc, watch};
use toolgate_policy::crd::McpPolicy;

use crate::push::acks;
use crate::push::streams::Hub;
use crate::status;
use crate::tls::CertStore;
use duties::Duties;

/// The leader task: runs a term each time this replica becomes the leader.
#[allow(missing_debug_implementations)]
pub struct Leader {
    pub client: Client,
    pub hub: Arc<Hub>,
    /// This replica's identity (Event reporter, acknowledgement reports).
    pub identity: String,
    /// The operator's namespace (report Leases).
    pub namespace: String,
    pub duties: Duties,
    pub certs: Arc<CertStore>,
    /// The hub's status notifications (acks, disconnects): they go to the controller of
    /// the current term and are dropped between terms, when nobody writes status.
    pub status: mpsc::UnboundedReceiver<ObjectRef<McpPolicy>>,
}

impl Leader {
    /// Follows `leader` (from [`lease::run`]) until its sender is gone: a term starts when
    /// it turns true and ends, dropping everything the term runs, when it turns false.
    pub async fn run(self, mut leader: watch::Receiver<bool>) {
        let Self { client, hub, identity, namespace, duties, certs, mut status } = self;
        loop {
            // Between terms: drop status notifications until leadership comes.
            loop {
                tokio::select! {
                    became = async { leader.wait_for(|l| *l).await.is_ok() } => {
                        if !became {
                            return;
                        }
                        break;
                    }
                    Some(_) = status.recv() => {}
                }
            }
            hub.metrics.set_leader(true);
            let (tx, rx) = mpsc::unbounded_channel();
            let forward = async {
                while let Some(policy) = status.recv().await {
                    let _ = tx.send(policy);
                }
            };
            let term = async {
                tokio::join!(
                    forward,
                    status::run(client.clone(), hub.clone(), rx, identity.clone()),
                    acks::collect(Api::namespaced(client.clone(), &namespace), identity.clone(), hub.clone()),
                    duties::janitor(client.clone(), hub.clone()),
                    acks::abandon_replaced(client.clone(), hub.clone()),
                    duties::leader_duties(&client, &duties, &certs, &hub),
                )
            };
            tokio::select! {
                _ = term => {}
                _ = async { let _ = leader.wait_for(|l| !*l).await; } => {}
            }
            hub.metrics.set_leader(false);
            tracing::info!("no longer the leader: status writes and rotation stop here");
        }
    }
}

//! The shared counter store's metrics and state (`toolgate_counter_store_*`, a line in
//! `/readyz`) and a monitor that keeps them fresh; `Metrics::store` holds them. The store
//! itself is built from the flags in `cli` (`--counter-store …`) and used by the gate
//! for enforcing limits.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use toolgate_counters::{RedisCounters, SharedCounters};
use toolgate_policy::CounterStore;

/// The store in use, for `/readyz` and the metrics.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    up: Gauge,
    errors: Counter,
    round_trips: Counter,
    fallbacks: Family<FallbackLabels, Counter>,
    redis: OnceLock<RedisCounters>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    mode: &'static str,
}

impl StoreMetrics {
    /// Registers the store's series.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "toolgate_counter_store_up",
            "Whether the shared counter store (Redis) answered its last operation: 1 yes, 0 no; -1 when limits are counted locally",
            m.up.clone(),
        );
        registry.register(
            "toolgate_counter_store_errors",
            "Counter store operations that failed or timed out",
            m.errors.clone(),
        );
        registry.register(
            "toolgate_counter_store_round_trips",
            "Counter store round trips (one per decision with limits, one per rollback)",
            m.round_trips.clone(),
        );
        registry.register(
            "toolgate_counter_store_fallbacks",
            "Limited calls decided without the unreachable store: mode=local (counted here against max / replicas), mode=open (admitted uncounted)",
            m.fallbacks.clone(),
        );
        m.up.set(-1);
        m
    }

    /// Whether limits can be counted in a shared store (the flags named one).
    pub fn is_shared(&self) -> bool {
        self.redis.get().is_some()
    }

    /// One line for `/readyz`: the store's state (`None` for the local store).
    pub fn readiness(&self) -> Option<String> {
        let r = self.redis.get()?;
        Some(if r.is_up() {
            "counter store: up".to_owned()
        } else {
            "counter store: unreachable (limited calls are refused or handled by --counter-store-on-failure)".to_owned()
        })
    }

    /// Keeps the store's metrics and state fresh: a `PING` every `every` while no decision
    /// does it (the connection manager reconnects with back-off meanwhile).
    pub fn monitor(&self, store: &SharedCounters, every: Duration) -> Arc<dyn CounterStore> {
        let redis = store.redis().clone();
        let _ = self.redis.set(redis.clone());
        // The series' handles share their values with the registered ones.
        let (up_gauge, failed, round_trips) = (self.up.clone(), self.errors.clone(), self.round_trips.clone());
        let local = self.fallbacks.get_or_create(&FallbackLabels { mode: "local" }).clone();
        let open = self.fallbacks.get_or_create(&FallbackLabels { mode: "open" }).clone();
        let shared = store.clone();
        tokio::spawn(async move {
            let (mut errors, mut trips) = (0u64, 0u64);
            let (mut locals, mut opens) = (0u64, 0u64);
            let mut was_up = None;
            loop {
                let _ = redis.ping().await;
                let up = redis.is_up();
                up_gauge.set(i64::from(up));
                if was_up != Some(up) {
                    if up {
                        tracing::info!("counter store reachable");
                    } else {
                        tracing::warn!(
                            "counter store unreachable: limited calls are refused (or as --counter-store-on-failure says)"
                        );
                    }
                    was_up = Some(up);
                }
                let e = redis.errors();
                failed.inc_by(e.saturating_sub(errors));
                errors = e;
                let t = redis.round_trips();
                round_trips.inc_by(t.saturating_sub(trips));
                trips = t;
                let f = shared.fallbacks();
                let (l, o) = (f.local.load(Ordering::Relaxed), f.open.load(Ordering::Relaxed));
                local.inc_by(l.saturating_sub(locals));
                open.inc_by(o.saturating_sub(opens));
                (locals, opens) = (l, o);
                tokio::time::sleep(every).await;
            }
        });
        Arc::new(store.clone())
    }
}

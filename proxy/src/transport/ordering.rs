//! Keeps the order of a session's streams towards a Streamable-HTTP upstream.
//!
//! Once told that its session is initialized (`notifications/initialized` answered), a client
//! opens its server→client stream (`GET /mcp` with its `Mcp-Session-Id`) and right away POSTs,
//! e.g. a `tools/call` whose tool asks the client back (`sampling/createMessage`,
//! `elicitation/create`) on that stream. The SDK client does not wait for the GET's answer
//! before it POSTs, and sends the two on separate connections. Going direct, the server
//! still opens the stream before the tool's request is sent; through the proxy the POST can
//! overtake the GET (the proxy forwards both at once, on separate upstream connections, and
//! the POST may even reach the proxy first), and a server without a GET stream yet drops
//! (or parks) its request: the call hangs.
//!
//! [`Order`] keeps, per session, what a POST must wait for:
//! - a GET of the session that is on its way upstream (sent, head not answered yet): the
//!   POST waits until it is answered (or fails, or its client leaves), for at most [`WAIT`];
//! - a GET that is expected but has not arrived: from the moment the proxy passed on the
//!   answer to `notifications/initialized`, for [`EXPECT`]; a POST in that time waits for the
//!   GET to come and be answered. A client that opens no GET stream costs its first POST at
//!   most [`EXPECT`]; then the session is forgotten and its POSTs never wait again.
//!
//! A session whose GET was answered (including a `405` from a server without GET streams) is
//! forgotten: its POSTs do not wait. Sessions are keyed by a keyed hash of their id, so a
//! caller only delays POSTs that carry the same session id, each by at most [`WAIT`]; the
//! number of tracked sessions is capped ([`MAX_TRACKED`]).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The longest a POST waits for its session's GET.
pub const WAIT: Duration = Duration::from_secs(2);

/// How long after `notifications/initialized` was answered a session's GET is expected.
pub const EXPECT: Duration = Duration::from_millis(250);

/// Most sessions tracked at once; beyond it a session is not ordered (its POSTs do not
/// wait, as before this module existed).
pub const MAX_TRACKED: usize = 10_000;

#[derive(Debug)]
struct Pending {
    /// GETs of this session sent upstream and not answered yet.
    in_flight: usize,
    /// Until when a GET of this session is expected (none is in flight yet).
    expected_until: Option<Instant>,
    /// A POST waited the whole bound for a GET in flight: later ones do not wait for it.
    gave_up: bool,
    /// Woken whenever the above changes.
    changed: Arc<Notify>,
}

impl Pending {
    fn new() -> Self {
        Self { in_flight: 0, expected_until: None, gave_up: false, changed: Arc::new(Notify::new()) }
    }

    /// Until when a POST that started at `start` waits; `None`: it goes now.
    fn wait_until(&self, start: Instant) -> Option<Instant> {
        if self.gave_up {
            return None;
        }
        let bound = start + WAIT;
        if self.in_flight > 0 { Some(bound) } else { self.expected_until.map(|t| t.min(bound)) }
    }
}

#[derive(Debug)]
pub struct Order {
    hasher: RandomState,
    pending: Mutex<HashMap<u64, Pending>>,
    wait: Duration,
    expect: Duration,
    max: usize,
}

impl Default for Order {
    fn default() -> Self {
        Self::new(WAIT, EXPECT, MAX_TRACKED)
    }
}

impl Order {
    pub fn new(wait: Duration, expect: Duration, max: usize) -> Self {
        Self { hasher: RandomState::new(), pending: Mutex::new(HashMap::new()), wait, expect, max }
    }

    fn key(&self, session: &str) -> u64 {
        self.hasher.hash_one(session)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Pending>> {
        // Every update leaves the map consistent: a panic elsewhere cannot corrupt it.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry of `key`, made if there is room (expired expectations make room).
    fn entry<'m>(&self, map: &'m mut HashMap<u64, Pending>, key: u64) -> Option<&'m mut Pending> {
        if !map.contains_key(&key) && map.len() >= self.max {
            let now = Instant::now();
            map.retain(|_, p| p.in_flight > 0 || p.expected_until.is_some_and(|t| t > now));
            if map.len() >= self.max {
                tracing::debug!(tracked = map.len(), "too many sessions tracked: not ordering this one");
                return None;
            }
        }
        Some(map.entry(key).or_insert_with(Pending::new))
    }

    /// The upstream answered `notifications/initialized` of `session` (2xx): its client is
    /// about to open its GET stream.
    pub fn initialized(&self, session: &str) {
        let key = self.key(session);
        let mut map = self.lock();
        if let Some(p) = self.entry(&mut map, key)
            && p.in_flight == 0
        {
            p.expected_until = Some(Instant::now() + self.expect);
        }
    }

    /// A GET of `session` is about to be sent upstream: until the returned guard is dropped
    /// (drop it once the upstream's head arrived, or the request failed), POSTs of the
    /// session wait. `None` when too many sessions are tracked already.
    pub fn get_started(self: &Arc<Self>, session: &str) -> Option<GetInFlight> {
        let key = self.key(session);
        let mut map = self.lock();
        let p = self.entry(&mut map, key)?;
        p.in_flight += 1;
        p.expected_until = None;
        p.changed.notify_waiters();
        Some(GetInFlight { order: self.clone(), key })
    }

    /// Before a POST of `session` is sent upstream: waits while a GET of the session is in
    /// flight or expected, within the bounds. Returns whether it waited.
    pub async fn before_post(&self, session: &str) -> bool {
        let key = self.key(session);
        let start = Instant::now();
        let mut waited = false;
        loop {
            let changed: Arc<Notify>;
            // Created under the lock, so a change (made under the lock, then waking every
            // waiter that exists) cannot slip in between the check and the wait.
            let (wake, until) = {
                let mut map = self.lock();
                let Some(p) = map.get_mut(&key) else { return waited };
                let Some(until) = p.wait_until(start) else { return waited };
                if Instant::now() >= until {
                    if p.in_flight > 0 {
                        p.gave_up = true;
                        tracing::debug!(
                            wait_ms = self.wait.as_millis() as u64,
                            "the session's GET is still unanswered upstream: forwarding its POSTs anyway"
                        );
                    } else {
                        // No GET came: this client opens none (now). Forget the session.
                        map.remove(&key);
                    }
                    return waited;
                }
                changed = p.changed.clone();
                (changed.notified(), until)
            };
            waited = true;
            let _ = tokio::time::timeout_at(until.into(), wake).await;
        }
    }

    /// Sessions tracked (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().len()
    }
}

/// A GET on its way upstream; dropping it ends the wait of the session's POSTs.
#[derive(Debug)]
pub struct GetInFlight {
    order: Arc<Order>,
    key: u64,
}

impl Drop for GetInFlight {
    fn drop(&mut self) {
        let mut map = self.order.lock();
        let Some(p) = map.get_mut(&self.key) else { return };
        p.in_flight = p.in_flight.saturating_sub(1);
        if p.in_flight == 0
            && let Some(p) = map.remove(&self.key)
        {
            p.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const LONG: u64 = 60_000;

    fn order(wait_ms: u64, expect_ms: u64, max: usize) -> Arc<Order> {
        Arc::new(Order::new(Duration::from_millis(wait_ms), Duration::from_millis(expect_ms), max))
    }

    /// Runs `before_post` in a task; generous bound: reaching it means a lost wake-up.
    fn post(o: &Arc<Order>, session: &'static str) -> tokio::task::JoinHandle<bool> {
        let o = o.clone();
        tokio::spawn(async move { o.before_post(session).await })
    }

    async fn finished(post: tokio::task::JoinHandle<bool>) -> bool {
        tokio::time::timeout(Duration::from_secs(20), post).await.unwrap().unwrap()
    }

    async fn still_waiting(post: &tokio::task::JoinHandle<bool>) -> bool {
        tokio::time::sleep(Duration::from_millis(50)).await;
        !post.is_finished()
    }

    #[tokio::test]
    async fn post_of_an_unknown_session_does_not_wait() {
        let o = order(LONG, LONG, 8);
        assert!(!o.before_post("s1").await);
        // A GET that was answered (the guard dropped) leaves nothing to wait for.
        drop(o.get_started("s1").unwrap());
        assert_eq!(o.tracked(), 0);
        assert!(!o.before_post("s1").await);
    }

    #[tokio::test]
    async fn post_waits_until_its_sessions_get_is_answered() {
        let o = order(LONG, LONG, 8);
        let get = o.get_started("s1").unwrap();
        let p = post(&o, "s1");
        assert!(still_waiting(&p).await, "the POST went before its session's GET was answered");
        drop(get);
        assert!(finished(p).await);
        assert_eq!(o.tracked(), 0);
    }

    #[tokio::test]
    async fn post_right_after_initialized_waits_for_the_get_to_come_and_be_answered() {
        let o = order(LONG, LONG, 8);
        o.initialized("s1");
        let p = post(&o, "s1");
        assert!(still_waiting(&p).await, "the POST did not wait for the expected GET");
        let get = o.get_started("s1").unwrap();
        assert!(still_waiting(&p).await, "the POST went before the GET was answered");
        drop(get);
        assert!(finished(p).await);
        assert_eq!(o.tracked(), 0);
    }

    #[tokio::test]
    async fn a_client_without_get_stream_delays_only_its_first_post() {
        let o = order(LONG, 100, 8);
        o.initialized("s1");
        assert!(finished(post(&o, "s1")).await);
        // The expectation is gone: later POSTs go at once.
        assert_eq!(o.tracked(), 0);
        let p = post(&o, "s1");
        assert!(!finished(p).await);
    }

    #[tokio::test]
    async fn two_gets_of_a_session_both_must_be_answered() {
        let o = order(LONG, LONG, 8);
        let a = o.get_started("s1").unwrap();
        let b = o.get_started("s1").unwrap();
        assert_eq!(o.tracked(), 1);
        drop(a);
        assert_eq!(o.tracked(), 1);
        drop(b);
        assert_eq!(o.tracked(), 0);
    }

    #[tokio::test]
    async fn other_sessions_do_not_wait() {
        let o = order(LONG, LONG, 8);
        let _get = o.get_started("s1").unwrap();
        o.initialized("s2");
        assert!(!finished(post(&o, "s3")).await);
    }

    #[tokio::test]
    async fn the_wait_for_a_get_in_flight_is_bounded_once() {
        let o = order(100, LONG, 8);
        let _get = o.get_started("s1").unwrap();
        // The GET is never answered: the POST still goes, after the (short) bound ...
        assert!(finished(post(&o, "s1")).await);
        // ... and the next ones do not wait for that GET again.
        let p = post(&o, "s1");
        assert!(!finished(p).await);
        assert_eq!(o.tracked(), 1);
    }

    #[tokio::test]
    async fn tracked_sessions_are_capped_and_expired_expectations_make_room() {
        let o = order(LONG, 30, 2);
        let _a = o.get_started("a").unwrap();
        o.initialized("b");
        assert!(o.get_started("c").is_none());
        // A session already tracked still counts its further GETs.
        let _a2 = o.get_started("a").unwrap();
        assert_eq!(o.tracked(), 2);
        assert!(!finished(post(&o, "c")).await);
        // b's expectation expires: its place is free again.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(o.get_started("c").is_some());
    }
}

//! Which caller opened which MCP session.
//!
//! A session id is a header the client sends, so on its own it proves nothing: a caller
//! could name another caller's session (and post in it, take its GET stream, delete it) or
//! invent ids to get a fresh `scope: session` bucket per request. So a session exists for
//! the proxy only once it has seen the upstream (or its own session machinery) answer an
//! `initialize` with that `Mcp-Session-Id`, and it belongs to the identity that sent that
//! `initialize`. Every later request naming the session must come from the same identity.
//!
//! An unknown id is answered 404 (the client must initialize again, as the MCP spec says)
//! once the upstream has shown that it keeps sessions; an upstream that never gave out a
//! session id is stateless, and a request naming one is counted under its caller's
//! identity instead (never a fresh bucket).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sessions remembered at most (least recently used ones are forgotten first; a forgotten
/// session's client gets 404 and initializes again).
pub const MAX_SESSIONS: usize = 16_384;
/// Sessions one identity may hold at once (its least recently used one is forgotten to
/// make room), so that one caller cannot push every other caller's sessions out.
pub const MAX_PER_IDENTITY: usize = 1_024;

#[derive(Debug)]
struct Entry {
    owner: String,
    last_used: Instant,
}

/// What a request naming a session may do.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The session is this caller's.
    Own,
    /// No such session here, or another identity's (indistinguishable to the caller):
    /// answer 404, forward nothing.
    NotFound,
    /// The upstream keeps no sessions: the id means nothing; count the call under the
    /// caller's identity.
    Stateless,
}

#[derive(Debug)]
pub struct Owners {
    map: Mutex<HashMap<String, Entry>>,
    /// Keyed hashes of `(session, request id)` of requests whose answers are still coming
    /// (keyed with a random seed: a caller cannot pick ids that collide with another's).
    waiting: Arc<Mutex<HashSet<u64>>>,
    hasher: std::hash::RandomState,
    idle: Duration,
    /// An `initialize` was answered with a session id: the upstream keeps sessions.
    stateful: AtomicBool,
}

impl Owners {
    /// `idle`: sessions unused this long are forgotten.
    pub fn new(idle: Duration, stateful: bool) -> Self {
        Self {
            map: Mutex::default(),
            waiting: Arc::default(),
            hasher: std::hash::RandomState::new(),
            idle,
            stateful: AtomicBool::new(stateful),
        }
    }

    /// Claims request ids (canonical keys) of session `sid` until the returned guard is
    /// dropped (when their answers are settled). `None`: one of them is already waiting
    /// in that session. A server matches answers to requests by id within a session, so
    /// two waiting requests with one id could get each other's answers — and an error
    /// answered to one would give back the other's quota.
    pub fn claim(&self, sid: &str, ids: Vec<String>) -> Option<Claim> {
        use std::hash::BuildHasher;
        let keys: Vec<u64> = ids.iter().map(|id| self.hasher.hash_one((sid, id))).collect();
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if keys.iter().any(|k| w.contains(k)) {
            return None;
        }
        w.extend(keys.iter().copied());
        Some(Claim { waiting: self.waiting.clone(), keys })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `identity` may use session `id`.
    pub fn check(&self, id: &str, identity: &str) -> Verdict {
        let now = Instant::now();
        let mut map = self.map();
        match map.get_mut(id) {
            Some(e) if now.duration_since(e.last_used) >= self.idle => {
                map.remove(id);
                self.unknown()
            }
            // Constant-time comparison is not needed: identities are fingerprints or
            // names, and a mismatch answers exactly like an unknown session.
            Some(e) if e.owner == identity => {
                e.last_used = now;
                Verdict::Own
            }
            Some(_) => Verdict::NotFound,
            None => self.unknown(),
        }
    }

    fn unknown(&self) -> Verdict {
        if self.stateful.load(Ordering::Acquire) { Verdict::NotFound } else { Verdict::Stateless }
    }

    /// An `initialize` of `identity` was answered with session `id`. An id that is already
    /// someone else's stays theirs (an upstream never reuses ids; a proxy-made id is
    /// random), and nothing is recorded.
    pub fn opened(&self, id: &str, identity: &str) {
        self.stateful.store(true, Ordering::Release);
        let now = Instant::now();
        let mut map = self.map();
        if let Some(e) = map.get(id) {
            if e.owner != identity {
                tracing::warn!("an upstream gave out a session id that belongs to another caller: ignored");
            }
            return;
        }
        let mine = map.values().filter(|e| e.owner == identity).count();
        if mine >= MAX_PER_IDENTITY {
            forget_oldest(&mut map, |e| e.owner == identity);
        }
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, e| now.duration_since(e.last_used) < self.idle);
            if map.len() >= MAX_SESSIONS {
                forget_oldest(&mut map, |_| true);
            }
        }
        map.insert(id.to_owned(), Entry { owner: identity.to_owned(), last_used: now });
    }

    /// The session was ended (DELETE answered 2xx).
    pub fn closed(&self, id: &str) {
        self.map().remove(id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

/// Request ids claimed in a session ([`Owners::claim`]); released when dropped.
#[derive(Debug)]
pub struct Claim {
    waiting: Arc<Mutex<HashSet<u64>>>,
    keys: Vec<u64>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            w.remove(k);
        }
    }
}

fn forget_oldest(map: &mut HashMap<String, Entry>, which: impl Fn(&Entry) -> bool) {
    let oldest = map.iter().filter(|(_, e)| which(e)).min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone());
    if let Some(k) = oldest {
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_its_openers_only() {
        let o = Owners::new(Duration::from_secs(60), false);
        // Before any session was given out, the upstream counts as stateless.
        assert_eq!(o.check("s1", "alice"), Verdict::Stateless);
        o.opened("s1", "alice");
        assert_eq!(o.check("s1", "alice"), Verdict::Own);
        assert_eq!(o.check("s1", "mallory"), Verdict::NotFound, "another identity cannot use it");
        assert_eq!(o.check("invented", "alice"), Verdict::NotFound, "stateful now: unknown ids are 404");
        // An id given out again (never by a real upstream) does not change hands.
        o.opened("s1", "mallory");
        assert_eq!(o.check("s1", "mallory"), Verdict::NotFound);
        o.closed("s1");
        assert_eq!(o.check("s1", "alice"), Verdict::NotFound);
    }

    #[test]
    fn a_request_id_waits_once_per_session() {
        let o = Owners::new(Duration::from_secs(60), true);
        let a = o.claim("s1", vec!["1".into(), "\"x\"".into()]).expect("free");
        assert!(o.claim("s1", vec!["1".into()]).is_none(), "id 1 is waiting in s1");
        let other = o.claim("s2", vec!["1".into()]).expect("another session has its own ids");
        drop(a);
        assert!(o.claim("s1", vec!["1".into()]).is_some(), "answered: free again");
        drop(other);
    }

    #[test]
    fn idle_sessions_are_forgotten() {
        let o = Owners::new(Duration::ZERO, true);
        o.opened("s1", "alice");
        assert_eq!(o.check("s1", "alice"), Verdict::NotFound);
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn one_identity_cannot_push_out_the_others() {
        let o = Owners::new(Duration::from_secs(600), true);
        o.opened("alice-1", "alice");
        for i in 0..MAX_PER_IDENTITY + 10 {
            o.opened(&format!("m-{i}"), "mallory");
        }
        assert_eq!(o.check("alice-1", "alice"), Verdict::Own);
        assert_eq!(o.len(), MAX_PER_IDENTITY + 1);
        assert_eq!(o.check("m-0", "mallory"), Verdict::NotFound, "mallory's oldest made room for her newest");
        assert_eq!(o.check(&format!("m-{}", MAX_PER_IDENTITY + 9), "mallory"), Verdict::Own);
    }
}

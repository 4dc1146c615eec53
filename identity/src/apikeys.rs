//! Static API keys for callers outside any identity provider: a file (a mounted Secret)
//! of `name sha256:<hex of the key's SHA-256>` lines, reloaded when it changes. The file
//! holds hashes, never keys; a key is looked up by the hash of what the caller sent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// How often the file is checked for changes (Kubernetes updates a mounted Secret by
/// swapping a symlink, which file-change notifications miss).
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Most keys in one file.
pub const MAX_KEYS: usize = 10_000;

/// The key file's contents: hash → name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyTable {
    by_hash: HashMap<[u8; 32], String>,
}

impl KeyTable {
    /// Parses the file's text. Errors name the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut by_hash = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let mut parts = line.split_whitespace();
            let (Some(name), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!("line {n}: expected `name sha256:<64 hex digits>`"));
            };
            if name.len() > 63 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(format!("line {n}: the name must be 1-63 characters of letters, digits, '-', '_' or '.'"));
            }
            let digest = parse_hash(hash).ok_or_else(|| {
                format!(
                    "line {n}: expected sha256:<64 hex digits> (the SHA-256 of the key: `printf %s KEY | sha256sum`)"
                )
            })?;
            if !names.insert(name.to_owned()) {
                return Err(format!("line {n}: the name {name:?} is listed twice"));
            }
            if by_hash.insert(digest, name.to_owned()).is_some() {
                return Err(format!("line {n}: this key's hash is listed twice"));
            }
            if by_hash.len() > MAX_KEYS {
                return Err(format!("more than {MAX_KEYS} keys"));
            }
        }
        Ok(KeyTable { by_hash })
    }

    /// The name of `key`, if listed.
    pub fn name_of(&self, key: &[u8]) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        self.by_hash.get(&digest).map(String::as_str)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The key file, kept current.
#[derive(Clone, Debug)]
pub struct ApiKeys {
    path: PathBuf,
    table: Arc<RwLock<(Arc<KeyTable>, Option<Stamp>)>>,
}

type Stamp = (SystemTime, u64, [u8; 32]);

fn stamp(path: &Path) -> std::io::Result<(Stamp, String)> {
    let meta = std::fs::metadata(path)?;
    let text = std::fs::read_to_string(path)?;
    let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
    Ok(((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), digest), text))
}

impl ApiKeys {
    /// Reads the file; an unreadable or invalid file is an error (at start, fail closed).
    pub fn load(path: &Path) -> Result<Self, String> {
        let (st, text) = stamp(path).map_err(|e| format!("API key file {}: {e}", path.display()))?;
        let table = KeyTable::parse(&text).map_err(|e| format!("API key file {}: {e}", path.display()))?;
        Ok(ApiKeys { path: path.to_owned(), table: Arc::new(RwLock::new((Arc::new(table), Some(st)))) })
    }

    /// The current table.
    pub fn table(&self) -> Arc<KeyTable> {
        match self.table.read() {
            Ok(t) => t.0.clone(),
            Err(p) => p.into_inner().0.clone(),
        }
    }

    /// Reads the file again if it changed. A file that became unreadable or invalid keeps
    /// the previous keys (a half-written Secret update must not lock every caller out nor
    /// let anyone in) and returns the error.
    pub fn reload(&self) -> Result<bool, String> {
        let (st, text) = stamp(&self.path).map_err(|e| format!("API key file {}: {e}", self.path.display()))?;
        let current = match self.table.read() {
            Ok(t) => t.1,
            Err(p) => p.into_inner().1,
        };
        if current == Some(st) {
            return Ok(false);
        }
        let table = KeyTable::parse(&text).map_err(|e| format!("API key file {}: {e}", self.path.display()))?;
        let n = table.len();
        match self.table.write() {
            Ok(mut t) => *t = (Arc::new(table), Some(st)),
            Err(p) => *p.into_inner() = (Arc::new(table), Some(st)),
        }
        tracing::info!(file = %self.path.display(), keys = n, "API key file reloaded");
        Ok(true)
    }

    /// Checks the file every [`RELOAD_EVERY`] for as long as the runtime runs.
    pub fn spawn_reloader(&self) -> tokio::task::JoinHandle<()> {
        let keys = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = keys.reload() {
                    tracing::error!(error = %e, "keeping the previous API keys");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(key: &str) -> String {
        Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn keys_are_found_by_their_hash_and_bad_files_name_the_line() {
        let text =
            format!("# ci keys\nci-bot sha256:{}\n\nnightly sha256:{}\n", hash("k-ci"), hash("k-n").to_uppercase());
        let t = KeyTable::parse(&text).unwrap_or_default();
        assert_eq!(t.len(), 2);
        assert_eq!(t.name_of(b"k-ci"), Some("ci-bot"));
        assert_eq!(t.name_of(b"k-n"), Some("nightly"));
        assert_eq!(t.name_of(b"k-ci "), None);
        assert_eq!(t.name_of(b""), None);
        for (bad, want) in [
            ("ci-bot", "line 1: expected"),
            ("ci-bot sha256:abc", "line 1: expected sha256"),
            ("ci bot sha256:00", "line 1: expected `name"),
            (&format!("a sha256:{}\na sha256:{}", hash("1"), hash("2")), "line 2: the name \"a\" is listed twice"),
            (&format!("a sha256:{}\nb sha256:{}", hash("1"), hash("1")), "line 2: this key's hash"),
            (&format!("a/b sha256:{}", hash("1")), "line 1: the name"),
        ] {
            let err = KeyTable::parse(bad).err().unwrap_or_default();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_keys() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("a sha256:{}\n", hash("ka"))).unwrap_or_else(|e| panic!("{e}"));
        let keys = ApiKeys::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keys.table().name_of(b"ka"), Some("a"));
        assert_eq!(keys.reload(), Ok(false));
        std::fs::write(&path, format!("b sha256:{}\n", hash("kb"))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keys.reload(), Ok(true));
        assert_eq!(keys.table().name_of(b"ka"), None, "a removed key stops working");
        assert_eq!(keys.table().name_of(b"kb"), Some("b"));
        std::fs::write(&path, "b sha256:nothex\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(keys.reload().is_err());
        assert_eq!(keys.table().name_of(b"kb"), Some("b"), "a broken file keeps the previous keys");
        assert!(ApiKeys::load(&path).is_err(), "a broken file at start is an error");
    }
}

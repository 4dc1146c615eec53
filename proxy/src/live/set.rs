//! A policy set pushed by the operator made live: checked against its revision, compiled
//! into an [`Effective`] set, persisted in `--state-dir` so a restart enforces it before the
//! operator answers, and read back from there.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use toolgate_policy::Policy;
use toolgate_policy::push::{self, PolicySet};

use crate::live::{Effective, Source};

/// The persisted set in `--state-dir`.
pub const STATE_FILE: &str = "policyset.json";

/// Compiles a set: enforcing and dry-run documents, each group with the policy crate.
/// Errors name the McpPolicy and the path in its document.
pub fn compile_set(set: &PolicySet) -> Result<Effective, String> {
    let mut enforce = Vec::new();
    let mut dry_run = Vec::new();
    let mut problems = Vec::new();
    for p in &set.policies {
        match toolgate_policy::document_from_value(p.document.clone()) {
            Ok((doc, _)) if p.dry_run => dry_run.push((p.name.clone(), doc)),
            Ok((doc, _)) => enforce.push((p.name.clone(), doc)),
            Err(e) => problems.extend(e.problems().iter().map(|pr| format!("{}: {pr}", p.name))),
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    // Counter keys (and approvals remembered in a shared store) name the pod's namespace:
    // McpPolicies of the same name in two namespaces never share them.
    let enforce = compile_group(enforce)?.with_counter_namespace(&set.pod.namespace);
    let dry_run = compile_group(dry_run)?.with_counter_namespace(&set.pod.namespace);
    Ok(Effective::new(enforce, dry_run, set.revision.clone(), Source::Operator))
}

fn compile_group(docs: Vec<(String, toolgate_policy::Document)>) -> Result<Policy, String> {
    if docs.is_empty() {
        return Ok(Policy::empty());
    }
    // With several documents the policy crate names the document in every problem.
    let single = (docs.len() == 1).then(|| docs[0].0.clone());
    Policy::compile(docs).map_err(|e| {
        let lines: Vec<String> = e
            .problems()
            .iter()
            .map(|p| match &single {
                Some(name) => format!("{name}: {p}"),
                None => p.to_string(),
            })
            .collect();
        lines.join("\n")
    })
}

/// Checks that a set's revision is the hash of its content.
pub fn verify(set: &PolicySet) -> Result<(), String> {
    let expected = PolicySet::compute_revision(&set.policies);
    if expected == set.revision {
        Ok(())
    } else {
        Err(format!("revision {:?} does not match the content of the set (expected {expected})", set.revision))
    }
}

/// Writes the set atomically (temporary file, fsync, rename, fsync of the directory).
pub fn persist(dir: &Path, set: &PolicySet) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = serde_json::to_vec(set)?;
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    // Makes the rename durable; not every platform can open a directory.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The set a previous run persisted, checked and compiled. `Ok(None)`: there is none.
pub fn load_persisted(dir: &Path) -> Result<Option<Effective>, String> {
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if bytes.len() > push::MAX_LINE_BYTES {
        return Err(format!("{}: larger than {} bytes", path.display(), push::MAX_LINE_BYTES));
    }
    let set: PolicySet = toolgate_policy::from_slice_strict(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    verify(&set).map_err(|e| format!("{}: {e}", path.display()))?;
    compile_set(&set).map(Some).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use toolgate_policy::push::{PodRef, PushedPolicy};

    fn pushed(name: &str, dry_run: bool, document: Value) -> PushedPolicy {
        PushedPolicy { name: name.into(), uid: format!("uid-{name}"), generation: 1, dry_run, document }
    }

    fn set(policies: Vec<PushedPolicy>) -> PolicySet {
        PolicySet::new(PodRef { namespace: "ns".into(), name: "pod-0".into() }, policies)
    }

    #[test]
    fn sets_compile_into_enforcing_and_dry_run_documents() {
        let s = set(vec![
            pushed("a", false, json!({"version": "1", "default": "allow"})),
            pushed("b", true, json!({"version": "1", "default": "deny"})),
        ]);
        let e = compile_set(&s).expect("compiles");
        assert_eq!(e.enforce.names().collect::<Vec<_>>(), ["a"]);
        assert_eq!(e.dry_run.names().collect::<Vec<_>>(), ["b"]);
        assert_eq!(e.revision, s.revision);
        // Shared keys name the pod's namespace, decisions the McpPolicy.
        assert_eq!(e.enforce.counter_id("a"), Some("ns/a"));
        assert_eq!(e.dry_run.counter_id("b"), Some("ns/b"));
        assert!(compile_set(&set(vec![])).expect("empty").is_empty());
        let bad = set(vec![pushed(
            "limits",
            false,
            json!({"version": "1", "tools": {"x": {"limits": [{"window": "fortnight", "max": 1}]}}}),
        )]);
        let e = compile_set(&bad).expect_err("invalid");
        assert!(e.starts_with("limits: tools.x.limits[0]"), "{e}");
        let not_a_doc = set(vec![pushed("n", false, json!("deny everything"))]);
        assert!(compile_set(&not_a_doc).expect_err("not a mapping").starts_with("n: "));
    }

    #[test]
    fn persisted_sets_round_trip_and_tampering_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load_persisted(dir.path()).expect("nothing yet").is_none());
        let s = set(vec![pushed("a", false, json!({"version": "1", "default": "allow"}))]);
        persist(&dir.path().join("sub"), &s).expect("persists");
        let back = load_persisted(&dir.path().join("sub")).expect("loads").expect("present");
        assert_eq!(back.revision, s.revision);
        assert_eq!(back.source, Source::Operator);
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("sub")).expect("dir").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, [STATE_FILE], "no temporary file is left behind");
        let path = dir.path().join("sub").join(STATE_FILE);
        let tampered = std::fs::read_to_string(&path).expect("read").replace("allow", "deny");
        std::fs::write(&path, tampered).expect("write");
        let e = load_persisted(&dir.path().join("sub")).expect_err("revision mismatch");
        assert!(e.contains("does not match"), "{e}");
    }
}

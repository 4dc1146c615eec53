//! Generation of `crds/`: the YAML of every CRD the operator owns, from the Rust types
//! (`make crds`). A test fails when the committed files differ from what this produces.

use std::path::Path;

use kube::CustomResourceExt;
use toolgate_policy::crd::{McpApproval, McpPolicy};

const HEADER: &str = "# Generated from policy/src/crd.rs by `make crds`; do not edit.\n";

/// Each CRD's file name under `crds/` and its content.
pub fn crd_files() -> Vec<(&'static str, String)> {
    vec![
        ("mcpapprovals.toolgate.dev.yaml", to_yaml(&McpApproval::crd())),
        ("mcppolicies.toolgate.dev.yaml", to_yaml(&McpPolicy::crd())),
    ]
}

fn to_yaml<T: serde::Serialize>(crd: &T) -> String {
    // Serializing k8s-openapi types to YAML cannot fail: plain maps, lists and scalars.
    let body = serde_norway::to_string(crd).expect("a CRD serializes to YAML");
    format!("{HEADER}{body}")
}

/// Writes every CRD file into `dir`, creating it if needed.
pub fn write_all(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, content) in crd_files() {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}

/// Names of the files under `dir` that are missing or differ from what [`crd_files`]
/// produces.
pub fn stale_files(dir: &Path) -> Vec<String> {
    crd_files()
        .into_iter()
        .filter(|(name, content)| std::fs::read_to_string(dir.join(name)).ok().as_deref() != Some(content.as_str()))
        .map(|(name, _)| name.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn crds_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")
    }

    #[test]
    fn crds_directory_is_up_to_date() {
        let stale = stale_files(&crds_dir());
        assert!(stale.is_empty(), "crds/ is stale ({}): run `make crds` and commit the result", stale.join(", "));
    }

    #[test]
    fn staleness_is_detected() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(stale_files(dir.path()), ["mcpapprovals.toolgate.dev.yaml", "mcppolicies.toolgate.dev.yaml"]);
        write_all(dir.path()).expect("write");
        assert!(stale_files(dir.path()).is_empty());
        let file = dir.path().join("mcppolicies.toolgate.dev.yaml");
        let edited = std::fs::read_to_string(&file).expect("read").replace("mcpp", "mp");
        std::fs::write(&file, edited).expect("write");
        assert_eq!(stale_files(dir.path()), ["mcppolicies.toolgate.dev.yaml"]);
    }

    #[test]
    fn yaml_is_the_crd() {
        let (_, yaml) = &crd_files()[1];
        assert!(yaml.starts_with(HEADER));
        let value: serde_json::Value = serde_norway::from_str(yaml).expect("generated YAML parses");
        assert_eq!(value["kind"], "CustomResourceDefinition");
        assert_eq!(value["metadata"]["name"], "mcppolicies.toolgate.dev");
    }
}

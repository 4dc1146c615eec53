//! The operator's modules are layers: each imports only the layers declared below it, and
//! no module (file) imports another that imports it back. The import graph is read
//! from `operator/src` by [`toolgate_tests::layering`]. See docs/operator.md, "Code layout".

use std::path::Path;

use toolgate_tests::layering::ImportGraph;

/// `http`, `metrics`, `inject`, `auth`, `tls` and `crdgen` are leaves: they import no
/// module of the crate (checked by `the_leaves_import_nothing_of_the_crate`).
const LAYERS: &[&str] = &[
    "http",
    "metrics",
    "inject",
    "auth",
    "tls",
    "crdgen",
    "approvals",
    "push",
    "status",
    "admission",
    "leader",
    "router",
    "cli",
    "run",
];

/// Modules that must not import any other module of the crate.
const LEAVES: &[&str] = &["http", "metrics", "inject", "auth", "tls", "crdgen"];

fn graph() -> ImportGraph {
    ImportGraph::of_crate(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

#[test]
fn every_import_points_down_the_declared_layers() {
    let wrong = graph().against_layers(LAYERS);
    assert!(wrong.is_empty(), "imports against the layer order {LAYERS:?}:\n{}", wrong.join("\n"));
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    if let Some(cycle) = graph().cycle() {
        panic!("import cycle: {}", cycle.join(" → "));
    }
}

#[test]
fn the_leaves_import_nothing_of_the_crate() {
    let g = graph();
    for leaf in LEAVES {
        let imports = g.edges.get(*leaf).unwrap_or_else(|| panic!("no module {leaf}"));
        assert!(imports.is_empty(), "{leaf} is a leaf but imports {imports:?}");
    }
    // The cut this layout exists for: the webhook and the push server share only the
    // leaves, and neither imports the router that routes to both.
    for (from, to) in [
        ("admission", "push::server"),
        ("push::server", "admission"),
        ("admission", "router"),
        ("push::server", "router"),
    ] {
        assert!(!g.edges[from].contains(to), "{from} imports {to}");
    }
}

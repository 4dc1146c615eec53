//! The proxy's modules are layers: each imports only the layers declared below it, and
//! no module (file) imports another that imports it back. The import graph is read from
//! `proxy/src` by [`toolgate_tests::layering`]. See docs/proxy.md, "Code layout".

use std::path::Path;

use toolgate_tests::layering::ImportGraph;

/// Bottom to top: a module may import modules before it in this list (and its own
/// submodules), never one after it. `lib.rs` and `main.rs` only wire them together.
const LAYERS: &[&str] =
    &["mcp", "telemetry", "live", "gate", "approval", "control", "transport", "admin", "cli", "run"];

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
fn the_graph_sees_the_gate_below_the_transport() {
    // The test reads real edges: the transport uses the gate, and the gate never the transport.
    let g = graph();
    assert!(g.edges.keys().any(|m| m.starts_with("transport")), "{:?}", g.edges.keys());
    let transport_uses_gate = g
        .edges
        .iter()
        .filter(|(m, _)| m.starts_with("transport"))
        .any(|(_, tos)| tos.iter().any(|t| t.starts_with("gate")));
    assert!(transport_uses_gate, "no transport → gate edge found: the parser reads nothing");
}

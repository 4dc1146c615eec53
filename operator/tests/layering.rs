//! The operator's modules are layers: each imports only the layers declared below it, and
//! no module (file) imports another that imports it back. This test reads every
//! `crate::…` path (and `super::…`, and a `mod.rs` naming its own children) in
//! `operator/src` and fails on an edge against [`LAYERS`] or on any cycle between files.
//! See docs/operator.md, "Code layout". (The parser is the one of proxy/tests/layering.rs.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top: a module may import modules before it in this list (and its own
/// submodules), never one after it. `lib.rs` and `main.rs` only wire them together.
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

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `push/mod.rs` → `push`, `push/index.rs` → `push::index`, `lib.rs` → `` (the root).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts.join("::")
}

/// The text without comments (doc comments mention modules without importing them).
fn code_only(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string literal (a URL) is kept: only comment lines and
            // trailing comments after code matter here, and neither holds a `crate::` path
            // that is also code.
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path after `prefix` (`crate::`), including each member of a `{…}` group, as
/// its segments.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let preceded_by_ident =
            rest[..i].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
        rest = &rest[i + prefix.len()..];
        if preceded_by_ident {
            continue;
        }
        collect(rest, Vec::new(), &mut out);
    }
    out
}

/// Reads `a::b::{c, d::e}` at the start of `s`, appending each full path to `out`.
fn collect(s: &str, base: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut segs = base;
    let mut s = s;
    loop {
        if let Some(inner) = s.strip_prefix('{') {
            // A group: split its members at top-level commas.
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        collect(inner[start..i].trim_start(), segs.clone(), out);
                        return;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        collect(inner[start..i].trim_start(), segs.clone(), out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            return;
        }
        let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
        if end == 0 {
            break;
        }
        segs.push(s[..end].to_owned());
        s = &s[end..];
        match s.strip_prefix("::") {
            Some(r) => s = r,
            None => break,
        }
    }
    if !segs.is_empty() {
        out.push(segs);
    }
}

/// The module a path names: its longest prefix that is a module of the crate.
fn target(modules: &BTreeSet<String>, segs: &[String]) -> Option<String> {
    (1..=segs.len()).rev().map(|n| segs[..n].join("::")).find(|m| modules.contains(m))
}

/// The declared layer of a module (its first segment), with its rank.
fn layer(module: &str) -> Option<(usize, &'static str)> {
    let top = module.split("::").next()?;
    LAYERS.iter().position(|l| *l == top).map(|i| (i, LAYERS[i]))
}

struct Graph {
    /// module → modules it imports (never itself).
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        if file.file_name().is_some_and(|n| n == "main.rs")
            || file.strip_prefix(&src).is_ok_and(|r| r.starts_with("bin"))
        {
            continue; // the binaries: they only call the library
        }
        let me = module_of(&src, file);
        let text = std::fs::read_to_string(file).expect("read");
        let code = code_only(&text);
        let mut targets = BTreeSet::new();
        for segs in paths_after(&code, "crate::") {
            if let Some(t) = target(&modules, &segs) {
                targets.insert(t);
            }
        }
        // `super::` outside an inline `mod tests` names the parent module (inside it,
        // the file itself).
        let is_mod_file = file.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let tests_at = code.find("mod tests {").unwrap_or(code.len());
        if !is_mod_file && let Some(parent) = me.rsplit_once("::").map(|(p, _)| p.to_owned()) {
            for segs in paths_after(&code[..tests_at], "super::") {
                let mut full: Vec<String> = parent.split("::").map(str::to_owned).collect();
                full.extend(segs);
                if let Some(t) = target(&modules, &full) {
                    targets.insert(t);
                }
            }
        }
        // A `mod.rs` that uses its children (`pub use hold::…`, `refusal::answer`).
        if is_mod_file {
            let prefix = if me.is_empty() { String::new() } else { format!("{me}::") };
            for child in &modules {
                let Some(name) = child.strip_prefix(&prefix).filter(|n| !n.is_empty() && !n.contains("::")) else {
                    continue;
                };
                if code.contains(&format!("use {name}::")) {
                    targets.insert(child.clone());
                }
            }
        }
        targets.remove(&me);
        edges.insert(me, targets);
    }
    Graph { edges }
}

#[test]
fn every_import_points_down_the_declared_layers() {
    let g = graph();
    let mut wrong = Vec::new();
    for (from, tos) in &g.edges {
        let Some((rank_from, layer_from)) = layer(from) else {
            assert!(from.is_empty(), "module {from} is in no declared layer: add it to LAYERS");
            continue; // lib.rs wires everything
        };
        for to in tos {
            let (rank_to, layer_to) = layer(to).unwrap_or_else(|| panic!("{from} imports {to}, which is in no layer"));
            if rank_to > rank_from {
                wrong.push(format!("{from} ({layer_from}) imports {to} ({layer_to}), a layer above it"));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layer order {LAYERS:?}:\n{}", wrong.join("\n"));
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

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let g = graph();
    // Depth-first search with colours; report the first cycle found, as a path.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark: BTreeMap<&str, Mark> = g.edges.keys().map(|k| (k.as_str(), Mark::New)).collect();
    fn visit<'a>(
        n: &'a str,
        g: &'a Graph,
        mark: &mut BTreeMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        mark.insert(n, Mark::Open);
        stack.push(n);
        for m in g.edges.get(n).into_iter().flatten() {
            match mark.get(m.as_str()).copied().unwrap_or(Mark::Done) {
                Mark::Open => {
                    let at = stack.iter().position(|s| *s == m).expect("on stack");
                    let mut cycle: Vec<String> = stack[at..].iter().map(|s| (*s).to_owned()).collect();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(m, g, mark, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        mark.insert(n, Mark::Done);
        None
    }
    let nodes: Vec<&str> = g.edges.keys().map(String::as_str).collect();
    for n in nodes {
        if mark[n] == Mark::New
            && let Some(cycle) = visit(n, &g, &mut mark, &mut Vec::new())
        {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
}

#[test]
fn the_parser_sees_grouped_nested_and_relative_imports() {
    let code = "use crate::push::{self, Hub, streams::StreamGuard};\nuse crate::{leader::lease, http};\nlet x = crate::push::server::stream(1);";
    let got: Vec<String> = paths_after(code, "crate::").into_iter().map(|s| s.join("::")).collect();
    assert_eq!(
        got,
        ["push::self", "push::Hub", "push::streams::StreamGuard", "leader::lease", "http", "push::server::stream"],
        "{got:?}"
    );
    let modules: BTreeSet<String> = ["push", "push::streams", "push::server", "leader", "leader::lease", "http"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let segs = |p: &str| p.split("::").map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(target(&modules, &segs("push::streams::StreamGuard")).as_deref(), Some("push::streams"));
    assert_eq!(target(&modules, &segs("push::server::stream")).as_deref(), Some("push::server"));
    assert_eq!(target(&modules, &segs("push::Hub")).as_deref(), Some("push"));
    assert_eq!(layer("leader::lease").map(|l| l.1), Some("leader"));
    assert!(layer("push").expect("push") < layer("router").expect("router"));
    // A path inside a comment is not an import.
    assert!(paths_after(&code_only("// see crate::router\nfn f() {}"), "crate::").is_empty());
}

//! The import graph of a crate's modules, read from its sources, for the layering tests of
//! the proxy and the operator (`proxy/tests/layering.rs`, `operator/tests/layering.rs`).
//!
//! Every `crate::…` path in a file (each member of a `{…}` group too), every `super::…`
//! outside an inline `mod tests`, and every child a `mod.rs`/`lib.rs` uses by name is an
//! edge from that file's module to the module the path names (its longest prefix that is a
//! module of the crate). Comments are not code. `main.rs` and `src/bin/` are binaries that
//! only call the library and are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// module → the modules it imports (never itself). `""` is the crate root (`lib.rs`).
#[derive(Debug)]
pub struct ImportGraph {
    pub edges: BTreeMap<String, BTreeSet<String>>,
}

impl ImportGraph {
    /// The graph of the crate whose sources are under `src`.
    pub fn of_crate(src: &Path) -> ImportGraph {
        let mut files = Vec::new();
        rs_files(src, &mut files);
        let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
        let mut edges = BTreeMap::new();
        for file in &files {
            if file.file_name().is_some_and(|n| n == "main.rs")
                || file.strip_prefix(src).is_ok_and(|r| r.starts_with("bin"))
            {
                continue;
            }
            let me = module_of(src, file);
            let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
            let code = code_only(&text);
            let mut targets = BTreeSet::new();
            for segs in paths_after(&code, "crate::") {
                targets.extend(target(&modules, &segs));
            }
            let is_mod_file = file.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs");
            // `super::` outside an inline `mod tests` names the parent module (inside it,
            // the file itself).
            let tests_at = code.find("mod tests {").unwrap_or(code.len());
            if !is_mod_file && let Some((parent, _)) = me.rsplit_once("::") {
                for segs in paths_after(&code[..tests_at], "super::") {
                    let mut full: Vec<String> = parent.split("::").map(str::to_owned).collect();
                    full.extend(segs);
                    targets.extend(target(&modules, &full));
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
        ImportGraph { edges }
    }

    /// Every edge that points up `layers` (bottom first: a module may import modules of
    /// its own layer or of layers before it), and every module in no layer, as messages.
    pub fn against_layers(&self, layers: &[&str]) -> Vec<String> {
        let mut wrong = Vec::new();
        for (from, tos) in &self.edges {
            let Some((rank_from, layer_from)) = layer(layers, from) else {
                if !from.is_empty() {
                    wrong.push(format!("module {from} is in no declared layer: add it to the layers"));
                }
                continue; // lib.rs wires everything
            };
            for to in tos {
                match layer(layers, to) {
                    None => wrong.push(format!("{from} imports {to}, which is in no layer")),
                    Some((rank_to, layer_to)) if rank_to > rank_from => {
                        wrong.push(format!("{from} ({layer_from}) imports {to} ({layer_to}), a layer above it"))
                    }
                    Some(_) => {}
                }
            }
        }
        wrong
    }

    /// The first import cycle found (depth first), as a path that ends where it starts.
    pub fn cycle(&self) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Open,
            Done,
        }
        fn visit<'a>(
            n: &'a str,
            g: &'a ImportGraph,
            mark: &mut BTreeMap<&'a str, Mark>,
            stack: &mut Vec<&'a str>,
        ) -> Option<Vec<String>> {
            mark.insert(n, Mark::Open);
            stack.push(n);
            for m in g.edges.get(n).into_iter().flatten() {
                match mark.get(m.as_str()).copied().unwrap_or(Mark::Done) {
                    Mark::Open => {
                        let at = stack.iter().position(|s| s == m).unwrap_or(0);
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
        let mut mark: BTreeMap<&str, Mark> = self.edges.keys().map(|k| (k.as_str(), Mark::New)).collect();
        for n in self.edges.keys() {
            if mark[n.as_str()] == Mark::New
                && let Some(cycle) = visit(n, self, &mut mark, &mut Vec::new())
            {
                return Some(cycle);
            }
        }
        None
    }
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `gate/mod.rs` → `gate`, `gate/hold.rs` → `gate::hold`, `lib.rs` → `` (the root).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts.join("::")
}

/// The text without comments (doc comments mention modules without importing them).
pub fn code_only(text: &str) -> String {
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
pub fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
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
pub fn target(modules: &BTreeSet<String>, segs: &[String]) -> Option<String> {
    (1..=segs.len()).rev().map(|n| segs[..n].join("::")).find(|m| modules.contains(m))
}

/// The declared layer of a module (its first segment), with its rank.
pub fn layer<'a>(layers: &[&'a str], module: &str) -> Option<(usize, &'a str)> {
    let top = module.split("::").next()?;
    layers.iter().position(|l| *l == top).map(|i| (i, layers[i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &str) -> Vec<String> {
        p.split("::").map(str::to_owned).collect()
    }

    #[test]
    fn the_parser_sees_grouped_nested_and_relative_imports() {
        let code = "use crate::gate::{self, Hold, hold::Outcome};\nuse crate::{mcp::sse, live};\nlet x = crate::transport::http::full(1);\nlet y = xcrate::gate::z;";
        let got: Vec<String> = paths_after(code, "crate::").into_iter().map(|s| s.join("::")).collect();
        assert_eq!(
            got,
            ["gate::self", "gate::Hold", "gate::hold::Outcome", "mcp::sse", "live", "transport::http::full"],
            "{got:?}"
        );
        let modules: BTreeSet<String> = ["gate", "gate::hold", "mcp", "mcp::sse", "transport", "transport::http"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        assert_eq!(target(&modules, &segs("gate::hold::Outcome")).as_deref(), Some("gate::hold"));
        assert_eq!(target(&modules, &segs("transport::http::full")).as_deref(), Some("transport::http"));
        assert_eq!(target(&modules, &segs("gate::Hold")).as_deref(), Some("gate"));
        assert_eq!(target(&modules, &segs("nothing::here")), None);
        // A path inside a comment is not an import; one in a string with `//` is kept.
        assert!(paths_after(&code_only("// see crate::approval\nfn f() {}"), "crate::").is_empty());
        assert_eq!(paths_after(&code_only("let u = \"http://x\"; crate::mcp::f()"), "crate::").len(), 1);
    }

    #[test]
    fn layers_rank_bottom_first_and_edges_up_are_reported() {
        let layers = ["mcp", "gate", "transport"];
        assert_eq!(layer(&layers, "transport::http").map(|l| l.1), Some("transport"));
        assert!(layer(&layers, "mcp").expect("mcp") < layer(&layers, "gate").expect("gate"));
        assert_eq!(layer(&layers, "admin"), None);
        let graph = |edges: &[(&str, &[&str])]| ImportGraph {
            edges: edges
                .iter()
                .map(|(from, tos)| ((*from).to_owned(), tos.iter().map(|t| (*t).to_owned()).collect()))
                .collect(),
        };
        let down = graph(&[("", &["gate"]), ("gate", &["mcp"]), ("transport::http", &["gate", "mcp"]), ("mcp", &[])]);
        assert!(down.against_layers(&layers).is_empty());
        assert_eq!(down.cycle(), None);
        let up = graph(&[("mcp", &["gate::hold"]), ("gate::hold", &["mcp"]), ("admin", &[])]);
        let wrong = up.against_layers(&layers);
        assert_eq!(wrong.len(), 2, "{wrong:?}");
        assert!(wrong[0].contains("admin is in no declared layer"), "{wrong:?}");
        assert!(wrong[1].contains("mcp (mcp) imports gate::hold (gate)"), "{wrong:?}");
        assert_eq!(up.cycle().expect("a cycle"), ["gate::hold", "mcp", "gate::hold"]);
    }
}

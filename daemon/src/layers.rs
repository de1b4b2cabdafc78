//! The daemon crate's walls, checked on every test run: each module sits in
//! one layer, and a module may import only from its own layer or the ones
//! below. The map is docs/architecture.md section 3; this test keeps it
//! true. Imports are read from the source text (`crate::`, `super::` and
//! `crate::{..}` groups), comments left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers from the bottom up, and the modules (by path prefix) in each.
const LAYERS: &[(&str, &[&str])] = &[
    ("base", &["config", "status", "service", "keywatch"]),
    ("intake", &["ingest", "source", "pushed"]),
    ("operations", &["ops"]),
    (
        "daemon",
        &[
            "runtime",
            "checks",
            "archiving",
            "standby",
            "takeover",
            "http",
            "metrics",
        ],
    ),
    ("commands", &["cmd"]),
    ("entry", &["main", "layers"]),
];

fn layer_of(module: &str) -> Option<usize> {
    let top = module.split("::").next().unwrap_or(module);
    LAYERS.iter().position(|(_, ms)| ms.contains(&top))
}

/// Every module under `src` by its path (`cmd::verify`), with its source.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(src).into_iter().flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let Ok(rel) = p.strip_prefix(src) else {
            continue;
        };
        let mut parts: Vec<String> = rel
            .with_extension("")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|l| l == "mod") {
            parts.pop();
        }
        let text = std::fs::read_to_string(p).unwrap_or_default();
        out.insert(parts.join("::"), text);
    }
    out
}

/// The source with `//` comments removed (doc comments name modules freely).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The longest module name that `path` (`a::b::Item`) starts with.
fn resolve(path: &str, names: &BTreeSet<String>) -> Option<String> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    (1..=segs.len())
        .rev()
        .map(|i| segs[..i].join("::"))
        .find(|c| names.contains(c))
}

fn path_after(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    &s[..end]
}

/// What each module imports from the others.
fn arrows(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let names: BTreeSet<String> = mods.keys().cloned().collect();
    let mut out = BTreeMap::new();
    for (m, text) in mods {
        let text = code(text);
        let mut to = BTreeSet::new();
        let mut add = |path: &str| {
            if let Some(r) = resolve(path, &names).filter(|r| r != m) {
                to.insert(r);
            }
        };
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    add(path_after(item.trim()));
                }
            } else {
                add(path_after(rest));
            }
        }
        let parent: Vec<&str> = m.split("::").collect();
        let parent = parent[..parent.len().saturating_sub(1)].join("::");
        for (i, _) in text.match_indices("super::") {
            let rest = path_after(&text[i + "super::".len()..]);
            if parent.is_empty() {
                add(rest);
            } else {
                add(&format!("{parent}::{rest}"));
            }
        }
        out.insert(m.clone(), to);
    }
    out
}

#[test]
fn every_import_points_down_or_sideways_and_only_main_uses_the_commands() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    assert!(
        mods.len() > 20,
        "read only {} modules from {}",
        mods.len(),
        src.display()
    );
    let mut wrong = Vec::new();
    for (m, to) in arrows(&mods) {
        let Some(from) = layer_of(&m) else {
            wrong.push(format!("{m} is in no layer: add it to LAYERS"));
            continue;
        };
        for t in to {
            let Some(into) = layer_of(&t) else { continue };
            if into > from {
                wrong.push(format!(
                    "{m} ({}) imports {t} ({}), a layer above it",
                    LAYERS[from].0, LAYERS[into].0
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "import arrows against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let arrows = arrows(&modules(&src));
    // A circle of any length shows as a module that can reach itself.
    let mut circles = Vec::new();
    for start in arrows.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = arrows[start].iter().collect();
        while let Some(m) = todo.pop() {
            if m == start {
                circles.push(start.clone());
                break;
            }
            if seen.insert(m.clone()) {
                todo.extend(arrows.get(m).into_iter().flatten());
            }
        }
    }
    assert!(
        circles.is_empty(),
        "modules on an import circle: {circles:?}"
    );
}

#[test]
fn the_reader_sees_arrows_and_circles() {
    // The checks above would pass on a reader that sees nothing.
    let mut mods = BTreeMap::new();
    mods.insert(
        "a".to_string(),
        "use crate::{b::X, c};\n// crate::d\n".to_string(),
    );
    mods.insert("b".to_string(), "fn f() { crate::a::g() }".to_string());
    mods.insert("c".to_string(), String::new());
    mods.insert("d".to_string(), String::new());
    mods.insert(
        "c::e".to_string(),
        "use super::super::d;\nuse super::f;".to_string(),
    );
    mods.insert("c::f".to_string(), String::new());
    let a = arrows(&mods);
    assert_eq!(a["a"], ["b", "c"].iter().map(|s| s.to_string()).collect());
    assert_eq!(a["b"], ["a"].iter().map(|s| s.to_string()).collect());
    assert!(a["c::e"].contains("c::f"));
}

//! The shape of the source tree, kept by a test: no file in src/ over 700 lines, no function
//! over 120, no module circle among the crate's modules and their submodules, no JSON
//! formatted by hand (serde writes it), and every `kernels/<op>.cu` has its launchers in
//! `src/ops/<op>/cuda.rs` (or is one of the named exceptions).

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 700;
const MAX_FN_LINES: usize = 120;

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The lines of each function in `text` that has a body: (name, first line, line count).
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let t = t.strip_prefix("pub ").unwrap_or(t);
        let t = t.strip_prefix("pub(crate) ").unwrap_or(t);
        let t = t.strip_prefix("unsafe ").unwrap_or(t);
        let t = t.strip_prefix("const ").unwrap_or(t);
        let Some(rest) = t.strip_prefix("fn ") else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut started) = (0i64, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        started = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if !started && l.trim_end().ends_with(';') {
                break; // a declaration without a body
            }
            if started && depth == 0 {
                out.push((name.clone(), i + 1, j - i + 1));
                break;
            }
        }
    }
    out
}

#[test]
fn files_and_functions_stay_short() {
    let src = common::repo().join("src");
    let mut long = Vec::new();
    for path in rust_files(&src) {
        let text = std::fs::read_to_string(&path).unwrap();
        let n = text.lines().count();
        if n > MAX_FILE_LINES {
            long.push(format!("{}: {n} lines", path.display()));
        }
        for (name, line, len) in functions(&text) {
            if len > MAX_FN_LINES {
                long.push(format!(
                    "{}:{line}: fn {name} is {len} lines",
                    path.display()
                ));
            }
        }
    }
    assert!(long.is_empty(), "too long:\n{}", long.join("\n"));
}

/// The module path of a file under src/ (`ops/conv2d/cuda.rs` is ops::conv2d::cuda).
fn module_of(src: &Path, path: &Path) -> Vec<String> {
    let rel = path.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Every `crate::a::b` path in `text` outside its test module, as [a, b]; `super::x` paths of
/// module `module` are resolved against its parent.
fn crate_paths(text: &str, module: &[String]) -> Vec<Vec<String>> {
    let text = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut out = Vec::new();
    let mut push = |path: &str| {
        let parts: Vec<String> = path
            .split("::")
            .map(|p| p.trim().to_string())
            .take_while(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'))
            .collect();
        if !parts.is_empty() {
            out.push(parts);
        }
    };
    let parent = module[..module.len().saturating_sub(1)].join("::");
    let resolved = text.replace("super::", &format!("crate::{parent}::"));
    let resolved = resolved.replace("crate::::", "crate::");
    for (i, _) in resolved.match_indices("crate::") {
        let rest = &resolved[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // use crate::{a::b, c};
            let end = group.find('}').unwrap_or(0);
            group[..end].split(',').for_each(&mut push);
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            push(&rest[..end]);
        }
    }
    out
}

/// A cycle in `graph`, if any (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        v: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(v.to_string(), 1);
        stack.push(v.to_string());
        for w in g.get(v).into_iter().flatten() {
            match state.get(w.as_str()) {
                Some(1) => {
                    let from = stack.iter().position(|s| s == w).unwrap_or(0);
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(w.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(w, g, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(v.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for v in graph.keys() {
        if !state.contains_key(v) {
            if let Some(c) = visit(v, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_module_circles() {
    let src = common::repo().join("src");
    // depth 1: the crate's modules; depth 2: the submodules of each.
    for depth in [1usize, 2] {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for path in rust_files(&src) {
            let module = module_of(&src, &path);
            if module.first().is_some_and(|m| m == "cli") || module.len() < depth {
                continue; // the binary's own modules, and files above this depth
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for target in crate_paths(&text, &module) {
                if target.len() < depth || target[..depth - 1] != module[..depth - 1] {
                    continue;
                }
                let (from, to) = (module[..depth].join("::"), target[..depth].join("::"));
                if from != to {
                    graph.entry(from).or_default().insert(to);
                }
            }
        }
        if let Some(cycle) = find_cycle(&graph) {
            panic!("a module circle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn no_json_is_formatted_by_hand() {
    let src = common::repo().join("src");
    for path in rust_files(&src) {
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            assert!(
                !(line.contains("{{\\\"") || line.contains("\\\":{") || line.contains("\\\": {")),
                "{}:{}: JSON written by hand (use serde): {line}",
                path.display(),
                i + 1
            );
        }
    }
}

#[test]
fn every_kernel_file_has_its_launchers_where_its_name_says() {
    let repo = common::repo();
    // kernels/<op>.cu -> src/ops/<op>/cuda.rs; the loss versions, instance_loss_<version>.cu ->
    // src/loss/cuda/<version>.rs; the cuBLAS front's operand conversion, blas.cu.
    for entry in std::fs::read_dir(repo.join("kernels")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let launcher = if stem == "blas" {
            repo.join("src/cuda/blas.rs")
        } else if let Some(version) = stem.strip_prefix("instance_loss_") {
            repo.join(format!("src/loss/cuda/{version}.rs"))
        } else {
            repo.join(format!("src/ops/{stem}/cuda.rs"))
        };
        let text = std::fs::read_to_string(&launcher).unwrap_or_else(|_| {
            panic!(
                "kernels/{stem}.cu has no launcher file {}",
                launcher.display()
            )
        });
        assert!(
            text.contains(&format!("Kernel::new(\"{stem}\"")),
            "{} launches nothing of kernels/{stem}.cu",
            launcher.display()
        );
    }
}

#[test]
fn the_function_scanner_measures_bodies() {
    let text = "fn a() {\n    1\n}\npub fn b(x: u8);\npub(crate) unsafe fn c() {\n}\n";
    assert_eq!(
        functions(text),
        vec![("a".to_string(), 1, 3), ("c".to_string(), 5, 2)]
    );
}

/// The environment variables a user may set (the README documents each); every other
/// `INVASPREAD_*` name in src/ is a test hook and belongs in src/test_hooks.rs.
const USER_VARIABLES: [&str; 4] = [
    "INVASPREAD_GPU",
    "INVASPREAD_VGPU_DIR",
    "INVASPREAD_VGPU_DEVICES",
    "INVASPREAD_DIST_TIMEOUT_S",
];

/// The quoted `INVASPREAD_*` names in `text`.
fn quoted_variables(text: &str) -> Vec<String> {
    text.match_indices("\"INVASPREAD_")
        .map(|(i, _)| {
            let rest = &text[i + 1..];
            let end = rest
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            rest[..end].to_string()
        })
        .collect()
}

#[test]
fn test_hooks_exist_only_in_builds_with_the_test_feature() {
    let src = common::repo().join("src");
    let hooks = src.join("test_hooks.rs");
    for path in rust_files(&src) {
        if path == hooks {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for name in quoted_variables(&text) {
            assert!(
                USER_VARIABLES.contains(&name.as_str()),
                "{}: reads {name}, which is no user setting: a test hook goes in src/test_hooks.rs, \
                 behind the test-hooks feature",
                path.display()
            );
        }
    }
    // In test_hooks.rs every variable is read inside the module the feature gates.
    let text = std::fs::read_to_string(&hooks).unwrap();
    let gate = text
        .find("#[cfg(feature = \"test-hooks\")]\nmod enabled {")
        .expect("test_hooks.rs gates its hooks in `mod enabled` behind the test-hooks feature");
    let end = gate + text[gate..].find("\n}\n").expect("the end of mod enabled");
    for (at, _) in text.match_indices("std::env::var") {
        assert!(
            (gate..end).contains(&at),
            "src/test_hooks.rs reads a variable outside the gated module"
        );
    }
    let manifest = std::fs::read_to_string(common::repo().join("Cargo.toml")).unwrap();
    let default = manifest.lines().find(|l| l.starts_with("default"));
    assert!(
        default.is_none_or(|l| !l.contains("test-hooks")),
        "the test-hooks feature must not be a default feature"
    );
}

/// `fused-v3-tf32` as an enum variant would spell it: `FusedV3Tf32`.
fn camel_case(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut c = part.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The variants of every `enum` defined in `text`: the first word of each line of its body.
fn enum_variants(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let Some(rest) = t
            .strip_prefix("pub enum ")
            .or_else(|| t.strip_prefix("enum "))
        else {
            continue;
        };
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric()).collect();
        let mut variants = Vec::new();
        for l in &lines[i + 1..] {
            let l = l.trim();
            if l.starts_with('}') {
                break;
            }
            if l.starts_with("//") || l.starts_with('#') {
                continue;
            }
            let v: String = l.chars().take_while(|c| c.is_alphanumeric()).collect();
            if !v.is_empty() {
                variants.push(v);
            }
        }
        out.push((name, variants));
    }
    out
}

#[test]
fn loss_versions_are_listed_in_the_registry_alone() {
    let src = common::repo().join("src");
    let registry = src.join("loss/versions.rs");
    let names: Vec<&str> = invaspread::loss::versions::REGISTRY
        .iter()
        .map(|e| e.name)
        .collect();
    let variants: Vec<String> = names.iter().map(|n| camel_case(n)).collect();
    assert!(variants.contains(&"FusedV3Tf32".to_string()));
    for path in rust_files(&src) {
        if path == registry {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (name, vs) in enum_variants(&text) {
            let copied: Vec<&String> = vs.iter().filter(|v| variants.contains(v)).collect();
            assert!(
                copied.len() < 2,
                "{}: enum {name} lists loss versions {copied:?}: take them from the registry \
                 (loss::versions::REGISTRY, LossVersion)",
                path.display()
            );
        }
        let quoted = names
            .iter()
            .filter(|n| text.contains(&format!("\"{n}\"")))
            .count();
        assert!(
            quoted < 3,
            "{}: spells {quoted} loss versions' names: take them from the registry",
            path.display()
        );
    }
}

/// The code of `text` without its comments (`//` to the end of a line).
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn backends_tape_and_ops_know_nothing_of_ranks() {
    // Collectives are a layer of their own (src/dist/collectives.rs) above the backends: no
    // Backend method, and nothing in the backends, the tape or the ops, names a rank or a
    // collective.
    const RANK_WORDS: [&str; 8] = [
        "rank",
        "world_size",
        "all_gather",
        "all_reduce",
        "reduce_scatter",
        "broadcast",
        "ProcessGroup",
        "DataParallel",
    ];
    let src = common::repo().join("src");
    for dir in ["backend", "tape", "ops"] {
        for path in rust_files(&src.join(dir)) {
            let code = code_of(&std::fs::read_to_string(&path).unwrap());
            for word in RANK_WORDS {
                assert!(
                    !code.contains(word),
                    "{}: `{word}` in the code: ranks and collectives belong to src/dist/",
                    path.display()
                );
            }
        }
    }
    let backend = code_of(&std::fs::read_to_string(src.join("backend/mod.rs")).unwrap());
    let start = backend
        .find("pub trait Backend")
        .expect("the Backend trait");
    let body = &backend[start..start + backend[start..].find("\n}\n").unwrap()];
    for word in ["gradient", "collective", "group"] {
        assert!(!body.contains(word), "the Backend trait mentions {word}");
    }
}

/// The headers `for (...)` in `text`, each as its text between the parentheses.
fn for_headers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("for (") {
        let mut depth = 0usize;
        let body = &text[i + 4..];
        for (j, c) in body.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        out.push(body[1..j].to_string());
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// A grid-stride loop (`e += gridDim.x * blockDim.x`) with a 32-bit counter wraps when the
/// total is within one stride of 2^31 (for a total below it, which the launchers' guards let
/// through): every such loop of kernels/ counts in 64 bits.
#[test]
fn every_grid_stride_loop_counts_in_64_bits() {
    let kernels = common::repo().join("kernels");
    let mut loops = 0;
    for entry in std::fs::read_dir(&kernels).unwrap() {
        let path = entry.unwrap().path();
        if !path.extension().is_some_and(|e| e == "cu" || e == "cuh") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for header in for_headers(&text) {
            // The step clause adds the grid's stride (not a loop over the blocks themselves).
            let step = header.rsplit(';').next().unwrap_or("");
            if !(step.contains("+=") && step.contains("gridDim")) {
                continue;
            }
            loops += 1;
            let init = header.trim_start();
            assert!(
                [
                    "long long ",
                    "size_t ",
                    "unsigned long long ",
                    "std::size_t "
                ]
                .iter()
                .any(|t| init.starts_with(t)),
                "{}: a grid-stride loop with a 32-bit counter: for ({header})",
                path.display()
            );
        }
    }
    assert!(loops >= 10, "only {loops} grid-stride loops found");
}

#[test]
fn the_for_scanner_reads_nested_parentheses() {
    let headers = for_headers("for (int i = f(a, (b)); i < n; ++i) { for (x : y) {} }");
    assert_eq!(headers, ["int i = f(a, (b)); i < n; ++i", "x : y"]);
}

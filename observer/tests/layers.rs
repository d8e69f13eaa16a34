//! The agent's modules depend one way: kernel -> snapshot -> detect -> alerts -> act / report ->
//! commands -> cli (lib.rs tells the story). This reads every source file and fails on an import
//! from a layer above the file's own, so the layering stays a fact rather than a hope.
use std::{
    fs,
    path::{Path, PathBuf},
};

/// Layers by rank; a module may import from its own rank and below. `units` and `fastmap` are
/// foundations any layer may use.
const LAYERS: &[(&str, u32)] = &[
    ("units", 0),
    ("fastmap", 0),
    ("kernel", 1),
    ("snapshot", 2),
    ("detect", 3),
    ("alerts", 4),
    ("act", 5),
    ("report", 6),
    ("commands", 7),
    ("cli", 8),
];

fn rank(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(name, _)| *name == module).map(|&(_, r)| r)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file names after `crate::`, outside its unit tests (which may build
/// fixtures from any layer).
fn imported_modules(source: &str) -> Vec<String> {
    let code = source.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
    let mut modules = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c, d::{e, f}}`: the first name of each top-level item.
            let mut depth = 1;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (depth == 1 && c == ',') {
                    modules.push(leading_name(&item));
                    item.clear();
                    if depth == 0 {
                        break;
                    }
                } else {
                    item.push(c);
                }
            }
        } else {
            modules.push(leading_name(rest));
        }
    }
    modules.retain(|m| !m.is_empty());
    modules
}

fn leading_name(text: &str) -> String {
    text.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "found only {} sources under {}", files.len(), src.display());
    let mut upward = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.components().next().unwrap().as_os_str().to_string_lossy();
        let Some(own) = rank(top.trim_end_matches(".rs")) else { continue };
        let source = fs::read_to_string(file).unwrap();
        for module in imported_modules(&source) {
            if rank(&module).is_some_and(|r| r > own) {
                upward.push(format!("{} imports crate::{module}", relative.display()));
            }
        }
    }
    assert!(upward.is_empty(), "imports from a higher layer:\n{}", upward.join("\n"));
}

#[test]
fn the_import_reader_sees_groups_and_paths() {
    let source = "use crate::{\n    act::Mode,\n    detect::{Reason, x},\n    report,\n};\n\
                  fn f() { crate::cli::main(); }\n#[cfg(test)]\nmod tests { use crate::commands; }";
    assert_eq!(imported_modules(source), ["act", "detect", "report", "cli"]);
    assert_eq!(imported_modules("use crate::{units, commands::watch};"), ["units", "commands"]);
}

#[test]
fn only_cli_knows_clap() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let knowing: Vec<String> = files
        .iter()
        .filter(|f| fs::read_to_string(f).unwrap().contains("clap::"))
        .map(|f| f.strip_prefix(&src).unwrap().display().to_string())
        .collect();
    assert_eq!(knowing, ["cli.rs"]);
}

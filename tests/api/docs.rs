//! The docs that name code are checked against it: the flag reference
//! against `order-service --help`, and the guarantees page's test names
//! against the tests that exist.

use std::collections::BTreeMap;

use crate::helpers::{BIN, repo_path};

/// A flag as `--help` or the flag table tells it: its environment variable
/// and its default (`None`: none shown).
#[derive(Debug, PartialEq, Eq)]
struct Flag {
    env: Option<String>,
    default: Option<String>,
}

/// Every flag of `order-service --help` (run with an empty environment, so
/// no value of this shell's shows as a default).
fn flags_of_the_help() -> BTreeMap<String, Flag> {
    let out = std::process::Command::new(BIN).arg("--help").env_clear().output().expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let mut flags = BTreeMap::new();
    let mut current: Option<(String, Flag)> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("--").filter(|_| line.starts_with("  ")) {
            if let Some((name, flag)) = current.take() {
                flags.insert(name, flag);
            }
            let name = rest.split([' ', '<']).next().unwrap().to_owned();
            current = Some((name, Flag { env: None, default: None }));
        } else if let Some((_, flag)) = &mut current {
            if let Some(env) = trimmed.strip_prefix("[env: ") {
                flag.env = Some(env.split(['=', ']']).next().unwrap().to_owned());
            } else if let Some(default) = trimmed.strip_prefix("[default: ") {
                let default = default.trim_end_matches(']');
                flag.default = Some(if default == "\"\"" { String::new() } else { default.to_owned() });
            }
        }
    }
    flags.extend(current);
    flags.remove("help");
    flags.remove("version");
    flags
}

/// Backticked values in a table cell: `` `a`, `b` `` → a, b.
fn ticked(cell: &str) -> Vec<String> {
    cell.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// Every flag of the table in docs/operations.md, with the variable and the
/// default it names. A row may name several flags and variables, in order.
fn flags_of_the_table() -> BTreeMap<String, Flag> {
    let doc = std::fs::read_to_string(repo_path("docs/operations.md")).unwrap();
    let mut flags = BTreeMap::new();
    for row in doc.lines().filter(|line| line.starts_with("| `--")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let names = ticked(cells[0]);
        let envs = ticked(cells[1]);
        let default = ticked(cells[2]).first().cloned();
        let default = if cells[2].contains("empty") { Some(String::new()) } else { default };
        for (i, name) in names.iter().enumerate() {
            let env = envs.get(i).cloned();
            flags.insert(name.trim_start_matches("--").to_owned(), Flag { env, default: default.clone() });
        }
    }
    flags
}

/// The flag table names every flag of `--help`, no other, each with its
/// environment variable and its default.
#[test]
fn the_flag_reference_matches_the_help() {
    let help = flags_of_the_help();
    let table = flags_of_the_table();
    assert!(help.len() > 20, "read {} flags from --help", help.len());
    let missing: Vec<_> = help.keys().filter(|name| !table.contains_key(*name)).collect();
    let unknown: Vec<_> = table.keys().filter(|name| !help.contains_key(*name)).collect();
    assert!(missing.is_empty(), "docs/operations.md lacks --{missing:?}");
    assert!(unknown.is_empty(), "docs/operations.md names flags --help lacks: {unknown:?}");
    for (name, flag) in &help {
        let row = &table[name];
        assert_eq!(row.env, flag.env, "--{name}: its environment variable");
        // A default --help shows must be the table's; a flag without one
        // (a switch, or an optional path) may say what absence means.
        if flag.default.is_some() {
            assert_eq!(row.default, flag.default, "--{name}: its default");
        }
    }
}

/// The names of every test of this binary, as `--list` prints them.
fn tests_of_this_binary() -> Vec<String> {
    let me = std::env::current_exe().unwrap();
    let out = std::process::Command::new(me).args(["--list", "--format", "terse"]).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .map(str::to_owned)
        .collect()
}

/// Whether `name` (from the guarantees page: `module::test`, maybe with
/// `*` for any part) is among `tests`, where an engine test is listed under
/// `sqlite::` and `postgres::`.
fn named_test_exists(name: &str, tests: &[String]) -> bool {
    let parts: Vec<&str> = name.split("::").collect();
    tests.iter().any(|test| {
        let listed: Vec<&str> = test.split("::").collect();
        let engine_free: Vec<&str> =
            listed.iter().copied().filter(|part| *part != "sqlite" && *part != "postgres").collect();
        [listed, engine_free].iter().any(|listed| matches_parts(&parts, listed))
    })
}

/// `pattern` against `parts`; `*` matches one part or more.
fn matches_parts(pattern: &[&str], parts: &[&str]) -> bool {
    match (pattern.first(), parts.first()) {
        (None, None) => true,
        (Some(&"*"), Some(_)) => (1..=parts.len()).any(|n| matches_parts(&pattern[1..], &parts[n..])),
        (Some(p), Some(part)) => p == part && matches_parts(&pattern[1..], &parts[1..]),
        _ => false,
    }
}

/// Every test the guarantees page names exists: integration tests in this
/// binary's list, unit tests (`… (in `src/`)`) as a function of that name in
/// that module's file (`module.rs` or `module/mod.rs`).
#[test]
fn every_test_the_guarantees_name_exists() {
    let doc = std::fs::read_to_string(repo_path("docs/guarantees.md")).unwrap();
    let tests = tests_of_this_binary();
    assert!(tests.len() > 100, "listed {} tests", tests.len());
    let mut checked = 0;
    for row in doc.lines().filter(|line| line.starts_with("| ") && !line.starts_with("| promise")) {
        let Some(shown_by) = row.trim_end_matches('|').rsplit(" | ").next() else { continue };
        for name in ticked(shown_by).iter().filter(|name| name.contains("::")) {
            checked += 1;
            if shown_by.contains("(in `src/`)") && name.contains("::tests::") {
                let (module, function) = name.split_once("::tests::").unwrap();
                let path = module.replace("::", "/");
                let (file, module_file) =
                    (repo_path(&format!("src/{path}.rs")), repo_path(&format!("src/{path}/mod.rs")));
                let source = std::fs::read_to_string(&file)
                    .or_else(|_| std::fs::read_to_string(&module_file))
                    .unwrap_or_default();
                assert!(
                    source.contains(&format!("fn {function}(")),
                    "{name}: no such test in {}",
                    file.display()
                );
            } else {
                assert!(named_test_exists(name, &tests), "docs/guarantees.md names {name}: no such test");
            }
        }
    }
    assert!(checked > 20, "checked {checked} names");
}

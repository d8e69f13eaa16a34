//! What a VM run found, read from its serial console, checked against what was asked for, and
//! written into README.md's kernel support table.
//!
//! Every count here comes from libtest's own `test NAME ... ok` lines: a test that was renamed or
//! removed prints nothing, so it is reported missing instead of silently passing.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail};
use serde_json::Value;

use super::{BACKENDS, Kernel, Suite};
use crate::workspace_root;

/// How libtest reported one test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Ignored,
}

/// One test binary's run under one backend.
#[derive(Debug, Default)]
pub struct SuiteRun {
    /// The binary's exit code (`VMTEST-RESULT`); `None` if the guest never got that far.
    pub exit: Option<i32>,
    pub tests: BTreeMap<String, Outcome>,
    /// The guest's watchdog killed it (`VMTEST-HUNG`): how long it had run.
    pub hung: Option<String>,
}

/// What one VM run printed.
#[derive(Debug, Default)]
pub struct VmResults {
    pub kernel: String,
    /// `observer check` in the guest.
    pub check: Value,
    /// Backend -> suite -> run.
    pub runs: BTreeMap<String, BTreeMap<String, SuiteRun>>,
    /// Backends the guest did not test because `observer check` said they do not load.
    pub skipped: BTreeSet<String>,
    /// The guest reached the end of its script.
    pub ended: bool,
    /// The guest kernel's panic line, if it panicked.
    pub panic: Option<String>,
}

/// Reads the VMTEST-* marker lines of a console log. Anything else (kernel messages, boot noise)
/// is ignored; console lines can carry terminal escapes before a marker.
pub fn parse(console: &str) -> VmResults {
    let mut results = VmResults { check: Value::Null, ..VmResults::default() };
    for raw in console.lines() {
        if let Some(at) = raw.find("Kernel panic - ") {
            results.panic.get_or_insert_with(|| raw[at..].trim().to_owned());
        }
        let Some(at) = raw.find("VMTEST-") else { continue };
        let line = raw[at..].trim_end();
        if let Some(k) = line.strip_prefix("VMTEST-KERNEL ") {
            results.kernel = k.trim().to_owned();
        } else if let Some(json) = line.strip_prefix("VMTEST-CHECK ") {
            results.check = serde_json::from_str(json.trim()).unwrap_or(Value::Null);
        } else if let Some(rest) = line.strip_prefix("VMTEST-OUT ") {
            let Some((origin, text)) = rest.split_once(": ") else { continue };
            let Some((backend, suite)) = origin.split_once(' ') else { continue };
            let Some((name, outcome)) = test_line(text) else { continue };
            let tests = &mut suite_run(&mut results, backend, suite).tests;
            // A name reported twice keeps its worst outcome.
            if tests.get(name) != Some(&Outcome::Failed) {
                tests.insert(name.to_owned(), outcome);
            }
        } else if let Some(rest) = line.strip_prefix("VMTEST-RESULT ") {
            if let [backend, suite, code] = rest.split_whitespace().collect::<Vec<_>>()[..] {
                suite_run(&mut results, backend, suite).exit = code.parse().ok();
            }
        } else if let Some(rest) = line.strip_prefix("VMTEST-HUNG ") {
            if let [backend, suite, ref after @ ..] =
                rest.split_whitespace().collect::<Vec<_>>()[..]
            {
                suite_run(&mut results, backend, suite).hung = Some(after.join(" "));
            }
        } else if let Some(backend) = line.strip_prefix("VMTEST-SKIP ") {
            results.skipped.insert(backend.trim().to_owned());
        } else if line.starts_with("VMTEST-END") {
            results.ended = true;
        }
    }
    results
}

fn suite_run<'a>(results: &'a mut VmResults, backend: &str, suite: &str) -> &'a mut SuiteRun {
    results.runs.entry(backend.to_owned()).or_default().entry(suite.to_owned()).or_default()
}

/// libtest's `test NAME ... ok|FAILED|ignored[, reason]`.
fn test_line(text: &str) -> Option<(&str, Outcome)> {
    let (name, status) = text.strip_prefix("test ")?.split_once(" ... ")?;
    let outcome = match status.trim() {
        "ok" => Outcome::Ok,
        "FAILED" => Outcome::Failed,
        s if s.starts_with("ignored") => Outcome::Ignored,
        _ => return None,
    };
    Some((name.trim(), outcome))
}

impl VmResults {
    /// Whether `observer check` in the guest loaded and attached `backend`.
    pub fn loads(&self, backend: &str) -> bool {
        self.check["probes"][backend]["ok"] == true
    }

    /// The best backend that loads here, in `auto`'s order of preference.
    fn best(&self) -> Option<&'static str> {
        BACKENDS.into_iter().find(|b| self.loads(b))
    }

    /// The suites the guest runs under `backend` (the guest script applies the same rule).
    pub fn expected<'a>(&self, kernel: &'a Kernel, backend: &str) -> Vec<&'a Suite> {
        if !self.loads(backend) {
            return Vec::new();
        }
        let first = self.best() == Some(backend);
        kernel.suites.iter().filter(|s| !s.once || first).collect()
    }

    /// (passed, reported) over every test that printed a result under `backend`.
    pub fn counts(&self, backend: &str) -> (usize, usize) {
        let tests = self.runs.get(backend).into_iter().flat_map(|s| s.values());
        let tests = tests.flat_map(|run| run.tests.values());
        tests.fold((0, 0), |(ok, all), o| (ok + usize::from(*o == Outcome::Ok), all + 1))
    }
}

/// Everything wrong with a run, one phrase each; empty when it passed.
pub fn problems(kernel: &Kernel, results: &VmResults) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(panic) = &results.panic {
        problems.push(format!("the guest kernel panicked ({panic})"));
    }
    if !results.ended {
        problems.push("the VM stopped before finishing its tests (no VMTEST-END)".to_owned());
    }
    if results.check.is_null() {
        problems.push("`observer check` printed no JSON in the guest".to_owned());
        return problems;
    }
    let Some(best) = results.best() else {
        problems.push("no probe backend loads on this kernel".to_owned());
        return problems;
    };
    // `auto` must take the best backend that `check` found to load, whichever that is here.
    let auto = results.check["backend"].as_str().unwrap_or("none");
    if auto != best {
        problems.push(format!("auto picked {auto}, but {best} loads"));
    }
    for backend in BACKENDS {
        for suite in results.expected(kernel, backend) {
            let run = results.runs.get(backend).and_then(|r| r.get(suite.name));
            let Some(run) = run else {
                problems.push(format!("{} under {backend} did not run", suite.name));
                continue;
            };
            if let Some(after) = &run.hung {
                // libtest runs one test at a time in name order: the first without a result hung.
                let stuck = suite.tests.iter().filter(|t| !run.tests.contains_key(**t)).min();
                problems.push(format!(
                    "{} under {backend} hung{} and was killed {after} (the console lists its \
                     processes and blocked tasks)",
                    suite.name,
                    stuck.map(|t| format!(" in {t}")).unwrap_or_default()
                ));
                continue;
            }
            for test in suite.tests {
                match run.tests.get(*test) {
                    Some(Outcome::Ok) => {}
                    Some(Outcome::Failed) => {
                        problems.push(format!("{test} ({} under {backend}) failed", suite.name))
                    }
                    Some(Outcome::Ignored) => problems
                        .push(format!("{test} ({} under {backend}) was ignored", suite.name)),
                    None => problems.push(format!(
                        "{test} ({} under {backend}) reported no result: no such test?",
                        suite.name
                    )),
                }
            }
            match run.exit {
                Some(0) => {}
                Some(code) => {
                    problems.push(format!("{} under {backend} exited with {code}", suite.name))
                }
                None => problems.push(format!("{} under {backend} never finished", suite.name)),
            }
        }
    }
    problems
}

/// Fails with every problem of a run.
pub fn verify(kernel: &Kernel, results: &VmResults, console: &std::path::Path) -> Result<()> {
    let problems = problems(kernel, results);
    if !problems.is_empty() {
        bail!(
            "VM test failed on Linux {} ({}): {}; see {}",
            if results.kernel.is_empty() { "?" } else { &results.kernel },
            kernel.name,
            problems.join("; "),
            console.display()
        );
    }
    let ran: Vec<String> = BACKENDS
        .into_iter()
        .filter(|b| results.loads(b))
        .map(|b| {
            let (passed, _) = results.counts(b);
            format!("{b} {passed}")
        })
        .collect();
    eprintln!(
        "xtask: VM test passed on Linux {}: tests passed per backend: {}",
        results.kernel,
        ran.join(", ")
    );
    Ok(())
}

const TABLE_BEGIN: &str = "<!-- kernel-support:begin -->";
const TABLE_END: &str = "<!-- kernel-support:end -->";

/// What each backend needs, for the table.
fn needs(backend: &str) -> &'static str {
    match backend {
        "fentry" => "BTF, BPF trampolines (fentry/fexit, `bpf_get_func_ret`): Linux 5.17+",
        "kprobe" => "BTF, CONFIG_KPROBES (kprobe PMU): Linux 5.12+",
        _ => {
            "BTF tracepoints: Linux 5.12+; application send/receive times need 6.3+ (`sock_send_length`)"
        }
    }
}

/// The reason in a probe error, without the backend and program it starts with.
fn refusal(check: &Value, backend: &str) -> String {
    // "<backend> is unavailable on this kernel: <program> on <function>: <why>"
    let error = check["probes"][backend]["error"].as_str().unwrap_or("unavailable");
    let why = error.splitn(3, ": ").nth(2).unwrap_or(error);
    format!("refused: {}", cell_text(why))
}

/// Table cells cannot hold a `|` or a line break.
fn cell_text(text: &str) -> String {
    text.replace('|', "/").replace('\n', " ")
}

fn host_cell(check: &Value, backend: &str, host_tests_passed: bool) -> String {
    if check["probes"][backend]["ok"] != true {
        return refusal(check, backend);
    }
    if check["backend"] == backend && host_tests_passed {
        "loads; every integration test passes".into()
    } else {
        "loads".into()
    }
}

fn vm_cell(results: &VmResults, backend: &str) -> String {
    if !results.loads(backend) {
        return refusal(&results.check, backend);
    }
    let (passed, reported) = results.counts(backend);
    let mut cell = format!("loads; {passed} of {reported} tests pass");
    for note in results.check["backend_notes"][backend].as_array().into_iter().flatten() {
        cell.push_str(&format!("; {}", cell_text(note.as_str().unwrap_or_default())));
    }
    cell
}

/// The table, from the host check and one VM run per kernel.
pub fn support_table(
    host_check: &Value,
    host_tests_passed: bool,
    vms: &[(&Kernel, VmResults)],
) -> String {
    let host_kernel = host_check["kernel"].as_str().unwrap_or("?");
    let mut header =
        format!("| backend | needs | Linux {host_kernel} (the project's machines, CI) |");
    let mut rule = "|---|---|---|".to_owned();
    for (kernel, vm) in vms {
        header.push_str(&format!(" Linux {} ({}, qemu) |", vm.kernel, kernel.what));
        rule.push_str("---|");
    }
    let mut table = format!("{header}\n{rule}\n");
    for backend in BACKENDS {
        table.push_str(&format!(
            "| `{backend}` | {} | {} |",
            needs(backend),
            host_cell(host_check, backend, host_tests_passed)
        ));
        for (_, vm) in vms {
            table.push_str(&format!(" {} |", vm_cell(vm, backend)));
        }
        table.push('\n');
    }
    let auto = |check: &Value| format!("`{}`", check["backend"].as_str().unwrap_or("none"));
    table.push_str(&format!("| `auto` picks | | {} |", auto(host_check)));
    for (_, vm) in vms {
        table.push_str(&format!(" {} |", auto(&vm.check)));
    }
    table.push('\n');
    table
}

/// Rewrites README.md's kernel support table.
pub fn write_support_table(table: &str) -> Result<()> {
    let readme_path = workspace_root().join("README.md");
    let readme = std::fs::read_to_string(&readme_path)?;
    let (Some(begin), Some(end)) = (readme.find(TABLE_BEGIN), readme.find(TABLE_END)) else {
        bail!("README.md has no {TABLE_BEGIN} ... {TABLE_END} section");
    };
    let updated = format!("{}{TABLE_BEGIN}\n{table}{}", &readme[..begin], &readme[end..]);
    if updated != readme {
        std::fs::write(&readme_path, updated)?;
        eprintln!("xtask: updated the kernel support table in README.md");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WATCH: Suite = Suite { name: "watch", tests: &["alpha", "beta"], once: false };
    const ACT: Suite = Suite { name: "act", tests: &["gamma"], once: true };
    const KERNEL: Kernel = Kernel {
        name: "test",
        what: "a test kernel",
        apt: super::super::Apt::System,
        suites: &[WATCH, ACT],
    };

    /// A console where fentry and tracepoint load and kprobe does not.
    fn console(watch_fentry: &str, watch_tracepoint: &str) -> String {
        let check = r#"{"probes":{"fentry":{"ok":true},"kprobe":{"ok":false,"error":"kprobe is unavailable on this kernel: p on f: no kprobes"},"tracepoint":{"ok":true}},"backend":"fentry","backend_notes":{"tracepoint":["no send tracepoints"]}}"#;
        format!(
            "[    0.000000] Linux version 6.1.0 ...\n\
             \x1b[0mVMTEST-KERNEL 6.1.0-48-cloud-amd64\n\
             VMTEST-CHECK {check}\n\
             {watch_fentry}\
             VMTEST-OUT fentry act: running 1 test\n\
             VMTEST-OUT fentry act: test gamma ... ok\n\
             VMTEST-RESULT fentry act 0\n\
             VMTEST-SKIP kprobe\n\
             {watch_tracepoint}\
             VMTEST-END\n\
             [  196.036615] reboot: Power down\n"
        )
    }

    fn watch_run(backend: &str, lines: &[&str], exit: i32) -> String {
        let mut out =
            format!("VMTEST-OUT {backend} watch: \nVMTEST-OUT {backend} watch: running 2 tests\n");
        for l in lines {
            out.push_str(&format!("VMTEST-OUT {backend} watch: {l}\n"));
        }
        out.push_str(&format!(
            "VMTEST-OUT {backend} watch: test result: ok. 2 passed; 0 failed\nVMTEST-RESULT {backend} watch {exit}\n"
        ));
        out
    }

    #[test]
    fn all_passing_is_clean_and_counted_from_what_ran() {
        let ok = ["test alpha ... ok", "test beta ... ok"];
        let text = console(&watch_run("fentry", &ok, 0), &watch_run("tracepoint", &ok, 0));
        let results = parse(&text);
        assert_eq!(results.kernel, "6.1.0-48-cloud-amd64");
        assert!(results.ended);
        assert_eq!(problems(&KERNEL, &results), Vec::<String>::new());
        // fentry also ran the once-only suite.
        assert_eq!(results.counts("fentry"), (3, 3));
        assert_eq!(results.counts("tracepoint"), (2, 2));
        assert_eq!(results.counts("kprobe"), (0, 0));
        assert_eq!(
            vm_cell(&results, "tracepoint"),
            "loads; 2 of 2 tests pass; no send tracepoints"
        );
        assert_eq!(vm_cell(&results, "kprobe"), "refused: no kprobes");
    }

    #[test]
    fn a_missing_test_fails_the_run_by_name_even_with_exit_zero() {
        // libtest with --exact and an unknown name runs nothing and exits 0.
        let ok = ["test alpha ... ok", "test beta ... ok"];
        let text = console(&watch_run("fentry", &ok[..1], 0), &watch_run("tracepoint", &ok, 0));
        let problems = problems(&KERNEL, &parse(&text));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("beta (watch under fentry) reported no result"));
    }

    #[test]
    fn a_failed_test_fails_the_run() {
        let ok = ["test alpha ... ok", "test beta ... ok"];
        let failed = ["test alpha ... ok", "test beta ... FAILED"];
        let text = console(&watch_run("fentry", &ok, 0), &watch_run("tracepoint", &failed, 101));
        let results = parse(&text);
        let problems = problems(&KERNEL, &results);
        assert_eq!(
            problems,
            ["beta (watch under tracepoint) failed", "watch under tracepoint exited with 101"]
        );
        assert_eq!(results.counts("tracepoint"), (1, 2));
    }

    #[test]
    fn a_suite_that_never_ran_or_a_vm_that_stopped_early_fails() {
        let ok = ["test alpha ... ok", "test beta ... ok"];
        let text = console(&watch_run("fentry", &ok, 0), "");
        let cut =
            text.replace("VMTEST-END\n", "[  9.1] Kernel panic - not syncing: Fatal exception\n");
        let problems = problems(&KERNEL, &parse(&cut));
        assert_eq!(
            problems,
            [
                "the guest kernel panicked (Kernel panic - not syncing: Fatal exception)",
                "the VM stopped before finishing its tests (no VMTEST-END)",
                "watch under tracepoint did not run"
            ]
        );
    }

    #[test]
    fn a_hung_suite_is_named_once_with_how_long_it_ran() {
        let ok = ["test alpha ... ok", "test beta ... ok"];
        let hung = "VMTEST-OUT tracepoint watch: test alpha ... ok\n\
                    VMTEST-HUNG tracepoint watch after 300s\n\
                    VMTEST-RESULT tracepoint watch 124\n";
        let text = console(&watch_run("fentry", &ok, 0), hung);
        assert_eq!(
            problems(&KERNEL, &parse(&text)),
            ["watch under tracepoint hung in beta and was killed after 300s (the console lists \
              its processes and blocked tasks)"]
        );
    }

    #[test]
    fn auto_must_pick_the_best_backend_that_loads() {
        let ok = ["test alpha ... ok", "test beta ... ok"];
        let text = console(&watch_run("fentry", &ok, 0), &watch_run("tracepoint", &ok, 0))
            .replace(r#""backend":"fentry""#, r#""backend":"tracepoint""#);
        assert_eq!(problems(&KERNEL, &parse(&text)), ["auto picked tracepoint, but fentry loads"]);
    }

    #[test]
    fn ignored_and_unrecognised_lines() {
        assert_eq!(test_line("test a ... ignored, slow"), Some(("a", Outcome::Ignored)));
        assert_eq!(test_line("test result: ok. 1 passed"), None);
        // A result that something else wrote over is not a pass.
        assert_eq!(test_line("test a ... [  12.5] random: crng init done"), None);
    }
}

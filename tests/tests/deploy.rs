//! What ships for deployment is valid as users will apply it: the Kubernetes manifests against
//! the Kubernetes API schemas (offline, with PyPI's kubernetes-validate), and the settings they
//! give the agent are ones the agent has.
use std::{path::PathBuf, process::Command};

use observer_tests::{observer_bin, podman::DAEMONSET_CAPABILITIES};

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let dir = deploy_dir().join("kubernetes");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no manifests in {}", dir.display());
    found
}

/// (passed, what the validator said)
fn validate(manifest: &std::path::Path) -> (bool, String) {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(manifest)
        .output()
        .expect("python3 with kubernetes-validate (cargo xtask test installs it from PyPI)");
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), said)
}

#[test]
fn manifests_pass_the_kubernetes_schemas_strictly() {
    for manifest in manifests() {
        let (ok, said) = validate(&manifest);
        assert!(ok, "{}: {said}", manifest.display());
    }
    // The validator really checks: a misspelled field fails it.
    let original = std::fs::read_to_string(&manifests()[0]).unwrap();
    let broken = original.replacen("containers:", "contianers:", 1);
    let copy = std::env::temp_dir().join(format!("observer-broken-{}.yaml", std::process::id()));
    std::fs::write(&copy, broken).unwrap();
    let (ok, said) = validate(&copy);
    let _ = std::fs::remove_file(&copy);
    assert!(!ok, "a misspelled field passed: {said}");
}

#[test]
fn manifests_configure_only_variables_the_agent_has() {
    let help = Command::new(observer_bin()).args(["watch", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for manifest in manifests() {
        let text = std::fs::read_to_string(&manifest).unwrap();
        // Environment variables (upper case), not containers, ports or volumes: OBSERVER_*
        // and the Downward API's NODE_NAME, POD_NAME and POD_NAMESPACE alike.
        let names = text
            .lines()
            .filter_map(|l| l.trim().trim_start_matches('#').trim().strip_prefix("- name: "))
            .filter(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        for name in names {
            assert!(
                help.contains(&format!("[env: {name}=")),
                "{}: {name} is no flag's",
                manifest.display()
            );
        }
    }
}

#[test]
fn the_sidecar_gets_the_capabilities_the_podman_tests_prove_enough() {
    let text = std::fs::read_to_string(deploy_dir().join("kubernetes/sidecar.yaml")).unwrap();
    assert!(text.contains(r#"drop: ["ALL"]"#), "all capabilities dropped first");
    assert!(text.contains(r#"add: ["BPF", "PERFMON", "SYS_PTRACE", "NET_ADMIN"]"#));
    assert!(text.contains("type: Localhost"), "observer's seccomp profile, not the runtime's");
    assert!(deploy_dir().join("seccomp.json").exists());
}

#[test]
fn the_daemonset_gets_what_the_node_tests_prove_enough() {
    let text = std::fs::read_to_string(deploy_dir().join("kubernetes/daemonset.yaml")).unwrap();
    let quoted: Vec<String> = DAEMONSET_CAPABILITIES.iter().map(|c| format!("\"{c}\"")).collect();
    assert!(text.contains(r#"drop: ["ALL"]"#), "all capabilities dropped first");
    assert!(text.contains(&format!("add: [{}]", quoted.join(", "))));
    assert!(text.contains("type: Localhost"), "observer's seccomp profile, not the runtime's");
    assert!(text.contains("hostPID: true"), "the node's processes, for their namespaces");
    assert!(!text.contains("hostNetwork: true"), "every namespace is reached through /proc");
    assert!(!text.contains("privileged: true"));
    // The one host path: the pod logs, read only.
    assert_eq!(text.matches("hostPath:").count(), 1);
    assert!(text.contains("path: /var/log/pods"));
    assert!(text.contains("mountPath: /var/log/pods\n              readOnly: true"));
    for wanted in ["OBSERVER_ALL_NAMESPACES", "OBSERVER_METRICS_ADDR", "NODE_NAME", "/healthz"] {
        assert!(text.contains(wanted), "{wanted}");
    }
}

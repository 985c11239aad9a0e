//! `floodwall check`: the shipped policies validate; broken files list every
//! error with its position.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::common::*;

async fn check(files: &[PathBuf], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.arg("check").args(files).kill_on_drop(true);
    // Only what the test gives: secrets from the developer's shell must not leak in.
    for var in ["FLOODWALL_ADMIN_TOKEN", "REDIS_URL"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .expect("check finishes within 10s")
        .expect("run floodwall check")
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_policy_and_example_passes_check() {
    let mut files = yaml_files("policies");
    files.extend(yaml_files("examples"));
    assert!(files.len() >= 2, "found {files:?}");
    // Secrets named by `*_env` are unset here, as in CI: check notes them
    // and still passes (only `run` needs them).
    let out = check(&files, &[]).await;
    assert!(
        out.status.success(),
        "check failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for f in &files {
        assert!(
            stdout.contains(&format!("{}: ok", f.display())),
            "{} not reported ok:\n{stdout}",
            f.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_with_three_errors_lists_all_three_with_positions() {
    let dir = TempDir::new("check");
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        r#"version: 1
server:
  listen: ["127.0.0.1:0"]
  threads: 0
backends:
  main:
    endpoints: ["http://127.0.0.1:1"]
    timeouts: { connect: banana }
routes:
  - name: chat
    match: { path_prefix: /v1/ }
    backend: mian
"#,
    )
    .unwrap();
    let out = check(std::slice::from_ref(&file), &[]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("{}:", file.display());
    let errors: Vec<(usize, usize, &str)> = stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (line, rest) = rest.split_once(':')?;
            let (col, rest) = rest.split_once(' ')?;
            Some((line.parse().ok()?, col.parse().ok()?, rest))
        })
        .collect();
    assert_eq!(
        errors.len(),
        3,
        "expected three `file:line:column` errors:\n{stderr}"
    );
    let lines: Vec<usize> = errors.iter().map(|e| e.0).collect();
    assert_eq!(lines, [4, 8, 12], "{stderr}");
    assert!(errors.iter().all(|e| e.1 > 0));
    assert!(errors[0].2.starts_with("server.threads:"), "{stderr}");
    assert!(
        errors[1].2.starts_with("backends.main.timeouts.connect:"),
        "{stderr}"
    );
    assert!(errors[2].2.starts_with("routes[0].backend:"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_field_gets_a_did_you_mean_hint() {
    let dir = TempDir::new("check");
    let file = dir.path().join("typo.yaml");
    std::fs::write(
        &file,
        "version: 1\nbackends:\n  main:\n    endpoints: [\"http://127.0.0.1:1\"]\nroutes:\n  - name: chat\n    match: { path_prefix: /v1/ }\n    rewirte: { strip_prefix: /v1 }\n    backend: main\n",
    )
    .unwrap();
    let out = check(std::slice::from_ref(&file), &[]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:8:5 routes[0].rewirte:", file.display())),
        "position and path:\n{stderr}"
    );
    assert!(stderr.contains("did you mean `rewrite`"), "{stderr}");
}

//! Live reload: watch the policy file, recompile it, swap it in atomically.
//!
//! The watcher follows the file's directory, not the file, so atomic renames
//! (`mv new.yaml policy.yaml`) and Kubernetes ConfigMap symlink swaps
//! (`..data` re-pointed) are both seen. Events are debounced; then the file
//! is read and hashed, and an unchanged hash is ignored. SIGHUP forces a
//! reload. A file that does not compile leaves the old snapshot in place; the
//! errors are logged with their locations and counted in
//! `floodwall_config_reloads_total{result="error"}`.
//!
//! Requests already running keep the `Arc` of the snapshot they started on,
//! so they finish under the old rules.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tracing::{error, info, warn};

use crate::config;
use crate::state::{Active, Shared};

/// Quiet time after the last file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Unchanged,
    Applied { hash: String },
    Failed { errors: usize },
}

pub struct Reloader {
    shared: Arc<Shared>,
    path: PathBuf,
    /// Hash of the last file that failed to compile: the same bytes are not
    /// recompiled (and not counted again) until they change or SIGHUP.
    last_failed: std::sync::Mutex<Option<String>>,
}

impl Reloader {
    pub fn new(shared: Arc<Shared>, path: PathBuf) -> Self {
        Reloader {
            shared,
            path,
            last_failed: std::sync::Mutex::new(None),
        }
    }

    fn remember_failure(&self, hash: Option<String>) {
        if let Ok(mut g) = self.last_failed.lock() {
            *g = hash;
        }
    }

    /// Recompile the file and swap it in if it compiles. `force` reloads even
    /// when the file's hash is unchanged (SIGHUP: env-held secrets may have changed).
    pub fn reload(&self, force: bool) -> ReloadOutcome {
        let current = self.shared.snapshot();
        // Hash the bytes first: unchanged files and known-bad files are skipped.
        let file_hash = std::fs::read(&self.path)
            .ok()
            .map(|b| config::sha256_hex(&b));
        if !force {
            if file_hash.as_deref() == Some(current.source.hash.as_str()) {
                return ReloadOutcome::Unchanged;
            }
            let known_bad = self
                .last_failed
                .lock()
                .map(|g| g.is_some() && *g == file_hash)
                .unwrap_or(false);
            if known_bad {
                return ReloadOutcome::Unchanged;
            }
        }
        let snapshot = match config::load_file(&self.path) {
            Ok(s) => s,
            Err(errors) => {
                self.remember_failure(file_hash);
                for e in &errors.0 {
                    error!(target: "config", "{e}");
                }
                error!(
                    target: "config",
                    file = %self.path.display(),
                    errors = errors.0.len(),
                    "policy reload failed; still serving the previous policy (hash {})",
                    current.source.hash
                );
                self.shared.metrics.config_reloaded(false, None);
                return ReloadOutcome::Failed {
                    errors: errors.0.len(),
                };
            }
        };
        if !force && snapshot.source.hash == current.source.hash {
            return ReloadOutcome::Unchanged;
        }
        for field in config::restart_required(&current, &snapshot) {
            warn!(target: "config", field, "changed in the policy file, but only takes effect after a restart");
        }
        let hash = snapshot.source.hash.clone();
        match Active::try_build_with(
            snapshot,
            &self.shared.resilience,
            Some(&self.shared.admission),
        ) {
            Ok(active) => {
                self.remember_failure(None);
                self.shared.config.store(Arc::new(active));
                self.shared.metrics.config_reloaded(true, Some(&hash));
                info!(target: "config", file = %self.path.display(), hash = %hash, "policy reloaded");
                ReloadOutcome::Applied { hash }
            }
            Err(e) => {
                self.remember_failure(Some(hash));
                error!(target: "config", file = %self.path.display(), "policy reload failed: {e}");
                self.shared.metrics.config_reloaded(false, None);
                ReloadOutcome::Failed { errors: 1 }
            }
        }
    }

    async fn reload_blocking(self: &Arc<Self>, force: bool) -> ReloadOutcome {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.reload(force))
            .await
            .unwrap_or(ReloadOutcome::Failed { errors: 1 })
    }
}

/// The directories to watch: the file's own, and its symlink target's.
fn watch_dirs(path: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    dirs.push(parent(path));
    if let Ok(real) = std::fs::canonicalize(path) {
        let d = parent(&real);
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// File names in the watched directories whose changes can change the
/// policy: the file itself, its symlink target, and Kubernetes' `..data`
/// style entries (any name starting with `..`).
fn watched_names(path: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<std::ffi::OsString> = path
        .file_name()
        .map(|n| n.to_os_string())
        .into_iter()
        .collect();
    if let Some(n) = std::fs::canonicalize(path)
        .ok()
        .and_then(|r| r.file_name().map(|n| n.to_os_string()))
    {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

fn is_relevant(p: &Path, names: &[std::ffi::OsString]) -> bool {
    match p.file_name() {
        Some(n) => names.iter().any(|x| x == n) || n.to_string_lossy().starts_with(".."),
        None => true,
    }
}

/// The Pingora background service that runs the watcher and the SIGHUP handler.
pub struct ReloadService(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let reloader = self.0.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let names = watched_names(&reloader.path);
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if ev.paths.iter().any(|p| is_relevant(p, &names)) {
                    let _ = tx.send(());
                }
            }
        });
        let _watcher = match watcher {
            Ok(mut w) => {
                use notify::Watcher;
                for d in watch_dirs(&reloader.path) {
                    if let Err(e) = w.watch(&d, notify::RecursiveMode::NonRecursive) {
                        warn!(target: "config", dir = %d.display(), "cannot watch for policy changes: {e}; SIGHUP still reloads");
                    }
                }
                Some(w)
            }
            Err(e) => {
                warn!(target: "config", "file watching unavailable: {e}; SIGHUP still reloads");
                None
            }
        };
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(target: "config", "cannot listen for SIGHUP: {e}");
                None
            }
        };
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    if ev.is_none() { break; }
                    // Debounce: wait until the directory has been quiet for a moment.
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                    reloader.reload_blocking(false).await;
                }
                _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                    info!(target: "config", "SIGHUP: reloading the policy");
                    reloader.reload_blocking(true).await;
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}

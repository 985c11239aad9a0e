//! The policy file: reading it, validating it, and the compiled snapshot.
//!
//! A policy file goes through three steps, one module each:
//! 1. [`yaml`] parses the text into a tree that keeps every node's
//!    line and column;
//! 2. [`compile`] walks that tree section by section with the collecting
//!    reader in [`decode`] (units in [`units`], addresses in [`net`]);
//! 3. the result is a [`Snapshot`] (types in [`model`]), the only form of
//!    the policy that the rest of floodwall ever sees.
//!
//! Errors are never reported one at a time: [`compile_str`] returns every
//! problem in the file at once, sorted by position, each formatted as
//! `file:line:column path: message` so editors and CI logs can jump to it.
//!
//! The snapshot records the file's SHA-256 and load time for `/admin/status`;
//! [`restart_required`] tells the reloader which changed settings cannot be
//! applied live.

pub mod admission;
pub mod cache;
pub mod compile;
pub mod decode;
pub mod limits;
pub mod model;
pub mod net;
pub mod resilience;
pub mod units;
pub mod yaml;

pub use compile::NOT_SUPPORTED_YET;
pub use model::*;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as given, or a label such as `<demo>`.
    pub file: String,
    /// 1-based; 0 when the problem is with the file as a whole (unreadable).
    pub line: usize,
    /// 1-based; 0 with `line` 0.
    pub column: usize,
    /// Field path such as `routes[0].request.max_messages`; empty for YAML
    /// syntax errors and file-level problems.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `policies/prod.yaml:14:9 routes[0].request.max_messages: must be 1..=100000 (was 0)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.path.is_empty()) {
            (0, true) => write!(f, "{}: {}", self.file, self.message),
            (0, false) => write!(f, "{}: {}: {}", self.file, self.path, self.message),
            (_, true) => write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            ),
            (_, false) => write!(
                f,
                "{}:{}:{} {}: {}",
                self.file, self.line, self.column, self.path, self.message
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a policy file, sorted by position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    /// One error per line, no trailing newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        ConfigErrors(vec![error])
    }
}

/// Reads and compiles a policy file. Environment variables named by
/// `*_env` fields are read from the process environment.
pub fn load_file(path: &Path) -> Result<Snapshot, ConfigErrors> {
    load_file_with_env(path, &|name| std::env::var(name).ok())
}

/// [`load_file`] with an injected environment lookup.
pub fn load_file_with_env(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Snapshot, ConfigErrors> {
    let label = path.display().to_string();
    let file_error = |message: String| ConfigError {
        file: label.clone(),
        line: 0,
        column: 0,
        path: String::new(),
        message,
    };
    let bytes =
        std::fs::read(path).map_err(|e| file_error(format!("cannot read the policy file: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        file_error(format!(
            "the policy file is not valid UTF-8 (first bad byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    compile_str_with_env(&text, &label, env)
}

/// Compiles policy text. `file_label` is used in error messages and as
/// `source.path`.
pub fn compile_str(text: &str, file_label: &str) -> Result<Snapshot, ConfigErrors> {
    compile_str_with_env(text, file_label, &|name| std::env::var(name).ok())
}

/// [`compile_str`] with an explicit environment lookup, for tests and for
/// callers that supply secrets themselves.
pub fn compile_str_with_env(
    text: &str,
    file_label: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Snapshot, ConfigErrors> {
    let ctx = decode::Ctx::new(file_label, NOT_SUPPORTED_YET);
    let parsed = yaml::parse(text);
    for e in &parsed.errors {
        ctx.error(e.line, e.col, "", e.message.clone());
    }
    let source = SourceInfo {
        path: PathBuf::from(file_label),
        hash: sha256_hex(text.as_bytes()),
        loaded_at: SystemTime::now(),
    };
    let snapshot = parsed
        .root
        .as_ref()
        .and_then(|root| compile::compile(root, &ctx, env, source));
    match snapshot {
        Some(snapshot) if !ctx.has_errors() => Ok(snapshot),
        _ => {
            let mut errors = ctx.into_errors();
            if errors.is_empty() {
                // Unreachable by construction; never return an empty error list.
                errors.push(ConfigError {
                    file: file_label.to_string(),
                    line: 0,
                    column: 0,
                    path: String::new(),
                    message: "the policy could not be compiled".to_string(),
                });
            }
            Err(ConfigErrors(errors))
        }
    }
}

/// Hex SHA-256, as used for `source.hash`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `floodwall check FILE...`: prints `FILE: ok` (stdout) or every error
/// (stderr) for each file, then a summary line. True when all are valid.
pub fn check_files(paths: &[PathBuf]) -> bool {
    let mut failed = 0usize;
    let mut error_count = 0usize;
    for path in paths {
        // `check` validates the file, not the machine it runs on: a secret
        // held in an unset environment variable is noted, not an error
        // (`run` refuses to start without it).
        let unset = std::cell::RefCell::new(Vec::<String>::new());
        let env = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| {
                    unset.borrow_mut().push(name.to_string());
                    // Valid wherever a secret may stand (a token, a redis:// URL).
                    Some("redis://env-unset.invalid:6379/0".to_string())
                })
        };
        let result = load_file_with_env(path, &env);
        for name in unset.borrow().iter() {
            eprintln!(
                "{}: note: environment variable {name} is not set here; `floodwall run` needs it",
                path.display()
            );
        }
        match result {
            Ok(_) => println!("{}: ok", path.display()),
            Err(errors) => {
                failed += 1;
                error_count += errors.len();
                eprintln!("{errors}");
            }
        }
    }
    let files = |n: usize| if n == 1 { "file" } else { "files" };
    if failed == 0 {
        println!("{} {} checked, all valid", paths.len(), files(paths.len()));
        true
    } else {
        eprintln!(
            "{} {} checked, {failed} invalid ({error_count} {})",
            paths.len(),
            files(paths.len()),
            if error_count == 1 { "error" } else { "errors" }
        );
        false
    }
}

/// The settings that differ between `old` and `new` and only take effect
/// after a restart (listeners, worker threads, shutdown grace period, the
/// Redis store and the cache's tier sizes), by
/// their policy path, for the reload log.
pub fn restart_required(old: &Snapshot, new: &Snapshot) -> Vec<String> {
    let mut changed = Vec::new();
    if old.server.listen != new.server.listen {
        changed.push("server.listen".to_string());
    }
    if old.server.admin.listen != new.server.admin.listen {
        changed.push("server.admin.listen".to_string());
    }
    if old.server.threads != new.server.threads {
        changed.push("server.threads".to_string());
    }
    // Handed to Pingora's server configuration once, at start-up.
    if old.server.grace_period != new.server.grace_period {
        changed.push("server.grace_period".to_string());
    }
    // The Redis client and the cache's tiers are built once, at start-up.
    let redis = |s: &Snapshot| {
        s.store.as_ref().map(|st| {
            let r = &st.redis;
            (
                r.url.clone(),
                r.key_prefix.clone(),
                r.timeout,
                r.expected_replicas,
            )
        })
    };
    if redis(old) != redis(new) {
        changed.push("store.redis".to_string());
    }
    if old.cache_store != new.cache_store {
        changed.push("store.cache".to_string());
    }
    changed
}

#[cfg(test)]
mod tests;

//! What the mock saw: connections, requests, per-scenario attempts and client
//! disconnects. Kept behind one mutex; [`MockStats`] is a cloned snapshot.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;

/// At most this many attempts are recorded per scenario (the counter keeps
/// counting past it).
pub const MAX_ATTEMPTS_PER_SCENARIO: usize = 10_000;
/// At most this many scenarios; later ones share the `_overflow` bucket.
pub const MAX_SCENARIOS: usize = 4_096;
/// At most this many disconnect records (top level and per scenario).
pub const MAX_DISCONNECTS: usize = 10_000;
const OVERFLOW_SCENARIO: &str = "_overflow";

/// A snapshot of the mock's counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MockStats {
    /// `MockOptions::name`.
    pub name: String,
    pub connections_accepted: u64,
    /// A gauge: not cleared by a reset.
    pub connections_open: u64,
    /// Requests answered or refused, not counting the `/mock/*` control endpoints.
    pub requests: u64,
    pub scenarios: BTreeMap<String, ScenarioStats>,
    /// Every client disconnect seen while streaming, hanging or waiting.
    pub disconnects: Vec<Disconnect>,
}

impl MockStats {
    /// The attempts of one scenario (empty when it never ran).
    pub fn attempts(&self, scenario: &str) -> &[Attempt] {
        self.scenarios
            .get(scenario)
            .map(|s| s.attempts.as_slice())
            .unwrap_or(&[])
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ScenarioStats {
    /// Attempts seen (the counter `fail=` and `reset=` use); may exceed
    /// `attempts.len()` once the record is full.
    pub attempt_count: u64,
    pub attempts: Vec<Attempt>,
    /// `at_ms` of each client disconnect in this scenario.
    pub client_disconnects: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Attempt {
    /// Milliseconds since the mock started.
    pub at_ms: f64,
    pub connection_id: u64,
    /// 0 for the first request on the connection; > 0 proves reuse.
    pub request_on_connection: u64,
    pub method: String,
    /// Path with query.
    pub path: String,
    /// Status sent, 0 when none was (reset, hang, disconnected before headers).
    pub status: u16,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Serialize)]
pub struct Disconnect {
    pub at_ms: f64,
    pub scenario: String,
    pub path: String,
}

/// How an attempt ended. Serialises as the lower-case name; compares equal to
/// that string (`attempt.outcome == "ok"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Still running (transient; e.g. during `latency`).
    Pending,
    Ok,
    Failed,
    Reset,
    Hang,
    Cut,
    Stalled,
    Disconnected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Reset => "reset",
            Outcome::Hang => "hang",
            Outcome::Cut => "cut",
            Outcome::Stalled => "stalled",
            Outcome::Disconnected => "disconnected",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for Outcome {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Outcome {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Points at one recorded attempt so it can be finished later.
pub(crate) struct AttemptRef {
    epoch: u64,
    pub(crate) scenario: String,
    index: Option<usize>,
}

struct Inner {
    stats: MockStats,
    /// Bumped by every reset, so late updates of pre-reset attempts are dropped.
    epoch: u64,
}

pub(crate) struct StatsStore {
    started: Instant,
    inner: Mutex<Inner>,
}

impl StatsStore {
    pub(crate) fn new(name: String) -> Self {
        StatsStore {
            started: Instant::now(),
            inner: Mutex::new(Inner {
                stats: MockStats {
                    name,
                    ..MockStats::default()
                },
                epoch: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters invalid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn now_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    pub(crate) fn connection_opened(&self) {
        let mut g = self.lock();
        g.stats.connections_accepted += 1;
        g.stats.connections_open += 1;
    }

    pub(crate) fn connection_closed(&self) {
        let mut g = self.lock();
        g.stats.connections_open = g.stats.connections_open.saturating_sub(1);
    }

    pub(crate) fn count_request(&self) {
        self.lock().stats.requests += 1;
    }

    /// Record the start of an attempt; returns its 0-based number within the
    /// scenario (what `fail=`/`reset=` compare against).
    pub(crate) fn begin_attempt(
        &self,
        scenario: &str,
        connection_id: u64,
        request_on_connection: u64,
        method: &str,
        path: &str,
    ) -> (u64, AttemptRef) {
        let at_ms = self.now_ms();
        let mut g = self.lock();
        let epoch = g.epoch;
        let key = bucket(&g.stats, scenario);
        let sc = g.stats.scenarios.entry(key.clone()).or_default();
        let number = sc.attempt_count;
        sc.attempt_count += 1;
        let index = if sc.attempts.len() < MAX_ATTEMPTS_PER_SCENARIO {
            sc.attempts.push(Attempt {
                at_ms,
                connection_id,
                request_on_connection,
                method: method.to_string(),
                path: path.to_string(),
                status: 0,
                outcome: Outcome::Pending,
            });
            Some(sc.attempts.len() - 1)
        } else {
            None
        };
        (
            number,
            AttemptRef {
                epoch,
                scenario: key,
                index,
            },
        )
    }

    pub(crate) fn finish(&self, r: &AttemptRef, status: u16, outcome: Outcome) {
        let mut g = self.lock();
        if g.epoch != r.epoch {
            return;
        }
        let Some(i) = r.index else { return };
        if let Some(a) = g
            .stats
            .scenarios
            .get_mut(&r.scenario)
            .and_then(|s| s.attempts.get_mut(i))
        {
            a.status = status;
            a.outcome = outcome;
        }
    }

    pub(crate) fn client_disconnect(&self, r: &AttemptRef, path: &str) {
        let at_ms = self.now_ms();
        let mut g = self.lock();
        let key = bucket(&g.stats, &r.scenario);
        let sc = g.stats.scenarios.entry(key).or_default();
        if sc.client_disconnects.len() < MAX_DISCONNECTS {
            sc.client_disconnects.push(at_ms);
        }
        if g.stats.disconnects.len() < MAX_DISCONNECTS {
            g.stats.disconnects.push(Disconnect {
                at_ms,
                scenario: r.scenario.clone(),
                path: path.to_string(),
            });
        }
    }

    pub(crate) fn snapshot(&self) -> MockStats {
        self.lock().stats.clone()
    }

    pub(crate) fn reset(&self) {
        let mut g = self.lock();
        g.epoch += 1;
        let s = &mut g.stats;
        s.connections_accepted = 0;
        s.requests = 0;
        s.scenarios.clear();
        s.disconnects.clear();
    }
}

fn bucket(stats: &MockStats, scenario: &str) -> String {
    if stats.scenarios.contains_key(scenario) || stats.scenarios.len() < MAX_SCENARIOS {
        scenario.to_string()
    } else {
        OVERFLOW_SCENARIO.to_string()
    }
}

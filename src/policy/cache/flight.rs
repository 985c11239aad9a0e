//! Request collapsing: concurrent identical misses make one upstream call.
//!
//! The first miss for a key becomes the [`Leader`]; later ones, while the
//! leader runs, become [`Follower`]s. The leader publishes the response
//! header it is about to send and then every body chunk as it arrives;
//! followers replay what was published so far and then tail it, so a
//! follower of a stream receives each event as soon as the leader does.
//!
//! - The leader publishes only a response it may store (200, not
//!   `no-store`); anything else, or a leader that ends without publishing
//!   (refused by a limit, client gone, upstream down), *fails* the flight:
//!   followers waiting for the header then retry as the route's
//!   `on_leader_failure` says (one takes over, or each goes alone).
//! - A flight that fails after its header was published (the upstream broke
//!   mid-stream) ends every follower's response the same way the leader's
//!   ends: cut, with no terminator.
//! - A [`Leader`] dropped without [`Leader::complete`] fails the flight
//!   (RAII), so a cancelled request can never leave followers waiting; their
//!   wait for the header is bounded by `lock_timeout` anyway.
//! - This collapses misses within one instance. Replicas sharing Redis each
//!   make at most one call per key at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

/// The response header a leader publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub sse: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    Failed,
}

#[derive(Default)]
struct State {
    head: Option<Arc<Head>>,
    chunks: Vec<Bytes>,
    end: Option<End>,
}

pub struct Flight {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Flight {
    fn new() -> Flight {
        Flight {
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.send_modify(|v| *v += 1);
    }
}

type Map = Arc<Mutex<HashMap<String, Weak<Flight>>>>;

/// The flights in progress, by cache key.
#[derive(Default, Clone)]
pub struct Flights {
    map: Map,
}

/// The result of [`Flights::join`].
pub enum Join {
    Leader(Leader),
    Follower(Follower),
}

impl Flights {
    pub fn new() -> Flights {
        Flights::default()
    }

    /// Lead a new flight for `key`, or follow the one in progress.
    pub fn join(&self, key: &str) -> Join {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(key).and_then(Weak::upgrade) {
            if f.lock().end != Some(End::Failed) {
                let rx = f.changed.subscribe();
                return Join::Follower(Follower {
                    flight: f,
                    next: 0,
                    rx,
                });
            }
        }
        // Forget flights nobody holds any more while we are here.
        if map.len() > 64 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let flight = Arc::new(Flight::new());
        map.insert(key.to_string(), Arc::downgrade(&flight));
        Join::Leader(Leader {
            flight,
            key: key.to_string(),
            map: self.map.clone(),
            done: false,
        })
    }

    /// Flights in progress (for tests and status).
    pub fn len(&self) -> usize {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|w| w.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The one request of a flight that goes upstream.
#[must_use = "dropping the leader fails the flight"]
pub struct Leader {
    flight: Arc<Flight>,
    key: String,
    map: Map,
    done: bool,
}

impl Leader {
    /// The response is storable: followers may start sending it.
    pub fn publish_head(&self, head: Head) {
        self.flight.update(|s| s.head = Some(Arc::new(head)));
    }

    pub fn push(&self, chunk: Bytes) {
        self.flight.update(|s| s.chunks.push(chunk));
    }

    /// The response ended as it should. The flight stays joinable (new
    /// followers replay it whole) until the leader is dropped, which the
    /// caller does once the entry is stored.
    pub fn complete(&mut self) {
        self.done = true;
        self.flight.update(|s| s.end = Some(End::Complete));
    }

    /// The leader produced nothing followers can use (or was cut).
    pub fn fail(mut self) {
        self.fail_now();
    }

    /// Whether the header was published.
    pub fn published(&self) -> bool {
        self.flight.lock().head.is_some()
    }

    fn fail_now(&mut self) {
        if !self.done {
            self.done = true;
            self.flight.update(|s| s.end = Some(End::Failed));
        }
        self.forget();
    }

    fn forget(&self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.flight)))
        {
            map.remove(&self.key);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.fail_now();
    }
}

/// What a follower waited for.
#[derive(Debug)]
pub enum HeadWait {
    Head(Arc<Head>),
    /// The leader failed before publishing a header.
    Failed,
    /// No header within the lock timeout.
    TimedOut,
}

/// The next piece of a followed response.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Chunk(Bytes),
    /// The response is complete.
    End,
    /// The leader's response was cut after its header.
    Cut,
}

pub struct Follower {
    flight: Arc<Flight>,
    next: usize,
    rx: watch::Receiver<u64>,
}

impl Follower {
    /// Wait for the leader's header, at most `limit`.
    pub async fn head(&mut self, limit: Duration) -> HeadWait {
        let wait = async {
            loop {
                self.rx.borrow_and_update();
                {
                    let s = self.flight.lock();
                    if let Some(h) = &s.head {
                        return HeadWait::Head(h.clone());
                    }
                    if s.end.is_some() {
                        return HeadWait::Failed;
                    }
                }
                if self.rx.changed().await.is_err() {
                    return HeadWait::Failed;
                }
            }
        };
        tokio::time::timeout(limit, wait)
            .await
            .unwrap_or(HeadWait::TimedOut)
    }

    /// The next chunk after the ones already returned.
    pub async fn next(&mut self) -> Next {
        loop {
            self.rx.borrow_and_update();
            {
                let s = self.flight.lock();
                if let Some(c) = s.chunks.get(self.next) {
                    self.next += 1;
                    return Next::Chunk(c.clone());
                }
                match s.end {
                    Some(End::Complete) => return Next::End,
                    Some(End::Failed) => return Next::Cut,
                    None => {}
                }
            }
            if self.rx.changed().await.is_err() {
                return Next::Cut;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> Head {
        Head {
            status: 200,
            headers: vec![("content-type".into(), b"text/event-stream".to_vec())],
            sse: true,
        }
    }

    fn leader(j: Join) -> Leader {
        match j {
            Join::Leader(l) => l,
            Join::Follower(_) => panic!("expected to lead"),
        }
    }

    fn follower(j: Join) -> Follower {
        match j {
            Join::Follower(f) => f,
            Join::Leader(_) => panic!("expected to follow"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn followers_tail_the_leader_chunk_by_chunk() {
        let flights = Flights::new();
        let mut l = leader(flights.join("k"));
        let mut f = follower(flights.join("k"));
        let mut g = follower(flights.join("k"));
        assert_eq!(flights.len(), 1);
        l.publish_head(head());
        assert!(matches!(
            f.head(Duration::from_secs(1)).await,
            HeadWait::Head(_)
        ));
        l.push(Bytes::from_static(b"a"));
        // The follower gets the first chunk before the leader goes on.
        assert_eq!(f.next().await, Next::Chunk(Bytes::from_static(b"a")));
        let pending = tokio::time::timeout(Duration::from_millis(10), f.next()).await;
        assert!(pending.is_err(), "nothing more published yet");
        l.push(Bytes::from_static(b"b"));
        l.complete();
        assert_eq!(f.next().await, Next::Chunk(Bytes::from_static(b"b")));
        assert_eq!(f.next().await, Next::End);
        // A late follower replays the whole response.
        assert!(matches!(
            g.head(Duration::from_secs(1)).await,
            HeadWait::Head(_)
        ));
        assert_eq!(g.next().await, Next::Chunk(Bytes::from_static(b"a")));
        assert_eq!(g.next().await, Next::Chunk(Bytes::from_static(b"b")));
        assert_eq!(g.next().await, Next::End);
        let mut late = follower(flights.join("k"));
        assert!(matches!(
            late.head(Duration::from_secs(1)).await,
            HeadWait::Head(_)
        ));
        drop(l);
        // Once the leader is gone the key is free again.
        drop((f, g, late));
        assert!(matches!(flights.join("k"), Join::Leader(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_dropped_before_its_header_fails_the_flight_and_frees_the_key() {
        let flights = Flights::new();
        let l = leader(flights.join("k"));
        let mut f = follower(flights.join("k"));
        let waiter = tokio::spawn(async move { f.head(Duration::from_secs(30)).await });
        tokio::task::yield_now().await;
        drop(l);
        assert!(matches!(waiter.await.unwrap(), HeadWait::Failed));
        // Takeover: the next join leads a new flight.
        let _l2 = leader(flights.join("k"));
        assert!(matches!(flights.join("k"), Join::Follower(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_after_the_header_cuts_the_followers() {
        let flights = Flights::new();
        let l = leader(flights.join("k"));
        let mut f = follower(flights.join("k"));
        l.publish_head(head());
        l.push(Bytes::from_static(b"a"));
        l.fail();
        assert!(matches!(
            f.head(Duration::from_secs(1)).await,
            HeadWait::Head(_)
        ));
        assert_eq!(f.next().await, Next::Chunk(Bytes::from_static(b"a")));
        assert_eq!(f.next().await, Next::Cut);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_for_a_header_is_bounded() {
        let flights = Flights::new();
        let _l = leader(flights.join("k"));
        let mut f = follower(flights.join("k"));
        let started = tokio::time::Instant::now();
        assert!(matches!(
            f.head(Duration::from_secs(5)).await,
            HeadWait::TimedOut
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn different_keys_do_not_collapse() {
        let flights = Flights::new();
        let _a = leader(flights.join("a"));
        let _b = leader(flights.join("b"));
        assert_eq!(flights.len(), 2);
    }
}

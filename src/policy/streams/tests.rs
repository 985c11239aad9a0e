use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;

fn route(max: Option<u32>, per_identity: Option<u32>, cap: &StreamCap) -> StreamLimiter {
    StreamLimiter::new(
        StreamsConfig {
            max_concurrent: max,
            per_identity,
            max_duration: Some(Duration::from_secs(600)),
        },
        cap.clone(),
    )
}

#[test]
fn a_third_stream_per_user_is_refused_until_one_ends() {
    let cap = StreamCap::default();
    let chat = route(None, Some(2), &cap);
    let a = chat.try_acquire(Some("alice")).unwrap();
    let _b = chat.try_acquire(Some("alice")).unwrap();
    let refused = chat.try_acquire(Some("alice")).unwrap_err();
    assert_eq!(
        refused,
        StreamLimited {
            scope: StreamScope::Identity,
            limit: 2,
            retry_after: Duration::from_secs(1),
        }
    );
    let _bob = chat.try_acquire(Some("bob")).unwrap();
    drop(a);
    let _c = chat.try_acquire(Some("alice")).unwrap();
    assert_eq!(chat.stats().rejected_identity, 1);
    assert_eq!(chat.max_duration(), Some(Duration::from_secs(600)));
}

#[test]
fn route_and_instance_caps_and_gauges_return_to_zero() {
    let cap = StreamCap::new(ServerStreamsConfig {
        max_concurrent: Some(3),
    });
    let chat = route(Some(2), None, &cap);
    let rag = route(None, None, &cap);
    let s1 = chat.try_acquire(None).unwrap();
    let s2 = chat.try_acquire(Some("x")).unwrap();
    let refused = chat.try_acquire(None).unwrap_err();
    assert_eq!((refused.scope, refused.limit), (StreamScope::Route, 2));
    let s3 = rag.try_acquire(None).unwrap();
    let refused = rag.try_acquire(None).unwrap_err();
    assert_eq!((refused.scope, refused.limit), (StreamScope::Instance, 3));
    assert_eq!((chat.active(), rag.active(), cap.active()), (2, 1, 3));
    drop((s1, s2, s3));
    assert_eq!((chat.active(), rag.active(), cap.active()), (0, 0, 0));
    let stats = chat.stats();
    assert_eq!(
        (stats.admitted, stats.rejected_route, stats.identities),
        (2, 1, 0)
    );
    assert_eq!(rag.stats().rejected_instance, 1);
}

#[test]
fn a_refused_stream_takes_nothing() {
    let cap = StreamCap::new(ServerStreamsConfig {
        max_concurrent: Some(1),
    });
    let chat = route(Some(5), Some(5), &cap);
    let held = route(None, None, &cap).try_acquire(None).unwrap();
    assert_eq!(
        chat.try_acquire(Some("alice")).unwrap_err().scope,
        StreamScope::Instance
    );
    let stats = chat.stats();
    assert_eq!((stats.active, stats.identities), (0, 0));
    drop(held);
    assert_eq!(cap.active(), 0);
}

#[test]
fn reconfigure_and_set_max_keep_counts() {
    let cap = StreamCap::default();
    let chat = route(Some(2), None, &cap);
    let a = chat.try_acquire(None).unwrap();
    let b = chat.try_acquire(None).unwrap();
    chat.reconfigure(StreamsConfig {
        max_concurrent: Some(1),
        ..StreamsConfig::default()
    });
    cap.set_max(Some(10));
    assert_eq!(chat.active(), 2);
    assert!(chat.try_acquire(None).is_err());
    drop(a);
    assert!(chat.try_acquire(None).is_err());
    drop(b);
    let _c = chat.try_acquire(None).unwrap();
    cap.set_max(None);
    assert_eq!(cap.max(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_are_exact_under_1000_concurrent_streams() {
    let cap = StreamCap::new(ServerStreamsConfig {
        max_concurrent: Some(50),
    });
    let routes: Vec<StreamLimiter> = (0..3).map(|_| route(Some(30), Some(4), &cap)).collect();
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let (limiter, running, peak) = (routes[i % 3].clone(), running.clone(), peak.clone());
            tokio::spawn(async move {
                let id = format!("user-{}", i % 11);
                match limiter.try_acquire(Some(&id)) {
                    Ok(slot) => {
                        let n = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(n, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        drop(slot);
                        true
                    }
                    Err(_) => false,
                }
            })
        })
        .collect();
    let mut admitted = 0u64;
    for t in tasks {
        admitted += u64::from(t.await.unwrap());
    }
    assert!(peak.load(Ordering::SeqCst) <= 50);
    assert_eq!(cap.active(), 0);
    let mut total = 0;
    for r in &routes {
        let s = r.stats();
        assert_eq!((s.active, s.identities), (0, 0));
        total += s.admitted;
        total += s.rejected_identity + s.rejected_route + s.rejected_instance;
    }
    assert_eq!(total, 1000);
    assert_eq!(
        routes.iter().map(|r| r.stats().admitted).sum::<u64>(),
        admitted
    );
}

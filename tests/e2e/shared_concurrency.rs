//! A concurrency cap held across replicas (`concurrency.shared: true`):
//! two real floodwall processes in front of one mock, sharing a private
//! `redis-server`.
//!
//! Holders are endless mock streams, released by dropping the client's
//! connection; a replica dies by SIGKILL. Every wait is bounded.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::admission::{
    adm_policy, admission, get, hold_stream, join, rejections, requests_active, retry_after,
    route_in_flight, route_status, series, spawn_get, streams_active, wait_admission, ENDLESS,
};
use crate::common::*;

/// `store.redis` for `redis`, with a timeout generous enough for a loaded
/// test machine (a slow answer would count as Redis being away).
fn store(redis: &RedisServer, prefix: &str) -> String {
    format!(
        "store:\n  redis: {{ url: \"{}\", key_prefix: {prefix}, timeout: 1s, expected_replicas: 2 }}\n",
        redis.url()
    )
}

/// Route `agent` with `concurrency` (a YAML flow mapping).
fn agent(concurrency: &str) -> String {
    format!("  - name: agent\n    match: {{ path_prefix: / }}\n    backend: main\n    concurrency: {concurrency}\n")
}

fn shared_slots(state: &str) -> String {
    series(
        "floodwall_route_shared_slots",
        &[("route", "agent"), ("state", state)],
    )
}

/// The `shared` block of `agent` in `/admin/status`.
fn shared(adm: &Value) -> &Value {
    &route_status(adm, "agent")["concurrency"]["shared"]
}

/// Live leases of route `agent` in Redis (expired ones included until the
/// next hold drops them, so callers also compare expiries with `TIME`).
async fn live_leases(redis: &RedisServer, prefix: &str) -> u64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("redis connection in time")
    .unwrap();
    let key = format!("{prefix}:v1:conc:{{agent}}:leases");
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    redis::cmd("ZCOUNT")
        .arg(&key)
        .arg(format!("({now_ms}"))
        .arg("+inf")
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// A request that is refused because the fleet is full.
async fn assert_shed_shared_full(addr: SocketAddr, scenario: &str) {
    let started = Instant::now();
    let r = get(addr, &[("x-mock-fault", &format!("scenario={scenario}"))]).await;
    r.assert_floodwall_error(503, "overloaded");
    assert!(retry_after(&r) >= 1);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("across replicas"),
        "{}",
        r.text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once, took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_redis_run_two_in_total_and_a_third_once_one_ends() {
    let redis = RedisServer::start();
    let mock = start_mock().await;
    let policy = adm_policy(
        &mock,
        &store(&redis, "fw-e2e-conc-a"),
        "",
        // A lease far longer than the test: only releases free places.
        &agent("{ max_in_flight: 2, shared: true, lease: 5m }"),
    );
    let a = Floodwall::start(&policy).await;
    let b = Floodwall::start(&policy).await;

    let h1 = hold_stream(a.addr, "one", ENDLESS).await;
    let h2 = hold_stream(b.addr, "two", ENDLESS).await;
    // Each instance runs one, below its own count of 2, but the fleet is full.
    assert_shed_shared_full(a.addr, "third-a").await;
    assert_shed_shared_full(b.addr, "third-b").await;
    assert!(mock.stats().attempts("third-a").is_empty());
    assert!(mock.stats().attempts("third-b").is_empty());
    assert_eq!(live_leases(&redis, "fw-e2e-conc-a").await, 2);
    for fw in [&a, &b] {
        let m = fw.metrics().await;
        assert_eq!(
            metric(&m, &rejections("agent", "shared_full")),
            Some(1.0),
            "{m}"
        );
        assert_eq!(metric(&m, &shared_slots("leased")), Some(1.0), "{m}");
        let adm = admission(fw).await;
        assert_eq!(shared(&adm)["leased"], 1, "{adm}");
        assert_eq!(shared(&adm)["fleet_in_use"], 2, "{adm}");
        assert_eq!(shared(&adm)["lease_ms"], 300_000, "{adm}");
    }

    // The stream on A ends: its place is back at once (not by expiry), and
    // B may use it.
    drop(h1);
    let r = eventually("B to admit a request", Duration::from_secs(5), || async {
        let r = get(b.addr, &[("x-mock-fault", "scenario=after")]).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(mock.stats().attempts("after").len(), 1);
    eventually(
        "B to give its lease back",
        Duration::from_secs(5),
        || async { (live_leases(&redis, "fw-e2e-conc-a").await == 1).then_some(()) },
    )
    .await;
    // Still two at most: with h2 and another holder on A, B is refused.
    let h3 = hold_stream(a.addr, "three", ENDLESS).await;
    assert_shed_shared_full(b.addr, "fourth").await;
    drop((h2, h3));
    eventually(
        "every lease to be given back",
        Duration::from_secs(5),
        || async { (live_leases(&redis, "fw-e2e-conc-a").await == 0).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_for_a_shared_place_runs_when_one_frees_on_the_other_instance() {
    let redis = RedisServer::start();
    let mock = start_mock().await;
    let policy = adm_policy(
        &mock,
        &store(&redis, "fw-e2e-conc-q"),
        "",
        &agent(
            "{ max_in_flight: 2, shared: true, lease: 2s, queue: { max_depth: 5, max_wait: 10s } }",
        ),
    );
    let a = Floodwall::start(&policy).await;
    let b = Floodwall::start(&policy).await;
    let h1 = hold_stream(a.addr, "one", ENDLESS).await;
    let _h2 = hold_stream(a.addr, "two", ENDLESS).await;

    // B has room of its own, but not across the fleet: the request waits.
    let waiter = spawn_get(b.addr, vec![("x-mock-fault", "scenario=waiter".into())]);
    let adm = wait_admission(&b, "the request to wait for a lease", |a| {
        shared(a)["waiting"] == 1
    })
    .await;
    assert_eq!(shared(&adm)["leased"], 0, "{adm}");
    let m = b.metrics().await;
    assert_eq!(metric(&m, &shared_slots("waiting")), Some(1.0), "{m}");
    assert!(mock.stats().attempts("waiter").is_empty());

    let released = Instant::now();
    drop(h1);
    let (r, done) = join(waiter).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let took = done - released;
    // Well under the 2s lease: the place came back by its release.
    assert!(
        took < Duration::from_millis(1500),
        "admitted {took:?} after the release"
    );
    let m = b
        .wait_metrics("the waiter's queue time and no waiter left", |m| {
            metric(m, &shared_slots("waiting")) == Some(0.0)
                && metric(m, "floodwall_queue_wait_seconds_count{route=\"agent\"}") == Some(1.0)
        })
        .await;
    assert_eq!(metric(&m, &rejections("agent", "timeout")), None, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_places_of_a_killed_instance_come_back_after_its_lease() {
    let redis = RedisServer::start();
    let mock = start_mock().await;
    let lease = Duration::from_secs(2);
    let policy = adm_policy(
        &mock,
        &store(&redis, "fw-e2e-conc-k"),
        "",
        &agent("{ max_in_flight: 2, shared: true, lease: 2s }"),
    );
    let mut a = Floodwall::start(&policy).await;
    let b = Floodwall::start(&policy).await;
    let _h1 = hold_stream(a.addr, "one", ENDLESS).await;
    let _h2 = hold_stream(a.addr, "two", ENDLESS).await;
    // A renews its leases: still held after two leases' time.
    tokio::time::sleep(2 * lease).await;
    assert_shed_shared_full(b.addr, "while-a-lives").await;

    // SIGKILL: no release, no goodbye.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    assert_shed_shared_full(b.addr, "just-after-the-kill").await;

    let (r, at) = eventually(
        "B to admit once A's leases expired",
        Duration::from_secs(15),
        || async {
            let r = get(b.addr, &[("x-mock-fault", "scenario=after-expiry")]).await;
            (r.status == 200).then(|| (r, Instant::now()))
        },
    )
    .await;
    assert_eq!(r.status, 200);
    let took = at - killed;
    // A renewed at most lease/3 before it died, so its leases had at least
    // 2/3 of the lease left; they are gone at most one lease later (plus
    // a generous margin for a loaded machine).
    assert!(
        took >= lease * 2 / 3 - Duration::from_millis(100),
        "admitted only {took:?} after the kill: A's leases did not hold"
    );
    assert!(
        took <= lease + Duration::from_secs(4),
        "admitted {took:?} after the kill; the lease is {lease:?}"
    );
    // Both places are B's now (A's leases are gone from Redis).
    let _b1 = hold_stream(b.addr, "b-one", ENDLESS).await;
    let adm = wait_admission(&b, "B's first lease", |a| shared(a)["leased"] == 1).await;
    assert_eq!(shared(&adm)["fleet_in_use"], 1, "{adm}");
    let _b2 = hold_stream(b.addr, "b-two", ENDLESS).await;
    assert_eq!(live_leases(&redis, "fw-e2e-conc-k").await, 2);
    let adm = admission(&b).await;
    assert_eq!(shared(&adm)["leased"], 2, "{adm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_client_disconnects_every_shared_slot_lease_and_gauge_returns_to_0() {
    let redis = RedisServer::start();
    let mock = start_mock().await;
    // A lease far longer than the test: only releases can free the places.
    let policy = adm_policy(
        &mock,
        &store(&redis, "fw-e2e-conc-d"),
        "",
        &agent(
            "{ max_in_flight: 2, shared: true, lease: 5m, queue: { max_depth: 5, max_wait: 30s } }",
        ),
    );
    let a = Floodwall::start(&policy).await;
    let b = Floodwall::start(&policy).await;
    let h1 = hold_stream(a.addr, "one", ENDLESS).await;
    let h2 = hold_stream(b.addr, "two", ENDLESS).await;
    // A request waiting for a lease on B, whose client goes away.
    let mut leaver = RawConn::connect(b.addr).await;
    leaver
        .write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-mock-fault: scenario=left\r\n\r\n")
        .await;
    wait_admission(&b, "the leaver to wait for a lease", |a| {
        shared(a)["waiting"] == 1
    })
    .await;
    assert_eq!(live_leases(&redis, "fw-e2e-conc-d").await, 2);

    drop(leaver);
    drop(h1);
    drop(h2);
    for fw in [&a, &b] {
        fw.wait_metrics("every gauge back to 0", |m| {
            [
                route_in_flight("agent"),
                requests_active("agent"),
                streams_active("agent"),
                shared_slots("leased"),
                shared_slots("local"),
                shared_slots("waiting"),
            ]
            .iter()
            .all(|s| metric(m, s) == Some(0.0))
        })
        .await;
    }
    eventually("Redis to hold no lease", Duration::from_secs(5), || async {
        (live_leases(&redis, "fw-e2e-conc-d").await == 0).then_some(())
    })
    .await;
    assert!(mock.stats().attempts("left").is_empty());

    // Both places are usable at once again, from either instance.
    let _n1 = hold_stream(a.addr, "again-a", ENDLESS).await;
    let _n2 = hold_stream(b.addr, "again-b", ENDLESS).await;
    assert_eq!(live_leases(&redis, "fw-e2e-conc-d").await, 2);
    for fw in [&a, &b] {
        let adm = admission(fw).await;
        assert_eq!(shared(&adm)["store_errors_total"], 0, "{adm}");
        assert_eq!(shared(&adm)["lost_total"], 0, "{adm}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_an_instance_runs_its_share_and_registers_it_when_redis_returns() {
    let redis = RedisServer::start();
    let port = redis.port;
    let mock = start_mock().await;
    // 4 across the fleet; 4 ÷ expected_replicas (2) = 2 per instance
    // while Redis is away.
    let policy = adm_policy(
        &mock,
        &format!(
            "store:\n  redis: {{ url: \"{}\", key_prefix: fw-e2e-conc-o, timeout: 200ms, expected_replicas: 2 }}\n",
            redis.url()
        ),
        "",
        &agent("{ max_in_flight: 4, shared: true, lease: 3s }"),
    );
    let fw = Floodwall::start(&policy).await;
    // Connected and used once, then Redis goes away.
    assert_eq!(get(fw.addr, &[]).await.status, 200);
    drop(redis);

    let started = Instant::now();
    let _h1 = hold_stream(fw.addr, "one", ENDLESS).await;
    let _h2 = hold_stream(fw.addr, "two", ENDLESS).await;
    // The store timeout (plus a margin for a loaded machine) per attempt at most.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_shed_shared_full(fw.addr, "over-the-share").await;
    let adm = admission(&fw).await;
    assert_eq!(shared(&adm)["local"], 2, "{adm}");
    assert_eq!(shared(&adm)["leased"], 0, "{adm}");
    assert_eq!(shared(&adm)["fallback_cap"], 2, "{adm}");
    let m = fw.metrics().await;
    assert_eq!(metric(&m, &shared_slots("local")), Some(2.0), "{m}");
    assert!(
        metric(
            &m,
            "floodwall_limiter_store_errors_total{op=\"lease_acquire\"}"
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{m}"
    );

    // Redis back on the same port (empty): the next renewals take leases
    // for the two requests that ran without one.
    let redis = RedisServer::start_on(port);
    wait_admission(&fw, "both requests to be leased", |a| {
        shared(a)["leased"] == 2
    })
    .await;
    assert_eq!(live_leases(&redis, "fw-e2e-conc-o").await, 2);
    // And the full cap of 4 applies again.
    let _h3 = hold_stream(fw.addr, "three", ENDLESS).await;
    assert_eq!(live_leases(&redis, "fw-e2e-conc-o").await, 3);
}

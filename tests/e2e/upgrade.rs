//! Zero-downtime binary upgrade: a new process takes over the listening
//! sockets (`--upgrade`, Pingora's socket hand-off) while the old one drains.
//! Under steady load no connection is refused and no request fails.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(config: &Path, sock: &Path, ready: &Path, log: &Path, upgrade: bool) -> Proc {
    let logf = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .arg("--ready-file")
        .arg(ready)
        .arg("--upgrade-sock")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf);
    if upgrade {
        cmd.arg("--upgrade");
    }
    Proc(cmd.spawn().expect("spawn floodwall"))
}

async fn wait_file(p: &Path, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        assert!(
            Instant::now() < deadline,
            "{what} did not appear:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrade_under_load_fails_no_request() {
    let mock = start_mock().await;
    let dir = TempDir::new("upgrade");
    // Fixed ports: the hand-off matches listeners by address.
    let (port, admin) = (free_port(), free_port());
    let config = dir.path().join("policy.yaml");
    std::fs::write(
        &config,
        format!(
            r#"version: 1
server:
  listen: ["127.0.0.1:{port}"]
  admin: {{ listen: "127.0.0.1:{admin}" }}
  threads: 2
  grace_period: 3s
backends:
  main:
    endpoints: ["http://{}"]
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    backend: main
"#,
            mock.addr()
        ),
    )
    .unwrap();
    let sock = dir.path().join("upgrade.sock");
    let (ready_old, log_old) = (dir.path().join("old.json"), dir.path().join("old.log"));
    let (ready_new, log_new) = (dir.path().join("new.json"), dir.path().join("new.log"));
    let mut old = spawn(&config, &sock, &ready_old, &log_old, false);
    wait_file(&ready_old, "the old process's ready file", &log_old).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Steady load: 4 clients, a new connection per request.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let body = chat_body("hi", false).to_string();
            while !stop.load(Ordering::Relaxed) {
                let r = tokio::time::timeout(Duration::from_secs(10), async {
                    let peer = pingora::upstreams::peer::HttpPeer::new(addr, false, String::new());
                    let connector = pingora::connectors::http::Connector::new(None);
                    let (mut s, _) = connector
                        .get_http_session(&peer)
                        .await
                        .map_err(|e| format!("connect: {e}"))?;
                    let mut req =
                        pingora::http::RequestHeader::build("POST", b"/v1/chat/completions", None)
                            .unwrap();
                    req.insert_header("host", "x").unwrap();
                    req.insert_header("content-type", "application/json")
                        .unwrap();
                    req.insert_header("x-mock-fault", "latency=50ms").unwrap();
                    req.insert_header("content-length", body.len().to_string())
                        .unwrap();
                    s.write_request_header(Box::new(req))
                        .await
                        .map_err(|e| format!("write: {e}"))?;
                    s.write_request_body(bytes::Bytes::from(body.clone()), true)
                        .await
                        .map_err(|e| format!("body: {e}"))?;
                    s.finish_request_body()
                        .await
                        .map_err(|e| format!("finish: {e}"))?;
                    s.read_response_header()
                        .await
                        .map_err(|e| format!("header: {e}"))?;
                    let status = s.response_header().map(|h| h.status.as_u16()).unwrap_or(0);
                    while let Some(_c) = s
                        .read_response_body()
                        .await
                        .map_err(|e| format!("body read: {e}"))?
                    {}
                    if status == 200 {
                        Ok(())
                    } else {
                        Err(format!("status {status}"))
                    }
                })
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
                match r {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    assert!(before > 0, "load is flowing through the old process");

    // The new process waits for the sockets; then the old one hands them over.
    let new = spawn(&config, &sock, &ready_new, &log_new, true);
    wait_file(&sock, "the upgrade socket", &log_new).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = Command::new("kill")
        .arg("-QUIT")
        .arg(old.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    wait_file(&ready_new, "the new process's ready file", &log_new).await;

    // The old process drains and exits by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Ok(Some(s)) = old.0.try_wait() {
            break s.code();
        }
        assert!(
            Instant::now() < deadline,
            "old process still running:\n{}",
            std::fs::read_to_string(&log_old).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, Some(0));
    let at_exit = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} requests failed during the upgrade: {:?}\nold:\n{}\nnew:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        std::fs::read_to_string(&log_old).unwrap_or_default(),
        std::fs::read_to_string(&log_new).unwrap_or_default()
    );
    assert!(
        ok.load(Ordering::Relaxed) > at_exit,
        "the new process serves after the old one exited"
    );
    drop(new);
}

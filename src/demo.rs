//! `floodwall demo`: the mock LLM backend and floodwall in front of it, in
//! memory, with `policies/demo.yaml`. Prints curl commands to try.

use std::path::PathBuf;

use crate::mock::{MockOptions, MockServer};
use crate::server::{run_snapshot, RunOptions};

const DEMO_POLICY: &str = include_str!("../policies/demo.yaml");

pub fn run(port: u16, admin_port: u16) -> Result<(), String> {
    // The mock runs on its own thread and runtime; Pingora owns the rest.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("mock-backend".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                match MockServer::start(MockOptions::default()).await {
                    Ok(mock) => {
                        let _ = tx.send(Ok(mock.addr()));
                        std::future::pending::<()>().await;
                        drop(mock);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        })
        .map_err(|e| e.to_string())?;
    let mock_addr = rx.recv().map_err(|e| e.to_string())??;

    let text = DEMO_POLICY
        .replace("127.0.0.1:18000", &mock_addr.to_string())
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:9090", &format!("127.0.0.1:{admin_port}"));
    // Written to a file so that editing it reloads live, as in production.
    let path = std::env::temp_dir().join(format!("floodwall-demo-{}.yaml", std::process::id()));
    std::fs::write(&path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut snapshot = crate::config::load_file(&path).map_err(|e| e.to_string())?;
    crate::server::resolve_ports(&mut snapshot)?;

    let p = snapshot.server.listen.first().cloned().unwrap_or_default();
    let a = snapshot.server.admin.listen.clone();
    println!(
        r#"
floodwall demo: proxy on http://{p}, admin on http://{a}, mock LLM backend on http://{mock_addr}
policy: {policy} (edit it: floodwall reloads it live)

Try:
  curl -s http://{p}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hello"}}]}}'
  curl -sN http://{p}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"hello"}}]}}'
  curl -s http://{p}/v1/chat/completions -H 'content-type: application/json' -d '{{"model": broken'
  curl -s http://{p}/nowhere
  curl -s http://{p}/v1/chat/completions -H 'content-type: application/json' \
    -H 'x-mock-fault: latency=3s' -d '{{"model":"m","messages":[]}}'
  curl -s http://{a}/metrics | grep floodwall_
  curl -s http://{a}/admin/status
Stop with Ctrl-C.
"#,
        policy = path.display()
    );
    let opts = RunOptions {
        config: PathBuf::from(&path),
        ready_file: None,
        upgrade: false,
        upgrade_sock: None,
    };
    run_snapshot(snapshot, opts)
}

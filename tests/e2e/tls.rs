//! HTTPS backends: verified against a configured CA, refused without it.

use floodwall::mock::MockTls;

use crate::common::*;

async fn tls_mock() -> MockServer {
    MockServer::start(MockOptions {
        tls: Some(MockTls {
            cert_pem: fixture("tls/server.pem"),
            key_pem: fixture("tls/server.key"),
        }),
        ..MockOptions::default()
    })
    .await
    .expect("TLS mock starts")
}

fn tls_policy(port: u16, tls: &str) -> String {
    format!(
        r#"version: 1
server:
  listen: ["127.0.0.1:0"]
  admin: {{ listen: "127.0.0.1:0" }}
  threads: 2
backends:
  secure:
    endpoints: ["https://localhost:{port}"]
{tls}    timeouts: {{ connect: 2s, response_headers: 5s }}
routes:
  - name: all
    match: {{ path_prefix: / }}
    backend: secure
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backend_verified_with_the_configured_ca() {
    let mock = tls_mock().await;
    let ca = fixture("tls/ca.pem");
    let fw = Floodwall::start(&tls_policy(
        mock.addr().port(),
        &format!("    tls: {{ ca_file: \"{}\" }}\n", ca.display()),
    ))
    .await;
    let r = Client::new().get(fw.addr, "/echo").await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), fw.logs());
    let v = r.json();
    assert_eq!(v["path"], "/echo");
    assert_eq!(
        v["headers"]["host"],
        format!("localhost:{}", mock.addr().port())
    );
    assert_eq!(r.header("x-floodwall-backend"), Some("secure"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backend_with_an_unknown_ca_is_refused() {
    let mock = tls_mock().await;
    let fw = Floodwall::start(&tls_policy(mock.addr().port(), "")).await;
    let r = Client::new().get(fw.addr, "/echo").await;
    r.assert_floodwall_error(502, "upstream_connect_error");
    assert_eq!(
        mock.stats().requests,
        0,
        "no request went over an unverified connection"
    );
}

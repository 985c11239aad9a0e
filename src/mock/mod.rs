//! The scriptable mock LLM backend floodwall ships for tests, demos and benches.
//!
//! A hand-written HTTP/1.1 server on raw tokio sockets (heads parsed with
//! `httparse`), so faults can be injected byte-exactly: keep-alive with
//! Content-Length and chunked request bodies, optional TLS (tokio-rustls), and
//! a record of every connection and request in [`MockStats`].
//!
//! Endpoints:
//! - `POST /v1/chat/completions`: OpenAI-compatible, plain or SSE streaming
//!   (`"stream": true`, `stream_options.include_usage`);
//! - `POST /v1/embeddings`: 8 floats per input, derived from a SHA-256;
//! - `GET /v1/models`;
//! - `GET /mock/stats` (the [`MockStats`] JSON), `POST /mock/reset`: control
//!   endpoints, neither counted nor scripted;
//! - `Upgrade: websocket` on any path: `101`, then raw echo until EOF;
//! - anything else: a JSON echo of method, path, headers and body digest.
//!
//! Behaviour is scripted per request with [`FaultScript`] directives, taken
//! from the `x-mock-fault: k=v;k=v` header, else from a model name
//! `mock:k=v;k=v`, else from the server defaults ([`MockOptions::defaults`],
//! [`MockServer::set_defaults`]). Every response carries `x-mock-server`,
//! `x-mock-connection` (connection id) and `x-mock-request` (0-based request
//! number on that connection).
//!
//! Bounds: request heads 64 KiB / 128 fields, bodies 64 MiB, 300 s idle
//! keep-alive, 10 s TLS handshake, 10 000 concurrent connections, and capped
//! stats records (see [`stats`]).

mod handler;
mod http;
pub mod script;
pub mod stats;
mod ws;

#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

pub use http::{MAX_BODY_BYTES, MAX_HEADERS, MAX_HEADER_BYTES};
pub use script::{parse_duration, FaultScript};
pub use stats::{Attempt, Disconnect, MockStats, Outcome, ScenarioStats};

use handler::Shared;

/// Most connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 10_000;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run a [`MockServer`].
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Where to listen; `127.0.0.1:0` (an ephemeral port) by default.
    pub listen: SocketAddr,
    /// Serve TLS instead of plain HTTP.
    pub tls: Option<MockTls>,
    /// Applied when a request scripts nothing itself.
    pub defaults: FaultScript,
    /// Reported in stats and the `x-mock-server` header.
    pub name: String,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            defaults: FaultScript::default(),
            name: "mock".to_string(),
        }
    }
}

/// PEM files for TLS: the certificate chain (leaf first) and its private key
/// (PKCS#8, PKCS#1 or SEC1).
#[derive(Clone, Debug)]
pub struct MockTls {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

/// A running mock backend. Dropping it stops the accept loop and closes every
/// connection.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Bind, spawn the accept loop on the current tokio runtime, and return
    /// once listening.
    pub async fn start(opts: MockOptions) -> io::Result<MockServer> {
        let acceptor = match &opts.tls {
            Some(tls) => Some(tls_acceptor(tls)?),
            None => None,
        };
        let listener = TcpListener::bind(opts.listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            stats: stats::StatsStore::new(opts.name.clone()),
            name: opts.name,
            defaults: RwLock::new(opts.defaults),
            replies: AtomicU64::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, acceptor, shared.clone(), stop_rx));
        tracing::debug!(%addr, name = %shared.name, "mock backend listening");
        Ok(MockServer {
            addr,
            shared,
            stop,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MockStats {
        self.shared.stats.snapshot()
    }

    /// Clear counters, attempts (and with them the `fail`/`reset` counters)
    /// and disconnects; `connections_open` is kept.
    pub fn reset_stats(&self) {
        self.shared.stats.reset();
    }

    /// Replace the default script, live (applies to requests read from now on).
    pub fn set_defaults(&self, f: FaultScript) {
        self.shared.set_defaults(f);
    }

    /// Stop accepting and close every connection; returns once done.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every
        // connection task.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (sock, _peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of fds and the like: back off briefly.
                        tracing::debug!(error = %e, "mock accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if conns.len() >= MAX_CONNECTIONS {
                    drop(sock);
                    continue;
                }
                let _ = sock.set_nodelay(true);
                let id = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
                shared.stats.connection_opened();
                let guard = OpenGuard(shared.clone());
                let shared = shared.clone();
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    let _guard = guard;
                    match acceptor {
                        None => handler::serve(shared, sock, id).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                                Ok(Ok(tls)) => handler::serve(shared, tls, id).await,
                                Ok(Err(e)) => tracing::debug!(error = %e, "mock TLS handshake failed"),
                                Err(_) => tracing::debug!("mock TLS handshake timed out"),
                            }
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// Decrements `connections_open` however the connection task ends (including
/// abort).
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.stats.connection_closed();
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn tls_acceptor(tls: &MockTls) -> io::Result<TlsAcceptor> {
    let open = |p: &PathBuf| {
        std::fs::File::open(p)
            .map(io::BufReader::new)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
    };
    let certs = rustls_pemfile::certs(&mut open(&tls.cert_pem)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{}: {e}", tls.cert_pem.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{}: no certificate found",
            tls.cert_pem.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut open(&tls.key_pem)?)
        .map_err(|e| invalid(format!("{}: {e}", tls.key_pem.display())))?
        .ok_or_else(|| invalid(format!("{}: no private key found", tls.key_pem.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(format!("TLS certificate/key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// `floodwall mock --listen ADDR ...`: serve until ctrl-c or SIGTERM.
pub async fn run_cli(listen: SocketAddr, defaults: FaultScript) -> io::Result<()> {
    let described = if defaults.is_empty() {
        String::from("(none)")
    } else {
        defaults.to_string()
    };
    let server = MockServer::start(MockOptions {
        listen,
        defaults,
        ..MockOptions::default()
    })
    .await?;
    tracing::info!(addr = %server.addr(), defaults = %described, "mock LLM backend listening");
    println!(
        "floodwall mock listening on http://{} (defaults: {described})",
        server.addr()
    );
    wait_for_signal().await;
    tracing::info!("mock backend shutting down");
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

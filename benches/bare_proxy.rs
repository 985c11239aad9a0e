//! The load benchmark's baseline: a bare Pingora 0.9 reverse proxy.
//!
//! The minimal `ProxyHttp` implementation: `upstream_peer` returns the one
//! backend, everything else is Pingora's default proxy loop (HTTP/1.1 to the
//! upstream over Pingora's keep-alive connection pool). No logging, no header
//! rewriting, no body buffering: what floodwall costs on top of Pingora is
//! measured against this.
//!
//! ```text
//! cargo build --release --example bare_proxy
//! target/release/examples/bare_proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:8000 \
//!     [--threads 2] [--ready-file PATH]
//! ```
//!
//! It uses the same global allocator as the `floodwall` binary (jemalloc,
//! unless built with `--no-default-features`), so that the comparison
//! measures Pingora plus floodwall's code against Pingora, not one allocator
//! against another.
//!
//! `--upstream` falls back to `$BARE_PROXY_UPSTREAM`. A listen port of 0 is
//! replaced by a free port picked at start-up. Once the listener accepts
//! connections, `--ready-file` gets `{"listen":["ADDR"],"pid":N}` (written to
//! a temporary name, then renamed), and the same JSON is printed on stdout.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::upstreams::peer::HttpPeer;
use pingora::Result;

/// The minimal proxy: one upstream, plain HTTP/1.1.
struct BareProxy {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for BareProxy {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // Not TLS, no SNI: Pingora's default peer options (HTTP/1.1, pooled
        // keep-alive connections) are exactly what is being measured.
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

struct Args {
    listen: String,
    upstream: SocketAddr,
    threads: usize,
    ready_file: Option<PathBuf>,
}

const USAGE: &str =
    "usage: bare_proxy --listen ADDR --upstream ADDR [--threads N] [--ready-file PATH]\n\
     (--upstream defaults to $BARE_PROXY_UPSTREAM; --threads to 2)";

fn parse_args() -> std::result::Result<Args, String> {
    let mut listen = None;
    let mut upstream = std::env::var("BARE_PROXY_UPSTREAM").ok();
    let mut threads = 2usize;
    let mut ready_file = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => listen = Some(value("--listen")?),
            "--upstream" => upstream = Some(value("--upstream")?),
            "--threads" => {
                threads = value("--threads")?
                    .parse()
                    .map_err(|e| format!("--threads: {e}"))?
            }
            "--ready-file" => ready_file = Some(PathBuf::from(value("--ready-file")?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let listen = listen.ok_or("--listen is required")?;
    let upstream = upstream.ok_or("--upstream (or $BARE_PROXY_UPSTREAM) is required")?;
    let upstream = upstream
        .to_socket_addrs()
        .map_err(|e| format!("--upstream {upstream}: {e}"))?
        .next()
        .ok_or_else(|| format!("--upstream {upstream}: no address"))?;
    Ok(Args {
        listen,
        upstream,
        threads: threads.max(1),
        ready_file,
    })
}

/// Replace a port of 0 with a free port picked now (Pingora binds by string).
fn concrete_addr(addr: &str) -> std::result::Result<SocketAddr, String> {
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| format!("--listen {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("--listen {addr}: no address"))?;
    if sa.port() != 0 {
        return Ok(sa);
    }
    let l = TcpListener::bind(sa).map_err(|e| format!("cannot bind {addr}: {e}"))?;
    l.local_addr().map_err(|e| e.to_string())
}

/// Writes the ready state once the listener accepts connections.
struct Ready {
    listen: SocketAddr,
    ready_file: Option<PathBuf>,
}

#[async_trait]
impl BackgroundService for Ready {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = self.listen;
        loop {
            let up = tokio::task::spawn_blocking(move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
            .await
            .unwrap_or(false);
            if up {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("bare_proxy: {addr} did not accept connections within 30s");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let body = serde_json::json!({ "listen": [addr.to_string()], "pid": std::process::id() })
            .to_string();
        println!("{body}");
        if let Some(path) = &self.ready_file {
            let tmp = path.with_extension("tmp");
            if let Err(e) = std::fs::write(&tmp, &body).and_then(|_| std::fs::rename(&tmp, path)) {
                eprintln!("bare_proxy: cannot write {}: {e}", path.display());
            }
        }
    }
}

/// The same allocator as `src/main.rs` (see the module comment).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("bare_proxy: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listen = match concrete_addr(&args.listen) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bare_proxy: {e}");
            return ExitCode::from(1);
        }
    };

    // A benchmark fixture: stop promptly on SIGTERM.
    let conf = ServerConf {
        threads: args.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        BareProxy {
            upstream: args.upstream,
        },
    );
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    server.add_service(background_service(
        "ready",
        Ready {
            listen,
            ready_file: args.ready_file,
        },
    ));
    server.run_forever();
}

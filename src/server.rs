//! Assembling and running the Pingora server: the proxy service on the
//! policy's listeners, the admin service, live reload and start-up checks.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use tracing::{error, info};

use crate::config::{self, Snapshot};
use crate::connection::GuardedApp;
use crate::proxy::FloodwallProxy;
use crate::reload::{ReloadService, Reloader};
use crate::state::Shared;
use crate::telemetry::Metrics;

/// Read buffer of each client connection: none. Pingora's default is a
/// 64 KiB `BufReader`, sized for TLS records and allocated zeroed, so once
/// the allocator reuses memory all of it is resident for as long as the
/// connection lives (most of what an idle stream costs). floodwall's proxy
/// listeners are plain TCP, and Pingora's HTTP/1 session reads the request
/// header into its own buffer and the body into its body reader's, so a
/// read buffer below them only adds a copy. Without it a request's bytes go
/// straight from the socket into those buffers; a body that arrives with
/// its header past the first 4 KiB costs one more `read(2)`.
const CLIENT_READ_BUFFER: usize = 0;

pub struct RunOptions {
    pub config: PathBuf,
    /// Write `{"listen":[...],"admin":"..."}` here once every listener accepts.
    pub ready_file: Option<PathBuf>,
    /// Take over the listening sockets of a running floodwall (Pingora `--upgrade`).
    pub upgrade: bool,
    pub upgrade_sock: Option<String>,
}

/// Replace a port of 0 with a free port picked now, so that the real address
/// can be reported. (Pingora binds by address string.)
///
/// The port stays reserved until the listeners are up (see [`RESERVED`]):
/// a socket bound to it with `SO_REUSEADDR` but not listening, which lets
/// Pingora's own listener (also `SO_REUSEADDR`) bind and listen there, while
/// no other socket's port-0 bind can be handed the port. Without it, another
/// process starting at the same moment (parallel tests) could be given the
/// same port between our pick and Pingora's bind; the start-up check then
/// found *its* listener accepting on our address.
fn concrete_addr(addr: &str) -> Result<String, String> {
    let sa: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve listen address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve listen address {addr}"))?;
    if sa.port() != 0 {
        return Ok(addr.to_string());
    }
    let bind = || -> std::io::Result<(tokio::net::TcpSocket, SocketAddr)> {
        let sock = match sa {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        sock.set_reuseaddr(true)?;
        sock.bind(sa)?;
        let local = sock.local_addr()?;
        Ok((sock, local))
    };
    let (sock, local) = bind().map_err(|e| format!("cannot bind {addr}: {e}"))?;
    if let Ok(mut held) = RESERVED.lock() {
        held.push(sock);
    }
    Ok(local.to_string())
}

/// The ports [`concrete_addr`] picked, held until the start-up check has
/// seen every listener accept (then released: Pingora's listeners hold them).
static RESERVED: std::sync::Mutex<Vec<tokio::net::TcpSocket>> = std::sync::Mutex::new(Vec::new());

/// Load, resolve ports, build and run. Returns only on start-up failure
/// (the process exits when the server stops, its log flushed).
pub fn run(opts: RunOptions) -> Result<(), String> {
    let mut snapshot = config::load_file(&opts.config).map_err(|e| e.to_string())?;
    resolve_ports(&mut snapshot)?;
    run_snapshot(snapshot, opts)
}

pub fn resolve_ports(snapshot: &mut Snapshot) -> Result<(), String> {
    for l in snapshot.server.listen.iter_mut() {
        *l = concrete_addr(l)?;
    }
    snapshot.server.admin.listen = concrete_addr(&snapshot.server.admin.listen)?;
    Ok(())
}

pub fn run_snapshot(snapshot: Snapshot, opts: RunOptions) -> Result<(), String> {
    let listen = snapshot.server.listen.clone();
    let admin_listen = snapshot.server.admin.listen.clone();
    let threads = snapshot.server.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let grace = snapshot.server.grace_period;

    let hash = snapshot.source.hash.clone();
    let shared = Shared::new(snapshot, Metrics::new());
    shared.metrics.config_loaded(&hash);

    let defaults = ServerConf::default();
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(5),
        upgrade_sock: opts
            .upgrade_sock
            .clone()
            .unwrap_or_else(|| defaults.upgrade_sock.clone()),
        ..defaults
    };
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let derived = shared.connections.init_from_rlimit();
    let configured = shared.active().snapshot.server.max_connections;
    if configured.is_some_and(|c| c > derived) {
        tracing::warn!(
            max_connections = configured,
            open_files_allow = derived,
            "server.max_connections is above what the open-files limit allows (two files a connection)"
        );
    }
    shared
        .connections
        .metrics()
        .limit
        .set(shared.connections.limit(configured) as i64);
    // The connection guards (server.max_connections, request header size
    // and time) run in front of the proxy on every accepted connection.
    let app = GuardedApp::new(
        pingora::proxy::http_proxy(&server.configuration, FloodwallProxy::new(shared.clone())),
        shared.clone(),
    );
    let mut proxy = Service::new("floodwall proxy".to_string(), app);
    for addr in &listen {
        proxy.add_listener(
            ListenerConfig::tcp(addr.as_str())
                .l4_buffer(L4BufferSettings::default().read(CLIENT_READ_BUFFER)),
        );
    }
    server.add_service(proxy);
    server.add_service(crate::admin::admin_service(shared.clone(), &admin_listen));
    let reloader = Arc::new(Reloader::new(shared.clone(), opts.config.clone()));
    server.add_service(background_service("policy reload", ReloadService(reloader)));
    server.add_service(background_service(
        "shutdown",
        crate::shutdown::ShutdownService {
            state: shared.shutdown.clone(),
            grace,
        },
    ));
    server.add_service(background_service(
        "start-up",
        Startup {
            shared,
            listen: listen.clone(),
            admin: admin_listen.clone(),
            ready_file: opts.ready_file,
        },
    ));
    info!(listen = ?listen, admin = %admin_listen, threads, "floodwall starting");
    server.run(pingora::server::RunArgs::default());
    // What `run_forever` does, with the log written out first.
    crate::telemetry::writer::flush();
    std::process::exit(0)
}

/// Marks the process ready once every proxy listener accepts connections.
struct Startup {
    shared: Arc<Shared>,
    listen: Vec<String>,
    admin: String,
    ready_file: Option<PathBuf>,
}

fn accepts(addr: &str) -> bool {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(|mut sa| {
            if sa.ip().is_unspecified() {
                sa.set_ip(match sa {
                    SocketAddr::V4(_) => [127, 0, 0, 1].into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            TcpStream::connect_timeout(&sa, Duration::from_millis(200)).is_ok()
        })
        .unwrap_or(false)
}

#[async_trait]
impl BackgroundService for Startup {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addrs: Vec<String> = self
            .listen
            .iter()
            .chain(std::iter::once(&self.admin))
            .cloned()
            .collect();
        loop {
            let a = addrs.clone();
            let all = tokio::task::spawn_blocking(move || a.iter().all(|x| accepts(x)))
                .await
                .unwrap_or(false);
            if all {
                break;
            }
            if Instant::now() > deadline {
                error!(listen = ?addrs, "listeners did not come up within 30s");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Ok(mut held) = RESERVED.lock() {
            held.clear();
        }
        self.shared
            .health
            .listeners_bound
            .store(true, Ordering::Release);
        self.shared.health.started.store(true, Ordering::Release);
        info!(listen = ?self.listen, admin = %self.admin, "floodwall ready");
        if let Some(path) = &self.ready_file {
            let body = serde_json::json!({ "listen": self.listen, "admin": self.admin, "pid": std::process::id() });
            let tmp = path.with_extension("tmp");
            let written =
                std::fs::write(&tmp, body.to_string()).and_then(|_| std::fs::rename(&tmp, path));
            if let Err(e) = written {
                error!(file = %path.display(), "cannot write the ready file: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picked_port_stays_reserved_yet_a_reuseaddr_listener_can_take_it() {
        let picked: SocketAddr = concrete_addr("127.0.0.1:0").unwrap().parse().unwrap();
        assert_ne!(picked.port(), 0);
        // Held: a socket without SO_REUSEADDR (what another program's
        // explicit or port-0 bind is) cannot bind it...
        let plain = tokio::net::TcpSocket::new_v4().unwrap();
        let err = plain.bind(picked).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        // ...while Pingora's listener (SO_REUSEADDR, then listen) can.
        let pingora_like = tokio::net::TcpSocket::new_v4().unwrap();
        pingora_like.set_reuseaddr(true).unwrap();
        pingora_like.bind(picked).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _listener = rt.block_on(async { pingora_like.listen(16) }).unwrap();
        // A fixed port is left alone.
        assert_eq!(concrete_addr("127.0.0.1:8080").unwrap(), "127.0.0.1:8080");
    }
}

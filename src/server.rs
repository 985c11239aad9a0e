//! Assembling and running the Pingora server: the proxy service on the
//! policy's listeners, the admin service, live reload and start-up checks.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
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
fn concrete_addr(addr: &str) -> Result<String, String> {
    let sa: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve listen address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve listen address {addr}"))?;
    if sa.port() != 0 {
        return Ok(addr.to_string());
    }
    let l = TcpListener::bind(sa).map_err(|e| format!("cannot bind {addr}: {e}"))?;
    let local = l.local_addr().map_err(|e| e.to_string())?;
    Ok(local.to_string())
}

/// Load, resolve ports, build and run. Returns only on start-up failure
/// (`run_forever` exits the process when the server stops).
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
    server.run_forever();
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

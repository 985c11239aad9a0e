//! The `floodwall` command: `run`, `check`, `demo` and `mock`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use floodwall::telemetry::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "floodwall",
    version,
    about = "A resilience-policy reverse proxy for LLM backends, on Pingora."
)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a policy file (reloaded live when it changes, or on SIGHUP).
    Run {
        /// The policy file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Write the bound addresses as JSON to this file once ready (useful with port 0).
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Take over the listening sockets of a running floodwall (zero-downtime upgrade).
        #[arg(long)]
        upgrade: bool,
        /// The Unix socket used to hand over listeners during an upgrade.
        #[arg(long)]
        upgrade_sock: Option<String>,
    },
    /// Validate policy files: exit 0 when all are valid, 1 with every error otherwise.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Start the bundled mock LLM backend and floodwall in front of it, in memory.
    Demo {
        /// The proxy port.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// The admin port (metrics, health, status).
        #[arg(long, default_value_t = 9090)]
        admin_port: u16,
    },
    /// Exit 0 when an HTTP GET to URL answers 2xx within 2 s (for container
    /// health checks, where there is no curl).
    Probe {
        #[arg(default_value = "http://127.0.0.1:9090/health/live")]
        url: String,
    },
    /// Run the scriptable mock LLM backend on its own.
    Mock {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// Default fault script, e.g. "latency=20ms" or "fail=2:503;retry_after=1".
        #[arg(long, default_value = "")]
        fault: String,
    },
}

/// jemalloc, not glibc's malloc: under load glibc cost floodwall 20-25% more
/// CPU per request (BENCHMARKS.md, "Fourth session of 2026-11-24"). The
/// `jemalloc` feature is on by default; `--no-default-features` keeps the
/// system allocator.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files } => {
            if floodwall::config::check_files(&files) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::Run {
            config,
            ready_file,
            upgrade,
            upgrade_sock,
        } => {
            logging::init(cli.log_format);
            let opts = floodwall::server::RunOptions {
                config,
                ready_file,
                upgrade,
                upgrade_sock,
            };
            match floodwall::server::run(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // What was logged before the failure comes first.
                    floodwall::telemetry::writer::flush();
                    eprintln!("floodwall: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Demo { port, admin_port } => {
            logging::init(cli.log_format);
            match floodwall::demo::run(port, admin_port) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    floodwall::telemetry::writer::flush();
                    eprintln!("floodwall demo: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Probe { url } => match probe(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("floodwall probe: {e}");
                ExitCode::from(1)
            }
        },
        Command::Mock { listen, fault } => {
            logging::init(cli.log_format);
            let defaults = match floodwall::mock::FaultScript::parse(&fault) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("floodwall mock: --fault: {e}");
                    return ExitCode::from(2);
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("floodwall mock: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(floodwall::mock::run_cli(listen, defaults)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("floodwall mock: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// A minimal HTTP/1.0 GET for `floodwall probe`.
fn probe(url: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    use std::time::Duration;
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let t = Duration::from_secs(2);
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, t).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(t)).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut head = [0u8; 32];
    let n = s.read(&mut head).map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&head[..n]);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if status.starts_with('2') {
        Ok(())
    } else {
        Err(format!("{url} answered {status:?}"))
    }
}

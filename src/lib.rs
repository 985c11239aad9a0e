//! floodwall: a resilience-policy reverse proxy for LLM backends, on Pingora.
//!
//! The modules follow the path a request takes:
//! - [`config`]: the policy file, its validation and the compiled snapshot;
//! - [`connection`]: each client connection before its requests reach the
//!   proxy: the connection cap and the request-header size and time guards;
//! - [`proxy`]: the Pingora wiring (request intake, routing, the upstream
//!   loop and floodwall's own responses);
//! - [`policy`]: one pure decision module per policy kind;
//! - [`store`]: state shared across replicas (Redis);
//! - [`telemetry`]: metrics and logs; [`admin`]: health, metrics, status;
//! - [`reload`]: file watching and the atomic snapshot swap;
//! - [`mock`]: the scriptable mock LLM backend used by tests, demo and benches;
//! - [`text`]: decimals for headers and log lines without `fmt`.

pub mod admin;
pub mod config;
pub mod connection;
pub mod demo;
pub mod mock;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod request;
pub mod routing;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod text;

//! End-to-end tests: the real `floodwall` binary on ephemeral ports, in front
//! of the in-process mock backend (or a fixed raw-bytes upstream). One test
//! crate so that the suite links once; one module per area.

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod admission;
mod cache;
mod check;
mod connections;
mod cors;
mod errors;
mod headers;
mod http1;
mod limits;
mod operator_kit;
mod passthrough;
mod reload;
mod request_checks;
mod resilience;
mod routing;
mod shared_concurrency;
mod shutdown;
mod tls;
mod upgrade;
mod websocket;

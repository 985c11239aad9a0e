//! Wiring of the stream limits and the concurrency limits (with their
//! priority queue) into the request path.
//!
//! Order: the stream slot is tried first (a cheap, immediate refusal), then
//! the route's concurrency slot, which may wait in the queue. Both are RAII
//! guards held in the request's `Ctx`, so every exit path (success, upstream
//! error, client disconnect, timeout, reload) releases them. A client that
//! leaves while queued is removed from the queue at once.

use std::time::Instant;

use pingora::proxy::Session;
use prometheus::{Histogram, IntGauge};

use super::reject::{Reason, Reject};
use super::{Ctx, FloodwallProxy};
use crate::policy::concurrency::{Rejected, Slot};
use crate::policy::identity;
use crate::policy::streams::{StreamScope, StreamSlot};
use crate::state::Active;

/// An open stream: its slot, the active-streams gauge and the duration
/// histogram, released and recorded when dropped.
pub struct StreamGuard {
    _slot: StreamSlot,
    gauge: Option<IntGauge>,
    duration: Option<Histogram>,
    started: Instant,
    /// `streams.max_duration`: the stream is cut with `stream_timeout` then.
    pub cut_at: Option<Instant>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(g) = &self.gauge {
            g.dec();
        }
        if let Some(h) = &self.duration {
            h.observe(self.started.elapsed().as_secs_f64());
        }
    }
}

/// A held concurrency slot.
pub struct SlotGuard {
    _slot: Slot,
}

/// Whether [`FloodwallProxy::admit_admission`] has anything to do for this
/// request: a stream slot, a concurrency limit, or the caller's identity
/// for a per-identity cap. The request path skips the (boxed) call
/// otherwise.
pub(super) fn admission_applies(ctx: &Ctx, active: &Active) -> bool {
    let Some(route) = ctx.route.as_ref() else {
        return false;
    };
    if active.admission.route(ctx.route_index).is_none() {
        return false;
    }
    ctx.llm.as_ref().is_some_and(|l| l.stream)
        || route.concurrency.is_some()
        || route
            .streams
            .as_ref()
            .is_some_and(|s| s.per_identity.is_some())
}

impl FloodwallProxy {
    /// Stream and concurrency admission. `Ok(Some(_))` when refused (a
    /// response was sent), `Ok(None)` to go on.
    pub(super) async fn admit_admission(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        active: &Active,
    ) -> pingora::Result<Option<bool>> {
        let Some(route) = ctx.route.clone() else {
            return Ok(None);
        };
        let Some(ra) = active.admission.route(ctx.route_index) else {
            return Ok(None);
        };
        let snap = &active.snapshot;
        let streaming = ctx.llm.as_ref().is_some_and(|l| l.stream);
        let needs_identity = route
            .concurrency
            .as_ref()
            .is_some_and(|c| c.per_identity.is_some())
            || route
                .streams
                .as_ref()
                .is_some_and(|s| s.per_identity.is_some());
        if needs_identity && ctx.identity.is_none() {
            let who = super::limits::extract_identity(
                session,
                active,
                ctx.llm.as_ref(),
                None,
                super::limits::now_ms(),
            );
            ctx.identity = Some(Box::new(who));
        }
        let who = ctx.identity.as_ref().and_then(|i| i.user.clone());
        let m = &self.shared.admission_metrics;

        if streaming {
            if let Err(r) = self.take_stream_slot(ctx, active, &route.name) {
                return self.reject(session, ctx, r, true).await.map(Some);
            }
        }

        if let (Some(limiter), Some(cfg)) = (&ra.concurrency, &route.concurrency) {
            let trusted = identity::peer_trusted(
                session
                    .client_addr()
                    .and_then(|a| a.as_inet())
                    .map(|a| a.ip()),
                &snap.server.trusted_proxies,
            );
            let header = cfg
                .priority_header()
                .filter(|_| trusted)
                .and_then(|h| session.req_header().headers.get(h))
                .map(|v| v.as_bytes().to_vec());
            let class = cfg.class_for(header.as_deref(), streaming);
            let acquired = tokio::select! {
                biased;
                r = limiter.acquire(who.as_deref(), class) => r,
                _ = session.downstream_session.read_body_or_idle(true) => {
                    ctx.error = Some("client closed the connection while queued".into());
                    return Err(pingora::Error::create(
                        pingora::ErrorType::ConnectionClosed,
                        pingora::ErrorSource::Downstream,
                        Some("client closed the connection while queued".into()),
                        None,
                    ));
                }
            };
            match acquired {
                Ok(slot) => {
                    let waited = slot.queued_for();
                    if !waited.is_zero() {
                        if let Ok(h) = m
                            .queued_seconds
                            .get_metric_with_label_values(&[&route.name])
                        {
                            h.observe(waited.as_secs_f64());
                        }
                    }
                    ctx.slot = Some(Box::new(SlotGuard { _slot: slot }));
                }
                Err(rej) => {
                    let retry = rej.retry_after().as_secs_f64().ceil().max(1.0) as u64;
                    let (reason, cause) = match &rej {
                        Rejected::PerIdentity { .. } => (Reason::ConcurrencyLimit, "per_identity"),
                        Rejected::Shed { cause, .. } => (Reason::Overloaded, cause.as_str()),
                    };
                    if let Ok(c) = m.sheds.get_metric_with_label_values(&[&route.name, cause]) {
                        c.inc();
                    }
                    let mut r = Reject::new(reason, rej.to_string());
                    r.retry_after = Some(retry);
                    return self.reject(session, ctx, r, true).await.map(Some);
                }
            }
        }
        Ok(None)
    }
}

impl FloodwallProxy {
    /// Takes a stream slot (route, caller and instance caps) and keeps it
    /// in `ctx.stream` with the active-streams gauge and the
    /// `max_duration` deadline; the refusal (`stream_limit`) otherwise.
    /// Called at admission for `stream: true`, and again when a response
    /// turns out to be SSE without it.
    pub(super) fn take_stream_slot(
        &self,
        ctx: &mut Ctx,
        active: &Active,
        route_name: &str,
    ) -> Result<(), Reject> {
        let Some(ra) = active.admission.route(ctx.route_index) else {
            return Ok(());
        };
        let who = ctx.identity.as_ref().and_then(|i| i.user.clone());
        let m = &self.shared.admission_metrics;
        match ra.streams.try_acquire(who.as_deref()) {
            Ok(slot) => {
                let gauge = m
                    .streams_active
                    .get_metric_with_label_values(&[route_name])
                    .ok();
                if let Some(g) = &gauge {
                    g.inc();
                }
                let now = Instant::now();
                ctx.stream = Some(StreamGuard {
                    _slot: slot,
                    gauge,
                    duration: m
                        .stream_duration
                        .get_metric_with_label_values(&[route_name])
                        .ok(),
                    started: now,
                    cut_at: ra.streams.max_duration().map(|d| now + d),
                });
                Ok(())
            }
            Err(l) => {
                if let Ok(c) = m
                    .sheds
                    .get_metric_with_label_values(&[route_name, "stream_limit"])
                {
                    c.inc();
                }
                let mut r = Reject::new(Reason::StreamLimit, l.to_string());
                if l.scope == StreamScope::Identity {
                    r.status = Some(429);
                }
                r.retry_after = Some(l.retry_after.as_secs_f64().ceil().max(1.0) as u64);
                Err(r)
            }
        }
    }
}

//! The attempt loop: retries, circuit breakers, fallback and the
//! first-token hold, around single upstream attempts ([`super::upstream`]).
//!
//! The decisions come from the pure policy modules (`policy::retry`,
//! `policy::breaker`); this file only sequences them:
//!
//! 1. targets are the route's backend, then its `fallback` backends in order,
//!    then a static `respond`;
//! 2. for each target, attempts are made while the retry policy allows: a
//!    failure *before any byte reached the client* (connect error, reset,
//!    timeout, a retryable status, no first token in time) is retried after
//!    the back-off (honouring `Retry-After`), on another endpoint when there
//!    is one, within the retry budget and the `total` deadline;
//! 3. an open breaker (the backend's, or every endpoint's) skips the target;
//! 4. a request the backend refuses as bad (`context_length_exceeded`...) is
//!    passed through at once: never retried, never answered by a fallback;
//! 5. once the response is committed to the client there are no retries; a
//!    stream that breaks later ends with an SSE error event.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::response::Parts as RespParts;
use pingora::http::ResponseHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};

use super::reject::{Reason, Reject};
use super::sse::SseScanner;
use super::upstream::{self, AttemptReport, AttemptRequest, BackendRuntime, StreamEnd};
use super::{BoxFut, Ctx, FloodwallProxy};
use crate::config::{FallbackTarget, Route};
use crate::policy::breaker::{Breaker, CallOutcome, Permit};
use crate::policy::retry::{self, Delay, Failure, GiveUp, RetryBudget, RetryPolicy};
use crate::state::Active;
use crate::telemetry::metrics::UpstreamOutcome;
use crate::telemetry::resilience::ResilienceMetrics;

/// Bytes of an error response read to classify it (and replayed if it is
/// passed through).
const ERROR_PREFIX: usize = 64 * 1024;
/// How long a failed response's body may take to drain before its
/// connection is closed instead of reused.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

/// The breaker permits held by one attempt (backend-wide and endpoint).
#[derive(Default)]
struct Permits(Vec<(Arc<Breaker>, Permit)>);

impl Permits {
    fn record(self, status: Option<u16>, failed: bool, elapsed: Duration) {
        let now = Instant::now();
        for (b, p) in self.0 {
            let outcome = if failed {
                CallOutcome::Failure { elapsed }
            } else {
                b.config().outcome(status, elapsed)
            };
            b.record(p, outcome, now);
        }
    }
}

/// Why an attempt produced nothing for the client.
struct Failed {
    failure: Failure,
    reject: Reject,
    hint: Option<Duration>,
}

enum Step {
    /// The response went to the client (fully, or cut and marked).
    Done(Result<bool>),
    /// Nothing went to the client; the retry policy decides what next.
    Failed(Failed),
}

fn is_sse(h: &ResponseHeader) -> bool {
    h.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// The body with its `model` replaced (a fallback target's `model`).
fn rewrite_model(body: &Bytes, model: &str) -> Bytes {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("model".into(), serde_json::Value::String(model.to_string()));
            Bytes::from(serde_json::Value::Object(m).to_string())
        }
        _ => body.clone(),
    }
}

fn failure_of(r: &Reject, _report: &AttemptReport) -> Failure {
    match r.reason {
        Reason::UpstreamConnectError => Failure::ConnectError,
        Reason::UpstreamTimeout => Failure::Timeout,
        _ => Failure::Reset,
    }
}

impl FloodwallProxy {
    /// Serve a buffered request through the route's backends.
    pub(super) async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        active: &Arc<Active>,
        route: &Arc<Route>,
    ) -> Result<bool> {
        let snap = &active.snapshot;
        let metrics = self.shared.resilience.metrics.clone();
        let policy = route.retry.clone();
        let budget = active.budgets.get(ctx.route_index).cloned().flatten();
        if let Some(b) = &budget {
            b.deposit(Instant::now());
        }
        let deadline = route.timeouts.total.map(|t| ctx.start + t);
        let method = session.req_header().method.clone();

        let mut targets: Vec<(usize, Option<&str>)> = vec![(route.backend, None)];
        for f in &route.fallback {
            if let FallbackTarget::Backend { backend, model, .. } = f {
                targets.push((*backend, model.as_deref()));
            }
        }
        // Where an explicit `stale_cache` target sits among the backends.
        let stale_at = route
            .fallback
            .iter()
            .position(|f| *f == FallbackTarget::StaleCache)
            .map(|i| {
                1 + route.fallback[..i]
                    .iter()
                    .filter(|f| matches!(f, FallbackTarget::Backend { .. }))
                    .count()
            });
        let respond = route.fallback.iter().find_map(|f| match f {
            FallbackTarget::Respond { status, body } => Some((*status, body)),
            _ => None,
        });

        let mut last: Option<Reject> = None;
        let mut may_fall_back = true;
        'targets: for (ti, (bidx, model)) in targets.iter().enumerate() {
            if ti > 0 {
                if !may_fall_back {
                    break;
                }
                // An explicit `fallback: - stale_cache: true` here.
                if stale_at == Some(ti) {
                    if let Some(sent) = self.serve_stale(session, ctx).await {
                        Self::observe_attempts(&metrics, route, ctx.attempts);
                        return sent;
                    }
                }
                ResilienceMetrics::inc(
                    &metrics.fallbacks,
                    &[&route.name, &snap.backends[*bidx].name],
                );
            }
            let backend_cfg = &snap.backends[*bidx];
            let backend = &active.backends[*bidx];
            let body = match model {
                Some(m) => rewrite_model(&ctx.body, m),
                None => ctx.body.clone(),
            };
            let more_targets = ti + 1 < targets.len() || respond.is_some();
            let mut prev_endpoint = None;
            let mut attempt_no = 0u32;
            loop {
                attempt_no += 1;
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    // `total` covers every attempt, back-off and fallback.
                    let r = Reject::new(
                        Reason::UpstreamTimeout,
                        format!(
                            "no answer within the route's total timeout of {}ms",
                            route.timeouts.total.unwrap_or_default().as_millis()
                        ),
                    );
                    Self::observe_attempts(&metrics, route, ctx.attempts);
                    return self.finish_attempts(session, ctx, r).await;
                }
                // Breakers: the backend's, then a healthy endpoint's.
                let mut permits = Permits::default();
                if let Some(b) = &backend.breaker {
                    match b.try_acquire(now) {
                        crate::policy::breaker::Admission::Allowed(p) => {
                            permits.0.push((b.clone(), p))
                        }
                        crate::policy::breaker::Admission::Rejected { retry_after } => {
                            ResilienceMetrics::inc(
                                &metrics.circuit_rejections,
                                &[&backend_cfg.name],
                            );
                            last = Some(circuit_open(&backend_cfg.name, retry_after));
                            may_fall_back = route.fallback_on.circuit_open;
                            continue 'targets;
                        }
                    }
                }
                let endpoint = match backend.choose(prev_endpoint, now) {
                    Ok((i, p)) => {
                        if let (Some(p), Some(b)) = (p, backend.endpoint_breaker(i)) {
                            permits.0.push((b.clone(), p));
                        }
                        i
                    }
                    Err(retry_after) => {
                        ResilienceMetrics::inc(&metrics.circuit_rejections, &[&backend_cfg.name]);
                        last = Some(circuit_open(&backend_cfg.name, retry_after));
                        may_fall_back = route.fallback_on.circuit_open;
                        continue 'targets;
                    }
                };
                prev_endpoint = Some(endpoint);
                ctx.attempts += 1;
                ctx.backend = Some(backend.name.clone());

                let step = self
                    .attempt(
                        session, ctx, active, route, backend, *bidx, endpoint, &body, deadline,
                        permits,
                    )
                    .await?;
                let failed = match step {
                    Step::Done(r) => {
                        Self::observe_attempts(&metrics, route, ctx.attempts);
                        return r;
                    }
                    Step::Failed(f) => f,
                };
                // Retry, or give up on this target.
                let decision = decide(
                    &policy,
                    attempt_no,
                    &failed,
                    &method,
                    deadline,
                    budget.as_deref(),
                );
                match decision {
                    Delay::After(d) => {
                        if let Some(h) = ctx.held_answer.take() {
                            drain_and_release(&self.connector, &active.backends[h.bidx], h).await;
                        }
                        ResilienceMetrics::inc(
                            &metrics.retries,
                            &[&route.name, failed.failure.reason()],
                        );
                        tracing::debug!(
                            request_id = %ctx.request_id,
                            retry_in_ms = d.as_millis() as u64,
                            failure = failed.failure.reason(),
                            "retrying"
                        );
                        if !d.is_zero() {
                            tokio::select! {
                                biased;
                                _ = session.downstream_session.read_body_or_idle(true) => {
                                    return client_gone(ctx, "client closed the connection during a retry back-off");
                                }
                                _ = tokio::time::sleep(d) => {}
                            }
                        }
                        continue;
                    }
                    Delay::GiveUp { why } => {
                        if why != GiveUp::NotRetryable || policy.retryable(&failed.failure) {
                            ResilienceMetrics::inc(&metrics.giveups, &[&route.name, why.as_str()]);
                        }
                        may_fall_back = route.fallback_on.retries_exhausted
                            && why.exhausted_retryable()
                            && more_targets;
                        if let Some(h) = ctx.held_answer.take() {
                            let stale = ctx.cache.as_ref().is_some_and(|c| c.stale.is_some());
                            if may_fall_back || stale {
                                // A fallback, or `cache.stale_if_error`, answers instead.
                                drain_and_release(&self.connector, &active.backends[h.bidx], h)
                                    .await;
                            } else {
                                // The upstream's own answer is the last word: pass it through.
                                Self::observe_attempts(&metrics, route, ctx.attempts);
                                let backend = &active.backends[h.bidx];
                                return self
                                    .commit(
                                        session, ctx, route, backend, h.answer, h.resp, h.held,
                                        None,
                                    )
                                    .await;
                            }
                        }
                        let mut r = failed.reject;
                        if let GiveUp::RetryAfterTooLong { wait, .. } = why {
                            r.retry_after = Some(wait.as_secs_f64().ceil() as u64);
                        }
                        last = Some(r);
                        continue 'targets;
                    }
                }
            }
        }
        Self::observe_attempts(&metrics, route, ctx.attempts);
        // `cache.stale_if_error`: an expired answer beats an error (and the
        // static `respond`).
        if let Some(sent) = self.serve_stale(session, ctx).await {
            return sent;
        }
        if may_fall_back {
            if let Some((status, body)) = respond {
                ResilienceMetrics::inc(&metrics.fallbacks, &[&route.name, "respond"]);
                return self.respond_static(session, ctx, status, body).await;
            }
        }
        let r =
            last.unwrap_or_else(|| Reject::new(Reason::UpstreamError, "no backend could answer"));
        self.finish_attempts(session, ctx, r).await
    }

    fn observe_attempts(metrics: &ResilienceMetrics, route: &Route, attempts: u32) {
        if let Ok(h) = metrics
            .attempts
            .get_metric_with_label_values(&[&route.name])
        {
            h.observe(f64::from(attempts.max(1)));
        }
    }

    async fn finish_attempts(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        r: Reject,
    ) -> Result<bool> {
        if let Some(sent) = self.serve_stale(session, ctx).await {
            return sent;
        }
        self.reject(session, ctx, r, true).await
    }

    /// One attempt: connect, send, read the header, classify; commit to the
    /// client when the answer is final.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        active: &Arc<Active>,
        route: &Arc<Route>,
        backend: &BackendRuntime,
        bidx: usize,
        endpoint: usize,
        body: &Bytes,
        deadline: Option<Instant>,
        permits: Permits,
    ) -> Result<Step> {
        let backend_cfg = &active.snapshot.backends[bidx];
        let mut headers_timeout = route
            .timeouts
            .response_headers
            .unwrap_or(backend_cfg.timeouts.response_headers);
        if let Some(d) = deadline {
            headers_timeout = headers_timeout.min(d.saturating_duration_since(Instant::now()));
        }
        // `first_token` counts from sending the request, so for a streaming
        // request it also bounds the wait for the header.
        let first_token = route.timeouts.first_token;
        if let Some(ft) = first_token.filter(|_| ctx.llm.as_ref().is_some_and(|l| l.stream)) {
            headers_timeout = headers_timeout.min(ft);
        }
        // Outgoing-call limits of the backend (`backends.*.limits`): wait for
        // a turn, at most `max_wait` and never past the route's deadline.
        let call = match active.admission.pacer(bidx) {
            None => None,
            Some(pacer) => {
                let limit = deadline.map_or(Duration::MAX, |d| {
                    d.saturating_duration_since(Instant::now())
                });
                let turn = tokio::select! {
                    biased;
                    t = pacer.acquire_within(limit) => t,
                    _ = session.downstream_session.read_body_or_idle(true) => {
                        return client_gone(ctx, "client closed the connection while waiting for an upstream call slot").map(|_| Step::Done(Ok(true)));
                    }
                };
                match turn {
                    Ok(permit) => Some(permit),
                    Err(q) => {
                        drop(permits);
                        let mut r = Reject::new(
                            Reason::UpstreamQuota,
                            format!(
                                "backend {} is at its outgoing call limit (waited {}ms)",
                                backend_cfg.name,
                                q.waited.as_millis()
                            ),
                        );
                        r.retry_after = Some(q.retry_after.as_secs_f64().ceil().max(1.0) as u64);
                        let sent = self.reject(session, ctx, r, true).await;
                        return Ok(Step::Done(sent));
                    }
                }
            }
        };
        // Built here, in one statement with the attempt: a local would keep
        // its room (~350 bytes) in this future for the whole stream.
        let header = Box::new(self.upstream_request(
            session,
            ctx,
            route,
            active,
            backend.host(endpoint),
            body.len(),
        )?);
        let mut report = AttemptReport::default();
        let started = Instant::now();
        // Boxed: connecting (TCP, TLS) is the largest state of this future,
        // and it is over once the header has arrived. Inline, its space
        // would stay part of every open stream's request future.
        let start = Box::pin(upstream::start_attempt(
            &self.connector,
            backend,
            endpoint,
            AttemptRequest {
                header,
                body,
                response_headers_timeout: headers_timeout,
                connect_timeout: route.timeouts.connect,
            },
            &mut report,
        ));
        // The request body was read whole, so any downstream event while the
        // upstream thinks means the client left: drop the attempt (closing
        // its connection, so the backend stops generating).
        let attempt = tokio::select! {
            biased;
            a = start => a,
            _ = session.downstream_session.read_body_or_idle(true) => {
                return client_gone(ctx, "client closed the connection before the response header").map(|_| Step::Done(Ok(true)));
            }
        };
        let outcome = if attempt.is_ok() {
            UpstreamOutcome::Ok
        } else {
            report.outcome
        };
        self.shared.metrics.observe_upstream_on(
            &backend.metrics,
            &backend_cfg.name,
            outcome,
            report.header_latency.map(|d| d.as_secs_f64()),
        );
        // The adaptive in-flight limit (`limits.adaptive`) learns from the
        // time to the response header, or to the timeout.
        if let Some(call) = &call {
            let latency = match outcome {
                UpstreamOutcome::Ok => report.header_latency,
                UpstreamOutcome::Timeout => Some(started.elapsed()),
                _ => None,
            };
            if let Some((limit, changed)) = latency.and_then(|l| call.record_latency(l)) {
                self.shared
                    .admission_metrics
                    .adaptive_limit
                    .with_label_values(&[&backend_cfg.name])
                    .set(i64::from(limit));
                if changed {
                    tracing::info!(backend = %backend_cfg.name, limit, "adaptive in-flight limit changed");
                }
            }
        }
        let mut answer = match attempt {
            Ok(a) => a,
            Err(r) => {
                let failure = failure_of(&r, &report);
                permits.record(None, true, started.elapsed());
                return Ok(Step::Failed(Failed {
                    failure,
                    reject: r,
                    hint: None,
                }));
            }
        };
        let Some(resp) = upstream::downstream_header(&answer.session) else {
            permits.record(None, true, started.elapsed());
            return Ok(Step::Failed(Failed {
                failure: Failure::Reset,
                reject: Reject::new(Reason::UpstreamError, "upstream sent no response header"),
                hint: None,
            }));
        };
        let status = resp.status.as_u16();
        let header_elapsed = started.elapsed();
        let mut held: Vec<Bytes> = Vec::new();

        // A request the backend refuses as bad is final: pass it through.
        if matches!(status, 400 | 413 | 422) {
            held = read_prefix(&mut answer.session, ERROR_PREFIX).await;
            let joined: Vec<u8> = held.iter().flat_map(|b| b.iter().copied()).collect();
            if retry::is_request_fault(status, &joined)
                || !route.retry.retryable(&Failure::Status(status))
            {
                permits.record(Some(status), false, header_elapsed);
                let r = self
                    .commit(session, ctx, route, backend, answer, resp, held, None)
                    .await;
                return Ok(Step::Done(r));
            }
        }

        let failure = Failure::Status(status);
        if route.retry.retryable(&failure) {
            let hint = retry::server_hint(&resp.headers, SystemTime::now());
            permits.record(Some(status), false, header_elapsed);
            let msg = format!("upstream {} answered {status}", backend_cfg.name);
            // Keep the answer for a pass-through if this turns out to be the
            // last word; the caller decides, so stash it in the ctx.
            ctx.held_answer = Some(Box::new(HeldAnswer {
                answer,
                resp,
                held,
                bidx,
            }));
            return Ok(Step::Failed(Failed {
                failure,
                reject: Reject::new(Reason::UpstreamError, msg),
                hint,
            }));
        }

        // A server error that is not retried: `cache.stale_if_error` answers
        // with the expired entry instead, when there is one.
        if status >= 500 && ctx.cache.as_ref().is_some_and(|c| c.stale.is_some()) {
            permits.record(Some(status), false, header_elapsed);
            let held = Box::new(HeldAnswer {
                answer,
                resp,
                held,
                bidx,
            });
            drain_and_release(&self.connector, backend, held).await;
            if let Some(sent) = self.serve_stale(session, ctx).await {
                return Ok(Step::Done(sent));
            }
            return Ok(Step::Done(Err(Error::explain(
                ErrorType::InternalError,
                "stale entry vanished",
            ))));
        }

        // A final answer. With `first_token`, hold SSE headers until the
        // first token so that a slow start can still be retried invisibly.
        let mut held_for_token = false;
        if is_sse(&resp) && route.timeouts.hold_for_first_token {
            if let Some(limit) = first_token {
                let mut wait = limit.saturating_sub(started.elapsed());
                if let Some(d) = deadline {
                    wait = wait.min(d.saturating_duration_since(Instant::now()));
                }
                let waited = tokio::select! {
                    biased;
                    w = wait_first_token(&mut answer.session, wait) => w,
                    _ = session.downstream_session.read_body_or_idle(true) => {
                        return client_gone(ctx, "client closed the connection while waiting for the first token").map(|_| Step::Done(Ok(true)));
                    }
                };
                match waited {
                    Ok(chunks) => {
                        held = chunks;
                        held_for_token = true;
                    }
                    Err(failure) => {
                        permits.record(Some(status), true, started.elapsed());
                        let reject = match failure {
                            Failure::Timeout => Reject::new(
                                Reason::UpstreamTimeout,
                                format!(
                                    "upstream {} sent no first token within {}ms (timeouts.first_token)",
                                    backend_cfg.name,
                                    limit.as_millis()
                                ),
                            ),
                            _ => Reject::new(
                                Reason::UpstreamError,
                                format!("upstream {} broke off before the first token", backend_cfg.name),
                            ),
                        };
                        return Ok(Step::Failed(Failed {
                            failure,
                            reject,
                            hint: None,
                        }));
                    }
                }
            }
        }
        // Not held (`hold_for_first_token: false`): the first token is still
        // due, and a late one ends the stream that has started.
        let first_token_due = match (held_for_token, first_token) {
            (false, Some(limit)) if is_sse(&resp) => Some(started + limit),
            _ => None,
        };
        // The breakers' outcome is recorded when the body ends: a stream
        // that breaks mid-answer counts as a failure; a client that leaves,
        // as nothing. (Inline rather than in a wrapper async fn, which would
        // keep a second copy of commit's arguments for the whole stream.)
        let elapsed = started.elapsed();
        let r = self
            .commit(
                session,
                ctx,
                route,
                backend,
                answer,
                resp,
                held,
                first_token_due,
            )
            .await;
        match ctx.stream_end {
            Some(StreamEnd::UpstreamBroke | StreamEnd::IdleTimeout) => {
                permits.record(Some(status), true, elapsed)
            }
            Some(StreamEnd::ClientGone) => drop(permits),
            _ => permits.record(Some(status), false, elapsed),
        }
        Ok(Step::Done(r))
    }

    /// Send an upstream answer to the client: header, any body already read,
    /// then the rest as it arrives. `first_token_due`: an SSE stream whose
    /// first token has not arrived by then is ended with an error event.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn commit(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        route: &Arc<Route>,
        backend: &BackendRuntime,
        mut answer: upstream::Answer,
        resp: Box<ResponseHeader>,
        held: Vec<Bytes>,
        first_token_due: Option<Instant>,
    ) -> Result<bool> {
        let sse = is_sse(&resp);
        // A response that turns out to be SSE is a stream too, even without
        // `stream: true`: it needs a stream slot before anything is sent.
        if sse && ctx.stream.is_none() {
            if let Some(active) = ctx.active.clone() {
                if let Err(r) = self.take_stream_slot(ctx, &active, &route.name) {
                    upstream::release(
                        &self.connector,
                        backend,
                        answer.endpoint,
                        answer.session,
                        false,
                    )
                    .await;
                    return self.reject(session, ctx, r, true).await;
                }
            }
        }
        // A miss on a cached route: decide whether this answer may be stored
        // (followers of the same key start on it now).
        if let Some(c) = ctx.cache.as_mut() {
            let policy = c.policy.clone();
            if let Some(f) = c.fill.as_mut() {
                f.start(&resp, sse, &policy);
            }
        }
        let mut parts = RespParts::from(*resp);
        self.prepare_response(session, ctx, &mut parts)?;
        parts.headers.insert(
            super::headers::names::X_FLOODWALL_BACKEND,
            backend.name_header.clone(),
        );
        let resp = Box::new(ResponseHeader::from(parts));
        ctx.status = resp.status.as_u16();
        let head_only =
            session.req_header().method == http::Method::HEAD || matches!(ctx.status, 204 | 304);
        if let Err(e) = session.write_response_header(resp, false).await {
            upstream::release(
                &self.connector,
                backend,
                answer.endpoint,
                answer.session,
                false,
            )
            .await;
            ctx.error = Some(format!("writing response header: {}", e.etype().as_str()));
            ctx.stream_end = Some(StreamEnd::ClientGone);
            return Err(e);
        }
        ctx.response_started = true;
        if ctx.stream.is_some() {
            if let Ok(h) = self
                .shared
                .admission_metrics
                .stream_ttfb
                .get_metric_with_label_values(&[&route.name])
            {
                h.observe(ctx.start.elapsed().as_secs_f64());
            }
        }
        let mut bytes_out = 0u64;
        let mut end = None;
        let max_entry = ctx.cache.as_ref().map_or(0, |c| c.policy.max_entry);
        let mut fill = ctx.cache.as_mut().and_then(|c| c.fill.take());
        for chunk in held {
            bytes_out += chunk.len() as u64;
            if let Some(u) = ctx.usage.as_mut() {
                u.feed(sse, &chunk);
            }
            if let Some(f) = fill.as_mut() {
                f.feed(&chunk, max_entry);
            }
            if session
                .write_response_body(Some(chunk), false)
                .await
                .is_err()
            {
                end = Some((
                    StreamEnd::ClientGone,
                    Some("client closed the connection".to_string()),
                ));
                break;
            }
        }
        let (end, why) = match end {
            Some(e) => e,
            None if head_only => match session.write_response_body(None, true).await {
                Ok(()) => (StreamEnd::Complete, None),
                Err(_) => (
                    StreamEnd::ClientGone,
                    Some("client closed the connection".into()),
                ),
            },
            None => {
                let mut usage = ctx.usage.take();
                let limits = upstream::StreamLimits {
                    idle: route.timeouts.idle,
                    first_token_due,
                    cut_at: ctx.stream.as_ref().and_then(|s| s.cut_at),
                };
                let shutdown = self.shared.shutdown.clone();
                let r = upstream::stream_body(
                    session,
                    &mut answer.session,
                    sse,
                    limits,
                    &shutdown,
                    |c: &Bytes| {
                        bytes_out += c.len() as u64;
                        if let Some(u) = usage.as_mut() {
                            u.feed(sse, c);
                        }
                        if let Some(f) = fill.as_mut() {
                            f.feed(c, max_entry);
                        }
                    },
                )
                .await;
                ctx.usage = usage;
                r
            }
        };
        ctx.bytes_out = bytes_out;
        ctx.stream_end = Some(end);
        if let (Some(c), Some(f)) = (ctx.cache.as_mut(), fill) {
            c.fill = Some(f);
            self.finish_fill(ctx, end).await;
        }
        let m = &self.shared.admission_metrics;
        if ctx.stream.is_some() {
            match end {
                StreamEnd::ClientGone => {
                    if let Ok(c) = m
                        .stream_disconnects
                        .get_metric_with_label_values(&[&route.name])
                    {
                        c.inc();
                    }
                }
                StreamEnd::MaxDuration | StreamEnd::IdleTimeout => {
                    let kind = if end == StreamEnd::MaxDuration {
                        "max_duration"
                    } else {
                        "idle"
                    };
                    if let Ok(c) = m
                        .stream_timeouts
                        .get_metric_with_label_values(&[&route.name, kind])
                    {
                        c.inc();
                    }
                }
                _ => {}
            }
        }
        let reusable = end == StreamEnd::Complete && answer.session.response_done();
        upstream::release(
            &self.connector,
            backend,
            answer.endpoint,
            answer.session,
            reusable,
        )
        .await;
        match end {
            StreamEnd::Complete => Ok(true),
            StreamEnd::UpstreamBroke
            | StreamEnd::IdleTimeout
            | StreamEnd::ClientGone
            | StreamEnd::MaxDuration
            | StreamEnd::ShuttingDown => {
                let why = why.unwrap_or_default();
                ctx.error = Some(why.clone());
                // End the response abnormally: Pingora drops the connection
                // without writing the body terminator, so the cut is visible.
                Error::e_explain(ErrorType::ConnectionClosed, why)
            }
        }
    }

    /// The route's static `respond` fallback.
    fn respond_static<'a>(
        &'a self,
        session: &'a mut Session,
        ctx: &'a mut Ctx,
        status: u16,
        body: &'a serde_json::Value,
    ) -> BoxFut<'a, Result<bool>> {
        Box::pin(async move {
            let body = Bytes::from(body.to_string());
            let mut h = ResponseHeader::build(status, Some(8))?;
            h.insert_header("content-type", "application/json")?;
            h.insert_header("content-length", body.len().to_string())?;
            h.insert_header("x-floodwall-reason", "fallback_response")?;
            h.insert_header("x-floodwall-backend", "respond")?;
            h.insert_header("cache-control", "no-store")?;
            h.insert_header("x-request-id", ctx.request_id.as_str())?;
            if matches!(status, 429 | 503) {
                h.insert_header("retry-after", "1")?;
            }
            for (k, v) in &ctx.cors {
                h.insert_header(*k, v.as_str())?;
            }
            ctx.status = status;
            ctx.reason = Some(Reason::FallbackResponse);
            self.shared.metrics.local_response("fallback_response");
            session.write_response_header(Box::new(h), false).await?;
            ctx.response_started = true;
            session.write_response_body(Some(body), true).await?;
            Ok(true)
        })
    }
}

/// A retryable upstream answer kept aside: if no retry or fallback follows,
/// it is passed through as the upstream's own last word.
pub struct HeldAnswer {
    pub answer: upstream::Answer,
    pub resp: Box<ResponseHeader>,
    pub held: Vec<Bytes>,
    /// The backend (index in the snapshot) that gave it.
    pub bidx: usize,
}

fn circuit_open(backend: &str, retry_after: Duration) -> Reject {
    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut r = Reject::new(
        Reason::CircuitOpen,
        format!(
            "backend {backend} is unavailable: its circuit breaker is open (half-open in {secs}s)"
        ),
    );
    r.retry_after = Some(secs);
    r
}

pub(super) fn client_gone(ctx: &mut Ctx, why: &str) -> Result<bool> {
    ctx.error = Some(why.into());
    ctx.stream_end = Some(StreamEnd::ClientGone);
    Err(Error::create(
        ErrorType::ConnectionClosed,
        pingora::ErrorSource::Downstream,
        Some(why.to_string().into()),
        None,
    ))
}

/// The retry decision for a failed attempt, in the order the policy module
/// documents: the policy's own delay, then replay, deadline and budget.
fn decide(
    policy: &RetryPolicy,
    attempt_no: u32,
    failed: &Failed,
    method: &http::Method,
    deadline: Option<Instant>,
    budget: Option<&RetryBudget>,
) -> Delay {
    match policy.delay(
        attempt_no,
        &failed.failure,
        failed.hint,
        super::headers::random_u64(),
    ) {
        Delay::After(d) => {
            let now = Instant::now();
            if !policy.may_resend(method, &failed.failure) {
                Delay::GiveUp {
                    why: GiveUp::NoReplay,
                }
            } else if deadline.is_some_and(|dl| now + d >= dl) {
                Delay::GiveUp {
                    why: GiveUp::Deadline,
                }
            } else if budget.is_some_and(|b| !b.try_withdraw(now)) {
                Delay::GiveUp {
                    why: GiveUp::BudgetExhausted,
                }
            } else {
                Delay::After(d)
            }
        }
        g => g,
    }
}

/// Read up to `max` bytes of a body (to classify an error response).
async fn read_prefix(up: &mut HttpSession, max: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut n = 0;
    let read = async {
        while n < max {
            match up.read_response_body().await {
                Ok(Some(c)) => {
                    n += c.len();
                    out.push(c);
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT * 4, read).await;
    out
}

/// Read SSE chunks until the first token, within `limit`.
async fn wait_first_token(
    up: &mut HttpSession,
    limit: Duration,
) -> std::result::Result<Vec<Bytes>, Failure> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut held = Vec::new();
    let mut sc = SseScanner::new();
    loop {
        match tokio::time::timeout_at(deadline, up.read_response_body()).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(Ok(Some(c))) => {
                sc.feed(&c);
                held.push(c);
                if sc.first_token {
                    return Ok(held);
                }
            }
            // The body ended (or broke) before any token: pass on what there is.
            Ok(Ok(None)) => return Ok(held),
            Ok(Err(_)) => return Err(Failure::Reset),
        }
    }
}

/// Drain a failed answer briefly so its connection can be reused; close it otherwise.
pub(super) fn drain_and_release<'a>(
    connector: &'a upstream::Connectors,
    backend: &'a BackendRuntime,
    mut held: Box<HeldAnswer>,
) -> BoxFut<'a, ()> {
    Box::pin(async move {
        let done = tokio::time::timeout(DRAIN_TIMEOUT, async {
            let mut n = 0usize;
            loop {
                match held.answer.session.read_response_body().await {
                    Ok(Some(c)) => {
                        n += c.len();
                        if n > ERROR_PREFIX {
                            return false;
                        }
                    }
                    Ok(None) => return held.answer.session.response_done(),
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        upstream::release(
            connector,
            backend,
            held.answer.endpoint,
            held.answer.session,
            done,
        )
        .await;
    })
}

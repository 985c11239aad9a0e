//! The response cache in the request path (`routes[].cache`).
//!
//! After the rate limits (so a hit still counts as a request against them)
//! and before the concurrency and stream admission (a hit or a collapsed
//! miss never calls the upstream, so it takes no slot):
//!
//! 1. `Cache-Control: no-store` on the request, or a stream on a route with
//!    `streams: off`: `x-cache: BYPASS`, nothing looked up or stored.
//!    `no-cache`: the lookup is skipped and the fresh answer stored
//!    (`BYPASS`).
//! 2. A fresh entry is served (`HIT`) with an `age`; a stored stream is
//!    replayed as the same SSE events.
//! 3. Otherwise the request joins the key's flight
//!    ([`crate::policy::cache::flight`]): the leader goes upstream and
//!    records; followers receive the leader's answer as it arrives
//!    (`MISS`, counted in `floodwall_cache_collapsed_total`).
//! 4. The leader's answer is stored once it is complete (a 200 without
//!    `no-store`, the whole body, an SSE stream finished by `[DONE]` or a
//!    `finish_reason`, at most `max_entry` bytes).
//! 5. An expired entry found in step 2 is kept aside: if the upstream then
//!    fails (retries and fallbacks exhausted, breaker open, total timeout),
//!    it is served instead of the error (`STALE`), up to `stale_if_error`
//!    past its `ttl`.
//!
//! Token and cost budgets: a hit is free (its reservation is refunded)
//! unless the route sets `charge_hits: true`, when it is charged the usage
//! recorded in the stored answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};
use serde_json::Value;

use super::forward::client_gone;
use super::limits::{extract_identity, now_ms, UsageTracker};
use super::sse::SseScanner;
use super::upstream::StreamEnd;
use super::{BoxFut, Ctx, FloodwallProxy};
use crate::config::Route;
use crate::policy::cache::flight::{Head, HeadWait, Leader, Next};
use crate::policy::cache::key::Body;
use crate::policy::cache::lru::Lookup;
use crate::policy::cache::rules::{self, RequestMode};
use crate::policy::cache::{
    CacheKey, CachePolicy, Chunk, Entry, Join, KeyParts, OnLeaderFailure, Replay, Scope, Status,
};
use crate::state::Active;
use crate::telemetry::cache::CacheMetrics;

/// The cache's part of a request.
pub struct CacheCtx {
    pub status: Status,
    pub key: CacheKey,
    pub policy: Arc<CachePolicy>,
    /// An expired entry still within `stale_if_error`.
    pub stale: Option<Arc<Entry>>,
    /// Set on the request that goes upstream and may store its answer.
    /// Boxed: the response path takes it out for the length of the body,
    /// which would otherwise reserve its room in every request's future.
    pub fill: Option<Box<Fill>>,
}

/// Records the upstream answer of a miss, and relays it to followers.
pub struct Fill {
    leader: Option<Leader>,
    /// Whether the answer may be stored (decided at the header).
    storable: bool,
    head: Option<Head>,
    chunks: Vec<Chunk>,
    bytes: usize,
    too_big: bool,
    started: Instant,
    scanner: Option<SseScanner>,
}

fn header<'a>(session: &'a Session, name: &str) -> Option<&'a str> {
    session
        .req_header()
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
}

impl FloodwallProxy {
    /// Look the request up. `Ok(Some(_))`: answered (hit or collapsed
    /// miss); `Ok(None)`: go upstream (with `ctx.cache` set up to record).
    pub(super) async fn admit_cache(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        active: &Arc<Active>,
        route: &Arc<Route>,
        doc: Option<&Value>,
    ) -> Result<Option<bool>> {
        let Some(policy) = route.cache.clone() else {
            return Ok(None);
        };
        let m = &self.shared.cache_metrics;
        let mode = rules::request_mode(header(session, "cache-control"), header(session, "pragma"));
        let streaming = ctx.llm.as_ref().is_some_and(|l| l.stream);
        let key = self.cache_key(session, ctx, active, route, &policy, doc);
        let bypass = mode == RequestMode::NoStore || (streaming && !policy.streams);
        ctx.cache = Some(Box::new(CacheCtx {
            status: if bypass || mode == RequestMode::Refresh {
                Status::Bypass
            } else {
                Status::Miss
            },
            key: key.clone(),
            policy: policy.clone(),
            stale: None,
            fill: None,
        }));
        if bypass {
            CacheMetrics::inc(&m.requests, &[&route.name, "bypass"]);
            return Ok(None);
        }
        let store = &self.shared.cache;
        if mode == RequestMode::Normal {
            let (found, err) = store.get(policy.store, &key, now_ms()).await;
            if let Some(e) = err {
                CacheMetrics::inc(&m.errors, &[&route.name, "redis", "get"]);
                tracing::debug!(request_id = %ctx.request_id, error = %e, "cache lookup failed; treated as a miss");
            }
            match found {
                Lookup::Fresh(entry) => {
                    CacheMetrics::inc(&m.requests, &[&route.name, "hit"]);
                    return self
                        .serve_entry(session, ctx, &entry, Status::Hit)
                        .await
                        .map(Some);
                }
                Lookup::Stale(entry) => {
                    if let Some(c) = ctx.cache.as_mut() {
                        c.stale = Some(entry);
                    }
                }
                Lookup::Miss => {}
            }
        } else {
            CacheMetrics::inc(&m.requests, &[&route.name, "bypass"]);
        }

        // A miss: lead the flight for this key, or follow its leader.
        let flights = &self.shared.flights;
        let wait_until = tokio::time::Instant::now() + policy.lock_timeout;
        loop {
            match flights.join(key.as_str()) {
                Join::Leader(leader) => {
                    if mode == RequestMode::Normal {
                        CacheMetrics::inc(&m.requests, &[&route.name, "miss"]);
                    }
                    self.start_fill(ctx, Some(leader));
                    return Ok(None);
                }
                Join::Follower(mut f) => {
                    let limit = wait_until.saturating_duration_since(tokio::time::Instant::now());
                    let waited = tokio::select! {
                        biased;
                        w = f.head(limit) => w,
                        _ = session.downstream_session.read_body_or_idle(true) => {
                            return client_gone(ctx, "client closed the connection while waiting for an identical request's answer").map(Some);
                        }
                    };
                    match waited {
                        HeadWait::Head(head) => {
                            if mode == RequestMode::Normal {
                                CacheMetrics::inc(&m.requests, &[&route.name, "miss"]);
                            }
                            CacheMetrics::inc(&m.collapsed, &[&route.name]);
                            return self.serve_follower(session, ctx, f, &head).await.map(Some);
                        }
                        HeadWait::Failed
                            if policy.on_leader_failure == OnLeaderFailure::Takeover
                                && tokio::time::Instant::now() < wait_until =>
                        {
                            continue;
                        }
                        HeadWait::Failed | HeadWait::TimedOut => {
                            // Alone: go upstream, and store what comes back.
                            if mode == RequestMode::Normal {
                                CacheMetrics::inc(&m.requests, &[&route.name, "miss"]);
                            }
                            self.start_fill(ctx, None);
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }

    fn start_fill(&self, ctx: &mut Ctx, leader: Option<Leader>) {
        if let Some(c) = ctx.cache.as_mut() {
            c.fill = Some(Box::new(Fill {
                leader,
                storable: false,
                head: None,
                chunks: Vec::new(),
                bytes: 0,
                too_big: false,
                started: Instant::now(),
                scanner: None,
            }));
        }
    }

    fn cache_key(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        active: &Active,
        route: &Route,
        policy: &CachePolicy,
        doc: Option<&Value>,
    ) -> CacheKey {
        let identity = match policy.scope {
            Scope::Shared => None,
            Scope::User => {
                if ctx.identity.is_none() {
                    let who = extract_identity(session, active, ctx.llm.as_ref(), doc, now_ms());
                    ctx.identity = Some(Box::new(who));
                }
                Some(ctx.identity.as_ref().and_then(|i| i.user.clone()))
            }
        };
        let req = session.req_header();
        let headers: Vec<Option<&[u8]>> = policy
            .key_headers
            .iter()
            .map(|h| req.headers.get(h.as_str()).map(|v| v.as_bytes()))
            .collect();
        let body = match doc {
            Some(v) => Body::Json(v),
            None => Body::Raw(&ctx.body),
        };
        CacheKey::compute(&KeyParts {
            route: &route.name,
            method: req.method.as_str(),
            path_and_query: req.uri.path_and_query().map_or("/", |p| p.as_str()),
            headers,
            authorization: req.headers.get("authorization").map(|v| v.as_bytes()),
            identity: identity.as_ref().map(|o| o.as_deref()),
            body,
            ignore_fields: &policy.ignore_fields,
        })
    }

    /// The response header for a stored entry or a followed answer.
    #[allow(clippy::too_many_arguments)]
    fn cached_header(
        &self,
        session: &Session,
        ctx: &Ctx,
        status: u16,
        headers: &[(String, Vec<u8>)],
        body_len: Option<usize>,
        x_cache: Status,
        age: u64,
    ) -> Result<ResponseHeader> {
        // Plain `http` parts, as for a proxied answer (`prepare_response`).
        let bad = || Error::explain(ErrorType::InvalidHTTPHeader, "stored header is invalid");
        let mut h = http::Response::new(()).into_parts().0;
        h.status = http::StatusCode::from_u16(status).map_err(|_| bad())?;
        h.headers.reserve(headers.len() + 8);
        for (k, v) in headers {
            let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad())?;
            let value = http::HeaderValue::from_bytes(v).map_err(|_| bad())?;
            h.headers.append(name, value);
        }
        if let Some(n) = body_len {
            h.headers
                .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
        }
        h.headers.insert(
            super::headers::names::X_CACHE,
            http::HeaderValue::from_static(x_cache.as_str()),
        );
        h.headers
            .insert(http::header::AGE, http::HeaderValue::from(age));
        self.prepare_response(session, ctx, &mut h)?;
        Ok(ResponseHeader::from(h))
    }

    /// Serve a stored entry (`HIT` or `STALE`).
    pub(super) async fn serve_entry(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        entry: &Entry,
        status: Status,
    ) -> Result<bool> {
        if let Some(c) = ctx.cache.as_mut() {
            c.status = status;
            // A request answered from the cache leads no flight.
            c.fill = None;
        }
        let charge = ctx.cache.as_ref().is_some_and(|c| c.policy.charge_hits);
        ctx.usage = if charge && ctx.reservation.is_some() {
            let mut t = UsageTracker::new();
            for c in &entry.chunks {
                t.feed(entry.sse, &c.data);
            }
            Some(Box::new(t))
        } else {
            // No tracker: the reservation is refunded in full.
            None
        };
        let head_only = session.req_header().method == http::Method::HEAD;
        let body_len = (!entry.sse).then(|| entry.body_len());
        let h = self.cached_header(
            session,
            ctx,
            entry.status,
            &entry.headers,
            body_len,
            status,
            entry.age_secs(now_ms()),
        )?;
        ctx.status = entry.status;
        session.write_response_header(Box::new(h), false).await?;
        ctx.response_started = true;
        if head_only {
            session.write_response_body(None, true).await?;
            ctx.stream_end = Some(StreamEnd::Complete);
            return Ok(true);
        }
        let paced = entry.sse
            && ctx
                .cache
                .as_ref()
                .is_some_and(|c| c.policy.replay == Replay::Paced);
        let started = tokio::time::Instant::now();
        if entry.sse {
            for c in &entry.chunks {
                if paced {
                    tokio::time::sleep_until(started + Duration::from_millis(u64::from(c.at_ms)))
                        .await;
                }
                ctx.bytes_out += c.data.len() as u64;
                if let Err(e) = session
                    .write_response_body(Some(c.data.clone()), false)
                    .await
                {
                    ctx.stream_end = Some(StreamEnd::ClientGone);
                    ctx.error = Some("client closed the connection".into());
                    return Err(e);
                }
            }
            session.write_response_body(None, true).await?;
        } else {
            let body = entry.body();
            ctx.bytes_out += body.len() as u64;
            session.write_response_body(Some(body), true).await?;
        }
        ctx.stream_end = Some(StreamEnd::Complete);
        Ok(true)
    }

    /// Serve the answer of an identical request in flight, as it arrives.
    async fn serve_follower(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        mut f: crate::policy::cache::flight::Follower,
        head: &Head,
    ) -> Result<bool> {
        // A collapsed miss costs the upstream nothing: refund the reservation.
        ctx.usage = None;
        let h = self.cached_header(
            session,
            ctx,
            head.status,
            &head.headers,
            None,
            Status::Miss,
            0,
        )?;
        ctx.status = head.status;
        session.write_response_header(Box::new(h), false).await?;
        ctx.response_started = true;
        if session.req_header().method == http::Method::HEAD {
            session.write_response_body(None, true).await?;
            ctx.stream_end = Some(StreamEnd::Complete);
            return Ok(true);
        }
        loop {
            let next = tokio::select! {
                biased;
                n = f.next() => n,
                _ = session.downstream_session.read_body_or_idle(true) => {
                    return client_gone(ctx, "client closed the connection");
                }
            };
            match next {
                Next::Chunk(c) => {
                    ctx.bytes_out += c.len() as u64;
                    if let Err(e) = session.write_response_body(Some(c), false).await {
                        ctx.stream_end = Some(StreamEnd::ClientGone);
                        ctx.error = Some("client closed the connection".into());
                        return Err(e);
                    }
                }
                Next::End => {
                    session.write_response_body(None, true).await?;
                    ctx.stream_end = Some(StreamEnd::Complete);
                    return Ok(true);
                }
                Next::Cut => {
                    // The leader's stream broke; it already carried the
                    // error event, which this follower relayed.
                    let why = "the upstream answer this request shared broke off mid-response";
                    ctx.stream_end = Some(StreamEnd::UpstreamBroke);
                    ctx.error = Some(why.into());
                    return Error::e_explain(ErrorType::ConnectionClosed, why);
                }
            }
        }
    }

    /// Serve the stale entry kept aside, if there is one, instead of an
    /// upstream failure.
    pub(super) fn serve_stale<'a>(
        &'a self,
        session: &'a mut Session,
        ctx: &'a mut Ctx,
    ) -> BoxFut<'a, Option<Result<bool>>> {
        Box::pin(async move {
            let entry = ctx.cache.as_mut()?.stale.take()?;
            if ctx.response_started {
                return None;
            }
            let route = ctx
                .route
                .as_ref()
                .map(|r| r.name.clone())
                .unwrap_or_default();
            CacheMetrics::inc(&self.shared.cache_metrics.requests, &[&route, "stale"]);
            tracing::info!(request_id = %ctx.request_id, route = %route, age_s = entry.age_secs(now_ms()), "upstream failed; serving a stale cache entry");
            ctx.reason = None;
            Some(self.serve_entry(session, ctx, &entry, Status::Stale).await)
        })
    }
}

impl Fill {
    /// The upstream answered: decide whether it may be stored and, if so,
    /// let followers start on it.
    pub fn start(&mut self, resp: &ResponseHeader, sse: bool, policy: &CachePolicy) {
        let cc = resp
            .headers
            .get("cache-control")
            .and_then(|v| v.to_str().ok());
        self.storable =
            rules::storable(resp.status.as_u16(), cc, policy.scope) && (!sse || policy.streams);
        if !self.storable {
            if let Some(l) = self.leader.take() {
                l.fail();
            }
            return;
        }
        let headers: Vec<(String, Vec<u8>)> = resp
            .headers
            .iter()
            .filter(|(k, _)| rules::keep_header(k.as_str()))
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        let head = Head {
            status: resp.status.as_u16(),
            headers,
            sse,
        };
        if let Some(l) = &self.leader {
            l.publish_head(head.clone());
        }
        self.head = Some(head);
        self.scanner = sse.then(SseScanner::new);
        self.started = Instant::now();
    }

    /// One body chunk, as it goes to the client.
    pub fn feed(&mut self, chunk: &Bytes, max_entry: usize) {
        if !self.storable {
            return;
        }
        if let Some(l) = &self.leader {
            l.push(chunk.clone());
        }
        if let Some(s) = self.scanner.as_mut() {
            s.feed(chunk);
        }
        if self.too_big {
            return;
        }
        self.bytes += chunk.len();
        if self.bytes > max_entry {
            self.too_big = true;
            self.chunks = Vec::new();
            return;
        }
        let at_ms = u32::try_from(self.started.elapsed().as_millis()).unwrap_or(u32::MAX);
        self.chunks.push(Chunk {
            at_ms,
            data: chunk.clone(),
        });
    }
}

impl FloodwallProxy {
    /// The upstream answer ended: store it if it is complete, and release
    /// the followers (complete, or cut).
    pub(super) fn finish_fill<'a>(&'a self, ctx: &'a mut Ctx, end: StreamEnd) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let Some(c) = ctx.cache.as_mut() else { return };
            let Some(mut fill) = c.fill.take() else {
                return;
            };
            let policy = c.policy.clone();
            let key = c.key.clone();
            let Some(head) = fill.head.take().filter(|_| fill.storable) else {
                return; // the leader (if any) failed the flight already
            };
            let finished = fill.scanner.as_ref().is_some_and(|s| s.done || s.finished);
            let complete = rules::complete(head.sse, end == StreamEnd::Complete, finished);
            let Some(mut leader) = fill.leader.take() else {
                if complete && !fill.too_big {
                    self.store_entry(&policy, &key, head, fill.chunks).await;
                }
                return;
            };
            if !complete {
                leader.fail();
                return;
            }
            // Followers finish now; the flight stays joinable until the entry is
            // stored, so nobody in between goes upstream again.
            leader.complete();
            if !fill.too_big {
                self.store_entry(&policy, &key, head, fill.chunks).await;
            }
            drop(leader);
        })
    }

    async fn store_entry(
        &self,
        policy: &CachePolicy,
        key: &CacheKey,
        head: Head,
        chunks: Vec<Chunk>,
    ) {
        let now = now_ms();
        let entry = Arc::new(Entry {
            status: head.status,
            headers: head.headers,
            chunks,
            sse: head.sse,
            stored_at_ms: now,
            ttl_ms: policy.ttl.as_millis() as u64,
            keep_ms: policy.keep_for().as_millis() as u64,
        });
        let m = &self.shared.cache_metrics;
        let (evicted, err) = self.shared.cache.put(policy.store, key, entry, now).await;
        CacheMetrics::inc(&m.stores, &[&key.route]);
        for k in evicted {
            let route = k.split(':').next().unwrap_or("");
            CacheMetrics::inc(&m.evictions, &[route]);
        }
        if let Some(e) = err {
            CacheMetrics::inc(&m.errors, &[&key.route, "redis", "put"]);
            tracing::debug!(error = %e, route = %key.route, "could not store a cache entry in Redis");
        }
    }
}

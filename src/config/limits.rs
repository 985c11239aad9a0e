//! The limit sections of the policy file, compiled: `identity` (who is
//! calling), `prices` (USD per 1M tokens per model), the top-level
//! `rate_limits` and each route's `rate_limits`.
//!
//! Decoding follows the rest of the compiler: every problem is reported
//! with its position and the walk goes on. Checks that need more than one
//! section (a rule keyed by `user` needs `identity.user`, a cost budget needs
//! `prices`, a top-level rule's `routes` must name routes, rule names are
//! unique in the file) run once everything is read, in [`compile`]; route
//! rules are decoded while the routes are, so they carry the positions those
//! checks need in [`RateLimitRule::needs`].
//!
//! Counters are stored in integer units that both the in-memory store (u64)
//! and the Redis script (Lua numbers, which are doubles and exact only below
//! 2^53) hold exactly. That bounds `limit × per` for rolling windows; see
//! [`MAX_CAPACITY_UNITS`] and `docs/policy.md` ("Rate limits").

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::compile::{check_readable_file, env_var_name, header_name, is_name, Env};
use super::decode::{hint, list_names, Ctx, Map, Value};
use super::model::Route;
use super::units::format_duration;

// Defaults and ranges, shared with docs/policy.md.
pub const DEFAULT_TIER: &str = "default";
pub const DEFAULT_MAX_TOKENS: u64 = 256;
pub const DEFAULT_MISSING_IDENTITY_STATUS: u16 = 401;
pub const DEFAULT_JWT_HEADER: &str = "authorization";
pub const DEFAULT_JWT_CLAIM: &str = "sub";
/// The largest bucket a rolling window may have, in internal units
/// (`burst × per` in ticks; see [`Window::ticks`]). Half of 2^53, so a
/// bucket can also carry up to one full bucket of debt after a
/// reconciliation and still be exact in Lua.
pub const MAX_CAPACITY_UNITS: u64 = 1 << 52;
/// Rolling windows up to this length count time in milliseconds; longer
/// ones in seconds (so that day-long token windows keep a large range).
pub const MS_TICK_MAX_PER: Duration = Duration::from_secs(3600);

const MAX_REQUESTS: u64 = 1_000_000_000;
const MAX_TOKENS: u64 = 1_000_000_000_000;
/// $1,000,000 in nano-USD.
const MAX_COST_NANOS: u64 = 1_000_000 * NANOS_PER_USD;
const NANOS_PER_USD: u64 = 1_000_000_000;
/// Prices are USD per 1M tokens; stored as pico-USD per token, which is the
/// same number scaled by 10^6 (6 decimal places are kept exactly).
const PRICE_DECIMALS: u32 = 6;
const MAX_PRICE_USD_PER_M: u64 = 100_000;
const MIN_PER: Duration = Duration::from_secs(1);
const MAX_PER: Duration = Duration::from_secs(366 * 86_400);
const MAX_LEEWAY: Duration = Duration::from_secs(600);
const MAX_KEY_PARTS: usize = 8;
const MAX_IDENTITY_SOURCES: usize = 16;

// ---------------------------------------------------------------- types

/// Everything the limit sections compile to; one per snapshot.
#[derive(Debug, Default)]
pub struct LimitsConfig {
    pub identity: IdentityConfig,
    pub prices: Prices,
    /// Top-level rules, in file order.
    pub rules: Vec<Arc<RateLimitRule>>,
    /// For each route (parallel to `Snapshot::routes`): the top-level rules
    /// that apply to it, then the route's own rules.
    pub by_route: Vec<Arc<[Arc<RateLimitRule>]>>,
}

impl LimitsConfig {
    /// The rules that apply to the route at `route_index` (empty when none,
    /// or when the index is out of range).
    pub fn rules_for(&self, route_index: usize) -> &[Arc<RateLimitRule>] {
        self.by_route.get(route_index).map_or(&[], |r| &r[..])
    }

    /// Every rule in the file: top-level first, then each route's.
    pub fn all_rules(&self) -> impl Iterator<Item = &Arc<RateLimitRule>> {
        let mut seen: Vec<&str> = Vec::new();
        self.rules
            .iter()
            .chain(self.by_route.iter().flat_map(|r| r.iter()))
            .filter(move |r| {
                if seen.contains(&r.name.as_str()) {
                    false
                } else {
                    seen.push(r.name.as_str());
                    true
                }
            })
    }
}

/// `identity`: where the caller's user id and tier come from.
#[derive(Debug, Clone, Default)]
pub struct IdentityConfig {
    /// Tried in order; the first that yields a value wins.
    pub user: Vec<UserSource>,
    pub tier: TierConfig,
}

impl IdentityConfig {
    /// Whether a `body` source reads a field other than `user`, so the
    /// proxy must keep the parsed JSON document for identity extraction.
    pub fn needs_body_doc(&self) -> bool {
        self.user
            .iter()
            .any(|s| matches!(s, UserSource::Body { path, .. } if path != "user"))
    }
}

#[derive(Debug, Clone)]
pub enum UserSource {
    /// A request header (lower-case name), believed only from
    /// `server.trusted_proxies`.
    Header(String),
    Jwt(Arc<JwtSource>),
    /// A header holding an API key (`Bearer ` is stripped); the identity is
    /// a SHA-256 of the key, never the key.
    ApiKey {
        header: String,
    },
    /// A JSON body field, as a dotted path (`user`, `metadata.user_id`).
    Body {
        path: String,
        segments: Vec<String>,
    },
    /// The client IP (after `X-Forwarded-For` from trusted proxies).
    Ip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlg {
    Hs256,
    Rs256,
}

impl JwtAlg {
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlg::Hs256 => "HS256",
            JwtAlg::Rs256 => "RS256",
        }
    }
}

/// A secret or key, never printed.
#[derive(Clone)]
pub struct KeyBytes(pub Arc<[u8]>);

impl fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyBytes(<{} bytes>)", self.0.len())
    }
}

#[derive(Debug, Clone)]
pub struct JwtSource {
    /// Lower-case header name; `Bearer ` is stripped from its value.
    pub header: String,
    /// The claim that names the user (default `sub`).
    pub claim: String,
    pub algorithms: Vec<JwtAlg>,
    pub secret_env: Option<String>,
    /// The HS256 secret, read from `secret_env` when the file was compiled,
    /// as a ready HMAC key.
    pub hs256_secret: Option<crate::policy::identity::jwt::HmacKey>,
    pub public_key_file: Option<PathBuf>,
    /// The RS256 key as a DER `RSAPublicKey` (PKCS#1), read from
    /// `public_key_file` when the file was compiled.
    pub rs256_key: Option<KeyBytes>,
    /// When set, the `iss` claim must equal it.
    pub issuer: Option<String>,
    /// When set, the `aud` claim (a string or a list) must contain it.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Tokens that verified with this source, and their claims.
    pub verified: crate::policy::identity::jwt::Verified,
}

#[derive(Debug, Clone)]
pub struct TierConfig {
    pub from: TierFrom,
    /// The tier of a request whose source yields nothing (default `default`).
    pub default: String,
}

impl Default for TierConfig {
    fn default() -> Self {
        TierConfig {
            from: TierFrom::None,
            default: DEFAULT_TIER.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierFrom {
    None,
    /// A header (lower-case name), believed only from trusted proxies.
    Header(String),
    /// A claim of the verified JWT.
    JwtClaim(String),
}

/// `prices`: USD per 1M tokens, by model.
#[derive(Debug, Clone, Default)]
pub struct Prices {
    /// In file order; names ending in `*` are prefixes.
    entries: Vec<(String, Price)>,
}

/// A model's price in pico-USD per token (= USD per 1M tokens × 10^6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    pub input_pico: u64,
    pub output_pico: u64,
}

impl Price {
    /// The cost of a call, in nano-USD, rounded up.
    pub fn cost_nanos(&self, input_tokens: u64, output_tokens: u64) -> u64 {
        let pico = u128::from(input_tokens) * u128::from(self.input_pico)
            + u128::from(output_tokens) * u128::from(self.output_pico);
        u64::try_from(pico.div_ceil(1000)).unwrap_or(u64::MAX)
    }
}

impl Prices {
    pub fn new(entries: Vec<(String, Price)>) -> Prices {
        Prices { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Price)> {
        self.entries.iter().map(|(n, p)| (n.as_str(), *p))
    }

    /// The price of `model`: an exact entry, else the longest `prefix*`
    /// entry that matches (`*` alone matches every model).
    pub fn get(&self, model: &str) -> Option<Price> {
        if let Some((_, p)) = self.entries.iter().find(|(n, _)| n == model) {
            return Some(*p);
        }
        self.entries
            .iter()
            .filter_map(|(n, p)| {
                let prefix = n.strip_suffix('*')?;
                model.starts_with(prefix).then_some((prefix.len(), *p))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, p)| p)
    }
}

/// One rate-limit rule.
#[derive(Debug, Clone)]
pub struct RateLimitRule {
    /// Unique in the file; names the rule's counters (Redis keys) and
    /// metrics, so counters of an unchanged rule survive a reload.
    pub name: String,
    pub key: Vec<KeyPart>,
    /// The windows for requests whose tier has no entry in `tiers`.
    pub limits: Vec<Window>,
    /// Per-tier replacements of `limits`, in file order.
    pub tiers: Vec<(String, TierLimits)>,
    pub require_identity: bool,
    /// 401 (default) or 400.
    pub missing_identity_status: u16,
    pub on_store_error: OnStoreError,
    pub shadow: bool,
    pub exempt: Exempt,
    /// Top-level rules: the routes they apply to (`None` = every route).
    /// Route rules: `None`.
    pub routes: Option<Vec<String>>,
    /// The completion estimate for a request without `max_tokens`.
    pub default_max_tokens: u64,
    /// Where the rule is defined, e.g. `routes[0].rate_limits[1]`.
    pub origin: String,
    /// Positions for the checks that run once the whole file is read.
    pub(crate) needs: Needs,
}

impl RateLimitRule {
    /// The windows for `tier`: the tier's own, or `None` when the tier is
    /// unlimited, or the rule's `limits`.
    pub fn windows_for(&self, tier: &str) -> Option<&[Window]> {
        match self.tiers.iter().find(|(name, _)| name == tier) {
            Some((_, TierLimits::Unlimited)) => None,
            Some((_, TierLimits::Limits(windows))) => Some(windows),
            None => Some(&self.limits),
        }
    }

    /// Whether any window (of any tier) counts tokens or cost, so a
    /// request's admission reserves an estimate that must be reconciled.
    pub fn reserves_tokens(&self) -> bool {
        let any = |ws: &[Window]| ws.iter().any(|w| !matches!(w, Window::Requests { .. }));
        any(&self.limits)
            || self
                .tiers
                .iter()
                .any(|(_, t)| matches!(t, TierLimits::Limits(ws) if any(ws)))
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Needs {
    pub user_at: Option<Pos>,
    pub tier_at: Option<Pos>,
    pub identity_at: Option<Pos>,
    pub prices_at: Option<Pos>,
    pub name_at: Option<Pos>,
    pub routes_at: Vec<(String, Pos)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Pos {
    pub line: usize,
    pub col: usize,
    pub path: String,
}

impl Pos {
    fn of(v: &Value<'_>) -> Pos {
        Pos {
            line: v.line(),
            col: v.col(),
            path: v.path().to_string(),
        }
    }

    fn error(&self, ctx: &Ctx, message: impl Into<String>) {
        ctx.error(self.line, self.col, &self.path, message);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    Global,
    Ip,
    User,
    Tier,
    Route,
    Model,
    /// A request header (lower-case name).
    Header(String),
}

impl KeyPart {
    pub fn label(&self) -> String {
        match self {
            KeyPart::Global => "global".into(),
            KeyPart::Ip => "ip".into(),
            KeyPart::User => "user".into(),
            KeyPart::Tier => "tier".into(),
            KeyPart::Route => "route".into(),
            KeyPart::Model => "model".into(),
            KeyPart::Header(h) => format!("header:{h}"),
        }
    }
}

/// One window of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// `{ requests: N, per: DUR, burst: M }`: a rolling window (GCRA).
    Requests {
        limit: u64,
        per: Duration,
        burst: u64,
    },
    /// `{ tokens: N, per: DUR }`: a rolling window (GCRA) over tokens.
    Tokens { limit: u64, per: Duration },
    /// `{ cost_usd: X, per: 1d }`: a budget in nano-USD that resets at the
    /// UTC calendar boundary of its period.
    Cost { nanos: u64, period: CostPeriod },
}

/// The name of a window's counter inside a rule's state. It depends on the
/// window's kind and length only, so changing a limit keeps its counter and
/// changing `per` starts a new one. Displayed (and stored in Redis) as
/// `r:60000` (requests per minute), `t:86400000` (tokens per day), `c:d`
/// (cost per UTC day).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// Requests per this many milliseconds.
    Requests(u64),
    /// Tokens per this many milliseconds.
    Tokens(u64),
    Cost(CostPeriod),
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Requests(ms) => write!(f, "r:{ms}"),
            Field::Tokens(ms) => write!(f, "t:{ms}"),
            Field::Cost(period) => write!(f, "c:{}", period.code()),
        }
    }
}

impl Window {
    /// The window's counter (see [`Field`]).
    pub fn field(&self) -> Field {
        let ms = |per: &Duration| u64::try_from(per.as_millis()).unwrap_or(u64::MAX);
        match self {
            Window::Requests { per, .. } => Field::Requests(ms(per)),
            Window::Tokens { per, .. } => Field::Tokens(ms(per)),
            Window::Cost { period, .. } => Field::Cost(*period),
        }
    }

    /// For rolling windows: (milliseconds per tick, ticks per window).
    pub fn ticks(&self) -> Option<(u64, u64)> {
        let per = match self {
            Window::Requests { per, .. } | Window::Tokens { per, .. } => *per,
            Window::Cost { .. } => return None,
        };
        Some(ticks_of(per))
    }

    /// `requests`, `tokens` or `cost_usd`.
    pub fn kind(&self) -> &'static str {
        match self {
            Window::Requests { .. } => "requests",
            Window::Tokens { .. } => "tokens",
            Window::Cost { .. } => "cost_usd",
        }
    }

    /// As written in the policy, for logs and status: `10/1m`, `100000 tokens/1m`, `$5/1d`.
    pub fn describe(&self) -> String {
        match self {
            Window::Requests { limit, per, burst } if burst != limit => {
                format!("{limit}/{} (burst {burst})", format_duration(*per))
            }
            Window::Requests { limit, per, .. } => format!("{limit}/{}", format_duration(*per)),
            Window::Tokens { limit, per } => format!("{limit} tokens/{}", format_duration(*per)),
            Window::Cost { nanos, period } => {
                format!("${}/{}", format_usd(*nanos), period.code_long())
            }
        }
    }
}

/// (milliseconds per tick, ticks per window) for a rolling window of `per`.
pub fn ticks_of(per: Duration) -> (u64, u64) {
    let ms = u64::try_from(per.as_millis()).unwrap_or(u64::MAX);
    if per <= MS_TICK_MAX_PER {
        (1, ms.max(1))
    } else {
        (1000, (ms / 1000).max(1))
    }
}

/// Nano-USD as a decimal USD amount without trailing zeros (`5`, `0.25`).
pub fn format_usd(nanos: u64) -> String {
    let whole = nanos / NANOS_PER_USD;
    let frac = nanos % NANOS_PER_USD;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:09}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// The UTC calendar period of a cost budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CostPeriod {
    Hour,
    Day,
    /// ISO week: Monday 00:00 UTC to the next Monday.
    Week,
    /// Calendar month: the 1st 00:00 UTC to the next 1st.
    Month,
}

impl CostPeriod {
    pub fn code(self) -> &'static str {
        match self {
            CostPeriod::Hour => "h",
            CostPeriod::Day => "d",
            CostPeriod::Week => "w",
            CostPeriod::Month => "m",
        }
    }

    pub fn code_long(self) -> &'static str {
        match self {
            CostPeriod::Hour => "hour",
            CostPeriod::Day => "day",
            CostPeriod::Week => "week",
            CostPeriod::Month => "month",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierLimits {
    Unlimited,
    Limits(Vec<Window>),
}

/// `exempt`: requests the rule does not count.
#[derive(Debug, Clone, Default)]
pub struct Exempt {
    /// `/health` matches `/health` and `/health/...`; `/v1/models*` is a
    /// plain prefix.
    pub paths: Vec<String>,
    /// Rule keys (as shown in status: `alice`, `alice|chat`).
    pub keys: Vec<String>,
}

impl Exempt {
    pub fn path(&self, path: &str) -> bool {
        self.paths.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => {
                path.strip_prefix(p.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
                    || (p.ends_with('/') && path.starts_with(p.as_str()))
            }
        })
    }

    pub fn key(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k == key)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Admit while the store is unreachable (default).
    FailOpen,
    /// Reject with 503 `limiter_unavailable`.
    FailClosed,
    /// Enforce `limit ÷ store.redis.expected_replicas` in memory.
    Local,
}

impl OnStoreError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnStoreError::FailOpen => "fail_open",
            OnStoreError::FailClosed => "fail_closed",
            OnStoreError::Local => "local",
        }
    }
}

// ---------------------------------------------------------------- decoding

const IDENTITY_FIELDS: &[&str] = &["user", "tier"];
const USER_SOURCE_FIELDS: &[&str] = &["header", "jwt", "api_key", "body"];
const USER_SOURCE_NAMES: &[&str] = &["header", "jwt", "api_key", "body", "ip"];
const JWT_FIELDS: &[&str] = &[
    "header",
    "claim",
    "secret_env",
    "public_key_file",
    "algorithms",
    "issuer",
    "audience",
    "leeway",
];
const API_KEY_FIELDS: &[&str] = &["header"];
const TIER_FIELDS: &[&str] = &["header", "jwt_claim", "default"];
const PRICE_FIELDS: &[&str] = &["input", "output"];
const RULE_FIELDS: &[&str] = &[
    "name",
    "key",
    "limits",
    "tiers",
    "require_identity",
    "missing_identity_status",
    "on_store_error",
    "shadow",
    "exempt",
    "routes",
    "default_max_tokens",
];
const WINDOW_FIELDS: &[&str] = &["requests", "tokens", "cost_usd", "per", "burst"];
const EXEMPT_FIELDS: &[&str] = &["paths", "keys"];
const KEY_PART_NAMES: &[&str] = &[
    "global",
    "ip",
    "user",
    "tier",
    "route",
    "model",
    "header:<name>",
];

/// Reads `identity`, `prices` and the top-level `rate_limits` from the root
/// mapping, runs the checks that span sections over them and over the
/// routes' own rules, and returns the compiled limits.
pub(super) fn compile(top: &mut Map<'_>, env: Env<'_>, routes: &[Route]) -> LimitsConfig {
    let ctx = top.value().ctx();
    let identity = top
        .get("identity")
        .map(|v| identity(&v, env))
        .unwrap_or_default();
    let prices = top.get("prices").map(|v| prices(&v)).unwrap_or_default();
    let rules = top
        .get("rate_limits")
        .map(|v| rule_list(&v, true))
        .unwrap_or_default();

    let route_names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    let mut seen: Vec<(&str, &str)> = Vec::new();
    let all = rules
        .iter()
        .chain(routes.iter().flat_map(|r| r.rate_limits.iter()));
    for rule in all {
        let needs = &rule.needs;
        if let Some((_, other)) = seen.iter().find(|(n, _)| *n == rule.name) {
            if let Some(at) = &needs.name_at {
                at.error(
                    ctx,
                    format!(
                        "duplicate rate-limit rule name `{}` (also {other}); rule names key the counters, so they must be unique in the file",
                        rule.name
                    ),
                );
            }
        } else if !rule.name.is_empty() {
            seen.push((rule.name.as_str(), rule.origin.as_str()));
        }
        if identity.user.is_empty() {
            if let Some(at) = &needs.user_at {
                at.error(ctx, "the key uses `user`, but `identity.user` lists no sources, so every request would count against one shared bucket; configure `identity.user`");
            }
            if let Some(at) = &needs.identity_at {
                at.error(ctx, "`require_identity: true` needs `identity.user` sources; without them every request would be refused");
            }
        }
        if identity.tier.from == TierFrom::None {
            if let Some(at) = &needs.tier_at {
                at.error(ctx, "tiers need `identity.tier` (a header or a JWT claim); without it every request has the default tier");
            }
        }
        if prices.is_empty() {
            if let Some(at) = &needs.prices_at {
                at.error(
                    ctx,
                    "a `cost_usd` budget needs a `prices` table (USD per 1M tokens per model)",
                );
            }
        }
        for (name, at) in &needs.routes_at {
            if !route_names.contains(&name.as_str()) {
                let message = if route_names.is_empty() {
                    format!("unknown route `{name}`; no routes are defined")
                } else {
                    format!(
                        "unknown route `{name}`; defined routes: {}{}",
                        list_names(&route_names),
                        hint(name, &route_names)
                    )
                };
                at.error(ctx, message);
            }
        }
    }

    let by_route = routes
        .iter()
        .map(|route| {
            rules
                .iter()
                .filter(|r| {
                    r.routes
                        .as_ref()
                        .is_none_or(|names| names.contains(&route.name))
                })
                .chain(route.rate_limits.iter())
                .cloned()
                .collect::<Vec<_>>()
                .into()
        })
        .collect();
    LimitsConfig {
        identity,
        prices,
        rules,
        by_route,
    }
}

/// `routes[].rate_limits`.
pub(super) fn route_rules(v: &Value<'_>) -> Vec<Arc<RateLimitRule>> {
    rule_list(v, false)
}

// ---------------------------------------------------------------- identity

fn identity(v: &Value<'_>, env: Env<'_>) -> IdentityConfig {
    let mut config = IdentityConfig::default();
    let Some(mut m) = v.map(IDENTITY_FIELDS) else {
        return config;
    };
    if let Some(list) = m.get("user") {
        if let Some(items) = list.list() {
            if items.is_empty() {
                list.error("must list at least one source (leave `user` out for no user identity)");
            }
            if items.len() > MAX_IDENTITY_SOURCES {
                list.error(format!(
                    "must list at most {MAX_IDENTITY_SOURCES} sources (was {})",
                    items.len()
                ));
            }
            config.user = items
                .iter()
                .filter_map(|item| user_source(item, env))
                .collect();
        }
    }
    if let Some(tier) = m.get("tier") {
        config.tier = tier_config(&tier, &config.user);
    }
    config
}

fn user_source(item: &Value<'_>, env: Env<'_>) -> Option<UserSource> {
    if item.node().as_scalar().is_some() {
        let text = item.str()?;
        if text == "ip" {
            return Some(UserSource::Ip);
        }
        item.error(format!(
            "expected `ip` or a mapping with one of {} (was `{text}`){}",
            list_names(USER_SOURCE_FIELDS),
            hint(text, USER_SOURCE_NAMES)
        ));
        return None;
    }
    let mut m = item.map(USER_SOURCE_FIELDS)?;
    let set: Vec<&str> = USER_SOURCE_FIELDS
        .iter()
        .copied()
        .filter(|f| m.has(f))
        .collect();
    if set.len() != 1 {
        if set.is_empty() && m.misspelled(USER_SOURCE_FIELDS) {
            return None;
        }
        item.error(format!(
            "a source sets exactly one of {}{}",
            list_names(USER_SOURCE_FIELDS),
            if set.is_empty() {
                String::new()
            } else {
                format!(
                    " (this one sets {}); write each as its own list item",
                    list_names(&set)
                )
            }
        ));
        for f in USER_SOURCE_FIELDS {
            m.get(f);
        }
        return None;
    }
    match set[0] {
        "header" => header_name(&m.get("header")?).map(UserSource::Header),
        "jwt" => jwt_source(&m.get("jwt")?, env).map(|j| UserSource::Jwt(Arc::new(j))),
        "api_key" => {
            let v = m.get("api_key")?;
            let mut a = v.map(API_KEY_FIELDS)?;
            let header = match a.get("header") {
                Some(h) => header_name(&h)?,
                None => DEFAULT_JWT_HEADER.to_string(),
            };
            Some(UserSource::ApiKey { header })
        }
        _ => {
            let v = m.get("body")?;
            let path = dotted_path(&v)?;
            let segments = path.split('.').map(str::to_string).collect();
            Some(UserSource::Body { path, segments })
        }
    }
}

fn dotted_path(v: &Value<'_>) -> Option<String> {
    v.parse_with("a dotted field path", |s| {
        let ok = !s.is_empty() && s.split('.').all(|seg| !seg.is_empty() && seg.trim() == seg);
        if ok {
            Ok(s.to_string())
        } else {
            Err(format!(
                "`{s}` is not a dotted field path such as `user` or `metadata.user_id`"
            ))
        }
    })
}

fn jwt_source(v: &Value<'_>, env: Env<'_>) -> Option<JwtSource> {
    let mut m = v.map(JWT_FIELDS)?;
    let header = match m.get("header") {
        Some(h) => header_name(&h)?,
        None => DEFAULT_JWT_HEADER.to_string(),
    };
    let claim = match m.get("claim") {
        Some(c) => c.non_empty_string()?,
        None => DEFAULT_JWT_CLAIM.to_string(),
    };
    let mut source = JwtSource {
        header,
        claim,
        algorithms: Vec::new(),
        secret_env: None,
        hs256_secret: None,
        public_key_file: None,
        rs256_key: None,
        issuer: m.get("issuer").and_then(|i| i.non_empty_string()),
        audience: m.get("audience").and_then(|a| a.non_empty_string()),
        leeway: m
            .duration_in("leeway", Duration::ZERO..=MAX_LEEWAY)
            .unwrap_or(Duration::ZERO),
        verified: Default::default(),
    };
    let secret_value = m.get("secret_env");
    if let Some(name_value) = &secret_value {
        if let Some(name) = env_var_name(name_value) {
            match env(&name).filter(|s| !s.is_empty()) {
                Some(secret) if secret.len() < 16 => name_value.error(format!(
                    "the secret in `{name}` is {} bytes; HS256 needs at least 16 (32 recommended)",
                    secret.len()
                )),
                Some(secret) => {
                    source.hs256_secret = Some(crate::policy::identity::jwt::HmacKey::new(
                        secret.as_bytes(),
                    ))
                }
                None => name_value.error(format!(
                    "environment variable `{name}` is not set or is empty"
                )),
            }
            source.secret_env = Some(name);
        }
    }
    let key_value = m.get("public_key_file");
    if let Some(file) = &key_value {
        if let Some(path) = file.parse_with("a file path", check_readable_file) {
            match std::fs::read_to_string(&path) {
                Ok(text) => match crate::policy::identity::jwt::rsa_public_key_from_pem(&text) {
                    Ok(der) => source.rs256_key = Some(KeyBytes(der.into())),
                    Err(why) => file.error(format!("`{}`: {why}", path.display())),
                },
                Err(e) => file.error(format!("cannot read `{}`: {e}", path.display())),
            }
            source.public_key_file = Some(path);
        }
    }
    let algs_value = m.get("algorithms");
    match &algs_value {
        Some(list) => {
            for item in list.list_or_one().unwrap_or_default() {
                let Some(alg) = item.one_of(&[("HS256", JwtAlg::Hs256), ("RS256", JwtAlg::Rs256)])
                else {
                    continue;
                };
                if source.algorithms.contains(&alg) {
                    item.error(format!("`{}` is listed twice", alg.as_str()));
                    continue;
                }
                source.algorithms.push(alg);
            }
            if list.list_or_one().is_some_and(|l| l.is_empty()) {
                list.error("must list at least one algorithm (`HS256`, `RS256`)");
            }
        }
        None => {
            if secret_value.is_some() {
                source.algorithms.push(JwtAlg::Hs256);
            }
            if key_value.is_some() {
                source.algorithms.push(JwtAlg::Rs256);
            }
        }
    }
    if secret_value.is_none() && key_value.is_none() {
        v.error("set `secret_env` (HS256) or `public_key_file` (RS256): a token is only believed once its signature is verified");
    }
    let at = algs_value.as_ref().unwrap_or(v);
    if source.algorithms.contains(&JwtAlg::Hs256) && secret_value.is_none() {
        at.error("`HS256` needs `secret_env`");
    }
    if source.algorithms.contains(&JwtAlg::Rs256) && key_value.is_none() {
        at.error("`RS256` needs `public_key_file`");
    }
    Some(source)
}

fn tier_config(v: &Value<'_>, users: &[UserSource]) -> TierConfig {
    let mut config = TierConfig::default();
    let Some(mut m) = v.map(TIER_FIELDS) else {
        return config;
    };
    match (m.get("header"), m.get("jwt_claim")) {
        (Some(_), Some(claim)) => claim.error("set `header` or `jwt_claim`, not both"),
        (Some(h), None) => {
            if let Some(name) = header_name(&h) {
                config.from = TierFrom::Header(name);
            }
        }
        (None, Some(c)) => {
            if let Some(claim) = c.non_empty_string() {
                if !users.iter().any(|u| matches!(u, UserSource::Jwt(_))) {
                    c.error("`jwt_claim` reads the verified token of a `jwt` source in `identity.user`; add one");
                }
                config.from = TierFrom::JwtClaim(claim);
            }
        }
        (None, None) if m.misspelled(&["header", "jwt_claim"]) => {}
        (None, None) => v.error("set `header` or `jwt_claim`"),
    }
    if let Some(d) = m.get("default") {
        if let Some(name) = tier_name(&d) {
            config.default = name;
        }
    }
    config
}

fn tier_name(v: &Value<'_>) -> Option<String> {
    v.parse_with("a tier name", |s| {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if ok {
            Ok(s.to_string())
        } else {
            Err(format!(
                "`{s}` is not a tier name (1 to 64 letters, digits, `_`, `-`, `.`)"
            ))
        }
    })
}

// ---------------------------------------------------------------- prices

fn prices(v: &Value<'_>) -> Prices {
    let mut entries = Vec::new();
    for (key, value) in v.entries().unwrap_or_default() {
        let name = key.name.trim();
        if name.is_empty()
            || (name.contains('*') && !(name.ends_with('*') && name.matches('*').count() == 1))
        {
            value.ctx().error(
                key.line,
                key.col,
                value.path(),
                format!(
                    "`{}` is not a model name or a `prefix*` pattern (one `*`, at the end)",
                    key.name
                ),
            );
            continue;
        }
        let Some(mut m) = value.map(PRICE_FIELDS) else {
            continue;
        };
        let input = m.require("input").and_then(|x| price(&x));
        let output = m.require("output").and_then(|x| price(&x));
        if let (Some(input_pico), Some(output_pico)) = (input, output) {
            entries.push((
                name.to_string(),
                Price {
                    input_pico,
                    output_pico,
                },
            ));
        }
    }
    Prices { entries }
}

/// USD per 1M tokens -> pico-USD per token.
fn price(v: &Value<'_>) -> Option<u64> {
    v.parse_with("a price in USD per 1M tokens, such as 0.15", |s| {
        let scaled = parse_decimal(s, PRICE_DECIMALS).map_err(|why| {
            format!("expected a price in USD per 1M tokens such as 0.15 or 2.50, got `{s}` ({why})")
        })?;
        if scaled > MAX_PRICE_USD_PER_M * 10u64.pow(PRICE_DECIMALS) {
            return Err(format!(
                "must be 0..={MAX_PRICE_USD_PER_M} USD per 1M tokens (was {s})"
            ));
        }
        Ok(scaled)
    })
}

/// A non-negative decimal such as `0.15` as an integer scaled by
/// 10^`decimals`, exactly. More decimal places than that is an error.
pub fn parse_decimal(text: &str, decimals: u32) -> Result<u64, String> {
    let text = text.trim();
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits_ok = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if whole.is_empty()
        || !digits_ok(whole)
        || !digits_ok(frac)
        || (text.contains('.') && frac.is_empty())
    {
        return Err("not a plain decimal number".to_string());
    }
    if frac.len() > decimals as usize {
        return Err(format!("at most {decimals} decimal places"));
    }
    let too_large = || "too large".to_string();
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let frac_value: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| too_large())?
    };
    let frac_scaled = frac_value * 10u64.pow(decimals - frac.len() as u32);
    whole
        .checked_mul(10u64.pow(decimals))
        .and_then(|w| w.checked_add(frac_scaled))
        .ok_or_else(too_large)
}

// ---------------------------------------------------------------- rules

fn rule_list(v: &Value<'_>, top_level: bool) -> Vec<Arc<RateLimitRule>> {
    let Some(items) = v.list() else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| rule(item, top_level))
        .map(Arc::new)
        .collect()
}

fn rule(v: &Value<'_>, top_level: bool) -> Option<RateLimitRule> {
    let mut m = v.map(RULE_FIELDS)?;
    let mut needs = Needs::default();
    let name = m.require("name").and_then(|n| {
        let name = n.str()?;
        if !is_name(name) || name.len() > 64 {
            n.error(format!(
                "rule name `{name}` must be 1 to 64 of a-z, 0-9, `_` and `-`"
            ));
            return None;
        }
        needs.name_at = Some(Pos::of(&n));
        Some(name.to_string())
    });
    let key = m
        .require("key")
        .map(|k| key_parts(&k, &mut needs))
        .unwrap_or_default();
    let limits = m
        .require("limits")
        .map(|l| windows(&l, &mut needs))
        .unwrap_or_default();
    let mut tiers = Vec::new();
    if let Some(t) = m.get("tiers") {
        needs.tier_at = Some(Pos::of(&t));
        for (tier_key, value) in t.entries().unwrap_or_default() {
            let name = tier_key.name.clone();
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !valid {
                value.ctx().error(
                    tier_key.line,
                    tier_key.col,
                    value.path(),
                    format!("`{name}` is not a tier name (1 to 64 letters, digits, `_`, `-`, `.`)"),
                );
                continue;
            }
            let limits = match value.node().as_scalar() {
                Some(("unlimited", _)) => TierLimits::Unlimited,
                Some((text, _)) => {
                    value.error(format!(
                        "expected a list of windows or `unlimited` (was `{text}`)"
                    ));
                    continue;
                }
                None => TierLimits::Limits(windows(&value, &mut needs)),
            };
            tiers.push((name, limits));
        }
    }
    let require_value = m.get("require_identity");
    let require_identity = require_value
        .as_ref()
        .and_then(|r| r.bool())
        .unwrap_or(false);
    if require_identity {
        needs.identity_at = require_value.as_ref().map(Pos::of);
    }
    let missing_identity_status = m
        .get("missing_identity_status")
        .and_then(|s| {
            let n = s.int()?;
            match n {
                400 | 401 => Some(n as u16),
                _ => {
                    s.error(format!("must be 401 or 400 (was {n})"));
                    None
                }
            }
        })
        .unwrap_or(DEFAULT_MISSING_IDENTITY_STATUS);
    let on_store_error = m
        .one_of(
            "on_store_error",
            &[
                ("fail_open", OnStoreError::FailOpen),
                ("fail_closed", OnStoreError::FailClosed),
                ("local", OnStoreError::Local),
            ],
        )
        .unwrap_or(OnStoreError::FailOpen);
    let shadow = m.bool("shadow").unwrap_or(false);
    let exempt = m.get("exempt").map(|e| exempt(&e)).unwrap_or_default();
    let routes = m.get("routes").and_then(|r| {
        if !top_level {
            r.error("`routes` is for top-level rules; a rule under a route applies to that route");
            return None;
        }
        let mut names: Vec<String> = Vec::new();
        let items = r.list_or_one()?;
        if items.is_empty() {
            r.error("must list at least one route (leave `routes` out to apply the rule to every route)");
        }
        for item in items {
            let Some(name) = item.string() else { continue };
            if names.contains(&name) {
                item.error(format!("route `{name}` is listed twice"));
                continue;
            }
            needs.routes_at.push((name.clone(), Pos::of(&item)));
            names.push(name);
        }
        Some(names)
    });
    let default_max_tokens = m
        .u64_in("default_max_tokens", 1..=10_000_000)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    Some(RateLimitRule {
        name: name?,
        key,
        limits,
        tiers,
        require_identity,
        missing_identity_status,
        on_store_error,
        shadow,
        exempt,
        routes,
        default_max_tokens,
        origin: v.path().to_string(),
        needs,
    })
}

fn key_parts(v: &Value<'_>, needs: &mut Needs) -> Vec<KeyPart> {
    let Some(items) = v.list_or_one() else {
        return Vec::new();
    };
    if items.is_empty() {
        v.error(format!(
            "must list at least one of {}",
            list_names(KEY_PART_NAMES)
        ));
    }
    if items.len() > MAX_KEY_PARTS {
        v.error(format!(
            "must list at most {MAX_KEY_PARTS} parts (was {})",
            items.len()
        ));
    }
    let mut parts = Vec::new();
    for item in items {
        let Some(text) = item.str() else { continue };
        let part = match text {
            "global" => KeyPart::Global,
            "ip" => KeyPart::Ip,
            "user" => {
                needs.user_at = Some(Pos::of(&item));
                KeyPart::User
            }
            "tier" => KeyPart::Tier,
            "route" => KeyPart::Route,
            "model" => KeyPart::Model,
            other => match other.strip_prefix("header:") {
                Some(name) => {
                    let lower = name.trim().to_ascii_lowercase();
                    if lower.is_empty() || http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
                        item.error(format!("`{name}` is not a valid header name"));
                        continue;
                    }
                    KeyPart::Header(lower)
                }
                None => {
                    item.error(format!(
                        "must be one of {} (was `{other}`){}",
                        list_names(KEY_PART_NAMES),
                        hint(other, KEY_PART_NAMES)
                    ));
                    continue;
                }
            },
        };
        if parts.contains(&part) {
            item.error(format!("`{text}` is listed twice"));
            continue;
        }
        parts.push(part);
    }
    if parts.contains(&KeyPart::Global) && parts.len() > 1 {
        v.error(
            "`global` counts every request in one bucket and cannot be combined with other parts",
        );
        parts.retain(|p| *p == KeyPart::Global);
    }
    parts
}

fn windows(v: &Value<'_>, needs: &mut Needs) -> Vec<Window> {
    let Some(items) = v.list() else {
        return Vec::new();
    };
    if items.is_empty() {
        v.error("must list at least one window, e.g. `[{ requests: 10, per: 1m }]`");
    }
    let mut out: Vec<Window> = Vec::new();
    for item in items {
        let Some(w) = window(&item, needs) else {
            continue;
        };
        if let Some(other) = out.iter().find(|o| o.field() == w.field()) {
            item.error(format!(
                "a second `{}` window of the same length as `{}`; merge them (one limit per kind and length)",
                w.kind(),
                other.describe()
            ));
            continue;
        }
        out.push(w);
    }
    out
}

fn window(v: &Value<'_>, needs: &mut Needs) -> Option<Window> {
    let mut m = v.map(WINDOW_FIELDS)?;
    let kinds = ["requests", "tokens", "cost_usd"];
    let set: Vec<&str> = kinds.iter().copied().filter(|k| m.has(k)).collect();
    let per_value = m.require("per");
    let burst_value = m.get("burst");
    if set.len() != 1 {
        for k in kinds {
            m.get(k);
        }
        if !(set.is_empty() && m.misspelled(&kinds)) {
            v.error(format!(
                "a window sets exactly one of {}",
                list_names(&kinds)
            ));
        }
        return None;
    }
    let kind = set[0];
    let amount = m.get(kind)?;
    if kind != "requests" {
        if let Some(b) = &burst_value {
            b.error("`burst` applies to `requests` windows only");
        }
    }
    match kind {
        "cost_usd" => {
            needs.prices_at = Some(Pos::of(&amount));
            let nanos = amount.parse_with("an amount in USD, such as 5 or 0.50", |s| {
                let n = parse_decimal(s, 9).map_err(|why| {
                    format!("expected an amount in USD such as 5 or 0.50, got `{s}` ({why})")
                })?;
                if n == 0 || n > MAX_COST_NANOS {
                    return Err(format!("must be 0.000000001..=1000000 USD (was {s})"));
                }
                Ok(n)
            });
            let period = per_value.and_then(|p| cost_period(&p));
            Some(Window::Cost {
                nanos: nanos?,
                period: period?,
            })
        }
        _ => {
            let max = if kind == "requests" {
                MAX_REQUESTS
            } else {
                MAX_TOKENS
            };
            let limit = amount.u64_in(1..=max);
            let per = per_value.as_ref().and_then(|p| rolling_per(p));
            let burst = match (&burst_value, kind) {
                (Some(b), "requests") => Some(b.u64_in(1..=MAX_REQUESTS)?),
                _ => None,
            };
            let (limit, per) = (limit?, per?);
            let burst = burst.unwrap_or(limit);
            let (_, ticks) = ticks_of(per);
            let capacity = u128::from(burst) * u128::from(ticks);
            if capacity > u128::from(MAX_CAPACITY_UNITS) {
                let max_for_per = MAX_CAPACITY_UNITS / ticks;
                let at = if burst_value.is_some() && burst != limit {
                    burst_value.as_ref().unwrap_or(&amount)
                } else {
                    &amount
                };
                at.error(format!(
                    "is too large for `per: {}`: the counter is exact up to {max_for_per} per {} (was {})",
                    format_duration(per),
                    format_duration(per),
                    if burst != limit { burst } else { limit }
                ));
                return None;
            }
            Some(if kind == "requests" {
                Window::Requests { limit, per, burst }
            } else {
                Window::Tokens { limit, per }
            })
        }
    }
}

/// The length of a rolling window: `1s..=366d`, a whole number of
/// milliseconds (up to 1h) or seconds (longer).
fn rolling_per(v: &Value<'_>) -> Option<Duration> {
    let per = v.duration_in(MIN_PER..=MAX_PER)?;
    let whole = if per <= MS_TICK_MAX_PER {
        per.subsec_nanos() % 1_000_000 == 0
    } else {
        per.subsec_nanos() == 0
    };
    if !whole {
        v.error(if per <= MS_TICK_MAX_PER {
            "must be a whole number of milliseconds"
        } else {
            "must be a whole number of seconds (windows over 1h count in seconds)"
        });
        return None;
    }
    Some(per)
}

fn cost_period(v: &Value<'_>) -> Option<CostPeriod> {
    let text = v.str()?;
    let period = match text {
        "1h" => CostPeriod::Hour,
        "1d" | "24h" => CostPeriod::Day,
        "7d" | "1w" | "week" => CostPeriod::Week,
        "30d" | "1mo" | "month" => CostPeriod::Month,
        _ => {
            v.error(format!(
                "a cost budget resets at a UTC calendar boundary; `per` must be `1h`, `1d` (UTC day), `7d` (ISO week, from Monday) or `month` (also written `30d` or `1mo`: the calendar month) (was `{text}`)"
            ));
            return None;
        }
    };
    Some(period)
}

fn exempt(v: &Value<'_>) -> Exempt {
    let mut config = Exempt::default();
    let Some(mut m) = v.map(EXEMPT_FIELDS) else {
        return config;
    };
    if let Some(list) = m.get("paths") {
        for item in list.list_or_one().unwrap_or_default() {
            let Some(path) = item.parse_with("a path", |s| {
                if !s.starts_with('/') {
                    Err(format!("a path must start with `/` (was `{s}`)"))
                } else if s.contains(|c: char| c.is_whitespace() || c == '?' || c == '#')
                    || s[..s.len() - 1].contains('*')
                {
                    Err(format!(
                        "must not contain spaces, `?`, `#` or a `*` other than a final one (was `{s}`)"
                    ))
                } else {
                    Ok(s.to_string())
                }
            }) else {
                continue;
            };
            config.paths.push(path);
        }
    }
    if let Some(list) = m.get("keys") {
        for item in list.list_or_one().unwrap_or_default() {
            if let Some(key) = item.non_empty_string() {
                config.keys.push(key);
            }
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact() {
        assert_eq!(parse_decimal("0.15", 6), Ok(150_000));
        assert_eq!(parse_decimal("2", 6), Ok(2_000_000));
        assert_eq!(parse_decimal("0.000001", 6), Ok(1));
        assert!(parse_decimal("0.0000001", 6).is_err());
        assert!(parse_decimal("1.", 6).is_err());
        assert!(parse_decimal(".5", 6).is_err());
        assert!(parse_decimal("-1", 6).is_err());
        assert!(parse_decimal("1e3", 6).is_err());
    }

    #[test]
    fn prices_match_exactly_then_by_longest_prefix() {
        let p = |i| Price {
            input_pico: i,
            output_pico: 0,
        };
        let prices = Prices::new(vec![
            ("gpt-4o".into(), p(1)),
            ("gpt-4o*".into(), p(2)),
            ("gpt-4o-mini*".into(), p(3)),
            ("*".into(), p(4)),
        ]);
        assert_eq!(prices.get("gpt-4o"), Some(p(1)));
        assert_eq!(prices.get("gpt-4o-2024-08-06"), Some(p(2)));
        assert_eq!(prices.get("gpt-4o-mini-2024-07-18"), Some(p(3)));
        assert_eq!(prices.get("llama"), Some(p(4)));
        assert_eq!(Prices::default().get("x"), None);
    }

    #[test]
    fn cost_is_rounded_up_to_a_nano_dollar() {
        // gpt-4o-mini: $0.15 in, $0.60 out per 1M tokens.
        let price = Price {
            input_pico: 150_000,
            output_pico: 600_000,
        };
        // 1000 in + 500 out = 150_000_000 + 300_000_000 pico = 450_000 nano.
        assert_eq!(price.cost_nanos(1000, 500), 450_000);
        assert_eq!(price.cost_nanos(1, 0), 150);
        let odd = Price {
            input_pico: 1,
            output_pico: 0,
        };
        assert_eq!(odd.cost_nanos(1, 0), 1);
    }

    #[test]
    fn window_fields_depend_on_kind_and_length_only() {
        let a = Window::Requests {
            limit: 10,
            per: Duration::from_secs(60),
            burst: 10,
        };
        let b = Window::Requests {
            limit: 20,
            per: Duration::from_secs(60),
            burst: 5,
        };
        assert_eq!(a.field().to_string(), "r:60000");
        assert_eq!(a.field(), b.field());
        assert_eq!(
            Window::Tokens {
                limit: 5,
                per: Duration::from_secs(86_400)
            }
            .field()
            .to_string(),
            "t:86400000"
        );
        assert_eq!(
            Window::Cost {
                nanos: 1,
                period: CostPeriod::Day
            }
            .field()
            .to_string(),
            "c:d"
        );
        assert_eq!(ticks_of(Duration::from_secs(60)), (1, 60_000));
        assert_eq!(ticks_of(Duration::from_secs(3600)), (1, 3_600_000));
        assert_eq!(ticks_of(Duration::from_secs(86_400)), (1000, 86_400));
        assert_eq!(format_usd(5 * NANOS_PER_USD), "5");
        assert_eq!(format_usd(250_000_000), "0.25");
    }

    #[test]
    fn exempt_paths_match_whole_segments_or_explicit_prefixes() {
        let e = Exempt {
            paths: vec!["/health".into(), "/v1/models*".into()],
            keys: vec![],
        };
        assert!(e.path("/health"));
        assert!(e.path("/health/live"));
        assert!(!e.path("/healthz"));
        assert!(e.path("/v1/models"));
        assert!(e.path("/v1/models-list"));
        assert!(!e.path("/v1/chat"));
    }
}

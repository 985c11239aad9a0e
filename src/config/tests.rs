//! Tests of the whole compiler: text in, snapshot or positioned errors out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "FLOODWALL_ADMIN_TOKEN" => Some("s3cret".to_string()),
        "REDIS_URL" => Some("redis://:pw@redis.internal:6379/0".to_string()),
        "COPILOT_JWT_SECRET" => Some("an-hs256-secret-of-32-bytes-long".to_string()),
        "NOT_A_URL" => Some("http://example.com".to_string()),
        _ => None,
    }
}

fn compile(text: &str) -> Result<Snapshot, ConfigErrors> {
    compile_str_with_env(text, "p.yaml", &env)
}

/// The errors of a file that must not compile, as displayed.
fn errors(text: &str) -> Vec<String> {
    match compile(text) {
        Ok(_) => panic!("expected errors, but the policy compiled"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

const MINIMAL: &str = "\
version: 1
backends:
  local:
    endpoints: [\"http://127.0.0.1:8000\"]
routes:
  - name: all
    match: { path_prefix: / }
    backend: local
";

const FULL: &str = r#"version: 1
server:
  listen: ["0.0.0.0:8080", "[::]:8081"]
  admin:
    listen: 0.0.0.0:9090
    token_env: FLOODWALL_ADMIN_TOKEN
  threads: 4
  grace_period: 10s
  trusted_proxies: [127.0.0.0/8, 10.0.0.0/8, 192.168.1.7, "::1"]
  cors:
    allow_origins: ["https://app.example.com"]
    allow_headers: [Authorization, content-type]
    allow_credentials: true
    max_age: 1h
store:
  redis:
    url_env: REDIS_URL
    key_prefix: team-a
    timeout: 100ms
    expected_replicas: 3
backends:
  openai:
    endpoints: ["https://api.openai.com", "https://api2.openai.com:8443"]
    host: api.openai.com
    tls: { verify: false }
    timeouts: { connect: 2s, response_headers: 30s }
  local:
    endpoints: ["http://127.0.0.1:8000"]
routes:
  - name: chat
    match:
      path_prefix: /openai/v1/
      methods: [post, GET]
      host: API.Example.com
      header: { X-Route: beta }
    rewrite: { strip_prefix: /openai }
    backend: openai
    request:
      max_body: 2MiB
      json: required
      max_messages: 100
      max_prompt_chars: 10_000
      fields:
        - { path: query, max_chars: 10000 }
        - { path: prompt, required: true, min_chars: 1, max_chars: 10000 }
        - { path: metadata.sessionId, format: uuid }
        - { path: image, max_bytes: 1MiB }
    timeouts: { connect: 1s }
  - name: ws
    match: { path: /ws }
    websocket: true
    backend: local
"#;

#[test]
fn a_full_file_compiles_with_the_expected_values() {
    let snap = compile(FULL).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(snap.version, 1);
    assert_eq!(snap.source.path, PathBuf::from("p.yaml"));
    assert_eq!(snap.source.hash.len(), 64);

    let s = &snap.server;
    assert_eq!(s.listen, ["0.0.0.0:8080", "[::]:8081"]);
    assert_eq!(s.admin.listen, "0.0.0.0:9090");
    assert_eq!(s.admin.token_env.as_deref(), Some("FLOODWALL_ADMIN_TOKEN"));
    assert_eq!(s.admin.token.as_deref(), Some("s3cret"));
    assert_eq!(s.threads, Some(4));
    assert_eq!(s.grace_period, Duration::from_secs(10));
    assert_eq!(s.max_connections, None);
    assert_eq!(s.max_request_header_size, 64 * 1024);
    assert_eq!(s.request_header_timeout, Duration::from_secs(10));
    assert_eq!(s.trusted_proxies.len(), 4);
    assert!(s.trusted_proxies[2].contains("192.168.1.7".parse().unwrap()));
    assert_eq!(s.trusted_proxies[2].prefix, 32);
    assert_eq!(s.trusted_proxies[3].prefix, 128);
    let cors = s.cors.as_ref().unwrap();
    assert_eq!(cors.allow_origins, ["https://app.example.com"]);
    assert_eq!(cors.allow_methods, ["GET", "POST", "OPTIONS"]);
    assert_eq!(cors.allow_headers, ["authorization", "content-type"]);
    assert_eq!(cors.expose_headers.len(), 6);
    assert!(cors.allow_credentials);
    assert_eq!(cors.max_age, Duration::from_secs(3600));

    let redis = &snap.store.as_ref().unwrap().redis;
    assert_eq!(redis.url, "redis://:pw@redis.internal:6379/0");
    assert_eq!(redis.key_prefix, "team-a");
    assert_eq!(redis.timeout, Duration::from_millis(100));
    assert_eq!(redis.expected_replicas, 3);

    assert_eq!(snap.backends.len(), 2);
    assert_eq!(snap.backend_index["openai"], 0);
    assert_eq!(snap.backend_index["local"], 1);
    let openai = &snap.backends[0];
    assert_eq!(openai.endpoints[0].address, "api.openai.com:443");
    assert_eq!(openai.endpoints[1].port, 8443);
    assert_eq!(openai.host.as_deref(), Some("api.openai.com"));
    assert!(!openai.tls.verify);
    assert_eq!(openai.timeouts.connect, Duration::from_secs(2));
    assert_eq!(openai.timeouts.response_headers, Duration::from_secs(30));
    let local = &snap.backends[1];
    assert!(local.tls.verify);
    assert_eq!(local.timeouts.connect, Duration::from_secs(5));
    assert_eq!(local.timeouts.response_headers, Duration::from_secs(60));

    let chat = &snap.routes[0];
    assert_eq!(chat.name, "chat");
    assert!(matches!(&chat.matcher.path, PathMatch::Prefix(p) if p == "/openai/v1/"));
    assert_eq!(
        chat.matcher.methods,
        [http::Method::POST, http::Method::GET]
    );
    assert_eq!(chat.matcher.host.as_deref(), Some("api.example.com"));
    assert_eq!(
        chat.matcher.headers,
        [("x-route".to_string(), "beta".to_string())]
    );
    assert_eq!(
        chat.rewrite.as_ref().unwrap().strip_prefix.as_deref(),
        Some("/openai")
    );
    assert!(!chat.websocket);
    assert_eq!(chat.backend, 0);
    assert_eq!(chat.backend_name, "openai");
    assert_eq!(snap.backend(chat).name, "openai");
    let req = &chat.request;
    assert_eq!(req.max_body, 2 << 20);
    assert_eq!(req.json, JsonMode::Required);
    assert_eq!(req.max_messages, Some(100));
    assert_eq!(req.max_prompt_chars, Some(10_000));
    assert_eq!(req.fields.len(), 4);
    assert_eq!(req.fields[1].min_chars, Some(1));
    assert!(req.fields[1].required);
    assert_eq!(req.fields[2].segments, ["metadata", "sessionId"]);
    assert_eq!(req.fields[2].format, Some(FieldFormat::Uuid));
    assert_eq!(req.fields[3].max_bytes, Some(1 << 20));
    assert_eq!(chat.timeouts.connect, Some(Duration::from_secs(1)));
    assert_eq!(chat.timeouts.response_headers, None);

    let ws = &snap.routes[1];
    assert!(matches!(&ws.matcher.path, PathMatch::Exact(p) if p == "/ws"));
    assert!(ws.websocket);
    assert_eq!(ws.backend, 1);
    assert!(ws.matcher.methods.is_empty());
    assert_eq!(ws.request.max_body, 1 << 20);
    assert_eq!(ws.request.json, JsonMode::Auto);
}

#[test]
fn defaults_fill_a_minimal_file() {
    let snap = compile(MINIMAL).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(snap.server.listen, ["0.0.0.0:8080"]);
    assert_eq!(snap.server.admin.listen, "127.0.0.1:9090");
    assert_eq!(snap.server.admin.token, None);
    assert_eq!(snap.server.threads, None);
    assert_eq!(snap.server.grace_period, Duration::from_secs(30));
    assert_eq!(snap.server.max_connections, None);
    let loopback = &snap.server.trusted_proxies;
    assert!(loopback
        .iter()
        .any(|c| c.contains("127.0.0.1".parse().unwrap())));
    assert!(loopback.iter().any(|c| c.contains("::1".parse().unwrap())));
    assert!(!loopback
        .iter()
        .any(|c| c.contains("10.0.0.1".parse().unwrap())));
    assert!(snap.server.cors.is_none());
    assert!(snap.store.is_none());
}

#[test]
fn a_file_broken_in_three_places_reports_exactly_three_errors() {
    let text = "\
version: 1
server:
  threads: 0
backends:
  local:
    endpoints: [\"http://127.0.0.1:8000\"]
routes:
  - name: all
    match: { path_prefix: / }
    backend: local
    request:
      max_messages: 0
      json: maybe
";
    assert_eq!(
        errors(text),
        [
            "p.yaml:3:12 server.threads: must be 1..=1024 (was 0)",
            "p.yaml:12:21 routes[0].request.max_messages: must be 1..=100000 (was 0)",
            "p.yaml:13:13 routes[0].request.json: must be one of `auto`, `required`, `off` (was `maybe`)",
        ]
    );
}

#[test]
fn unknown_fields_suggest_the_closest_name() {
    let text = MINIMAL.replace(
        "    backend: local\n",
        "    backend: local\n    websockte: true\n    zzz: 1\n",
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_eq!(
        errs[0],
        "p.yaml:9:5 routes[0].websockte: unknown field `websockte`; did you mean `websocket`?"
    );
    // The list of route fields grows with each feature; its start is enough.
    assert!(
        errs[1].starts_with("p.yaml:10:5 routes[0].zzz: unknown field `zzz`; expected one of `name`, `match`, `rewrite`, `websocket`, `backend`, `request`, `timeouts`"),
        "{}",
        errs[1]
    );
    let typo = MINIMAL.replace("path_prefix", "path_prefx");
    assert_eq!(errors(&typo), ["p.yaml:7:14 routes[0].match.path_prefx: unknown field `path_prefx`; did you mean `path_prefix`?"]);
    // A misspelled required field is one error, not two.
    let required = MINIMAL.replace("    backend: local", "    backnd: local");
    assert_eq!(
        errors(&required),
        ["p.yaml:8:5 routes[0].backnd: unknown field `backnd`; did you mean `backend`?"]
    );
}

#[test]
fn a_bad_backend_reference_lists_the_defined_backends() {
    let text = MINIMAL.replace("backend: local", "backend: locla");
    assert_eq!(
        errors(&text),
        ["p.yaml:8:14 routes[0].backend: unknown backend `locla`; defined backends: `local`; did you mean `local`?"]
    );
}

#[test]
fn connection_guards_are_read_with_their_bounds() {
    let text = "\
version: 1
server:
  max_connections: 8000
  max_request_header_size: 16KiB
  request_header_timeout: 2s
backends:
  local:
    endpoints: [\"http://127.0.0.1:8000\"]
routes:
  - name: all
    match: { path_prefix: / }
    backend: local
";
    let snap = compile(text).expect("valid");
    assert_eq!(snap.server.max_connections, Some(8000));
    assert_eq!(snap.server.max_request_header_size, 16 * 1024);
    assert_eq!(snap.server.request_header_timeout, Duration::from_secs(2));

    let bad = text
        .replace("8000", "0")
        .replace("16KiB", "2MiB")
        .replace("2s", "10m");
    let errs = errors(&bad);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].contains("server.max_connections: must be 1..=10000000"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].contains("server.max_request_header_size: must be"),
        "{}",
        errs[1]
    );
    assert!(
        errs[2].contains("server.request_header_timeout: must be 100ms..=5m"),
        "{}",
        errs[2]
    );
}

#[test]
fn planned_fields_are_rejected_not_ignored() {
    let text = "\
version: 1
backends:
  local:
    endpoints: [\"http://127.0.0.1:8000\"]
routes:
  - name: all
    match: { path_prefix: / }
    backend: local
    cache: { stale_while_revalidate: 1m, convert: true }
";
    let errs = errors(text);
    let expected_paths = [
        "routes[0].cache.stale_while_revalidate",
        "routes[0].cache.convert",
    ];
    assert_eq!(errs.len(), expected_paths.len(), "{errs:#?}");
    for (err, path) in errs.iter().zip(expected_paths) {
        assert!(
            err.ends_with(&format!("{path}: `{path}` is not supported yet (planned)")),
            "{err}"
        );
    }
    // Every entry of the table is exercised above.
    assert_eq!(NOT_SUPPORTED_YET.len(), expected_paths.len());
}

#[test]
fn version_is_required_and_must_be_1() {
    let missing = MINIMAL.replace("version: 1\n", "");
    assert_eq!(
        errors(&missing),
        ["p.yaml:1:1 version: missing required field `version`"]
    );
    let two = MINIMAL.replace("version: 1", "version: 2");
    assert_eq!(
        errors(&two),
        ["p.yaml:1:10 version: unsupported policy version 2; this floodwall reads version 1"]
    );
}

#[test]
fn empty_and_non_mapping_files() {
    assert_eq!(
        errors(""),
        ["p.yaml:1:1: the file is empty; a policy starts with `version: 1`"]
    );
    assert_eq!(
        errors("- a\n"),
        ["p.yaml:1:1: expected a mapping, got a list"]
    );
}

#[test]
fn yaml_syntax_errors_have_a_position() {
    let errs = errors("version: 1\nroutes:\n  - name: a\n   bad: [\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("p.yaml:4:"), "{errs:?}");
    assert!(errs[0].contains("YAML syntax error"), "{errs:?}");
}

#[test]
fn duplicate_keys_and_route_names() {
    let text = format!(
        "{MINIMAL}  - name: all\n    match: {{ path: /x }}\n    backend: local\n    backend: local\n"
    );
    assert_eq!(
        errors(&text),
        [
            "p.yaml:9:11 routes[1].name: duplicate route name `all` (also routes[0])",
            "p.yaml:12:5: duplicate key `backend` (first defined at line 11, column 5)",
        ]
    );
}

#[test]
fn token_env_must_be_set() {
    let text = MINIMAL.replace(
        "backends:",
        "server:\n  admin: { token_env: MISSING_TOKEN }\nbackends:",
    );
    assert_eq!(
        errors(&text),
        ["p.yaml:3:23 server.admin.token_env: environment variable `MISSING_TOKEN` is not set or is empty (set it, or remove `token_env` to leave /admin/* without a token)"]
    );
}

#[test]
fn redis_needs_exactly_one_valid_url_source() {
    let both = MINIMAL.replace(
        "backends:",
        "store:\n  redis: { url: redis://x, url_env: REDIS_URL }\nbackends:",
    );
    assert_eq!(
        errors(&both),
        ["p.yaml:3:37 store.redis.url_env: set either `url` or `url_env`, not both"]
    );
    let none = MINIMAL.replace("backends:", "store:\n  redis: { key_prefix: x }\nbackends:");
    assert_eq!(errors(&none).len(), 1);
    assert!(errors(&none)[0].contains("set `url`"));
    let bad = MINIMAL.replace(
        "backends:",
        "store:\n  redis: { url: \"http://:secret@x\" }\nbackends:",
    );
    let errs = errors(&bad);
    assert_eq!(
        errs,
        ["p.yaml:3:17 store.redis.url: must start with redis:// or rediss:// and name a host"]
    );
    let bad_env = MINIMAL.replace(
        "backends:",
        "store:\n  redis: { url_env: NOT_A_URL }\nbackends:",
    );
    let errs = errors(&bad_env);
    assert!(
        errs[0].contains("the value of `NOT_A_URL`") && !errs[0].contains("example.com"),
        "{errs:?}"
    );
    let unset = MINIMAL.replace(
        "backends:",
        "store:\n  redis: { url_env: NOPE_URL }\nbackends:",
    );
    assert!(errors(&unset)[0].contains("`NOPE_URL` is not set"));
}

#[test]
fn cors_rules() {
    let wildcard_creds = MINIMAL.replace(
        "backends:",
        "server:\n  cors: { allow_origins: [\"*\"], allow_credentials: true }\nbackends:",
    );
    let errs = errors(&wildcard_creds);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("p.yaml:3:52 server.cors.allow_credentials: cannot be true"),
        "{errs:?}"
    );
    let missing = MINIMAL.replace("backends:", "server:\n  cors: { max_age: 5m }\nbackends:");
    assert_eq!(
        errors(&missing),
        ["p.yaml:3:9 server.cors.allow_origins: missing required field `allow_origins`"]
    );
    let slash = MINIMAL.replace(
        "backends:",
        "server:\n  cors: { allow_origins: [\"https://a.example.com/\"] }\nbackends:",
    );
    assert!(errors(&slash)[0].contains("trailing slash"));
}

#[test]
fn strip_prefix_must_be_a_prefix_of_the_route_path() {
    let text = MINIMAL.replace(
        "path_prefix: / }",
        "path_prefix: /v1/ }\n    rewrite: { strip_prefix: /openai }",
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("p.yaml:8:30 routes[0].rewrite.strip_prefix: the route's path_prefix `/v1/` does not start with `/openai`"),
        "{errs:?}"
    );
    let partial = MINIMAL.replace(
        "path_prefix: / }",
        "path_prefix: /openai/v1/ }\n    rewrite: { strip_prefix: /open }",
    );
    assert_eq!(errors(&partial).len(), 1);
    let trailing = MINIMAL.replace(
        "path_prefix: / }",
        "path_prefix: /openai/v1/ }\n    rewrite: { strip_prefix: /openai/ }",
    );
    assert!(errors(&trailing)[0].contains("write `/openai`"));
}

#[test]
fn match_needs_exactly_one_path_kind() {
    let both = MINIMAL.replace("path_prefix: / }", "path_prefix: /, path: /x }");
    assert_eq!(errors(&both), ["p.yaml:7:27 routes[0].match.path_prefix: set `path` (exact) or `path_prefix`, not both"]);
    let neither = MINIMAL.replace("{ path_prefix: / }", "{ methods: [GET] }");
    assert_eq!(errors(&neither).len(), 1);
    let relative = MINIMAL.replace("path_prefix: /", "path_prefix: v1");
    assert_eq!(
        errors(&relative),
        ["p.yaml:7:27 routes[0].match.path_prefix: a path prefix must start with `/` (was `v1`)"]
    );
    let method = MINIMAL.replace("path_prefix: / }", "path_prefix: /, methods: [PSOT] }");
    assert!(errors(&method)[0].contains("`PSOT` is not an HTTP method"));
    assert!(errors(&method)[0].contains("did you mean `POST`?"));
}

#[test]
fn backends_are_validated() {
    let text = "\
version: 1
backends:
  Bad.Name:
    endpoints: [\"https://api.example.com/v1\", \"ftp://x\"]
    tls: { ca_file: /nonexistent/ca.pem }
  empty:
    endpoints: []
routes:
  - name: all
    match: { path_prefix: / }
    backend: Bad.Name
";
    let errs = errors(text);
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(
        errs[0].starts_with("p.yaml:3:3 backends.Bad.Name: backend name `Bad.Name`"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("p.yaml:4:17 backends.Bad.Name.endpoints[0]:")
            && errs[1].contains("has a path"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("p.yaml:4:47 backends.Bad.Name.endpoints[1]:"),
        "{errs:#?}"
    );
    assert!(
        errs[3].starts_with(
            "p.yaml:5:21 backends.Bad.Name.tls.ca_file: cannot read `/nonexistent/ca.pem`"
        ),
        "{errs:#?}"
    );
    assert!(
        errs[4].starts_with(
            "p.yaml:7:16 backends.empty.endpoints: must list at least one endpoint URL"
        ),
        "{errs:#?}"
    );
}

#[test]
fn field_checks_are_validated() {
    let text = MINIMAL.replace(
        "    backend: local\n",
        "    backend: local
    request:
      max_body: 1KiB
      fields:
        - { path: a }
        - { path: b, min_chars: 10, max_chars: 5 }
        - { path: c..d, required: true }
        - { path: e, max_bytes: 2KiB }
",
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(
        errs[0].starts_with("p.yaml:12:11 routes[0].request.fields[0]: checks nothing"),
        "{errs:#?}"
    );
    assert!(errs[1].starts_with("p.yaml:13:33 routes[0].request.fields[1].min_chars: min_chars (10) is larger than max_chars (5)"), "{errs:#?}");
    assert!(
        errs[2].starts_with("p.yaml:14:19 routes[0].request.fields[2].path:"),
        "{errs:#?}"
    );
    assert!(errs[3].starts_with("p.yaml:15:33 routes[0].request.fields[3].max_bytes: is larger than the route's request.max_body (1KiB)"), "{errs:#?}");
    let off = MINIMAL.replace(
        "    backend: local\n",
        "    backend: local\n    request: { json: off, max_messages: 5 }\n",
    );
    assert!(errors(&off)[0].contains("`json: off` turns off body parsing"));
}

#[test]
fn server_addresses_are_validated() {
    let text = MINIMAL.replace(
        "backends:",
        "server:\n  listen: [\"0.0.0.0:8080\", \"nope\", \"0.0.0.0:8080\"]\n  admin: { listen: \"0.0.0.0:8080\" }\n  trusted_proxies: [10.0.0.0/33]\nbackends:",
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(
        errs[0].starts_with("p.yaml:3:28 server.listen[1]: expected `host:port`"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("p.yaml:3:36 server.listen[2]: `0.0.0.0:8080` is listed twice"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with(
            "p.yaml:4:20 server.admin.listen: `0.0.0.0:8080` is also a proxy listener"
        ),
        "{errs:#?}"
    );
    assert!(
        errs[3].starts_with("p.yaml:5:21 server.trusted_proxies[0]: prefix /33"),
        "{errs:#?}"
    );
}

#[test]
fn type_mismatches_name_the_expected_type_and_the_value() {
    let text = MINIMAL.replace(
        "    backend: local\n",
        "    backend: local\n    websocket: \"yes\"\n    request: [1]\n",
    );
    assert_eq!(
        errors(&text),
        [
            "p.yaml:9:16 routes[0].websocket: expected true or false (without quotes), got the string \"yes\"",
            "p.yaml:10:14 routes[0].request: expected a mapping, got a list",
        ]
    );
}

#[test]
fn error_display_formats() {
    let e = ConfigError {
        file: "f.yaml".into(),
        line: 0,
        column: 0,
        path: String::new(),
        message: "cannot read".into(),
    };
    assert_eq!(e.to_string(), "f.yaml: cannot read");
    let errs = ConfigErrors(vec![
        ConfigError {
            file: "f".into(),
            line: 1,
            column: 2,
            path: "a".into(),
            message: "x".into(),
        },
        ConfigError {
            file: "f".into(),
            line: 3,
            column: 4,
            path: String::new(),
            message: "y".into(),
        },
    ]);
    assert_eq!(errs.to_string(), "f:1:2 a: x\nf:3:4: y");
}

#[test]
fn load_file_reports_io_errors_at_line_zero() {
    let err = load_file(Path::new("/nonexistent/policy.yaml")).unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!(err.0[0].line, 0);
    assert!(err
        .to_string()
        .starts_with("/nonexistent/policy.yaml: cannot read the policy file"));
}

#[test]
fn restart_required_names_the_static_settings() {
    let old = compile(MINIMAL).unwrap();
    let same = compile(MINIMAL).unwrap();
    assert!(restart_required(&old, &same).is_empty());
    let new = compile(&MINIMAL.replace(
        "backends:",
        "server:\n  listen: [\"0.0.0.0:8081\"]\n  admin: { listen: \"127.0.0.1:9191\" }\n  threads: 2\n  grace_period: 1s\nstore:\n  redis: { url: \"redis://127.0.0.1:6390/0\" }\n  cache: { max_memory: 8MiB }\nbackends:",
    ))
    .unwrap();
    assert_eq!(
        restart_required(&old, &new),
        [
            "server.listen",
            "server.admin.listen",
            "server.threads",
            "server.grace_period",
            "store.redis",
            "store.cache"
        ]
    );
}

#[test]
fn compile_str_hashes_the_text() {
    let a = compile(MINIMAL).unwrap();
    let b = compile(&format!("{MINIMAL}# comment\n")).unwrap();
    assert_ne!(a.source.hash, b.source.hash);
    // sha256("") is well known; check the encoding on a tiny input.
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

/// Every policy shipped in `policies/` and `examples/` compiles.
#[test]
fn shipped_policies_compile() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for dir in ["policies", "examples"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let label = path.display().to_string();
                if let Err(e) = compile_str_with_env(&text, &label, &env) {
                    panic!("{e}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 7, "only {checked} policy files found");
}

#[test]
fn demo_policy_keeps_the_addresses_the_demo_rewrites() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("policies/demo.yaml")).unwrap();
    for needle in ["127.0.0.1:8080", "127.0.0.1:9090", "http://127.0.0.1:18000"] {
        assert!(text.contains(needle), "{needle}");
    }
    let snap = compile(&text).unwrap();
    let names: Vec<&str> = snap.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["chat", "embeddings", "models", "openai-egress"]);
    assert_eq!(snap.routes[0].request.max_messages, Some(100));
    assert_eq!(snap.routes[0].request.max_prompt_chars, Some(10_000));
}

/// Thousands of corrupted variants of a valid file (bytes deleted,
/// duplicated or replaced with YAML punctuation) must give errors or a
/// snapshot, never a panic.
#[test]
fn corrupted_files_never_panic() {
    const PUNCTUATION: &[u8] = b":-[]{},&*!|>'\"%@` \n\t#?0a/.";
    let base = FULL.as_bytes();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64*: deterministic, no dependency.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for _ in 0..3000 {
        let mut bytes = base.to_vec();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() as usize) % bytes.len().max(1);
            match next() % 3 {
                0 => {
                    bytes.remove(at);
                }
                1 => bytes.insert(at, bytes[at]),
                _ => bytes[at] = PUNCTUATION[(next() as usize) % PUNCTUATION.len()],
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Err(errors) = compile(&text) {
            assert!(!errors.is_empty());
            for e in errors.iter() {
                assert!(!e.message.is_empty() && e.line > 0, "{e}");
            }
        }
    }
}

/// `docs/teams.md` maps every number in the teams' plans to a row. Each
/// `expressed` row is a value that the team's example holds today; these
/// tests compile each example and check those values, naming the row
/// (`rc-80`...) in every message. The last two tests keep the doc honest:
/// every `expressed` row names an example that exists and tests that exist.
mod team_examples_hold_their_numbers {
    use super::*;

    const MIB: usize = 1 << 20;

    fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    /// Compiles `examples/<name>.yaml`, with every `*_env` variable set.
    fn example(name: &str) -> Snapshot {
        let path = root().join("examples").join(format!("{name}.yaml"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let label = format!("examples/{name}.yaml");
        compile_str_with_env(&text, &label, &|_| Some("redis://127.0.0.1:6379/0".into()))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn route<'a>(snap: &'a Snapshot, name: &str) -> &'a Route {
        snap.routes
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("{}: no route `{name}`", snap.source.path.display()))
    }

    fn field<'a>(route: &'a Route, path: &str) -> &'a FieldCheck {
        route
            .request
            .fields
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("route `{}`: no field check on `{path}`", route.name))
    }

    fn backend<'a>(snap: &'a Snapshot, name: &str) -> &'a Backend {
        let i = *snap
            .backend_index
            .get(name)
            .unwrap_or_else(|| panic!("{}: no backend `{name}`", snap.source.path.display()));
        &snap.backends[i]
    }

    /// The response-headers timeout a route's requests get: its own, else its backend's.
    fn response_headers(snap: &Snapshot, route: &Route) -> Duration {
        route
            .timeouts
            .response_headers
            .unwrap_or(snap.backend(route).timeouts.response_headers)
    }

    fn prefix(route: &Route) -> &str {
        match &route.matcher.path {
            PathMatch::Prefix(p) | PathMatch::Exact(p) => p,
        }
    }

    fn cidrs(snap: &Snapshot) -> Vec<String> {
        snap.server
            .trusted_proxies
            .iter()
            .map(|c| format!("{}/{}", c.addr, c.prefix))
            .collect()
    }

    #[test]
    fn research_copilot() {
        let snap = example("research-copilot");

        let names: Vec<&str> = snap.routes.iter().map(|r| r.name.as_str()).collect();
        for (name, path) in [
            ("copilot-agent", "/copilot-agent"),
            ("copilot", "/copilot"),
            ("chat", "/chat"),
            ("rag-distllm", "/rag-distllm"),
            ("rag", "/rag"),
        ] {
            assert_eq!(
                prefix(route(&snap, name)),
                path,
                "docs/teams.md rc-01: route `{name}`"
            );
        }
        let at = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert!(
            at("copilot-agent") < at("copilot"),
            "docs/teams.md rc-01: /copilot-agent before /copilot"
        );
        assert!(
            at("rag-distllm") < at("rag"),
            "docs/teams.md rc-01: /rag-distllm before /rag"
        );

        assert_eq!(
            cidrs(&snap),
            ["127.0.0.0/8", "10.0.0.0/8"],
            "docs/teams.md rc-11: X-Forwarded-For believed only from the cluster's proxies"
        );

        let agent = route(&snap, "copilot-agent");
        assert_eq!(
            agent.timeouts.response_headers,
            Some(Duration::from_secs(300)),
            "docs/teams.md rc-26: agent timeout 5 minutes"
        );

        // The circuit-breaker table's per-dependency timeouts, each on the
        // backend (and route) that dependency's calls go through.
        for (row, route_name, backend_name, secs) in [
            ("rc-34", "embeddings", "embedding", 10),
            ("rc-38", "llm-egress", "openai", 30),
            ("rc-42", "utils", "python-utils", 15),
            ("rc-46", "mcp-tools", "mcp-tools", 20),
        ] {
            let r = route(&snap, route_name);
            assert_eq!(
                r.backend_name, backend_name,
                "docs/teams.md {row}: route `{route_name}`"
            );
            assert_eq!(
                backend(&snap, backend_name).timeouts.response_headers,
                Duration::from_secs(secs),
                "docs/teams.md {row}: {backend_name} timeout {secs} s"
            );
            assert_eq!(
                response_headers(&snap, r),
                Duration::from_secs(secs),
                "docs/teams.md {row}: route `{route_name}` gets {secs} s"
            );
        }
        assert!(
            at("embeddings") < at("llm-egress"),
            "docs/teams.md rc-34: /openai/v1/embeddings before /openai/v1/"
        );

        for name in ["copilot-agent", "copilot", "chat", "rag-distllm", "rag"] {
            let query = field(route(&snap, name), "query");
            assert_eq!(
                query.max_chars,
                Some(10_000),
                "docs/teams.md rc-80: `{name}` query <= 10,000 chars"
            );
        }
        for name in ["copilot-agent", "copilot", "chat", "llm-egress"] {
            assert_eq!(
                route(&snap, name).request.max_messages,
                Some(100),
                "docs/teams.md rc-81: `{name}` history <= 100 messages"
            );
        }
        for name in ["copilot-agent", "copilot"] {
            let r = route(&snap, name);
            assert_eq!(
                field(r, "image").max_bytes,
                Some(10 * MIB),
                "docs/teams.md rc-83: `{name}` image <= 10 MiB"
            );
            assert!(
                r.request.max_body > 10 * MIB,
                "docs/teams.md rc-83: `{name}` max_body leaves room for the image and the rest"
            );
        }

        let admin = &snap.server.admin;
        assert_eq!(
            admin.listen, "0.0.0.0:9090",
            "docs/teams.md rc-85/rc-86/rc-89: probes reachable by the kubelet"
        );
        assert_eq!(
            admin.token_env.as_deref(),
            Some("FLOODWALL_ADMIN_TOKEN"),
            "docs/teams.md rc-101: admin status JSON behind a token"
        );
    }

    #[test]
    fn agent_chat() {
        let snap = example("agent-chat");

        let ws = route(&snap, "chat-ws");
        assert!(
            ws.websocket,
            "docs/teams.md ac-06: WebSocket chats pass through"
        );
        assert_eq!(prefix(ws), "/ws/", "docs/teams.md ac-06");

        let tools = route(&snap, "tools");
        assert_eq!(tools.backend_name, "tools", "docs/teams.md ac-04");
        assert_eq!(
            response_headers(&snap, tools),
            Duration::from_secs(20),
            "docs/teams.md ac-04: a slow tool call is cut after 20 s"
        );

        assert_eq!(
            cidrs(&snap),
            ["127.0.0.0/8", "10.0.0.0/8"],
            "docs/teams.md ac-15: client IP believed only from trusted proxies"
        );

        let chat = route(&snap, "chat");
        assert_eq!(
            chat.request.json,
            JsonMode::Required,
            "docs/teams.md ac-16: chat bodies are JSON"
        );
        let message = field(chat, "message");
        assert!(message.required, "docs/teams.md ac-16: message required");
        assert_eq!(
            message.min_chars,
            Some(1),
            "docs/teams.md ac-16: message >= 1 char"
        );
        assert_eq!(
            message.max_chars,
            Some(4000),
            "docs/teams.md ac-16: message <= 4,000 chars (placeholder)"
        );

        assert_eq!(
            snap.server.admin.token_env.as_deref(),
            Some("FLOODWALL_ADMIN_TOKEN"),
            "docs/teams.md ac-19: the admin token comes from the environment, never the file"
        );
    }

    #[test]
    fn maintenance_ops() {
        let snap = example("maintenance-ops");

        let admin = &snap.server.admin;
        assert_eq!(
            admin.listen, "0.0.0.0:9090",
            "docs/teams.md mo-07/mo-08/mo-15: probes reachable by the kubelet"
        );
        assert!(
            admin.token_env.is_some(),
            "docs/teams.md mo-15: /admin/* needs a token on 0.0.0.0"
        );

        let cors = snap
            .server
            .cors
            .as_ref()
            .expect("docs/teams.md mo-13: CORS configured");
        assert_eq!(
            cors.allow_origins,
            ["https://ops.example.com"],
            "docs/teams.md mo-13: the browser front end"
        );
        assert!(
            cors.allow_headers.iter().any(|h| h == "x-request-id"),
            "docs/teams.md mo-12: the browser may send X-Request-ID"
        );
        assert!(
            cors.expose_headers.iter().any(|h| h == "x-request-id"),
            "docs/teams.md mo-12: the browser may read X-Request-ID"
        );

        assert_eq!(
            cidrs(&snap),
            ["10.0.0.0/8"],
            "docs/teams.md mo-18: client IP believed only from the ingress"
        );

        let agents = route(&snap, "agents");
        assert_eq!(
            agents.request.json,
            JsonMode::Required,
            "docs/teams.md mo-20: agent bodies are JSON"
        );
        let prompt = field(agents, "prompt");
        assert!(prompt.required, "docs/teams.md mo-20: prompt required");
        assert_eq!(
            prompt.min_chars,
            Some(1),
            "docs/teams.md mo-20: prompt >= 1 char"
        );
        assert_eq!(
            prompt.max_chars,
            Some(10_000),
            "docs/teams.md mo-20: prompt <= 10,000 chars"
        );
        assert_eq!(
            field(agents, "sessionId").format,
            Some(FieldFormat::Uuid),
            "docs/teams.md mo-21: sessionId is a UUID"
        );

        // The replicas share the rate-limit counters; `local` divides by it.
        let redis = &snap
            .store
            .as_ref()
            .expect("docs/teams.md mo-02: store.redis")
            .redis;
        assert_eq!(
            redis.expected_replicas, 2,
            "docs/teams.md mo-02: the HPA minimum"
        );
    }

    #[test]
    fn maintenance_ops_limits() {
        use crate::config::limits::{KeyPart, OnStoreError};
        let snap = example("maintenance-ops");
        for name in ["agents", "api"] {
            let r = rule(&snap, name, "per-client");
            assert_eq!(r.key, [KeyPart::Ip], "docs/teams.md mo-17: per client");
            assert_eq!(
                requests(&r.limits),
                [(30, 60)],
                "docs/teams.md mo-17: 30/min on `{name}`"
            );
            assert_eq!(
                r.on_store_error,
                OnStoreError::Local,
                "docs/teams.md mo-02: Redis down: 30 / expected_replicas per replica"
            );
            assert!(
                r.exempt.path("/health") && r.exempt.path("/health/ready"),
                "docs/teams.md mo-19: health paths exempt"
            );
        }
        let health = snap.routes.iter().position(|r| r.name == "health").unwrap();
        assert!(
            snap.limits.rules_for(health).is_empty(),
            "docs/teams.md mo-19: the health route is not limited"
        );
        assert_eq!(
            served_by(&snap, "GET", "/health/ready"),
            "health",
            "docs/teams.md mo-19"
        );
        assert!(
            snap.store.is_some(),
            "docs/teams.md mo-02: counters shared through Redis"
        );
    }

    #[test]
    fn agent_chat_limits() {
        use crate::config::limits::{KeyPart, UserSource};
        let snap = example("agent-chat");
        assert!(
            matches!(
                snap.limits.identity.user.as_slice(),
                [UserSource::ApiKey { .. }, UserSource::Ip]
            ),
            "docs/teams.md ac-13: the user is the hashed bearer token, else the IP: {:?}",
            snap.limits.identity.user
        );
        let per_user = rule(&snap, "chat", "per-user");
        assert_eq!(per_user.key, [KeyPart::User], "docs/teams.md ac-13");
        assert!(
            !requests(&per_user.limits).is_empty(),
            "docs/teams.md ac-13: a placeholder number"
        );
        for name in ["chat-ws", "chat", "api"] {
            let r = rule(&snap, name, "per-ip");
            assert_eq!(r.key, [KeyPart::Ip], "docs/teams.md ac-14: `{name}`");
            assert!(!requests(&r.limits).is_empty(), "docs/teams.md ac-14");
        }
        let tools = snap.routes.iter().position(|r| r.name == "tools").unwrap();
        assert!(
            snap.limits.rules_for(tools).is_empty(),
            "the app's own tool calls are not limited per IP"
        );
    }

    #[test]
    fn research_citation_admission() {
        let snap = example("research-citation");
        for name in ["openai", "anthropic"] {
            let c = route(&snap, name)
                .concurrency
                .as_deref()
                .unwrap_or_else(|| panic!("docs/teams.md ci-14: `{name}` concurrency"));
            assert!(c.max_in_flight.is_some(), "docs/teams.md ci-14: `{name}`");
            let q = c
                .queue
                .as_ref()
                .unwrap_or_else(|| panic!("docs/teams.md ci-14/ci-15: `{name}` queue"));
            assert!(
                q.max_depth > 100,
                "docs/teams.md ci-26: `{name}`: the queue can pass 100 before it sheds"
            );
        }
        assert!(
            snap.store.is_none(),
            "docs/teams.md fw-09: no Redis, caps and queues in memory"
        );
    }

    #[test]
    fn research_citation() {
        let snap = example("research-citation");
        for (name, strip, backend_name) in [
            ("openai", "/openai", "openai"),
            ("anthropic", "/anthropic", "anthropic"),
        ] {
            let r = route(&snap, name);
            assert_eq!(
                r.rewrite.as_ref().and_then(|w| w.strip_prefix.as_deref()),
                Some(strip),
                "docs/teams.md fw-02: egress route `{name}` strips {strip}"
            );
            assert_eq!(
                r.backend_name, backend_name,
                "docs/teams.md ci-18/ci-19: one backend per provider, so latency and errors are per provider"
            );
        }
        assert_eq!(
            snap.backends.len(),
            2,
            "docs/teams.md ci-18/ci-19: one backend per provider"
        );
    }

    #[test]
    fn notes_assistant() {
        let snap = example("notes-assistant");
        let query = route(&snap, "query");
        assert_eq!(
            prefix(query),
            "/query",
            "docs/teams.md na-27: concurrent queries counted on route `query`"
        );
        assert_eq!(query.backend_name, "notes-api", "docs/teams.md na-27");
        let hf = route(&snap, "hf-egress");
        assert_eq!(
            hf.rewrite.as_ref().and_then(|w| w.strip_prefix.as_deref()),
            Some("/hf"),
            "docs/teams.md fw-02: inference calls go out through /hf"
        );
    }

    /// The rule named `name` that applies to route `route` (top-level or the route's own).
    fn rule<'a>(
        snap: &'a Snapshot,
        route: &str,
        name: &str,
    ) -> &'a crate::config::limits::RateLimitRule {
        let i = snap
            .routes
            .iter()
            .position(|r| r.name == route)
            .unwrap_or_else(|| panic!("no route `{route}`"));
        snap.limits
            .rules_for(i)
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("route `{route}`: no rule `{name}`"))
    }

    /// A rule's request windows as (limit, per in seconds).
    fn requests(windows: &[crate::config::limits::Window]) -> Vec<(u64, u64)> {
        windows
            .iter()
            .filter_map(|w| match w {
                crate::config::limits::Window::Requests { limit, per, .. } => {
                    Some((*limit, per.as_secs()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn research_copilot_admission() {
        let snap = example("research-copilot");
        let agent = route(&snap, "copilot-agent");
        let c = agent
            .concurrency
            .as_deref()
            .expect("copilot-agent concurrency");
        assert_eq!(c.max_in_flight, Some(10), "docs/teams.md rc-24");
        assert_eq!(c.per_identity, Some(3), "docs/teams.md rc-25");
        let q = c.queue.as_ref().expect("docs/teams.md rc-31: a queue");
        assert_eq!(
            q.priority.classes,
            ["interactive", "normal", "batch"],
            "docs/teams.md rc-31: highest first"
        );
        assert_eq!(q.priority.header.as_deref(), Some("x-priority"), "rc-31");
        assert_eq!(
            q.priority.default, 1,
            "docs/teams.md rc-31: normal by default"
        );
        assert_eq!(
            q.priority.streaming,
            Some(0),
            "docs/teams.md rc-31: streaming high"
        );
        assert_eq!(q.max_wait, Duration::from_secs(600), "docs/teams.md rc-32");

        // /rag-distllm always queued: a cap (a placeholder) and the agent's queue.
        let distllm = route(&snap, "rag-distllm")
            .concurrency
            .as_deref()
            .expect("docs/teams.md rc-02: rag-distllm concurrency");
        assert!(
            distllm.max_in_flight.is_some(),
            "docs/teams.md rc-02: a cap, so that the excess queues"
        );
        let dq = distllm
            .queue
            .as_ref()
            .expect("docs/teams.md rc-02: always queued");
        assert_eq!(
            dq.priority, q.priority,
            "docs/teams.md rc-02/rc-31: the agent's priorities"
        );
        assert_eq!(dq.max_wait, q.max_wait, "docs/teams.md rc-02/rc-32");

        let openai = backend(&snap, "openai")
            .limits
            .as_deref()
            .expect("openai limits");
        assert_eq!(openai.max_in_flight, Some(20), "docs/teams.md rc-28");
        assert_eq!(openai.per_minute, Some(100), "docs/teams.md rc-29");
        assert_eq!(
            openai.min_spacing,
            Duration::from_millis(100),
            "docs/teams.md rc-30"
        );
        assert_eq!(route(&snap, "llm-egress").backend_name, "openai");

        assert_eq!(
            snap.server.streams.max_concurrent,
            Some(100),
            "docs/teams.md rc-61: 100 streams per instance"
        );
        for name in ["copilot-agent", "copilot", "chat"] {
            let s = route(&snap, name).streams.as_deref();
            assert_eq!(
                s.and_then(|s| s.max_duration),
                Some(Duration::from_secs(600)),
                "docs/teams.md rc-62: `{name}` streams cut after 10 minutes"
            );
        }
    }

    #[test]
    fn research_copilot_limits() {
        use crate::config::limits::{KeyPart, OnStoreError, TierFrom, UserSource};
        const H: u64 = 3600;
        let snap = example("research-copilot");
        assert!(
            matches!(snap.limits.identity.user.as_slice(), [UserSource::Jwt(j)] if j.claim == "sub"),
            "docs/teams.md fw-04: the user is the token's `sub`"
        );
        assert_eq!(
            snap.limits.identity.tier.from,
            TierFrom::JwtClaim("tier".into()),
            "docs/teams.md rc-21"
        );
        assert_eq!(
            snap.limits.identity.tier.default, "free",
            "docs/teams.md rc-21"
        );
        // (action, routes, base per hour, free, premium, admin): rc-05..rc-07, rc-12..rc-20.
        for (name, routes, base, free, premium, admin) in [
            ("agent-per-user", &["copilot-agent"][..], 20, 10, 50, 1000),
            (
                "chat-per-user",
                &["copilot", "chat"][..],
                100,
                50,
                200,
                1000,
            ),
            (
                "rag-per-user",
                &["rag-distllm", "rag"][..],
                50,
                20,
                100,
                1000,
            ),
        ] {
            for route in routes {
                let r = rule(&snap, route, name);
                assert_eq!(
                    r.key,
                    [KeyPart::User],
                    "docs/teams.md rc-05..rc-07: `{name}` per user"
                );
                assert!(r.require_identity, "`{name}`");
                assert_eq!(
                    requests(&r.limits),
                    [(base, H)],
                    "docs/teams.md rc-05..rc-07: `{name}` on `{route}`"
                );
                for (tier, n) in [("free", free), ("premium", premium), ("admin", admin)] {
                    assert_eq!(
                        requests(r.windows_for(tier).unwrap_or(&[])),
                        [(n, H)],
                        "docs/teams.md rc-12..rc-20: `{name}` tier {tier}"
                    );
                }
            }
        }
        assert_eq!(
            requests(&rule(&snap, "sessions", "session-create").limits),
            [(50, 86_400)],
            "docs/teams.md rc-08"
        );
        assert_eq!(
            requests(&rule(&snap, "messages", "message-create").limits),
            [(500, 86_400)],
            "docs/teams.md rc-09"
        );
        for route in [
            "copilot-agent",
            "copilot",
            "chat",
            "rag-distllm",
            "rag",
            "sessions",
            "messages",
            "api",
        ] {
            let r = rule(&snap, route, "per-ip");
            assert_eq!(r.key, [KeyPart::Ip], "docs/teams.md rc-10");
            assert_eq!(
                requests(&r.limits),
                [(100, 900)],
                "docs/teams.md rc-10: per IP 100 per 15 minutes on `{route}`"
            );
            assert!(!r.require_identity, "docs/teams.md rc-10: before auth");
        }
        for route in ["embeddings", "llm-egress", "mcp-tools"] {
            let i = snap.routes.iter().position(|r| r.name == route).unwrap();
            assert!(
                snap.limits.rules_for(i).is_empty(),
                "egress route `{route}` is not limited per IP"
            );
        }
        assert!(
            snap.limits
                .all_rules()
                .all(|r| r.on_store_error == OnStoreError::Local),
            "Redis down: half per replica"
        );
    }

    #[test]
    fn notes_assistant_limits() {
        use crate::config::limits::{KeyPart, OnStoreError, Window};
        let snap = example("notes-assistant");
        let per_user = rule(&snap, "query", "per-user");
        assert_eq!(per_user.key, [KeyPart::User]);
        assert_eq!(
            requests(&per_user.limits),
            [(10, 60), (100, 3600), (500, 86_400)],
            "docs/teams.md na-02..na-05: 10/min, 100/hour and 500/day in one rule"
        );
        let global = rule(&snap, "query", "global");
        assert_eq!(global.key, [KeyPart::Global]);
        assert_eq!(
            requests(&global.limits),
            [(1000, 3600)],
            "docs/teams.md na-07"
        );
        for (name, key, usd) in [
            ("spend-user", KeyPart::User, 5),
            ("spend-total", KeyPart::Global, 100),
        ] {
            let r = rule(&snap, "hf-egress", name);
            assert_eq!(r.key, [key], "docs/teams.md na-08/na-09: `{name}`");
            assert!(
                matches!(r.limits[..], [Window::Cost { nanos, period: crate::config::limits::CostPeriod::Day }] if nanos == usd * 1_000_000_000),
                "docs/teams.md na-08/na-09: `{name}` ${usd}/day"
            );
        }
        assert!(
            snap.limits.prices.get("any-model").is_some(),
            "docs/teams.md na-10: every model is priced"
        );
        for r in snap.limits.all_rules() {
            assert_eq!(
                r.on_store_error,
                OnStoreError::FailOpen,
                "docs/teams.md na-12: `{}` fails open",
                r.name
            );
        }
        assert!(
            snap.store.is_some(),
            "docs/teams.md na-01: counters in Redis"
        );
        let query = snap
            .routes
            .iter()
            .find(|r| r.name == "query")
            .and_then(|r| r.concurrency.as_deref())
            .expect("route `query` has concurrency");
        assert_eq!(
            (query.max_in_flight, query.shared.map(|s| s.lease)),
            (Some(100), Some(Duration::from_secs(10))),
            "docs/teams.md na-06: 100 concurrent across the replicas"
        );
    }

    fn breaker<'a>(snap: &'a Snapshot, name: &str) -> &'a BreakerConfig {
        backend(snap, name)
            .circuit_breaker
            .as_deref()
            .unwrap_or_else(|| panic!("backend `{name}`: no circuit_breaker"))
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn research_copilot_resilience() {
        use crate::policy::retry::Jitter;
        let snap = example("research-copilot");
        // The plan's breaker table: (backend, failure rate, reset).
        for (name, rate, reset) in [
            ("embedding", 0.5, 30.0),
            ("openai", 0.4, 60.0),
            ("python-utils", 0.3, 10.0),
            ("mcp-tools", 0.5, 30.0),
        ] {
            let b = breaker(&snap, name);
            assert!(
                (b.failure_rate - rate).abs() < 1e-9,
                "docs/teams.md rc-35..rc-47: `{name}` trips at {rate}"
            );
            assert_eq!(
                b.open_for,
                secs(reset),
                "docs/teams.md rc-36..rc-48: `{name}` reset"
            );
            assert_eq!(
                b.open_for_max,
                secs(reset),
                "`{name}`: the reset does not grow"
            );
            assert_eq!(b.window, secs(10.0), "docs/teams.md rc-50: 10 s window");
            assert_eq!(b.min_requests, 5, "docs/teams.md rc-51: minimum volume 5");
        }
        assert!(
            backend(&snap, "copilot-api").circuit_breaker.is_none(),
            "the plan gives the Node API no breaker"
        );
        // Retries: (route, attempts, base).
        for (name, attempts, base) in [
            ("embeddings", 3, 1.0),
            ("llm-egress", 4, 2.0),
            ("utils", 4, 0.5),
            ("mcp-tools", 4, 1.0),
        ] {
            let r = &route(&snap, name).retry;
            assert_eq!(
                r.attempts, attempts,
                "docs/teams.md rc-52/rc-58..rc-60: `{name}`"
            );
            assert_eq!(
                r.backoff.base,
                secs(base),
                "docs/teams.md rc-54/rc-58..rc-60: `{name}`"
            );
            assert_eq!(r.backoff.factor, 2.0, "docs/teams.md rc-53: `{name}`");
            assert_eq!(r.backoff.max, secs(10.0), "docs/teams.md rc-55: `{name}`");
            assert_eq!(
                r.backoff.jitter,
                Jitter::Full,
                "docs/teams.md rc-56: `{name}`"
            );
            assert!(
                r.on.statuses.iter().all(|s| *s >= 500),
                "docs/teams.md rc-57: `{name}` never retries a 4xx: {:?}",
                r.on.statuses
            );
            assert!(r.on.connect_error && r.on.timeout, "`{name}`");
            assert!(
                r.replay,
                "docs/teams.md fw-05: `{name}` replays its JSON POSTs"
            );
            assert_eq!(r.rate_limited_multiplier, 1.0, "`{name}`");
        }
        // Fallbacks: skip, skip, degraded, and none for the LLM (error).
        for (name, code) in [
            ("embeddings", "skip"),
            ("mcp-tools", "skip"),
            ("utils", "degraded"),
        ] {
            let r = route(&snap, name);
            match r.fallback.as_slice() {
                [FallbackTarget::Respond { status, body }] => {
                    assert_eq!(*status, 503, "`{name}`");
                    assert_eq!(
                        body["error"]["code"], code,
                        "docs/teams.md rc-37/rc-45/rc-49: `{name}`"
                    );
                }
                other => panic!("`{name}`: fallback {other:?}"),
            }
            assert_eq!(r.fallback_on, FallbackOn::default(), "`{name}`");
        }
        assert!(
            route(&snap, "llm-egress").fallback.is_empty(),
            "docs/teams.md rc-41: LLM fallback is an error (503 circuit_open)"
        );
        for name in ["copilot-agent", "copilot", "chat", "rag", "api"] {
            assert_eq!(
                route(&snap, name).retry.attempts,
                1,
                "`{name}` is not retried"
            );
        }
    }

    #[test]
    fn research_citation_retry() {
        use crate::policy::retry::Jitter;
        let snap = example("research-citation");
        for name in ["openai", "anthropic"] {
            let r = &route(&snap, name).retry;
            assert_eq!(r.attempts, 3, "docs/teams.md ci-06: `{name}`");
            assert!(
                r.on.connect_error && r.on.timeout,
                "docs/teams.md ci-01: `{name}`"
            );
            assert_eq!(
                r.on.statuses,
                vec![429, 500, 502, 503, 504],
                "docs/teams.md ci-01: `{name}`"
            );
            assert_eq!(
                r.backoff.base,
                secs(1.0),
                "docs/teams.md ci-02/ci-07: `{name}`"
            );
            assert_eq!(r.backoff.factor, 2.0, "docs/teams.md ci-02/ci-09: `{name}`");
            assert_eq!(
                r.backoff.max,
                secs(30.0),
                "docs/teams.md ci-03/ci-08: `{name}`"
            );
            assert_eq!(
                r.backoff.jitter,
                Jitter::Up(0.1),
                "docs/teams.md ci-05: `{name}`"
            );
            assert_eq!(
                r.rate_limited_multiplier, 2.0,
                "docs/teams.md ci-04: `{name}`"
            );
            // 1 s, then 2 s: initial × base^(attempt-1).
            assert_eq!(r.backoff.nominal(1), secs(1.0));
            assert_eq!(r.backoff.nominal(2), secs(2.0));
            let b = breaker(&snap, name);
            assert_eq!(
                b.window,
                secs(10.0),
                "docs/teams.md ci-16/ci-17: `{name}` has a breaker"
            );
        }
    }

    #[test]
    fn notes_assistant_breaker() {
        let snap = example("notes-assistant");
        let b = breaker(&snap, "huggingface");
        assert_eq!(b.failure_count, Some(5), "docs/teams.md na-18: 5 failures");
        assert_eq!(b.window, secs(60.0), "docs/teams.md na-18: in 60 s");
        assert_eq!(
            b.failure_rate, 1.0,
            "docs/teams.md na-18: only the count matters"
        );
        assert_eq!(b.open_for, secs(30.0), "docs/teams.md na-19: open 30 s");
        assert_eq!(
            b.open_for_max,
            secs(30.0),
            "docs/teams.md na-19: every time"
        );
        assert_eq!(
            b.half_open_probes, 1,
            "docs/teams.md na-20: one success closes it"
        );
        let hf = route(&snap, "hf-egress");
        match hf.fallback.as_slice() {
            [FallbackTarget::Respond { status, body }] => {
                assert_eq!(*status, 503, "docs/teams.md na-22");
                let msg = body["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    msg.contains("temporarily unavailable"),
                    "docs/teams.md na-22: {msg}"
                );
            }
            other => panic!("hf-egress: fallback {other:?}"),
        }
        assert_eq!(
            hf.fallback_on,
            FallbackOn {
                circuit_open: true,
                retries_exhausted: false
            },
            "docs/teams.md na-22: only while the breaker is open"
        );
    }

    #[test]
    fn agent_chat_resilience() {
        let snap = example("agent-chat");
        let b = breaker(&snap, "tools");
        assert_eq!(b.min_requests, 5, "docs/teams.md ac-09");
        assert!(backend(&snap, "chat-api").circuit_breaker.is_none());
        let tools = route(&snap, "tools");
        assert_eq!(tools.retry.attempts, 3, "docs/teams.md ac-11");
        assert_eq!(
            tools.retry.backoff.factor, 2.0,
            "docs/teams.md ac-11: exponential"
        );
        assert_eq!(
            tools.retry.backoff.nominal(2),
            secs(1.0),
            "docs/teams.md ac-11"
        );
        assert!(
            matches!(
                tools.fallback.as_slice(),
                [FallbackTarget::Respond { status: 503, .. }]
            ),
            "docs/teams.md ac-12: {:?}",
            tools.fallback
        );
    }

    /// The name of the route that serves `method path` (first match wins).
    fn served_by<'a>(snap: &'a Snapshot, method: &str, path: &str) -> &'a str {
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        let no_header = |_: &str| None;
        let req = crate::routing::RequestParts {
            method: &method,
            path,
            host: None,
            header: &no_header,
        };
        let i = crate::routing::find(&snap.routes, &req)
            .unwrap_or_else(|| panic!("no route serves {method} {path}"));
        &snap.routes[i].name
    }

    fn cache<'a>(snap: &'a Snapshot, name: &str) -> &'a crate::policy::cache::CachePolicy {
        route(snap, name)
            .cache
            .as_deref()
            .unwrap_or_else(|| panic!("route `{name}`: no cache"))
    }

    #[test]
    fn research_copilot_cache() {
        use crate::policy::cache::{Scope, StoreKind};
        const H: u64 = 3600;
        let snap = example("research-copilot");
        // (row, method, path, route, ttl, scope, store)
        for (row, method, path, name, ttl, scope, store) in [
            (
                "rc-69",
                "POST",
                "/openai/v1/embeddings",
                "embeddings",
                24 * H,
                Scope::Shared,
                StoreKind::Tiered,
            ),
            (
                "rc-70",
                "GET",
                "/openai/v1/models",
                "models",
                H,
                Scope::Shared,
                StoreKind::Memory,
            ),
            (
                "rc-70",
                "GET",
                "/openai/v1/models/gpt-4o",
                "models",
                H,
                Scope::Shared,
                StoreKind::Memory,
            ),
            (
                "rc-71",
                "POST",
                "/rag",
                "rag",
                H,
                Scope::User,
                StoreKind::Tiered,
            ),
            (
                "rc-71",
                "POST",
                "/rag-distllm",
                "rag-distllm",
                H,
                Scope::User,
                StoreKind::Tiered,
            ),
            (
                "rc-72",
                "GET",
                "/sessions/42",
                "session-read",
                300,
                Scope::User,
                StoreKind::Memory,
            ),
            (
                "rc-73",
                "POST",
                "/utils/tokens/count",
                "token-count",
                24 * H,
                Scope::Shared,
                StoreKind::Tiered,
            ),
        ] {
            assert_eq!(
                served_by(&snap, method, path),
                name,
                "docs/teams.md {row}: {method} {path}"
            );
            let c = cache(&snap, name);
            assert_eq!(c.ttl.as_secs(), ttl, "docs/teams.md {row}: `{name}` ttl");
            assert_eq!(c.scope, scope, "docs/teams.md {row}: `{name}` scope");
            assert_eq!(c.store, store, "docs/teams.md {row}/rc-77: `{name}` store");
        }
        assert_eq!(
            cache(&snap, "embeddings").ignore_fields,
            [vec!["user".to_string()]],
            "docs/teams.md rc-69: users share embeddings"
        );
        // Creating sessions, chatting, the agent and LLM completions are not cached.
        for (method, path) in [
            ("POST", "/sessions"),
            ("POST", "/chat"),
            ("POST", "/copilot"),
            ("POST", "/copilot-agent"),
            ("POST", "/openai/v1/chat/completions"),
            ("POST", "/utils/other"),
        ] {
            let name = served_by(&snap, method, path);
            assert!(
                route(&snap, name).cache.is_none(),
                "{method} {path} (route `{name}`) is not cached"
            );
        }
        assert!(
            snap.store.is_some(),
            "docs/teams.md rc-77: the tiered routes have Redis"
        );
        assert_eq!(
            snap.server.admin.token_env.as_deref(),
            Some("FLOODWALL_ADMIN_TOKEN"),
            "docs/teams.md rc-78: the purge endpoint needs the admin token"
        );
        // The token-count route keeps python-utils' retries and fallback.
        let (tc, utils) = (route(&snap, "token-count"), route(&snap, "utils"));
        assert_eq!(tc.retry, utils.retry, "token-count retries as utils");
        assert_eq!(
            tc.fallback, utils.fallback,
            "token-count falls back as utils"
        );
    }

    #[test]
    fn notes_assistant_cache() {
        use crate::policy::cache::{Scope, StoreKind};
        const DAY: u64 = 86_400;
        let snap = example("notes-assistant");
        assert_eq!(served_by(&snap, "POST", "/query"), "query");
        let q = cache(&snap, "query");
        assert_eq!(q.ttl.as_secs(), DAY, "docs/teams.md na-14: 24 h");
        assert_eq!(q.scope, Scope::User, "docs/teams.md na-14: keyed by user");
        assert!(
            q.ignore_fields.is_empty(),
            "docs/teams.md na-14: the whole body (query and sources) is in the key"
        );
        assert_eq!(q.store, StoreKind::Tiered, "docs/teams.md na-14");
        assert_eq!(
            q.stale_if_error.map(|d| d.as_secs()),
            Some(DAY),
            "docs/teams.md na-21: an expired answer is served while inference is down"
        );

        let path = "/hf/pipeline/feature-extraction/sentence-transformers/all-MiniLM-L6-v2";
        assert_eq!(
            served_by(&snap, "POST", path),
            "hf-embeddings",
            "docs/teams.md na-15: embeddings before hf-egress"
        );
        let e = cache(&snap, "hf-embeddings");
        assert_eq!(e.ttl.as_secs(), 7 * DAY, "docs/teams.md na-15: 7 days");
        assert_eq!(e.scope, Scope::Shared, "docs/teams.md na-15");
        assert_eq!(e.store, StoreKind::Tiered, "docs/teams.md na-15");
        assert_eq!(
            e.stale_if_error.map(|d| d.as_secs()),
            Some(7 * DAY),
            "docs/teams.md na-21"
        );
        let emb = route(&snap, "hf-embeddings");
        assert_eq!(
            emb.backend_name, "huggingface",
            "docs/teams.md na-21: behind the inference breaker"
        );
        assert!(
            matches!(
                emb.fallback.as_slice(),
                [
                    FallbackTarget::StaleCache,
                    FallbackTarget::Respond { status: 503, .. }
                ]
            ),
            "docs/teams.md na-21/na-22: the cached answer, then the message: {:?}",
            emb.fallback
        );
        assert_eq!(
            emb.fallback_on,
            FallbackOn {
                circuit_open: true,
                retries_exhausted: false
            },
            "docs/teams.md na-21: while the breaker is open"
        );
        assert!(
            route(&snap, "hf-egress").cache.is_none(),
            "completions on hf-egress are not cached (the query route holds the answers)"
        );
        assert_eq!(
            snap.cache_store.max_memory,
            200 << 20,
            "docs/teams.md na-32: two replicas' memory tiers stay under 500 MB"
        );
        assert!(
            snap.server.admin.listen.starts_with("127."),
            "docs/teams.md na-34: the purge endpoint, open without a token, only on loopback"
        );
    }

    #[test]
    fn agent_chat_cache() {
        use crate::policy::cache::{Scope, StoreKind};
        let snap = example("agent-chat");
        let c = cache(&snap, "chat");
        assert_eq!(
            c.ttl.as_secs(),
            600,
            "docs/teams.md ac-21: 10 min placeholder"
        );
        assert_eq!(c.scope, Scope::User, "docs/teams.md ac-21");
        assert_eq!(c.store, StoreKind::Tiered, "docs/teams.md ac-21");
        assert_eq!(
            c.key_headers,
            ["cookie"],
            "docs/teams.md ac-21: a session cookie keeps users apart"
        );
        assert!(route(&snap, "tools").cache.is_none());
    }

    /// The rows of docs/teams.md's tables whose status is `expressed`, as cells.
    fn expressed_rows() -> Vec<Vec<String>> {
        let path = root().join("docs/teams.md");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let rows: Vec<Vec<String>> = text
            .lines()
            .filter(|l| l.trim_start().starts_with('|'))
            .map(|l| {
                l.trim()
                    .trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_string())
                    .collect::<Vec<_>>()
            })
            // | id | team | requirement | YAML path | status | proof |
            .filter(|cells| cells.len() == 6 && cells[4].starts_with("expressed"))
            .collect();
        assert!(
            rows.len() >= 30,
            "only {} `expressed` rows found in docs/teams.md",
            rows.len()
        );
        rows
    }

    /// The `code spans` of a markdown cell.
    fn code_spans(cell: &str) -> Vec<&str> {
        cell.split('`').skip(1).step_by(2).collect()
    }

    #[test]
    fn expressed_rows_name_existing_examples() {
        for cells in expressed_rows() {
            let file = code_spans(&cells[3])
                .into_iter()
                .find(|s| s.starts_with("examples/"))
                .unwrap_or_else(|| {
                    panic!(
                        "docs/teams.md {}: no `examples/...` file in the YAML path",
                        cells[0]
                    )
                });
            assert!(
                root().join(file).is_file(),
                "docs/teams.md {}: `{file}` does not exist",
                cells[0]
            );
        }
    }

    /// Every test named in an `expressed` row's proof exists: `module::name`
    /// is a unit test of this module, a chaos test in `tests/chaos/main.rs`
    /// (`chaos::name`) or an end-to-end test in `tests/e2e/<module>.rs`. A
    /// row proved by a benchmark names `BENCHMARKS.md` instead.
    #[test]
    fn expressed_rows_name_existing_tests() {
        let unit = std::fs::read_to_string(root().join("src/config/tests.rs")).unwrap();
        for cells in expressed_rows() {
            let proof = &cells[5];
            let names: Vec<&str> = code_spans(proof)
                .into_iter()
                .filter(|s| s.contains("::"))
                .collect();
            let benchmark = code_spans(proof).contains(&"BENCHMARKS.md");
            if benchmark {
                assert!(
                    root().join("BENCHMARKS.md").is_file(),
                    "docs/teams.md {}: BENCHMARKS.md does not exist",
                    cells[0]
                );
            }
            assert!(
                !names.is_empty() || benchmark || proof.contains("e2e: pending"),
                "docs/teams.md {}: no proof",
                cells[0]
            );
            for name in names {
                let (module, test) = name.rsplit_once("::").unwrap();
                let source = if module == "team_examples_hold_their_numbers" {
                    unit.clone()
                } else if module == "chaos" {
                    std::fs::read_to_string(root().join("tests/chaos/main.rs")).unwrap()
                } else {
                    let file = root().join("tests/e2e").join(format!("{module}.rs"));
                    std::fs::read_to_string(&file).unwrap_or_else(|e| {
                        panic!("docs/teams.md {}: {}: {e}", cells[0], file.display())
                    })
                };
                assert!(
                    source.contains(&format!("fn {test}(")),
                    "docs/teams.md {}: test `{name}` not found",
                    cells[0]
                );
            }
        }
    }

    /// Every alert an `expressed` row names (a `Floodwall...` code span in its
    /// YAML path) is a rule of `deploy/prometheus/alerts.yaml`.
    #[test]
    fn expressed_rows_name_existing_alerts() {
        let rules = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yaml")).unwrap();
        for cells in expressed_rows() {
            for alert in code_spans(&cells[3])
                .into_iter()
                .filter(|s| s.starts_with("Floodwall"))
            {
                assert!(
                    rules.contains(&format!("- alert: {alert}\n")),
                    "docs/teams.md {}: alert `{alert}` is not in deploy/prometheus/alerts.yaml",
                    cells[0]
                );
            }
        }
    }
}

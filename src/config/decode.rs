//! A schema-driven reader over the positioned YAML tree that collects every
//! error instead of stopping at the first.
//!
//! An operator fixing a policy file wants the whole list in one go, each with
//! its `file:line:column`, its field path (`routes[0].match.path_prefix`),
//! what was expected and what was given. So every getter here records its
//! error in the shared [`Ctx`] and returns `None`; the compiler carries on
//! (using a default in its place) and only decides at the end whether the
//! snapshot can be built.
//!
//! [`Map`] is where unknown fields are caught: it is opened with the list of
//! fields the schema allows, and when it is dropped every key that was not
//! read is reported, either as "not supported yet (planned)" if it appears in
//! the compiler's table of planned fields, or as "unknown field" with a
//! "did you mean" hint. Doing this in `Drop` means a section cannot forget
//! the check.
//!
//! Every value carries two paths: the concrete one shown to the operator
//! (`routes[2].retry`) and a schema pattern (`routes[].retry`,
//! `backends.*.limits`) used to look up planned fields.

use std::cell::RefCell;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::units::{self, format_duration, format_size};
use super::yaml::{Key, Node, NodeKind, ScalarStyle};
use super::ConfigError;

/// Fields the schema defines but the compiler does not implement yet, as
/// (schema pattern of the enclosing mapping, field name).
pub type PlannedTable = &'static [(&'static str, &'static str)];

/// Where errors are collected for one file.
pub struct Ctx {
    file: String,
    planned: PlannedTable,
    errors: RefCell<Vec<ConfigError>>,
}

impl Ctx {
    pub fn new(file: &str, planned: PlannedTable) -> Self {
        Ctx {
            file: file.to_string(),
            planned,
            errors: RefCell::new(Vec::new()),
        }
    }

    /// Records an error at a position.
    pub fn error(&self, line: usize, column: usize, path: &str, message: impl Into<String>) {
        self.errors.borrow_mut().push(ConfigError {
            file: self.file.clone(),
            line,
            column,
            path: path.to_string(),
            message: message.into(),
        });
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.borrow().is_empty()
    }

    /// All errors, sorted by position (stable, so errors at one position
    /// keep the order they were found in).
    pub fn into_errors(self) -> Vec<ConfigError> {
        let mut errors = self.errors.into_inner();
        errors.sort_by_key(|e| (e.line, e.column));
        errors
    }

    /// The document root as a value with an empty path.
    pub fn root<'a>(&'a self, node: &'a Node) -> Value<'a> {
        Value {
            ctx: self,
            node,
            path: String::new(),
            schema: String::new(),
        }
    }
}

/// A node together with its field path, ready to be read as some type.
#[derive(Clone)]
pub struct Value<'a> {
    ctx: &'a Ctx,
    node: &'a Node,
    path: String,
    schema: String,
}

impl<'a> Value<'a> {
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn line(&self) -> usize {
        self.node.line
    }

    pub fn col(&self) -> usize {
        self.node.col
    }

    pub fn node(&self) -> &'a Node {
        self.node
    }

    pub fn ctx(&self) -> &'a Ctx {
        self.ctx
    }

    /// Records an error at this value.
    pub fn error(&self, message: impl Into<String>) {
        self.ctx
            .error(self.node.line, self.node.col, &self.path, message);
    }

    /// "expected X, got Y".
    pub fn type_error(&self, expected: &str) {
        self.error(format!("expected {expected}, got {}", self.node.describe()));
    }

    fn join(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn join_schema(&self, key: &str) -> String {
        if self.schema.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.schema)
        }
    }

    /// A mapping with a fixed set of allowed `fields`.
    pub fn map(&self, fields: &'static [&'static str]) -> Option<Map<'a>> {
        match &self.node.kind {
            NodeKind::Map(entries) => Some(Map {
                value: self.clone(),
                entries,
                fields,
                used: vec![false; entries.len()],
            }),
            _ => {
                self.type_error("a mapping");
                None
            }
        }
    }

    /// A mapping from free-form names to values (`backends`, `header`).
    /// Children get the path `parent.name` and the schema `parent.*`.
    pub fn entries(&self) -> Option<Vec<(&'a Key, Value<'a>)>> {
        match &self.node.kind {
            NodeKind::Map(entries) => Some(
                entries
                    .iter()
                    .map(|(key, node)| {
                        let child = Value {
                            ctx: self.ctx,
                            node,
                            path: self.join(&key.name),
                            schema: self.join_schema("*"),
                        };
                        (key, child)
                    })
                    .collect(),
            ),
            _ => {
                self.type_error("a mapping of names to values");
                None
            }
        }
    }

    /// A list; children get the path `parent[i]` and the schema `parent[]`.
    pub fn list(&self) -> Option<Vec<Value<'a>>> {
        match &self.node.kind {
            NodeKind::Seq(items) => Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, node)| Value {
                        ctx: self.ctx,
                        node,
                        path: format!("{}[{i}]", self.path),
                        schema: format!("{}[]", self.schema),
                    })
                    .collect(),
            ),
            _ => {
                self.type_error("a list");
                None
            }
        }
    }

    /// A list, or a single scalar taken as a one-item list.
    pub fn list_or_one(&self) -> Option<Vec<Value<'a>>> {
        match &self.node.kind {
            NodeKind::Scalar(..) => Some(vec![self.clone()]),
            _ => self.list(),
        }
    }

    /// A list of strings. Items that are not strings are reported and left out.
    pub fn string_list(&self) -> Option<Vec<(String, Value<'a>)>> {
        let items = self.list()?;
        Some(
            items
                .into_iter()
                .filter_map(|item| Some((item.string()?, item)))
                .collect(),
        )
    }

    /// Any scalar, as text (numbers and booleans as written).
    pub fn str(&self) -> Option<&'a str> {
        match self.node.as_scalar() {
            Some((text, _)) => Some(text),
            None => {
                self.type_error("a string");
                None
            }
        }
    }

    pub fn string(&self) -> Option<String> {
        self.str().map(str::to_string)
    }

    /// A non-empty string.
    pub fn non_empty_string(&self) -> Option<String> {
        let text = self.str()?;
        if text.trim().is_empty() {
            self.error("must not be empty");
            return None;
        }
        Some(text.to_string())
    }

    /// `true` or `false`, unquoted.
    pub fn bool(&self) -> Option<bool> {
        match self.node.as_scalar() {
            Some((text, ScalarStyle::Plain)) => match text {
                "true" | "True" | "TRUE" => Some(true),
                "false" | "False" | "FALSE" => Some(false),
                _ => {
                    self.type_error("true or false");
                    None
                }
            },
            Some(_) => {
                self.type_error("true or false (without quotes)");
                None
            }
            None => {
                self.type_error("true or false");
                None
            }
        }
    }

    /// A whole number, unquoted. `_` separators are accepted (`10_000`).
    pub fn int(&self) -> Option<i128> {
        match self.node.as_scalar() {
            Some((text, ScalarStyle::Plain)) => match parse_int(text) {
                Some(n) => Some(n),
                None => {
                    self.type_error("a whole number");
                    None
                }
            },
            Some((text, _)) if parse_int(text).is_some() => {
                self.type_error("a whole number (write it without quotes)");
                None
            }
            _ => {
                self.type_error("a whole number");
                None
            }
        }
    }

    /// A whole number within `range`.
    pub fn u64_in(&self, range: RangeInclusive<u64>) -> Option<u64> {
        let n = self.int()?;
        match u64::try_from(n) {
            Ok(v) if range.contains(&v) => Some(v),
            _ => {
                self.error(format!(
                    "must be {}..={} (was {n})",
                    range.start(),
                    range.end()
                ));
                None
            }
        }
    }

    /// A whole number within `range`, as `usize`.
    pub fn usize_in(&self, range: RangeInclusive<usize>) -> Option<usize> {
        let (lo, hi) = (*range.start() as u64, *range.end() as u64);
        self.u64_in(lo..=hi).and_then(|v| usize::try_from(v).ok())
    }

    /// Any scalar parsed by `parse`, whose error text is used as the message.
    pub fn parse_with<T>(
        &self,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let Some((text, _)) = self.node.as_scalar() else {
            self.type_error(expected);
            return None;
        };
        match parse(text) {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(message);
                None
            }
        }
    }

    /// A duration (`250ms`, `10s`, `5m`, `1h`, `1d`).
    pub fn duration(&self) -> Option<Duration> {
        self.parse_with(units::DURATION_FORMS, units::parse_duration)
    }

    /// A duration within `range`.
    pub fn duration_in(&self, range: RangeInclusive<Duration>) -> Option<Duration> {
        let d = self.duration()?;
        if range.contains(&d) {
            return Some(d);
        }
        let was = self
            .node
            .as_scalar()
            .map(|(t, _)| t.to_string())
            .unwrap_or_default();
        self.error(format!(
            "must be {}..={} (was {was})",
            format_duration(*range.start()),
            format_duration(*range.end())
        ));
        None
    }

    /// A size in bytes within `range` (`64KiB`, `1MiB`, `10MB`, `512`).
    pub fn size_in(&self, range: RangeInclusive<u64>) -> Option<u64> {
        let Some((text, _)) = self.node.as_scalar() else {
            self.type_error(units::SIZE_FORMS);
            return None;
        };
        let bytes = match units::parse_size(text) {
            Ok(b) => b,
            Err(message) => {
                self.error(message);
                return None;
            }
        };
        if range.contains(&bytes) {
            return Some(bytes);
        }
        self.error(format!(
            "must be {}..={} (was {text})",
            format_size(*range.start()),
            format_size(*range.end())
        ));
        None
    }

    /// A ratio written as a percentage (`50%` -> 0.5).
    pub fn ratio(&self) -> Option<f64> {
        self.parse_with(units::RATIO_FORMS, units::parse_ratio)
    }

    /// One of a fixed set of words, listed in the error message.
    pub fn one_of<T: Copy>(&self, choices: &[(&str, T)]) -> Option<T> {
        let text = self.str()?;
        if let Some((_, v)) = choices.iter().find(|(name, _)| *name == text) {
            return Some(*v);
        }
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        self.error(format!(
            "must be one of {} (was `{text}`){}",
            list_names(&names),
            hint(text, &names)
        ));
        None
    }
}

/// A mapping being read field by field; reports unread keys when dropped.
pub struct Map<'a> {
    value: Value<'a>,
    entries: &'a [(Key, Node)],
    fields: &'static [&'static str],
    used: Vec<bool>,
}

impl<'a> Map<'a> {
    /// The mapping itself, e.g. to report a cross-field error at its start.
    pub fn value(&self) -> &Value<'a> {
        &self.value
    }

    pub fn path(&self) -> &str {
        &self.value.path
    }

    /// The path of one of this mapping's fields.
    pub fn field_path(&self, key: &str) -> String {
        self.value.join(key)
    }

    fn find(&self, key: &str) -> Option<usize> {
        debug_assert!(
            self.fields.contains(&key),
            "`{key}` is not declared in the field list of {}",
            self.value.schema
        );
        self.entries.iter().position(|(k, _)| k.name == key)
    }

    /// The value of `key`, or `None` when it is absent or empty (`key:` or
    /// `key: null` count as not set).
    pub fn get(&mut self, key: &str) -> Option<Value<'a>> {
        let i = self.find(key)?;
        self.used[i] = true;
        let node = &self.entries[i].1;
        if node.is_null() {
            return None;
        }
        Some(Value {
            ctx: self.value.ctx,
            node,
            path: self.value.join(key),
            schema: self.value.join_schema(key),
        })
    }

    /// Whether `key` is present with a non-empty value (does not mark it read).
    pub fn has(&self, key: &str) -> bool {
        self.find(key).is_some_and(|i| !self.entries[i].1.is_null())
    }

    /// Whether some key that is not a field of this mapping looks like a
    /// misspelling of one of `names`. Its "unknown field ... did you mean"
    /// error then already explains why those fields are missing.
    pub fn misspelled(&self, names: &[&str]) -> bool {
        self.entries.iter().any(|(k, _)| {
            !self.fields.contains(&k.name.as_str())
                && did_you_mean(&k.name, self.fields).is_some_and(|best| names.contains(&best))
        })
    }

    /// Like [`Map::get`], but a missing value is an error (unless the field
    /// was misspelled, which is reported as an unknown field instead).
    pub fn require(&mut self, key: &str) -> Option<Value<'a>> {
        let found = self.get(key);
        if found.is_none() && !(self.find(key).is_none() && self.misspelled(&[key])) {
            let (line, col) = match self.find(key) {
                Some(i) => (self.entries[i].0.line, self.entries[i].0.col),
                None => (self.value.line(), self.value.col()),
            };
            let message = match self.find(key) {
                Some(_) => format!("`{key}` must have a value"),
                None => format!("missing required field `{key}`"),
            };
            self.value
                .ctx
                .error(line, col, &self.value.join(key), message);
        }
        found
    }

    pub fn bool(&mut self, key: &str) -> Option<bool> {
        self.get(key)?.bool()
    }

    pub fn string(&mut self, key: &str) -> Option<String> {
        self.get(key)?.string()
    }

    pub fn u64_in(&mut self, key: &str, range: RangeInclusive<u64>) -> Option<u64> {
        self.get(key)?.u64_in(range)
    }

    pub fn usize_in(&mut self, key: &str, range: RangeInclusive<usize>) -> Option<usize> {
        self.get(key)?.usize_in(range)
    }

    pub fn duration_in(&mut self, key: &str, range: RangeInclusive<Duration>) -> Option<Duration> {
        self.get(key)?.duration_in(range)
    }

    pub fn size_in(&mut self, key: &str, range: RangeInclusive<u64>) -> Option<u64> {
        self.get(key)?.size_in(range)
    }

    pub fn one_of<T: Copy>(&mut self, key: &str, choices: &[(&str, T)]) -> Option<T> {
        self.get(key)?.one_of(choices)
    }

    /// Reports every key that was not read: planned ones as not supported
    /// yet, the rest as unknown.
    fn report_unread(&self) {
        let schema = self.value.schema.as_str();
        let planned: Vec<&str> = self
            .value
            .ctx
            .planned
            .iter()
            .filter(|(parent, _)| *parent == schema)
            .map(|(_, name)| *name)
            .collect();
        for ((key, _), used) in self.entries.iter().zip(&self.used) {
            if *used || self.fields.contains(&key.name.as_str()) {
                continue;
            }
            let path = self.value.join(&key.name);
            let message = if planned.contains(&key.name.as_str()) {
                format!("`{path}` is not supported yet (planned)")
            } else {
                let mut candidates: Vec<&str> = self.fields.to_vec();
                candidates.extend(&planned);
                match did_you_mean(&key.name, &candidates) {
                    Some(best) => format!("unknown field `{}`; did you mean `{best}`?", key.name),
                    None => format!(
                        "unknown field `{}`; expected one of {}",
                        key.name,
                        list_names(self.fields)
                    ),
                }
            };
            self.value.ctx.error(key.line, key.col, &path, message);
        }
    }
}

impl Drop for Map<'_> {
    fn drop(&mut self) {
        self.report_unread();
    }
}

/// `` `a`, `b`, `c` ``
pub fn list_names(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `"; did you mean `x`?"` when a candidate is close, else empty.
pub fn hint(word: &str, candidates: &[&str]) -> String {
    did_you_mean(word, candidates)
        .map(|best| format!("; did you mean `{best}`?"))
        .unwrap_or_default()
}

/// The candidate closest to `word` if it is close enough to be a typo:
/// same letters in another case, a prefix of at least four letters, or an
/// edit distance of at most a third of the word (at least 1, at most 3).
pub fn did_you_mean<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let lower = word.to_ascii_lowercase();
    let limit = (lower.chars().count() / 3).clamp(1, 3);
    let mut best: Option<(usize, &'c str)> = None;
    for &candidate in candidates {
        let cand = candidate.to_ascii_lowercase();
        let distance = if cand == lower {
            0
        } else if lower.len() >= 4 && cand.starts_with(&lower) {
            1
        } else {
            edit_distance(&lower, &cand)
        };
        if distance <= limit && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, c)| c)
}

/// Edit distance over chars (Levenshtein plus adjacent transpositions, so
/// `nmae` is one edit from `name`).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // rows[i][j] = distance between a[..i] and b[..j].
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

/// A YAML integer: optional sign, digits, optional `_` between digits.
fn parse_int(text: &str) -> Option<i128> {
    let digits = text.strip_prefix('+').unwrap_or(text);
    let (negative, digits) = match digits.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, digits),
    };
    let valid = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '_')
        && !digits.starts_with('_')
        && !digits.ends_with('_');
    if !valid {
        return None;
    }
    let n: i128 = digits.replace('_', "").parse().ok()?;
    Some(if negative { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml;

    const PLANNED: PlannedTable = &[("", "later")];

    fn with_root(text: &str, f: impl FnOnce(Value<'_>)) -> Vec<ConfigError> {
        let parsed = yaml::parse(text);
        let root = parsed.root.unwrap();
        let ctx = Ctx::new("t.yaml", PLANNED);
        f(ctx.root(&root));
        ctx.into_errors()
    }

    #[test]
    fn typed_getters_report_range_type_and_position() {
        let errors = with_root(
            "a: 0\nb: \"3\"\nc: yes\nd: 20m\ne: 2GiB\nf: nope\ng: 1.5\n",
            |root| {
                let mut m = root.map(&["a", "b", "c", "d", "e", "f", "g"]).unwrap();
                assert_eq!(m.u64_in("a", 1..=10), None);
                assert_eq!(m.u64_in("b", 1..=10), None);
                assert_eq!(m.bool("c"), None);
                assert_eq!(
                    m.duration_in("d", Duration::from_millis(1)..=Duration::from_secs(600)),
                    None
                );
                assert_eq!(m.size_in("e", 1..=1 << 30), None);
                assert_eq!(m.one_of("f", &[("auto", 1), ("off", 2)]), None);
                assert_eq!(m.u64_in("g", 1..=10), None);
            },
        );
        let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            [
                "t.yaml:1:4 a: must be 1..=10 (was 0)",
                "t.yaml:2:4 b: expected a whole number (write it without quotes), got the string \"3\"",
                "t.yaml:3:4 c: expected true or false, got `yes`",
                "t.yaml:4:4 d: must be 1ms..=10m (was 20m)",
                "t.yaml:5:4 e: must be 1B..=1GiB (was 2GiB)",
                "t.yaml:6:4 f: must be one of `auto`, `off` (was `nope`)",
                "t.yaml:7:4 g: expected a whole number, got `1.5`",
            ]
        );
    }

    #[test]
    fn unknown_and_planned_fields_are_reported_on_drop() {
        let errors = with_root("nmae: x\nlater: {a: 1}\nzzz: 1\n", |root| {
            let mut m = root.map(&["name", "other"]).unwrap();
            assert!(m.get("name").is_none());
        });
        let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            [
                "t.yaml:1:1 nmae: unknown field `nmae`; did you mean `name`?",
                "t.yaml:2:1 later: `later` is not supported yet (planned)",
                "t.yaml:3:1 zzz: unknown field `zzz`; expected one of `name`, `other`",
            ]
        );
    }

    #[test]
    fn required_fields_and_nested_paths() {
        let errors = with_root("routes:\n  - name: a\n  - {}\n", |root| {
            let mut m = root.map(&["routes"]).unwrap();
            for item in m.require("routes").unwrap().list().unwrap() {
                let mut r = item.map(&["name"]).unwrap();
                r.require("name");
            }
        });
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "t.yaml:3:5 routes[1].name: missing required field `name`"
        );
    }

    #[test]
    fn did_you_mean_finds_typos_only() {
        let names = ["path_prefix", "path", "methods", "host", "header"];
        assert_eq!(did_you_mean("path_prefx", &names), Some("path_prefix"));
        assert_eq!(did_you_mean("Methods", &names), Some("methods"));
        assert_eq!(did_you_mean("hots", &names), Some("host"));
        assert_eq!(did_you_mean("headers", &names), Some("header"));
        assert_eq!(did_you_mean("timeout", &names), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("nmae", "name"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn integers_accept_separators_and_signs() {
        assert_eq!(parse_int("10_000"), Some(10_000));
        assert_eq!(parse_int("-5"), Some(-5));
        assert_eq!(parse_int("_1"), None);
        assert_eq!(parse_int("1e3"), None);
        assert_eq!(parse_int(""), None);
    }
}

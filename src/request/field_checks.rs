//! `request.fields` checks: what a JSON path holds, and whether it passes.
//!
//! The usual way reads the paths straight from the body in one pass that
//! builds nothing ([`probe`]): the values on the checked paths are measured
//! where they lie and every other value is skipped. When the whole document
//! is parsed anyway (an identity source or a cache key reads it), the same
//! answers are read from the tree instead ([`seen_in`]). Both give the same
//! [`Seen`] for every document: a later duplicate key replaces the earlier
//! value, as in the tree, and a number segment indexes an array.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::{is_uuid, BodyError};
use crate::config::{FieldCheck, FieldFormat};

/// The most checks [`probe`] follows at once (one bit each); a route with
/// more has its document parsed whole.
pub const MAX_PROBED: usize = 64;

/// What a checked path holds in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Seen {
    /// Absent, or `null`.
    #[default]
    Absent,
    /// A number, a boolean, an object or an array.
    NotString,
    /// A string: its length in bytes, its characters (counted only when the
    /// check has a character limit or a format, so a 10 MiB image checked
    /// by bytes is not walked) and whether it is a UUID (only for
    /// `format: uuid`).
    Str {
        bytes: usize,
        chars: usize,
        uuid: bool,
    },
}

impl Seen {
    fn of_str(f: &FieldCheck, s: &str) -> Seen {
        let count = f.min_chars.is_some() || f.max_chars.is_some() || f.format.is_some();
        Seen::Str {
            bytes: s.len(),
            chars: if count { s.chars().count() } else { 0 },
            uuid: f.format == Some(FieldFormat::Uuid) && is_uuid(s),
        }
    }
}

/// What `f`'s path holds in a parsed document.
pub fn seen_in(f: &FieldCheck, doc: Option<&Value>) -> Seen {
    let mut cur = match doc {
        Some(v) => v,
        None => return Seen::Absent,
    };
    for s in &f.segments {
        let next = match cur {
            Value::Object(m) => m.get(s),
            Value::Array(a) => s.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
        match next {
            Some(v) => cur = v,
            None => return Seen::Absent,
        }
    }
    match cur {
        Value::Null => Seen::Absent,
        Value::String(s) => Seen::of_str(f, s),
        _ => Seen::NotString,
    }
}

/// What each of `checks`' paths holds in `body`, read in one pass without
/// building the document. `body` must be valid JSON (the caller has
/// validated it) or blank; at most [`MAX_PROBED`] checks.
pub fn probe(body: &[u8], checks: &[FieldCheck]) -> Result<Vec<Seen>, serde_json::Error> {
    let mut probe = Probe::new(checks);
    if !checks.is_empty() && !body.iter().all(u8::is_ascii_whitespace) {
        let mut de = serde_json::Deserializer::from_slice(body);
        probe.at(probe.all(), 0).deserialize(&mut de)?;
    }
    Ok(probe.finish())
}

/// The checks' paths, followed through one pass: [`probe`]'s own, or one
/// that also reads other keys of the root object (`request::parse` reads
/// the LLM fields in the same pass, with [`RootKey`] and [`Probe::value`]).
pub struct Probe<'a> {
    checks: &'a [FieldCheck],
    out: Vec<Seen>,
}

impl<'a> Probe<'a> {
    /// At most [`MAX_PROBED`] checks.
    pub fn new(checks: &'a [FieldCheck]) -> Probe<'a> {
        debug_assert!(checks.len() <= MAX_PROBED);
        Probe {
            checks,
            out: vec![Seen::Absent; checks.len()],
        }
    }

    /// Every check, as a mask.
    fn all(&self) -> u64 {
        match self.checks.len() {
            MAX_PROBED => u64::MAX,
            n => (1u64 << n) - 1,
        }
    }

    fn at(&mut self, mask: u64, depth: usize) -> At<'_> {
        At {
            checks: self.checks,
            mask,
            depth,
            out: &mut self.out,
        }
    }

    /// The seed for the value of a root key whose mask is `mask`.
    pub fn value(&mut self, mask: u64) -> impl for<'de> DeserializeSeed<'de, Value = ()> + '_ {
        self.at(mask, 1)
    }

    /// What each check's path holds.
    pub fn finish(self) -> Vec<Seen> {
        self.out
    }
}

/// A root key: what the caller makes of it (`classify`), and the mask of
/// the checks whose path starts with it.
pub struct RootKey<'a, K> {
    key: Key<'a>,
    classify: fn(&str) -> Option<K>,
}

impl<'a, K> RootKey<'a, K> {
    pub fn new(probe: &Probe<'a>, classify: fn(&str) -> Option<K>) -> Self {
        let key = Key {
            checks: probe.checks,
            mask: probe.all(),
            depth: 0,
        };
        RootKey { key, classify }
    }
}

impl<'de, K> DeserializeSeed<'de> for RootKey<'_, K> {
    type Value = (Option<K>, u64);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, K> Visitor<'de> for RootKey<'_, K> {
    type Value = (Option<K>, u64);
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(((self.classify)(s), self.key.matching(s)))
    }
}

/// The bits of `mask`, as indices.
fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            i
        })
    })
}

/// The checks of `mask` for which `keep` holds, as a mask.
fn select(mask: u64, keep: impl Fn(usize) -> bool) -> u64 {
    bits(mask).filter(|&i| keep(i)).fold(0, |m, i| m | 1 << i)
}

/// A value at `depth` segments into the document, on the path of the
/// checks in `mask`.
struct At<'a> {
    checks: &'a [FieldCheck],
    mask: u64,
    depth: usize,
    out: &'a mut [Seen],
}

impl At<'_> {
    /// Record `seen` for the checks whose path ends here.
    fn set(&mut self, seen: impl Fn(&FieldCheck) -> Seen) {
        for i in bits(self.mask) {
            let f = &self.checks[i];
            if f.segments.len() == self.depth {
                self.out[i] = seen(f);
            }
        }
    }

    /// The checks whose path goes on below this value.
    fn deeper(&self) -> u64 {
        select(self.mask, |i| self.checks[i].segments.len() > self.depth)
    }
}

impl<'de> DeserializeSeed<'de> for At<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        // This value replaces any earlier one under the same key: what the
        // earlier one held is forgotten, as a parsed tree would.
        for i in bits(self.mask) {
            self.out[i] = Seen::Absent;
        }
        d.deserialize_any(self)
    }
}

/// Visitor methods for the scalars that are not strings.
macro_rules! not_a_string {
    ($($name:ident: $t:ty),*) => {$(
        fn $name<E>(mut self, _: $t) -> Result<(), E> {
            self.set(|_| Seen::NotString);
            Ok(())
        }
    )*};
}

impl<'de> Visitor<'de> for At<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(mut self, s: &str) -> Result<(), E> {
        self.set(|f| Seen::of_str(f, s));
        Ok(())
    }
    not_a_string!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64);
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(()) // `null`: absent, as reset in `deserialize`
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut a: A) -> Result<(), A::Error> {
        self.set(|_| Seen::NotString);
        let deeper = self.deeper();
        let mut index = 0usize;
        loop {
            let here = select(deeper, |i| {
                self.checks[i].segments[self.depth].parse::<usize>() == Ok(index)
            });
            let more = match here {
                0 => a.next_element::<IgnoredAny>()?.is_some(),
                _ => a
                    .next_element_seed(At {
                        checks: self.checks,
                        mask: here,
                        depth: self.depth + 1,
                        out: &mut *self.out,
                    })?
                    .is_some(),
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut a: A) -> Result<(), A::Error> {
        self.set(|_| Seen::NotString);
        let deeper = self.deeper();
        let key = Key {
            checks: self.checks,
            mask: deeper,
            depth: self.depth,
        };
        while let Some(here) = a.next_key_seed(key)? {
            match here {
                0 => {
                    a.next_value::<IgnoredAny>()?;
                }
                _ => a.next_value_seed(At {
                    checks: self.checks,
                    mask: here,
                    depth: self.depth + 1,
                    out: &mut *self.out,
                })?,
            }
        }
        Ok(())
    }
}

/// A key: the checks of `mask` whose next segment it is.
#[derive(Clone, Copy)]
struct Key<'a> {
    checks: &'a [FieldCheck],
    mask: u64,
    depth: usize,
}

impl Key<'_> {
    fn matching(&self, key: &str) -> u64 {
        select(self.mask, |i| self.checks[i].segments[self.depth] == key)
    }
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = u64;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, s: &str) -> Result<u64, E> {
        Ok(self.matching(s))
    }
}

/// Apply one check to what its path holds.
pub fn check(f: &FieldCheck, seen: Seen) -> Result<(), BodyError> {
    let path = &f.path;
    let (bytes, chars, uuid) = match seen {
        Seen::Absent => {
            if f.required || f.min_chars.is_some_and(|m| m > 0) {
                return Err(BodyError::TooLarge(format!("`{path}` is required")));
            }
            return Ok(());
        }
        Seen::NotString => {
            if f.min_chars.is_some()
                || f.max_chars.is_some()
                || f.max_bytes.is_some()
                || f.format.is_some()
            {
                return Err(BodyError::TooLarge(format!("`{path}` must be a string")));
            }
            return Ok(());
        }
        Seen::Str { bytes, chars, uuid } => (bytes, chars, uuid),
    };
    if let Some(min) = f.min_chars {
        if chars < min {
            return Err(BodyError::TooLarge(format!(
                "`{path}` is {chars} characters; the minimum is {min}"
            )));
        }
    }
    if let Some(max) = f.max_chars {
        if chars > max {
            return Err(BodyError::TooLarge(format!(
                "`{path}` is {chars} characters; the limit is {max}"
            )));
        }
    }
    if let Some(max) = f.max_bytes {
        if bytes > max {
            return Err(BodyError::TooLarge(format!(
                "`{path}` is {bytes} bytes; the limit is {max} bytes"
            )));
        }
    }
    if f.format == Some(FieldFormat::Uuid) && !uuid {
        return Err(BodyError::TooLarge(format!(
            "`{path}` must be a UUID (8-4-4-4-12 hex digits); got {chars} characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(path: &str) -> FieldCheck {
        FieldCheck {
            path: path.into(),
            segments: path.split('.').map(str::to_string).collect(),
            required: false,
            min_chars: Some(0),
            max_chars: None,
            max_bytes: None,
            format: Some(FieldFormat::Uuid),
        }
    }

    /// The one-pass reading and the tree give the same answer for every
    /// path, on documents with nesting, arrays, nulls, escapes and
    /// duplicate keys.
    #[test]
    fn probe_reads_what_the_tree_holds() {
        let paths = [
            "query",
            "metadata",
            "metadata.sessionId",
            "metadata.sessionId.x",
            "messages.1.content",
            "messages.01.content",
            "messages.9.content",
            "messages.x",
            "a.b.c",
            "0",
            "n",
            "e",
            "d",
            "d.x",
            "t",
        ];
        let checks: Vec<FieldCheck> = paths.iter().map(|p| field(p)).collect();
        let docs = [
            r#"{"query":"hello","metadata":{"sessionId":"123e4567-e89b-12d3-a456-426614174000"}}"#,
            r#"{"query":"h\u00e9llo \"q\"","metadata":{"sessionId":7},"n":null,"e":"","t":true}"#,
            r#"{"messages":[{"content":"a"},{"role":"user","content":"b\nc"}],"a":{"b":{"c":[1]}}}"#,
            r#"{"messages":{"1":{"content":"not an array"}},"a":[{"b":1}],"query":["x"]}"#,
            // Duplicates: the later value wins, and what the earlier held is gone.
            r#"{"d":{"x":"first"},"d":"second","query":"a","query":null}"#,
            r#"{"d":"first","d":{"x":"second"},"metadata":{"sessionId":"s"},"metadata":{}}"#,
            r#"["zero",{"query":"not at the root"}]"#,
            r#""just a string""#,
            r#"12.5"#,
            r#"null"#,
            r#"{}"#,
        ];
        for doc in docs {
            let tree: Value = serde_json::from_str(doc).unwrap();
            let probed = probe(doc.as_bytes(), &checks).unwrap();
            for (f, got) in checks.iter().zip(&probed) {
                assert_eq!(*got, seen_in(f, Some(&tree)), "{} in {doc}", f.path);
            }
        }
        // Something is found, so the comparison above is not all `Absent`.
        let tree: Value = serde_json::from_str(docs[0]).unwrap();
        assert_eq!(
            seen_in(&checks[2], Some(&tree)),
            Seen::Str {
                bytes: 36,
                chars: 36,
                uuid: true
            }
        );
        assert_eq!(probe(b"  ", &checks).unwrap()[0], Seen::Absent);
    }

    #[test]
    fn characters_are_counted_only_when_a_check_needs_them() {
        let mut f = field("image");
        f.min_chars = None;
        f.format = None;
        f.max_bytes = Some(4);
        let seen = probe(br#"{"image":"h\u00e9llo"}"#, std::slice::from_ref(&f)).unwrap();
        assert_eq!(
            seen[0],
            Seen::Str {
                bytes: 6,
                chars: 0,
                uuid: false
            }
        );
        let e = check(&f, seen[0]).unwrap_err().to_string();
        assert!(e.contains("6 bytes; the limit is 4 bytes"), "{e}");
    }

    #[test]
    fn sixty_four_checks_are_followed() {
        let checks: Vec<FieldCheck> = (0..MAX_PROBED).map(|i| field(&format!("f{i}"))).collect();
        let seen = probe(br#"{"f0":"a","f63":"b","f64":"c"}"#, &checks).unwrap();
        assert!(matches!(seen[0], Seen::Str { bytes: 1, .. }));
        assert!(matches!(seen[63], Seen::Str { bytes: 1, .. }));
        assert_eq!(
            seen[1..63].iter().filter(|s| **s != Seen::Absent).count(),
            0
        );
    }
}

//! What floodwall reads from a request body, and the per-route request checks.
//!
//! The body is read whole (up to the route's `max_body`) and kept as one
//! `Bytes`, so any later attempt can resend it unchanged. Only the fields the
//! policies need are extracted: `model`, `stream`, `max_tokens`, `user`, and
//! the number and total size of `messages`. Everything else is validated as
//! JSON but skipped without allocating.
//!
//! "Prompt characters" means the Unicode scalar values of every message's
//! text content (a string, or the `text` of each content part) plus a
//! top-level `prompt` string, as sent.

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{FieldCheck, RequestPolicy};

mod field_checks;

/// The LLM-relevant fields of a JSON request body.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LlmFields {
    pub model: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    pub user: Option<String>,
    pub message_count: usize,
    pub prompt_chars: usize,
}

/// Why a body was refused. Messages name the field, the limit and the size sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    TooLarge(String),
}

/// Unknown fields are skipped by serde without building values for them,
/// and the fields read are read leniently: a field of an unexpected type
/// counts as absent (the request is still valid JSON and goes on).
#[derive(Default)]
struct Raw {
    model: Loose<String>,
    stream: Loose<bool>,
    max_tokens: Loose<u64>,
    max_completion_tokens: Loose<u64>,
    user: Loose<String>,
    messages: Messages,
    prompt: Loose<Chars>,
}

/// The top-level keys [`Raw`] reads.
#[derive(Clone, Copy)]
enum RawKey {
    Model,
    Stream,
    MaxTokens,
    MaxCompletionTokens,
    User,
    Messages,
    Prompt,
}

impl RawKey {
    fn of(key: &str) -> Option<RawKey> {
        Some(match key {
            "model" => RawKey::Model,
            "stream" => RawKey::Stream,
            "max_tokens" => RawKey::MaxTokens,
            "max_completion_tokens" => RawKey::MaxCompletionTokens,
            "user" => RawKey::User,
            "messages" => RawKey::Messages,
            "prompt" => RawKey::Prompt,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            RawKey::Model => "model",
            RawKey::Stream => "stream",
            RawKey::MaxTokens => "max_tokens",
            RawKey::MaxCompletionTokens => "max_completion_tokens",
            RawKey::User => "user",
            RawKey::Messages => "messages",
            RawKey::Prompt => "prompt",
        }
    }
}

/// Reads one [`RawKey`]'s value into `raw`.
struct RawField<'a> {
    raw: &'a mut Raw,
    key: RawKey,
}

impl<'de> serde::de::DeserializeSeed<'de> for RawField<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        let r = self.raw;
        match self.key {
            RawKey::Model => r.model = Deserialize::deserialize(d)?,
            RawKey::Stream => r.stream = Deserialize::deserialize(d)?,
            RawKey::MaxTokens => r.max_tokens = Deserialize::deserialize(d)?,
            RawKey::MaxCompletionTokens => r.max_completion_tokens = Deserialize::deserialize(d)?,
            RawKey::User => r.user = Deserialize::deserialize(d)?,
            RawKey::Messages => r.messages = Deserialize::deserialize(d)?,
            RawKey::Prompt => r.prompt = Deserialize::deserialize(d)?,
        }
        Ok(())
    }
}

/// The root object, read in one pass: [`Raw`]'s keys, and the
/// `request.fields` paths of `probe` (see `field_checks`). A repeated
/// [`Raw`] key is a data error, as serde's derived structs make it.
struct RawAndFields<'p, 'c>(&'p mut field_checks::Probe<'c>);

impl<'de> serde::de::DeserializeSeed<'de> for RawAndFields<'_, '_> {
    type Value = Raw;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for RawAndFields<'_, '_> {
    type Value = Raw;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
        use serde::de::{DeserializeSeed, Error};
        let probe = self.0;
        let mut raw = Raw::default();
        let mut read = [false; 7];
        while let Some((key, mask)) =
            a.next_key_seed(field_checks::RootKey::new(&*probe, RawKey::of))?
        {
            match (key, mask) {
                (None, 0) => {
                    a.next_value::<IgnoredAny>()?;
                }
                (None, _) => a.next_value_seed(probe.value(mask))?,
                (Some(k), _) if read[k as usize] => {
                    return Err(A::Error::duplicate_field(k.name()))
                }
                (Some(k), 0) => {
                    read[k as usize] = true;
                    a.next_value_seed(RawField {
                        raw: &mut raw,
                        key: k,
                    })?;
                }
                (Some(k), _) => {
                    // Read by both (a check on an LLM field itself): keep the
                    // value once and read it twice.
                    read[k as usize] = true;
                    let v: Value = a.next_value()?;
                    RawField {
                        raw: &mut raw,
                        key: k,
                    }
                    .deserialize(&v)
                    .map_err(A::Error::custom)?;
                    probe
                        .value(mask)
                        .deserialize(&v)
                        .map_err(A::Error::custom)?;
                }
            }
        }
        Ok(raw)
    }
}

/// A value of type `T`, or `None` when the JSON value has another type.
struct Loose<T>(Option<T>);

impl<T> Default for Loose<T> {
    fn default() -> Self {
        Loose(None)
    }
}

/// What `Loose<T>` accepts, as a serde visitor's result.
trait LooseKind: Sized {
    fn from_str(_: &str) -> Option<Self> {
        None
    }
    fn from_bool(_: bool) -> Option<Self> {
        None
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
}

impl LooseKind for String {
    fn from_str(s: &str) -> Option<Self> {
        Some(s.to_string())
    }
}
impl LooseKind for bool {
    fn from_bool(b: bool) -> Option<Self> {
        Some(b)
    }
}
impl LooseKind for u64 {
    fn from_u64(n: u64) -> Option<Self> {
        Some(n)
    }
}

/// The number of Unicode scalar values of a string.
struct Chars(usize);

impl LooseKind for Chars {
    fn from_str(s: &str) -> Option<Self> {
        Some(Chars(s.chars().count()))
    }
}

impl<'de, T: LooseKind> Deserialize<'de> for Loose<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: LooseKind> serde::de::Visitor<'de> for V<T> {
            type Value = Loose<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Loose(T::from_str(s)))
            }
            fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
                Ok(Loose(T::from_bool(b)))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
                Ok(Loose(T::from_u64(n)))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Loose(None))
            }
            fn visit_some<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                a: A,
            ) -> Result<Self::Value, A::Error> {
                skip_seq(a)?;
                Ok(Loose(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                a: A,
            ) -> Result<Self::Value, A::Error> {
                skip_map(a)?;
                Ok(Loose(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// `messages`: how many, and the characters of their text content (a
/// string, or the `text` of each content part). Anything but a list counts
/// as no messages.
#[derive(Default)]
struct Messages {
    count: usize,
    chars: usize,
}

/// Anything but an object counts as a message without text.
#[derive(Default)]
struct Message {
    chars: usize,
}

/// A message's `content`: a string or a list of parts.
#[derive(Default)]
struct Content(usize);

/// A content part: the characters of its `text`, when it is an object with one.
#[derive(Default)]
struct Part(usize);

/// Visitor methods that read scalars as "nothing here" (`Default`):
/// `ignore_scalars!()` for every scalar, `ignore_scalars!(but_str)` for
/// every scalar but strings (the visitor reads those itself).
macro_rules! ignore_scalars {
    () => {
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        ignore_scalars!(but_str);
    };
    (but_str) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    };
}

/// A map key compared with one name, without allocating (escaped keys are
/// unescaped by the parser first).
struct KeyIs<const CONTENT: bool>(bool);

impl<'de, const CONTENT: bool> Deserialize<'de> for KeyIs<CONTENT> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const C: bool>;
        impl<'de, const C: bool> serde::de::Visitor<'de> for V<C> {
            type Value = KeyIs<C>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, s: &str) -> Result<KeyIs<C>, E> {
                Ok(KeyIs(s == if C { "content" } else { "text" }))
            }
        }
        d.deserialize_str(V::<CONTENT>)
    }
}

fn skip_seq<'de, A: serde::de::SeqAccess<'de>>(mut a: A) -> Result<(), A::Error> {
    while a.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: serde::de::MapAccess<'de>>(mut a: A) -> Result<(), A::Error> {
    while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Messages;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of messages")
            }
            ignore_scalars!();
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Messages, A::Error> {
                let mut m = Messages::default();
                while let Some(msg) = a.next_element::<Message>()? {
                    m.count += 1;
                    m.chars += msg.chars;
                }
                Ok(m)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<Messages, A::Error> {
                skip_map(a)?;
                Ok(Messages::default())
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Message;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message")
            }
            ignore_scalars!();
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, a: A) -> Result<Message, A::Error> {
                skip_seq(a)?;
                Ok(Message::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Message, A::Error> {
                let mut chars = 0;
                while let Some(KeyIs(is_content)) = a.next_key::<KeyIs<true>>()? {
                    if is_content {
                        chars += a.next_value::<Content>()?.0;
                    } else {
                        a.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Message { chars })
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("message content")
            }
            fn visit_str<E>(self, s: &str) -> Result<Content, E> {
                Ok(Content(s.chars().count()))
            }
            ignore_scalars!(but_str);
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Content, A::Error> {
                let mut n = 0;
                while let Some(p) = a.next_element::<Part>()? {
                    n += p.0;
                }
                Ok(Content(n))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<Content, A::Error> {
                skip_map(a)?;
                Ok(Content(0))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Part {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Part;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a content part")
            }
            ignore_scalars!();
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, a: A) -> Result<Part, A::Error> {
                skip_seq(a)?;
                Ok(Part(0))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Part, A::Error> {
                let mut n = 0;
                while let Some(KeyIs(is_text)) = a.next_key::<KeyIs<false>>()? {
                    if is_text {
                        n += a.next_value::<Loose<Chars>>()?.0.map_or(0, |c| c.0);
                    } else {
                        a.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Part(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// A parsed JSON request body.
#[derive(Debug)]
pub struct Parsed {
    pub llm: LlmFields,
    /// The whole document, when asked for.
    pub doc: Option<Value>,
    /// What each `request.fields` path holds, when read in the same pass
    /// (in the order of the checks given to [`parse`]).
    seen: Option<Vec<field_checks::Seen>>,
}

/// Parse a JSON body. `Ok(None)` for an empty body.
pub fn parse_llm(body: &[u8]) -> Result<Option<(LlmFields, Option<Value>)>, BodyError> {
    Ok(parse(body, false, &[])?.map(|p| (p.llm, p.doc)))
}

/// Parse a JSON body, also returning the whole document when `keep_value`
/// (an identity source or a cache key reads it). Otherwise the paths of
/// `checks` (the route's `request.fields`) are read in the same pass, for
/// [`check`]. `Ok(None)` for an empty body.
pub fn parse(
    body: &[u8],
    keep_value: bool,
    checks: &[FieldCheck],
) -> Result<Option<Parsed>, BodyError> {
    use serde::de::DeserializeSeed;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if keep_value {
        let v: Value = serde_json::from_slice(body).map_err(json_error)?;
        let llm = match v.is_object() {
            // Read from the tree by reference (no deep copy of it).
            true => RawAndFields(&mut field_checks::Probe::new(&[]))
                .deserialize(&v)
                .map(fields_of)
                .unwrap_or_default(),
            false => LlmFields::default(),
        };
        return Ok(Some(Parsed {
            llm,
            doc: Some(v),
            seen: None,
        }));
    }
    // Pick fields when the document is an object; any other shape is
    // validated whole and yields none.
    let is_object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if is_object {
        let probed = checks.len() <= field_checks::MAX_PROBED;
        let mut probe = field_checks::Probe::new(if probed { checks } else { &[] });
        let mut de = serde_json::Deserializer::from_slice(body);
        let read = RawAndFields(&mut probe)
            .deserialize(&mut de)
            .and_then(|raw| de.end().map(|()| raw));
        match read {
            Ok(raw) => {
                return Ok(Some(Parsed {
                    llm: fields_of(raw),
                    doc: None,
                    seen: probed.then(|| probe.finish()),
                }))
            }
            // Valid JSON of another shape (`messages` not a list, a key
            // twice): check the syntax alone and extract nothing.
            Err(e) if e.is_data() => {}
            Err(e) => return Err(json_error(e)),
        }
    }
    serde_json::from_slice::<IgnoredAny>(body).map_err(json_error)?;
    Ok(Some(Parsed {
        llm: LlmFields::default(),
        doc: None,
        seen: None,
    }))
}

fn json_error(e: serde_json::Error) -> BodyError {
    let what = e.to_string();
    // serde_json appends " at line L column C"; say it in one consistent form.
    let msg = match what.rfind(" at line ") {
        Some(i) => what[..i].to_string(),
        None => what,
    };
    BodyError::InvalidJson(format!("{msg} at line {} column {}", e.line(), e.column()))
}

fn fields_of(raw: Raw) -> LlmFields {
    LlmFields {
        model: raw.model.0,
        stream: raw.stream.0 == Some(true),
        max_tokens: raw.max_tokens.0.or(raw.max_completion_tokens.0),
        user: raw.user.0,
        message_count: raw.messages.count,
        prompt_chars: raw.messages.chars + raw.prompt.0.map_or(0, |c| c.0),
    }
}

/// Apply the route's `max_messages`, `max_prompt_chars` and `fields` checks
/// to a body [`parse`]d with this policy's `fields` (`None`: an empty body).
/// The fields come from the parse's own pass, or its document; failing
/// both, from `body` (valid JSON, or blank) in a pass of their own.
pub fn check(
    policy: &RequestPolicy,
    parsed: Option<&Parsed>,
    body: &[u8],
) -> Result<(), BodyError> {
    let none = LlmFields::default();
    let fields = parsed.map_or(&none, |p| &p.llm);
    let doc = parsed.and_then(|p| p.doc.as_ref());
    if let Some(max) = policy.max_messages {
        if fields.message_count > max {
            return Err(BodyError::TooLarge(format!(
                "`messages` has {} messages; the limit is {max}",
                fields.message_count
            )));
        }
    }
    if let Some(max) = policy.max_prompt_chars {
        if fields.prompt_chars > max {
            return Err(BodyError::TooLarge(format!(
                "the prompt is {} characters; the limit is {max}",
                fields.prompt_chars
            )));
        }
    }
    if policy.fields.is_empty() {
        return Ok(());
    }
    if let Some(seen) = parsed.and_then(|p| p.seen.as_ref()) {
        for (f, seen) in policy.fields.iter().zip(seen) {
            field_checks::check(f, *seen)?;
        }
        return Ok(());
    }
    let whole: Option<Value>;
    let doc = match doc {
        Some(d) => Some(d),
        // More paths than one pass follows: parse the document (no policy
        // in practice has this many).
        None if policy.fields.len() > field_checks::MAX_PROBED => {
            whole = match body.iter().all(u8::is_ascii_whitespace) {
                true => None,
                false => Some(serde_json::from_slice(body).map_err(json_error)?),
            };
            whole.as_ref()
        }
        None => {
            let seen = field_checks::probe(body, &policy.fields).map_err(json_error)?;
            for (f, seen) in policy.fields.iter().zip(seen) {
                field_checks::check(f, seen)?;
            }
            return Ok(());
        }
    };
    for f in &policy.fields {
        field_checks::check(f, field_checks::seen_in(f, doc))?;
    }
    Ok(())
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hex digits in either case.
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn odd_shapes_are_read_leniently_without_failing() {
        let (f, _) = super::parse_llm(
            br#"{"model": 5, "stream": "true", "max_tokens": -1, "user": ["x"],
                "messages": [
                  "not an object",
                  {"role": "user", "con\u0074ent": "h\u00e9llo"},
                  {"content": [ "a string part", {"type": "text", "text": "abc"}, {"text": 7}, [1] ]},
                  {"content": {"text": "an object is not content"}},
                  {"content": null}
                ],
                "prompt": "xy"}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(f.model, None);
        assert!(!f.stream);
        assert_eq!(f.max_tokens, None);
        assert_eq!(f.user, None);
        assert_eq!(f.message_count, 5);
        // "héllo" (5) + "abc" (3) + "xy" (2)
        assert_eq!(f.prompt_chars, 10);
        let (f, _) = super::parse_llm(br#"{"messages": {"a": 1}, "max_completion_tokens": 9}"#)
            .unwrap()
            .unwrap();
        assert_eq!((f.message_count, f.max_tokens), (0, Some(9)));
        assert!(super::parse_llm(br#"{"messages": [{"content": "x"}"#).is_err());
    }

    use super::*;
    use crate::config::{FieldFormat, JsonMode};

    fn policy() -> RequestPolicy {
        RequestPolicy {
            max_body: 1 << 20,
            json: JsonMode::Auto,
            max_messages: None,
            max_prompt_chars: None,
            fields: vec![],
        }
    }

    fn field(path: &str) -> FieldCheck {
        FieldCheck {
            path: path.into(),
            segments: path.split('.').map(str::to_string).collect(),
            required: false,
            min_chars: None,
            max_chars: None,
            max_bytes: None,
            format: None,
        }
    }

    #[test]
    fn extracts_llm_fields() {
        let body = br#"{"model":"gpt-4o","stream":true,"max_tokens":64,"user":"u1",
            "messages":[{"role":"system","content":"abc"},{"role":"user","content":[{"type":"text","text":"h\u00e9"}]}],
            "temperature":0.2,"tools":[{"x":[1,2,{"y":null}]}]}"#;
        let (f, v) = parse_llm(body).unwrap().unwrap();
        assert!(v.is_none());
        assert_eq!(
            f,
            LlmFields {
                model: Some("gpt-4o".into()),
                stream: true,
                max_tokens: Some(64),
                user: Some("u1".into()),
                message_count: 2,
                prompt_chars: 5,
            }
        );
    }

    #[test]
    fn invalid_json_says_where() {
        let err = parse_llm(b"{\"model\": \"x\",\n \"stream\": tru}").unwrap_err();
        let BodyError::InvalidJson(msg) = err else {
            panic!()
        };
        assert!(msg.contains("line 2 column"), "{msg}");
        assert!(parse_llm(b"{\"a\":1").is_err());
        assert!(parse_llm(b"[1,2").is_err());
    }

    #[test]
    fn other_json_shapes_are_valid() {
        assert_eq!(
            parse_llm(b"[1,2,3]").unwrap().unwrap().0,
            LlmFields::default()
        );
        assert_eq!(
            parse_llm(b"{\"messages\": 3}").unwrap().unwrap().0,
            LlmFields::default()
        );
        assert!(parse_llm(b"  ").unwrap().is_none());
    }

    #[test]
    fn message_and_prompt_limits_name_limit_and_size() {
        let mut p = policy();
        p.max_messages = Some(1);
        let with = |llm: LlmFields| Parsed {
            llm,
            doc: None,
            seen: None,
        };
        let f = with(LlmFields {
            message_count: 3,
            ..Default::default()
        });
        let e = check(&p, Some(&f), b"").unwrap_err().to_string();
        assert!(e.contains("3 messages") && e.contains("limit is 1"), "{e}");
        p.max_messages = None;
        p.max_prompt_chars = Some(10);
        let f = with(LlmFields {
            prompt_chars: 11,
            ..Default::default()
        });
        let e = check(&p, Some(&f), b"").unwrap_err().to_string();
        assert!(
            e.contains("11 characters") && e.contains("limit is 10"),
            "{e}"
        );
    }

    /// `check` on `body`, its fields read in the parse's own pass, from
    /// the parsed tree, and in a pass of their own: the three must agree.
    fn check_body(p: &RequestPolicy, body: &str) -> Result<(), BodyError> {
        let b = body.as_bytes();
        let one_pass = parse(b, false, &p.fields).unwrap().unwrap();
        let tree = parse(b, true, &p.fields).unwrap().unwrap();
        assert!(tree.doc.is_some());
        let own_pass = Parsed {
            seen: None,
            doc: None,
            llm: one_pass.llm.clone(),
        };
        let got = check(p, Some(&one_pass), b);
        assert_eq!(got, check(p, Some(&tree), b), "{body}");
        assert_eq!(got, check(p, Some(&own_pass), b), "{body}");
        got
    }

    #[test]
    fn field_checks() {
        let doc =
            r#"{"query":"hello world","metadata":{"sessionId":"not-a-uuid"},"image":"aGVsbG8="}"#;
        let mut p = policy();
        let mut q = field("query");
        q.max_chars = Some(5);
        p.fields = vec![q];
        let e = check_body(&p, doc).unwrap_err().to_string();
        assert!(
            e.contains("`query` is 11 characters; the limit is 5"),
            "{e}"
        );
        // The usual case: the paths are read in the parse's own pass.
        let parsed = parse(doc.as_bytes(), false, &p.fields).unwrap().unwrap();
        assert!(parsed.seen.is_some() && parsed.doc.is_none());

        let mut s = field("metadata.sessionId");
        s.format = Some(FieldFormat::Uuid);
        p.fields = vec![s.clone()];
        let e = check_body(&p, doc).unwrap_err().to_string();
        assert!(
            e.contains("metadata.sessionId") && e.contains("UUID"),
            "{e}"
        );
        let ok = r#"{"metadata":{"sessionId":"123e4567-e89b-12d3-a456-426614174000"}}"#;
        assert!(check_body(&p, ok).is_ok());

        let mut img = field("image");
        img.max_bytes = Some(4);
        p.fields = vec![img];
        let e = check_body(&p, doc).unwrap_err().to_string();
        assert!(
            e.contains("8 bytes") && e.contains("limit is 4 bytes"),
            "{e}"
        );

        let mut prompt = field("prompt");
        prompt.min_chars = Some(1);
        p.fields = vec![prompt.clone()];
        let e = check_body(&p, doc).unwrap_err().to_string();
        assert!(e.contains("`prompt` is required"), "{e}");
        // A blank body has no fields.
        let e = check(&p, None, b" ").unwrap_err();
        assert!(e.to_string().contains("`prompt` is required"), "{e}");

        // The first failing check, in the policy's order, is the one reported.
        let mut q = field("query");
        q.max_chars = Some(5);
        let mut n = field("metadata");
        n.max_bytes = Some(1);
        p.fields = vec![n, q];
        let e = check_body(&p, doc).unwrap_err().to_string();
        assert!(e.contains("`metadata` must be a string"), "{e}");

        // More paths than one pass follows: the document is parsed instead.
        p.fields = (0..=64).map(|i| field(&format!("f{i}"))).collect();
        p.fields.push(prompt);
        let e = check_body(&p, doc).unwrap_err();
        assert!(e.to_string().contains("`prompt` is required"), "{e}");

        // A check on an LLM field itself: both readers get the value.
        let mut model = field("model");
        model.max_chars = Some(3);
        p.fields = vec![model];
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        let e = check_body(&p, body).unwrap_err();
        assert!(e.to_string().contains("`model` is 6 characters"), "{e}");
        let parsed = parse(body.as_bytes(), false, &p.fields).unwrap().unwrap();
        assert_eq!(parsed.llm.model.as_deref(), Some("gpt-4o"));
        assert_eq!(parsed.llm.message_count, 1);

        // A key twice: no LLM fields are read, and the checks see the later value.
        let mut q = field("query");
        q.max_chars = Some(3);
        p.fields = vec![q];
        let body = r#"{"model":"a","query":"long enough","model":"b","query":"ok"}"#;
        assert!(check_body(&p, body).is_ok());
        let parsed = parse(body.as_bytes(), false, &p.fields).unwrap().unwrap();
        assert_eq!(parsed.llm, LlmFields::default());
        assert!(parsed.seen.is_none());
    }

    #[test]
    fn uuid_format() {
        assert!(is_uuid("123e4567-e89b-12d3-a456-426614174000"));
        assert!(!is_uuid("123e4567e89b12d3a456426614174000"));
        assert!(!is_uuid("123e4567-e89b-12d3-a456-42661417400g"));
    }
}

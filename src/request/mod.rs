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

use crate::config::{FieldCheck, FieldFormat, RequestPolicy};

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

/// Unknown fields are skipped by serde without building values for them.
#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    model: Option<Value>,
    #[serde(default)]
    stream: Option<Value>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    user: Option<Value>,
    #[serde(default)]
    messages: Option<Vec<RawMessage>>,
    #[serde(default)]
    prompt: Option<Value>,
}

#[derive(Deserialize)]
struct RawMessage {
    #[serde(default)]
    content: Option<Value>,
}

/// Parse a JSON body. `Ok(None)` for an empty body.
pub fn parse_llm(body: &[u8]) -> Result<Option<(LlmFields, Option<Value>)>, BodyError> {
    parse(body, false)
}

/// Parse a JSON body, also returning the whole document when `keep_value`
/// (needed by `request.fields` checks on arbitrary paths).
pub fn parse(
    body: &[u8],
    keep_value: bool,
) -> Result<Option<(LlmFields, Option<Value>)>, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if keep_value {
        let v: Value = serde_json::from_slice(body).map_err(json_error)?;
        let fields = match v.is_object() {
            true => serde_json::from_value::<Raw>(v.clone())
                .map(fields_of)
                .unwrap_or_default(),
            false => LlmFields::default(),
        };
        return Ok(Some((fields, Some(v))));
    }
    // Validate the whole document's syntax, then pick fields when it is an
    // object (serde would otherwise read an array positionally into `Raw`).
    let is_object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if !is_object {
        serde_json::from_slice::<IgnoredAny>(body).map_err(json_error)?;
        return Ok(Some((LlmFields::default(), None)));
    }
    match serde_json::from_slice::<Raw>(body) {
        Ok(raw) => Ok(Some((fields_of(raw), None))),
        Err(e) if e.is_data() => {
            // Valid JSON of another shape (an array, or `messages` not a list):
            // check the syntax alone and extract nothing.
            serde_json::from_slice::<IgnoredAny>(body).map_err(json_error)?;
            Ok(Some((LlmFields::default(), None)))
        }
        Err(e) => Err(json_error(e)),
    }
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
    let text_chars = |v: &Value| -> usize {
        match v {
            Value::String(s) => s.chars().count(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .map(|s| s.chars().count())
                .sum(),
            _ => 0,
        }
    };
    let messages = raw.messages.unwrap_or_default();
    let mut prompt_chars: usize = messages
        .iter()
        .filter_map(|m| m.content.as_ref())
        .map(text_chars)
        .sum();
    if let Some(Value::String(p)) = &raw.prompt {
        prompt_chars += p.chars().count();
    }
    LlmFields {
        model: raw.model.and_then(|v| v.as_str().map(str::to_string)),
        stream: matches!(raw.stream, Some(Value::Bool(true))),
        max_tokens: raw
            .max_tokens
            .or(raw.max_completion_tokens)
            .and_then(|v| v.as_u64()),
        user: raw.user.and_then(|v| v.as_str().map(str::to_string)),
        message_count: messages.len(),
        prompt_chars,
    }
}

/// Apply the route's `max_messages`, `max_prompt_chars` and `fields` checks.
pub fn check(
    policy: &RequestPolicy,
    fields: &LlmFields,
    doc: Option<&Value>,
) -> Result<(), BodyError> {
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
    for f in &policy.fields {
        check_field(f, doc)?;
    }
    Ok(())
}

fn lookup<'a>(doc: Option<&'a Value>, segments: &[String]) -> Option<&'a Value> {
    let mut cur = doc?;
    for s in segments {
        cur = match cur {
            Value::Object(m) => m.get(s)?,
            Value::Array(a) => a.get(s.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn check_field(f: &FieldCheck, doc: Option<&Value>) -> Result<(), BodyError> {
    let path = &f.path;
    let v = match lookup(doc, &f.segments) {
        None | Some(Value::Null) => {
            if f.required || f.min_chars.is_some_and(|m| m > 0) {
                return Err(BodyError::TooLarge(format!("`{path}` is required")));
            }
            return Ok(());
        }
        Some(v) => v,
    };
    let Some(s) = v.as_str() else {
        if f.min_chars.is_some()
            || f.max_chars.is_some()
            || f.max_bytes.is_some()
            || f.format.is_some()
        {
            return Err(BodyError::TooLarge(format!("`{path}` must be a string")));
        }
        return Ok(());
    };
    if f.min_chars.is_some() || f.max_chars.is_some() {
        let n = s.chars().count();
        if let Some(min) = f.min_chars {
            if n < min {
                return Err(BodyError::TooLarge(format!(
                    "`{path}` is {n} characters; the minimum is {min}"
                )));
            }
        }
        if let Some(max) = f.max_chars {
            if n > max {
                return Err(BodyError::TooLarge(format!(
                    "`{path}` is {n} characters; the limit is {max}"
                )));
            }
        }
    }
    if let Some(max) = f.max_bytes {
        if s.len() > max {
            return Err(BodyError::TooLarge(format!(
                "`{path}` is {} bytes; the limit is {max} bytes",
                s.len()
            )));
        }
    }
    if f.format == Some(FieldFormat::Uuid) && !is_uuid(s) {
        return Err(BodyError::TooLarge(format!(
            "`{path}` must be a UUID (8-4-4-4-12 hex digits); got {} characters",
            s.chars().count()
        )));
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
    use super::*;
    use crate::config::JsonMode;

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
        let f = LlmFields {
            message_count: 3,
            ..Default::default()
        };
        let e = check(&p, &f, None).unwrap_err().to_string();
        assert!(e.contains("3 messages") && e.contains("limit is 1"), "{e}");
        p.max_messages = None;
        p.max_prompt_chars = Some(10);
        let f = LlmFields {
            prompt_chars: 11,
            ..Default::default()
        };
        let e = check(&p, &f, None).unwrap_err().to_string();
        assert!(
            e.contains("11 characters") && e.contains("limit is 10"),
            "{e}"
        );
    }

    #[test]
    fn field_checks() {
        let doc: Value = serde_json::from_str(
            r#"{"query":"hello world","metadata":{"sessionId":"not-a-uuid"},"image":"aGVsbG8="}"#,
        )
        .unwrap();
        let mut p = policy();
        let mut q = field("query");
        q.max_chars = Some(5);
        p.fields = vec![q];
        let e = check(&p, &LlmFields::default(), Some(&doc))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`query` is 11 characters; the limit is 5"),
            "{e}"
        );

        let mut s = field("metadata.sessionId");
        s.format = Some(FieldFormat::Uuid);
        p.fields = vec![s.clone()];
        let e = check(&p, &LlmFields::default(), Some(&doc))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metadata.sessionId") && e.contains("UUID"),
            "{e}"
        );

        let ok: Value = serde_json::from_str(
            r#"{"metadata":{"sessionId":"123e4567-e89b-12d3-a456-426614174000"}}"#,
        )
        .unwrap();
        assert!(check(&p, &LlmFields::default(), Some(&ok)).is_ok());

        let mut img = field("image");
        img.max_bytes = Some(4);
        p.fields = vec![img];
        let e = check(&p, &LlmFields::default(), Some(&doc))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("8 bytes") && e.contains("limit is 4 bytes"),
            "{e}"
        );

        let mut prompt = field("prompt");
        prompt.min_chars = Some(1);
        p.fields = vec![prompt];
        let e = check(&p, &LlmFields::default(), Some(&doc))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`prompt` is required"), "{e}");
    }

    #[test]
    fn uuid_format() {
        assert!(is_uuid("123e4567-e89b-12d3-a456-426614174000"));
        assert!(!is_uuid("123e4567e89b12d3a456426614174000"));
        assert!(!is_uuid("123e4567-e89b-12d3-a456-42661417400g"));
    }
}

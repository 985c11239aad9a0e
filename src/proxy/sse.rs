//! An incremental scanner over an OpenAI-style SSE response body.
//!
//! It is fed the body chunk by chunk, as the bytes arrive (events may be
//! split across chunks anywhere), and tracks what the policies need:
//! - whether the *first token* arrived: the first `data:` event that carries
//!   content, a tool call, a `finish_reason` or an error (role-only and empty
//!   deltas do not count; see `first_token` in docs/policy.md);
//! - whether `data: [DONE]` or a `finish_reason` was seen (the stream ended
//!   as the model intended);
//! - the `usage` object of the final chunk, when the upstream sends one;
//! - how many characters of content were streamed, to estimate tokens when
//!   there is no usage.
//!
//! Only `data:` lines are looked at; comments (`: ping`) and other fields are
//! skipped. Lines longer than [`MAX_LINE`] are dropped rather than buffered.

use std::borrow::Cow;

use serde::Deserialize;

/// The longest `data:` line kept while waiting for its end.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Default)]
pub struct SseScanner {
    line: Vec<u8>,
    overflow: bool,
    pub events: u64,
    pub first_token: bool,
    pub done: bool,
    pub finished: bool,
    pub usage: Option<Usage>,
    pub content_chars: u64,
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    function_call: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

impl SseScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed the next bytes of the body.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while let Some(i) = bytes.iter().position(|&b| b == b'\n') {
            let (head, rest) = bytes.split_at(i);
            if self.overflow {
                self.overflow = false;
                self.line.clear();
            } else if self.line.is_empty() {
                self.on_line(head);
            } else {
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                self.on_line(&line);
                self.line = line;
                self.line.clear();
            }
            bytes = &rest[1..];
        }
        if !bytes.is_empty() && !self.overflow {
            if self.line.len() + bytes.len() > MAX_LINE {
                self.overflow = true;
                self.line.clear();
            } else {
                self.line.extend_from_slice(bytes);
            }
        }
    }

    fn on_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        self.events += 1;
        if data == b"[DONE]" {
            self.done = true;
            self.first_token = true;
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk<'_>>(data) else {
            // Not JSON: still data the client will see.
            self.first_token = true;
            return;
        };
        if chunk.error.is_some() {
            self.first_token = true;
        }
        for c in &chunk.choices {
            let content = c
                .delta
                .as_ref()
                .and_then(|d| d.content.as_deref())
                .or(c.text.as_deref())
                .unwrap_or("");
            if !content.is_empty() {
                self.first_token = true;
                self.content_chars += content.chars().count() as u64;
            }
            if c.delta
                .as_ref()
                .is_some_and(|d| d.tool_calls.is_some() || d.function_call.is_some())
            {
                self.first_token = true;
            }
            if c.finish_reason.is_some() {
                self.first_token = true;
                self.finished = true;
            }
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
            });
        }
    }

    /// The stream ended the way a model ends it (`[DONE]` or a finish reason).
    pub fn completed(&self) -> bool {
        self.done || self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = r#"data: {"choices":[{"delta":{"role":"assistant","content":""},"index":0,"finish_reason":null}]}"#;
    const TOKEN: &str =
        r#"data: {"choices":[{"delta":{"content":"Hé"},"index":0,"finish_reason":null}]}"#;
    const STOP: &str = r#"data: {"choices":[{"delta":{},"index":0,"finish_reason":"stop"}]}"#;
    const USAGE: &str = r#"data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;

    #[test]
    fn role_only_and_comments_are_not_a_first_token() {
        let mut s = SseScanner::new();
        s.feed(format!(": ping\n\n{ROLE}\n\n").as_bytes());
        assert!(!s.first_token);
        assert_eq!(s.events, 1);
        s.feed(format!("{TOKEN}\n\n").as_bytes());
        assert!(s.first_token);
        assert_eq!(s.content_chars, 2);
    }

    #[test]
    fn events_split_anywhere_are_reassembled() {
        let body = format!("{ROLE}\r\n\r\n{TOKEN}\n\n{STOP}\n\n{USAGE}\n\ndata: [DONE]\n\n");
        for split in 0..body.len() {
            let mut s = SseScanner::new();
            s.feed(&body.as_bytes()[..split]);
            s.feed(&body.as_bytes()[split..]);
            assert!(s.first_token && s.done && s.finished, "split at {split}");
            assert_eq!(
                s.usage,
                Some(Usage {
                    prompt_tokens: 7,
                    completion_tokens: 3
                })
            );
            assert_eq!(s.content_chars, 2);
            assert_eq!(s.events, 5);
        }
    }

    #[test]
    fn tool_calls_errors_and_non_json_count_as_first_token() {
        for line in [
            r#"data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#,
            r#"data: {"error":{"message":"x"}}"#,
            "data: not json",
        ] {
            let mut s = SseScanner::new();
            s.feed(format!("{line}\n\n").as_bytes());
            assert!(s.first_token, "{line}");
        }
    }

    #[test]
    fn overlong_lines_are_dropped_not_buffered() {
        let mut s = SseScanner::new();
        s.feed(b"data: ");
        s.feed(&vec![b'x'; MAX_LINE + 10]);
        s.feed(format!("\n\n{TOKEN}\n\n").as_bytes());
        assert!(s.first_token);
        assert!(s.line.capacity() <= MAX_LINE + 64);
    }
}

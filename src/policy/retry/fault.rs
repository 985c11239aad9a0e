//! Telling "the request is bad" apart from "the backend is failing".
//!
//! A `400` whose error says the *request itself* is at fault (the prompt is
//! too long for the model's context, the content was refused by a safety
//! filter, a parameter is invalid) will fail the same way on every retry,
//! and answering it from a fallback backend would launder a refusal into a
//! success. Such a response is never retried on the same backend, never
//! answered by a fallback, and passes through to the client with its
//! original body.
//!
//! Recognised shapes (the error object's `code` and `type`, at the top level
//! or under `error`, and Azure's `error.innererror.code`):
//! - OpenAI: `{"error":{"type":"invalid_request_error","code":"context_length_exceeded"}}`;
//! - Azure OpenAI: `{"error":{"code":"content_filter","innererror":{"code":"ResponsibleAIPolicyViolation"}}}`;
//! - Anthropic: `{"type":"error","error":{"type":"invalid_request_error"}}`;
//! - vLLM and other OpenAI-compatible servers: `{"object":"error","type":"BadRequestError"}`.
//!
//! Only `400`, `413` and `422` are considered; anything else is not a
//! request fault whatever its body says.

/// Statuses that can carry a request fault.
pub const REQUEST_FAULT_STATUSES: [u16; 3] = [400, 413, 422];

/// Error codes and types (compared case-insensitively) that blame the
/// request.
pub const REQUEST_FAULT_CODES: &[&str] = &[
    "context_length_exceeded",
    "content_policy_violation",
    "content_filter",
    "responsibleaipolicyviolation",
    "invalid_request_error",
    "string_above_max_length",
    "invalid_prompt",
    "invalid_image",
    "invalid_value",
    "invalid_type",
    "unsupported_value",
    "unsupported_parameter",
    "request_too_large",
    "badrequesterror",
];

/// Whether this response says the request itself is bad (see the module
/// docs). `body` is the response body as received (it is small for these
/// statuses; the caller reads it before deciding).
pub fn is_request_fault(status: u16, body: &[u8]) -> bool {
    if !REQUEST_FAULT_STATUSES.contains(&status) {
        return false;
    }
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let error = json.get("error");
    let candidates = [
        error.and_then(|e| e.get("code")),
        error.and_then(|e| e.get("type")),
        error
            .and_then(|e| e.get("innererror"))
            .and_then(|e| e.get("code")),
        json.get("code"),
        json.get("type"),
    ];
    candidates
        .iter()
        .filter_map(|v| v.and_then(serde_json::Value::as_str))
        .any(|code| {
            REQUEST_FAULT_CODES
                .iter()
                .any(|known| known.eq_ignore_ascii_case(code))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_shapes_that_blame_the_request() {
        let cases: &[&str] = &[
            r#"{"error":{"message":"This model's maximum context length is 8192 tokens","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
            r#"{"error":{"message":"refused","type":"invalid_request_error","code":"content_policy_violation"}}"#,
            r#"{"error":{"message":"filtered","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation"}}}"#,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long"}}"#,
            r#"{"object":"error","message":"maximum context length","type":"BadRequestError","param":null,"code":400}"#,
            r#"{"error":{"message":"bad","type":null,"code":"string_above_max_length"}}"#,
        ];
        for body in cases {
            assert!(is_request_fault(400, body.as_bytes()), "{body}");
        }
        assert!(is_request_fault(
            413,
            br#"{"error":{"code":"request_too_large"}}"#
        ));
        assert!(is_request_fault(
            422,
            br#"{"error":{"type":"invalid_request_error"}}"#
        ));
    }

    #[test]
    fn other_statuses_and_bodies_are_not_request_faults() {
        let context = br#"{"error":{"code":"context_length_exceeded"}}"#;
        // The same body on a status that is not a client error about the request.
        assert!(!is_request_fault(500, context));
        assert!(!is_request_fault(429, context));
        assert!(!is_request_fault(404, context));
        // A 400 that does not say why, or says something else.
        assert!(!is_request_fault(400, b"Bad Request"));
        assert!(!is_request_fault(400, b""));
        assert!(!is_request_fault(
            400,
            br#"{"error":{"type":"server_error","code":"overloaded"}}"#
        ));
        assert!(!is_request_fault(
            400,
            br#"{"error":"context_length_exceeded"}"#
        ));
    }
}

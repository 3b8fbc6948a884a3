//! Errors the edge answers with, in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`),
//! and the mapping of engine and fetcher failures to HTTP statuses — by type, never by parsing text.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ep_engine::{EngineError, Failure, InvalidKind};
use ep_proto::ErrorBody;

use crate::fetch::FetchError;

/// An error response: status, OpenAI error body, optional `Retry-After` seconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody::new(message, kind, None, None),
            retry_after: None,
        }
    }
    /// 400 `invalid_request_error` naming the parameter at fault.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).param(param)
    }
    /// 400 `invalid_request_error` without a parameter.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    pub fn not_found(kind_code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).code(kind_code)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message).code("invalid_api_key")
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message).retry(retry_after)
    }
    pub fn param(mut self, p: &str) -> Self {
        self.body.error.param = Some(p.to_string());
        self
    }
    pub fn code(mut self, c: &str) -> Self {
        self.body.error.code = Some(c.to_string());
        self
    }
    pub fn retry(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
    /// The OpenAI error `type`.
    pub fn kind(&self) -> &str {
        &self.body.error.kind
    }
    /// The error `code`, else its `type` (what the audit shows as the outcome).
    pub fn code_str(&self) -> String {
        self.body
            .error
            .code
            .clone()
            .unwrap_or_else(|| self.body.error.kind.clone())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// The request parameter an engine refusal is about.
fn invalid_param(kind: InvalidKind) -> &'static str {
    match kind {
        InvalidKind::EmptyPrompt | InvalidKind::PromptTooLong | InvalidKind::ExceedsKvBudget => {
            "messages"
        }
        InvalidKind::TokenOutOfVocabulary => "prompt",
        InvalidKind::MaxTokens => "max_tokens",
        InvalidKind::Sampling => "temperature",
        InvalidKind::PublicPrefix => "model",
        InvalidKind::Export => "model",
    }
}

fn invalid_code(kind: InvalidKind) -> &'static str {
    match kind {
        InvalidKind::PromptTooLong | InvalidKind::ExceedsKvBudget => "context_length_exceeded",
        _ => "invalid_value",
    }
}

impl From<&Failure> for ApiError {
    fn from(f: &Failure) -> Self {
        match f {
            Failure::Invalid(i) => ApiError::invalid(invalid_param(i.kind), i.message.clone())
                .code(invalid_code(i.kind)),
            Failure::OutOfKvMemory { .. } => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "server_error",
                f.to_string(),
            )
            .code("out_of_kv_memory"),
            // The client went away (or the server is stopping): nobody reads this.
            Failure::Cancelled => ApiError::new(
                StatusCode::from_u16(499).expect("499 is a valid status"),
                "cancelled",
                "the request was cancelled",
            ),
            Failure::Internal(m) => ApiError::internal(format!("internal error: {m}")),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(i) => (&Failure::Invalid(i)).into(),
            EngineError::Failed(f) => (&f).into(),
            EngineError::Stopped => ApiError::unavailable("the engine is stopping", 5),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl From<FetchError> for ApiError {
    fn from(e: FetchError) -> Self {
        match &e {
            FetchError::NotFound(_) => ApiError::not_found("model_not_found", e.to_string()),
            FetchError::Unavailable { .. } => ApiError::unavailable(e.to_string(), 10),
            FetchError::NotReady(_) => ApiError::unavailable(e.to_string(), 5),
            FetchError::Refused { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "server_error", e.to_string())
                    .code("cloud_prompt_refused")
            }
        }
        .param("model")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ep_engine::InvalidRequest;

    #[test]
    fn failures_map_by_type() {
        let e: ApiError = (&Failure::Invalid(InvalidRequest::new(
            InvalidKind::PromptTooLong,
            "long".into(),
        )))
            .into();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            e.body.error.code.as_deref(),
            Some("context_length_exceeded")
        );
        let e: ApiError = (&Failure::OutOfKvMemory {
            tokens: 1,
            capacity: 1,
        })
            .into();
        assert_eq!(e.status, StatusCode::INSUFFICIENT_STORAGE);
        let e: ApiError = (&Failure::Internal("x".into())).into();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.kind(), "server_error");
        let e: ApiError = FetchError::NotReady("p".into()).into();
        assert_eq!(
            (e.status, e.retry_after),
            (StatusCode::SERVICE_UNAVAILABLE, Some(5))
        );
        let e: ApiError = FetchError::NotFound("p".into()).into();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let e: ApiError = FetchError::Refused {
            name: "p".into(),
            why: "sig".into(),
        }
        .into();
        assert_eq!(e.status, StatusCode::BAD_GATEWAY);
    }
}

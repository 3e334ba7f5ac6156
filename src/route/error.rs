//! Errors of the ingest API. Client faults are 4xx with a reason that names the
//! line and the problem; unavailable sinks and overload are 503 with
//! Retry-After; nothing internal leaks into a response body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is wrong (4xx).
    #[error("{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
    Input {
        status: u16,
        code: &'static str,
        line: Option<usize>,
        message: String,
    },
    /// Try again later (503 + Retry-After): overload, or a sink that cannot
    /// take the payload right now. Nothing of the request is acknowledged.
    #[error("{message}")]
    Unavailable {
        code: &'static str,
        message: String,
        retry_after_secs: u64,
    },
}

impl ApiError {
    pub fn input(
        status: u16,
        code: &'static str,
        line: Option<usize>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError::Input {
            status,
            code,
            line,
            message: message.into(),
        }
    }

    pub fn unavailable(
        code: &'static str,
        message: impl Into<String>,
        retry_after_secs: u64,
    ) -> ApiError {
        ApiError::Unavailable {
            code,
            message: message.into(),
            retry_after_secs,
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            ApiError::Input { status, .. } => *status,
            ApiError::Unavailable { .. } => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Input { code, .. } | ApiError::Unavailable { code, .. } => code,
        }
    }

    pub fn line(&self) -> Option<usize> {
        match self {
            ApiError::Input { line, .. } => *line,
            ApiError::Unavailable { .. } => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::BAD_REQUEST);
        let body = json!({
            "error": {
                "code": self.code(),
                "line": self.line(),
                "message": self.to_string(),
            }
        });
        let mut resp = (status, Json(body)).into_response();
        if let ApiError::Unavailable {
            retry_after_secs, ..
        } = self
        {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs.max(1)),
            );
        }
        resp
    }
}

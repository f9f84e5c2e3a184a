//! Every error a client sees: one table from OCI error code to HTTP status, one function
//! that turns an error into `{"errors":[{"code","message","detail"}]}`.
//!
//! Storage, auth and proxy code never build HTTP responses themselves; they return their
//! own errors and the gate maps them here.

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, Body};

/// The error codes of the OCI distribution spec, plus the few a front door needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    /// Not in the spec's list (distribution has it): a malformed tag.
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// Not in the spec's list: a path that is no registry endpoint.
    NotFound,
    /// Not in the spec's list (distribution has it): the upstream or storage is down.
    Unavailable,
    /// Not in the spec's list (distribution has it): anything else.
    Unknown,
}

impl ErrorCode {
    /// The code string of the error body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::TagInvalid => "TAG_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }

    /// The status that goes with the code when nothing more specific applies.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown
            | ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::BlobUploadInvalid
            | ErrorCode::DigestInvalid
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::ManifestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::SizeInvalid
            | ErrorCode::TagInvalid => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::BAD_GATEWAY,
            ErrorCode::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error on its way to the client.
#[derive(Debug, Clone)]
pub struct OciError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub detail: Option<serde_json::Value>,
}

impl OciError {
    /// An error with the code's usual status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OciError {
            status: code.status(),
            code,
            message: message.into(),
            detail: None,
        }
    }

    /// The same error with another status (e.g. 504 for an upstream timeout).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The same error with a `detail` value.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// The JSON body.
    pub fn body_json(&self) -> String {
        let mut entry = serde_json::json!({
            "code": self.code.as_str(),
            "message": self.message,
        });
        if let (Some(detail), Some(map)) = (&self.detail, entry.as_object_mut()) {
            map.insert("detail".to_owned(), detail.clone());
        }
        serde_json::json!({ "errors": [entry] }).to_string()
    }

    /// The response: status, JSON body, content type and length. The gate adds the
    /// API-version header to every response, this one included.
    pub fn into_response(self) -> Response<Body> {
        let mut resp = body::json_response(self.status, self.body_json());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        resp
    }
}

impl std::fmt::Display for OciError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code.as_str(),
            self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_oci_json() {
        let err = OciError::new(ErrorCode::Denied, "no").with_detail(serde_json::json!({"a": 1}));
        let v: serde_json::Value = serde_json::from_str(&err.body_json()).expect("json");
        assert_eq!(v["errors"][0]["code"], "DENIED");
        assert_eq!(v["errors"][0]["message"], "no");
        assert_eq!(v["errors"][0]["detail"]["a"], 1);
        assert_eq!(err.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn unsupported_is_405() {
        assert_eq!(
            ErrorCode::Unsupported.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(ErrorCode::Unauthorized.status(), StatusCode::UNAUTHORIZED);
    }
}

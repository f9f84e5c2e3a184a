//! `_catalog` never lists a repository the caller may not pull. When rules can hide
//! repositories, the backend's answer (one page: small, and capped here) is read,
//! filtered and sent on; pagination headers pass unchanged.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{self, Body};
use crate::error::{ErrorCode, OciError};
use crate::route::RepoName;

/// Largest catalog page the gate will read to filter.
const MAX_CATALOG_BYTES: usize = 8 * 1024 * 1024;

#[derive(serde::Deserialize, serde::Serialize)]
struct Catalog {
    repositories: Vec<String>,
}

/// A catalog page read from the backend, ready to be filtered.
pub struct Page {
    parts: http::response::Parts,
    catalog: Catalog,
}

/// Read a successful catalog answer; anything else passes through unchanged (`Err`).
pub async fn read(resp: Response<Body>) -> Result<Page, Response<Body>> {
    if resp.status() != StatusCode::OK {
        return Err(resp);
    }
    let (parts, body) = resp.into_parts();
    let bytes = match body::collect_limited(body, MAX_CATALOG_BYTES).await {
        Ok(b) => b,
        Err(e) => return Err(refused(&format!("catalog page could not be read: {e}"))),
    };
    match serde_json::from_slice::<Catalog>(&bytes) {
        Ok(catalog) => Ok(Page { parts, catalog }),
        Err(_) => Err(refused("catalog page is not the JSON the spec describes")),
    }
}

/// Keep only the repositories `visible` says yes to.
pub fn filter(page: Page, visible: impl Fn(&RepoName) -> bool) -> Response<Body> {
    let Page {
        mut parts,
        mut catalog,
    } = page;
    catalog
        .repositories
        .retain(|name| RepoName::parse(name).is_ok_and(|r| visible(&r)));
    let json = match serde_json::to_vec(&catalog) {
        Ok(j) => j,
        Err(e) => return refused(&e.to_string()),
    };
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(json.len()));
    Response::from_parts(parts, body::full(json))
}

fn refused(why: &str) -> Response<Body> {
    tracing::warn!("catalog not served: {why}");
    OciError::new(
        ErrorCode::Unavailable,
        format!("the catalog cannot be served: {why}"),
    )
    .into_response()
}

//! `GET`/`HEAD /images/<name>/<file>`: artifacts streamed from disk.
//!
//! The body is read in 512 KiB chunks, so memory stays flat whatever the
//! file size. `ETag` is the artifact's sha256 (strong: the bytes are what the
//! manifest says), and `If-None-Match` answers 304. `Range` serves one range
//! (`a-b`, `a-`, or the suffix `-n`) as 206 with `Content-Range`, or 416 when
//! it lies past the end; a request for several ranges gets the whole file
//! (RFC 9110 lets a server ignore `Range`). `If-Range` with the current ETag
//! keeps the range; with any other validator the whole file is sent.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;
use warp::http::{HeaderValue, Method, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::ImageStore;

const CHUNK: usize = 512 * 1024;

/// The artifact routes over `store`.
pub fn routes(store: Arc<ImageStore>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("images" / String / String)
        .and(warp::get().or(warp::head()).unify())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and_then(move |name: String, file: String, method: Method, headers: warp::http::HeaderMap| {
            let store = store.clone();
            async move {
                let get = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
                let conditions =
                    Conditions { if_none_match: get(header::IF_NONE_MATCH), range: get(header::RANGE), if_range: get(header::IF_RANGE) };
                Ok::<_, Rejection>(serve(&store, &name, &file, &method, &conditions).await)
            }
        })
}

/// The request headers that shape an artifact response.
#[derive(Debug, Default, Clone, Copy)]
pub struct Conditions<'a> {
    /// `If-None-Match`
    pub if_none_match: Option<&'a str>,
    /// `Range`
    pub range: Option<&'a str>,
    /// `If-Range`
    pub if_range: Option<&'a str>,
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// Send the whole file (no header, several ranges, or one we do not understand).
    Full,
    /// Send bytes `start..=end`.
    Part {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: u64,
    },
    /// No byte of the range exists: 416.
    Unsatisfiable,
}

/// Parses a `Range` header against a file of `len` bytes.
pub fn parse_range(header: Option<&str>, len: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return RangeRequest::Full };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeRequest::Full };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (true, true) => return RangeRequest::Full,
        // Suffix: the last b bytes.
        (true, false) => match b.parse::<u64>() {
            Ok(0) => return RangeRequest::Unsatisfiable,
            Ok(n) => (len.saturating_sub(n), len.saturating_sub(1)),
            Err(_) => return RangeRequest::Full,
        },
        (false, true) => match a.parse::<u64>() {
            Ok(start) => (start, len.saturating_sub(1)),
            Err(_) => return RangeRequest::Full,
        },
        (false, false) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(start), Ok(end)) if start <= end => (start, end.min(len.saturating_sub(1))),
            _ => return RangeRequest::Full,
        },
    };
    if len == 0 || parsed.0 >= len {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Part { start: parsed.0, end: parsed.1 }
}

async fn serve(store: &ImageStore, name: &str, file: &str, method: &Method, cond: &Conditions<'_>) -> Response {
    let Some((path, sha256)) = store.file(name, file) else {
        return error(StatusCode::NOT_FOUND, &format!("no artifact {file:?} in image {name:?}"));
    };
    let etag = sha256.map(|s| format!("\"{s}\""));
    if let (Some(etag), Some(inm)) = (&etag, cond.if_none_match)
        && inm.split(',').any(|t| t.trim() == etag || t.trim() == "*")
    {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        resp.headers_mut().insert(header::ETAG, HeaderValue::from_str(etag).expect("hex is a valid header"));
        return resp;
    }

    let mut file_handle = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(path = %path.display(), "opening artifact: {e}");
            return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("artifact {name}/{file} cannot be read"));
        }
    };
    let len = match file_handle.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("artifact {name}/{file}: {e}")),
    };
    // If-Range: the range holds only while the representation is the one the
    // client has (a strong ETag match; dates are never strong enough here).
    let range_allowed = match cond.if_range {
        None => true,
        Some(v) => etag.as_deref() == Some(v.trim()),
    };
    let range = if range_allowed { parse_range(cond.range, len) } else { RangeRequest::Full };
    let (status, start, count) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, len),
        RangeRequest::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        RangeRequest::Unsatisfiable => {
            let mut resp = error(StatusCode::RANGE_NOT_SATISFIABLE, &format!("range outside the {len} bytes of {name}/{file}"));
            resp.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes */{len}")).expect("digits"));
            return resp;
        }
    };
    let mut resp = if method == Method::HEAD {
        Response::default()
    } else {
        if start > 0
            && let Err(e) = file_handle.seek(std::io::SeekFrom::Start(start)).await
        {
            return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("artifact {name}/{file}: {e}"));
        }
        warp::reply::stream(ReaderStream::with_capacity(file_handle.take(count), CHUNK)).into_response()
    };
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        let value = format!("bytes {start}-{}/{len}", start + count - 1);
        headers.insert(header::CONTENT_RANGE, HeaderValue::from_str(&value).expect("digits"));
    }
    let content_type = if file.ends_with(".json") { "application/json" } else { "application/octet-stream" };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(etag) = etag {
        headers.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex is a valid header"));
    }
    resp
}

/// A JSON error body `{"error": "..."}` with `status`.
pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    warp::reply::with_status(warp::reply::json(&serde_json::json!({ "error": message })), status).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_listed_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let m = crate::store::tests::write_image(dir.path(), "tiny");
        let store = Arc::new(ImageStore::load(dir.path()).unwrap());
        let api = routes(store);

        let resp = warp::test::request().path("/images/tiny/vmlinuz").reply(&api).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.body().as_ref(), b"kernel-bytes");
        let etag = format!("\"{}\"", m.artifact("vmlinuz").unwrap().sha256);
        assert_eq!(resp.headers()["etag"], etag.as_str());

        let resp = warp::test::request().method("HEAD").path("/images/tiny/vmlinuz").reply(&api).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-length"], "12");
        assert!(resp.body().is_empty(), "HEAD has no body");

        let resp = warp::test::request().path("/images/tiny/vmlinuz").header("if-none-match", &etag).reply(&api).await;
        assert_eq!(resp.status(), 304);

        let resp = warp::test::request().path("/images/tiny/manifest.json").reply(&api).await;
        assert_eq!(resp.status(), 200);
        let got: kiln_core::Manifest = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(got.digest, m.digest);

        // kernel-bytes: 12 bytes.
        // (case, Range, status, body, Content-Range)
        type Case<'a> = (&'a str, Option<&'a str>, u16, &'a [u8], Option<&'a str>);
        let cases: &[Case] = &[
            ("first bytes", Some("bytes=0-5"), 206, b"kernel", Some("bytes 0-5/12")),
            ("open end", Some("bytes=7-"), 206, b"bytes", Some("bytes 7-11/12")),
            ("suffix", Some("bytes=-5"), 206, b"bytes", Some("bytes 7-11/12")),
            ("end past the file", Some("bytes=7-100"), 206, b"bytes", Some("bytes 7-11/12")),
            ("suffix longer than the file", Some("bytes=-100"), 206, b"kernel-bytes", Some("bytes 0-11/12")),
            ("start past the end", Some("bytes=12-"), 416, b"", Some("bytes */12")),
            ("several ranges: whole file", Some("bytes=0-1,3-4"), 200, b"kernel-bytes", None),
            ("not bytes: whole file", Some("items=0-1"), 200, b"kernel-bytes", None),
        ];
        for (case, range, status, body, content_range) in cases {
            let mut req = warp::test::request().path("/images/tiny/vmlinuz");
            if let Some(r) = range {
                req = req.header("range", *r);
            }
            let resp = req.reply(&api).await;
            assert_eq!(resp.status().as_u16(), *status, "case {case}");
            if *status != 416 {
                assert_eq!(resp.body().as_ref(), *body, "case {case}");
                assert_eq!(resp.headers()["content-length"], body.len().to_string().as_str(), "case {case}");
            }
            assert_eq!(resp.headers().get("content-range").map(|v| v.to_str().unwrap()), *content_range, "case {case}");
        }
        let resp =
            warp::test::request().path("/images/tiny/vmlinuz").header("range", "bytes=0-5").header("if-range", &etag).reply(&api).await;
        assert_eq!(resp.status(), 206, "If-Range with the current ETag keeps the range");
        let resp =
            warp::test::request().path("/images/tiny/vmlinuz").header("range", "bytes=0-5").header("if-range", "\"old\"").reply(&api).await;
        assert_eq!(resp.status(), 200, "If-Range with another ETag sends the whole file");
        assert_eq!(resp.body().as_ref(), b"kernel-bytes");

        for path in ["/images/tiny/..%2Fmanifest.json", "/images/tiny/%2E%2E", "/images/nope/vmlinuz", "/images/tiny/other"] {
            let resp = warp::test::request().path(path).reply(&api).await;
            assert_eq!(resp.status(), 404, "path {path}");
        }
    }
}

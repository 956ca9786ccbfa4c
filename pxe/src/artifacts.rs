//! `GET`/`HEAD /images/<name>/<hex digest>/<file>`: a file of one
//! generation of an image, the URL boot scripts name; and
//! `/images/<name>/<file>`: the same file of the current generation.
//!
//! Each request takes the image snapshot of the moment
//! ([`crate::store::LiveImages`]) and serves from the generation it names,
//! whose directory never changes: the `ETag` is the sha256 of the bytes sent
//! (a manifest's, of the bytes read with it), whatever a build does
//! meanwhile. Every response carries `X-Kiln-Image-Digest`, the digest of
//! the generation its bytes are from. A generation no longer kept is 404.
//!
//! The body is read in 512 KiB chunks, so memory stays flat whatever the
//! file size. `If-None-Match` answers 304. `Range` serves one range
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

use crate::store::{LiveImages, Served, Source};

const CHUNK: usize = 512 * 1024;

/// The header naming the generation a response's bytes are from.
pub const IMAGE_DIGEST_HEADER: &str = "x-kiln-image-digest";

/// The artifact routes over `images`.
pub fn routes(images: Arc<LiveImages>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let current = warp::path!("images" / String / String).map(|name, file| (name, None, file));
    let pinned = warp::path!("images" / String / String / String).map(|name, hex, file| (name, Some(hex), file));
    current.or(pinned).unify().and(warp::get().or(warp::head()).unify()).and(warp::method()).and(warp::header::headers_cloned()).and_then(
        move |(name, hex, file): (String, Option<String>, String), method: Method, headers: warp::http::HeaderMap| {
            let store = images.current();
            async move {
                let get = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
                let conditions =
                    Conditions { if_none_match: get(header::IF_NONE_MATCH), range: get(header::RANGE), if_range: get(header::IF_RANGE) };
                let generation = store.image(&name).and_then(|i| match &hex {
                    Some(hex) => i.generation(hex),
                    None => Some(&i.current),
                });
                let found = generation.and_then(|g| crate::store::served(g, &file).map(|s| (g.manifest.digest, s)));
                let Some((digest, served)) = found else {
                    return Ok::<_, Rejection>(match hex {
                        Some(hex) if store.image(&name).is_some_and(|i| i.generation(&hex).is_none()) => {
                            error(StatusCode::NOT_FOUND, &format!("image {name:?} keeps no generation {hex:?}"))
                        }
                        _ => error(StatusCode::NOT_FOUND, &format!("no artifact {file:?} in image {name:?}")),
                    });
                };
                let mut resp = serve(&served, &name, &file, &method, &conditions).await;
                resp.headers_mut()
                    .insert(IMAGE_DIGEST_HEADER, HeaderValue::from_str(&digest.to_string()).expect("a digest is a valid header"));
                Ok(resp)
            }
        },
    )
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

/// The body of a response: a file opened for it, or bytes in memory.
enum Body {
    File(tokio::fs::File),
    Bytes(bytes::Bytes),
}

async fn serve(served: &Served, name: &str, file: &str, method: &Method, cond: &Conditions<'_>) -> Response {
    let etag = format!("\"{}\"", served.sha256);
    if let Some(inm) = cond.if_none_match
        && inm.split(',').any(|t| t.trim() == etag || t.trim() == "*")
    {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        resp.headers_mut().insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex is a valid header"));
        return resp;
    }

    let (body, len) = match &served.source {
        Source::Bytes(bytes) => (Body::Bytes(bytes.clone()), bytes.len() as u64),
        Source::File(path) => {
            let handle = match tokio::fs::File::open(path).await {
                Ok(f) => f,
                // Removed since the snapshot was taken: the generation is no longer kept.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return error(StatusCode::NOT_FOUND, &format!("artifact {name}/{file}: its generation is no longer kept"));
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), "opening artifact: {e}");
                    return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("artifact {name}/{file} cannot be read"));
                }
            };
            match handle.metadata().await {
                Ok(m) => (Body::File(handle), m.len()),
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("artifact {name}/{file}: {e}")),
            }
        }
    };
    // If-Range: the range holds only while the representation is the one the
    // client has (a strong ETag match; dates are never strong enough here).
    let range_allowed = match cond.if_range {
        None => true,
        Some(v) => etag == v.trim(),
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
    let mut resp = match body {
        _ if method == Method::HEAD => Response::default(),
        Body::Bytes(bytes) => Response::new(bytes.slice(start as usize..(start + count) as usize).into()),
        Body::File(mut handle) => {
            if start > 0
                && let Err(e) = handle.seek(std::io::SeekFrom::Start(start)).await
            {
                return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("artifact {name}/{file}: {e}"));
            }
            warp::reply::stream(ReaderStream::with_capacity(handle.take(count), CHUNK)).into_response()
        }
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
    headers.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex is a valid header"));
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
    async fn every_generation_is_served_at_its_own_url_with_the_etag_of_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let one = crate::store::tests::write_generation(dir.path(), "tiny", b"kernel one");
        let live = Arc::new(LiveImages::load(dir.path()).unwrap());
        let api = routes(live.clone());
        let get = |path: String| warp::test::request().path(&path).reply(&api);
        let sha = |bytes: &[u8]| format!("\"{}\"", kiln_core::Digest::of(bytes).hex());

        let two = crate::store::tests::write_generation(dir.path(), "tiny", b"kernel two");
        let resp = get("/images/tiny/vmlinuz".into()).await;
        assert_eq!(resp.body().as_ref(), b"kernel one", "served from the snapshot until it is refreshed");
        assert_eq!(resp.headers()["etag"], sha(resp.body()).as_str());
        live.refresh().unwrap();

        for (path, m, bytes) in [
            ("/images/tiny/vmlinuz".to_string(), &two, b"kernel two".as_slice()),
            (format!("/images/tiny/{}/vmlinuz", two.digest.hex()), &two, b"kernel two"),
            (format!("/images/tiny/{}/vmlinuz", one.digest.hex()), &one, b"kernel one"),
        ] {
            let resp = get(path.clone()).await;
            assert_eq!(resp.status(), 200, "{path}");
            assert_eq!(resp.body().as_ref(), bytes, "{path}");
            assert_eq!(resp.headers()["etag"], sha(bytes).as_str(), "{path}: the ETag is the sha256 of the bytes sent");
            assert_eq!(resp.headers()[IMAGE_DIGEST_HEADER], m.digest.to_string().as_str(), "{path}");
            let resp = warp::test::request().path(&path).header("if-none-match", sha(b"kernel one")).reply(&api).await;
            assert_eq!(resp.status() == 304, bytes == b"kernel one", "{path}: 304 only for the bytes the client holds");
        }
        let resp = get(format!("/images/tiny/{}/manifest.json", one.digest.hex())).await;
        let served: kiln_core::Manifest = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(served, one, "an old generation's manifest");
        assert_eq!(resp.headers()["etag"], sha(resp.body()).as_str());

        let resp = get(format!("/images/tiny/{}/vmlinuz", "ab".repeat(32))).await;
        assert_eq!(resp.status(), 404);
        assert!(String::from_utf8_lossy(resp.body()).contains("keeps no generation"), "{:?}", resp.body());
        let resp = get(format!("/images/tiny/{}/../vmlinuz", one.digest.hex())).await;
        assert_eq!(resp.status(), 404, "only files a manifest lists");

        // Removed from disk (pruned by a later build): 404, not the wrong bytes.
        std::fs::remove_dir_all(dir.path().join(".generations/tiny").join(one.digest.hex())).unwrap();
        let resp = get(format!("/images/tiny/{}/vmlinuz", one.digest.hex())).await;
        assert_eq!(resp.status(), 404);
        live.refresh().unwrap();
        assert!(live.current().image("tiny").unwrap().older.is_empty());
    }

    #[tokio::test]
    async fn serves_listed_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let m = crate::store::tests::write_image(dir.path(), "tiny");
        let store = Arc::new(LiveImages::load(dir.path()).unwrap());
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

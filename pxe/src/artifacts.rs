//! `GET`/`HEAD /images/<name>/<file>`: artifacts streamed from disk.
//!
//! The body is read in 64 KiB chunks, so memory stays flat whatever the
//! file size. `ETag` is the artifact's sha256 (strong: the bytes are what the
//! manifest says), and `If-None-Match` answers 304.

use std::sync::Arc;

use tokio_util::io::ReaderStream;
use warp::http::{HeaderValue, Method, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::ImageStore;

const CHUNK: usize = 64 * 1024;

/// The artifact routes over `store`.
pub fn routes(store: Arc<ImageStore>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("images" / String / String)
        .and(warp::get().or(warp::head()).unify())
        .and(warp::method())
        .and(warp::header::optional::<String>("if-none-match"))
        .and_then(move |name: String, file: String, method: Method, if_none_match: Option<String>| {
            let store = store.clone();
            async move { Ok::<_, Rejection>(serve(&store, &name, &file, &method, if_none_match.as_deref()).await) }
        })
}

async fn serve(store: &ImageStore, name: &str, file: &str, method: &Method, if_none_match: Option<&str>) -> Response {
    let Some((path, sha256)) = store.file(name, file) else {
        return error(StatusCode::NOT_FOUND, &format!("no artifact {file:?} in image {name:?}"));
    };
    let etag = sha256.map(|s| format!("\"{s}\""));
    if let (Some(etag), Some(inm)) = (&etag, if_none_match)
        && inm.split(',').any(|t| t.trim() == etag || t.trim() == "*")
    {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        resp.headers_mut().insert(header::ETAG, HeaderValue::from_str(etag).expect("hex is a valid header"));
        return resp;
    }

    let file_handle = match tokio::fs::File::open(&path).await {
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
    let mut resp = if method == Method::HEAD {
        Response::default()
    } else {
        warp::reply::stream(ReaderStream::with_capacity(file_handle, CHUNK)).into_response()
    };
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    let content_type = if file.ends_with(".json") { "application/json" } else { "application/octet-stream" };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(etag) = etag {
        headers.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex is a valid header"));
    }
    resp
}

/// A JSON error body `{"error": "..."}` with `status`.
pub fn error(status: StatusCode, message: &str) -> Response {
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

        for path in ["/images/tiny/..%2Fmanifest.json", "/images/tiny/%2E%2E", "/images/nope/vmlinuz", "/images/tiny/other"] {
            let resp = warp::test::request().path(path).reply(&api).await;
            assert_eq!(resp.status(), 404, "path {path}");
        }
    }
}

//! The routes of `kiln check` ([`crate::checks`]): operators start one and
//! read it; the nodes of a round say their test pod and report what they
//! received, each as itself (its certificate, or its node token).

use super::*;
use crate::checks::Error as CheckError;

/// `POST /api/v1/checks` and `GET /api/v1/checks/ID`: for operators.
pub(super) fn operator_routes(api: &Arc<Api>) -> BoxedFilter<(Response,)> {
    let start = warp::path!("api" / "v1" / "checks").and(warp::post()).and(with(api)).and(peer()).map(
        |api: Arc<Api>, peer: Option<Arc<ClientCert>>| {
            let operator = match api.operator(peer.as_deref()) {
                Ok(operator) => operator,
                Err(denied) => return denied.into_response(),
            };
            match api.checks.start() {
                Ok(started) => {
                    tracing::info!(operator = ?operator, check = %started.id, nodes = started.nodes.len(), "audit: connectivity check started");
                    warp::reply::with_status(warp::reply::json(&started), StatusCode::ACCEPTED).into_response()
                }
                Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
            }
        },
    );
    let get = warp::path!("api" / "v1" / "checks" / String).and(warp::get()).and(with(api)).and(peer()).map(
        |id: String, api: Arc<Api>, peer: Option<Arc<ClientCert>>| {
            api.for_operator(peer.as_deref(), || match api.checks.get(&id) {
                Some(result) => warp::reply::json(&result).into_response(),
                None => error(StatusCode::NOT_FOUND, &format!("no check {id:?}")),
            })
        },
    );
    start.or(get).unify().boxed()
}

/// `POST /api/v1/checks/ID/ready` and `POST /api/v1/checks/ID/report`: for
/// the nodes of the round.
pub(super) fn node_routes(api: &Arc<Api>) -> BoxedFilter<(Response,)> {
    let ready = warp::path!("api" / "v1" / "checks" / String / "ready")
        .and(warp::post())
        .and(with(api))
        .and(caller())
        .and(warp::body::content_length_limit(MAX_BODY))
        .and(warp::body::bytes())
        .map(|id: String, api: Arc<Api>, caller: Caller, body: warp::hyper::body::Bytes| {
            answer(&api, &caller, &body, "test pod", |node, ready| api.checks.ready(&id, node, ready))
        });
    let report = warp::path!("api" / "v1" / "checks" / String / "report")
        .and(warp::post())
        .and(with(api))
        .and(caller())
        .and(warp::body::content_length_limit(MAX_BODY))
        .and(warp::body::bytes())
        .map(|id: String, api: Arc<Api>, caller: Caller, body: warp::hyper::body::Bytes| {
            answer(&api, &caller, &body, "check report", |node, report| api.checks.report(&id, node, report))
        });
    ready.or(report).unify().boxed()
}

/// A node's answer to a check: the caller proves which node it is, the
/// body (`what`, for errors) is read as `T`, and `take` records it.
fn answer<T: serde::de::DeserializeOwned>(
    api: &Api,
    caller: &Caller,
    body: &[u8],
    what: &str,
    take: impl FnOnce(&str, T) -> Result<(), CheckError>,
) -> Response {
    let node = match authorize(api, caller, None) {
        Ok(node) => node,
        Err(denied) => return denied.into_response(),
    };
    let value: T = match serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(body)) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("{what}: field `{}`: {}", e.path(), e.inner())),
    };
    match take(&node, value) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e @ CheckError::NotInCheck { .. }) => error(StatusCode::FORBIDDEN, &e.to_string()),
        Err(e @ CheckError::Invalid(_)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
    }
}

//! The station's HTTP server (tokio + axum, on its own thread): `/metrics`
//! (Prometheus text exposition), `/healthz`, `/api/status` (the snapshot the
//! dashboard renders) and `POST /api/actions` (operator actions). It reads
//! snapshots and hands actions to a `Controller`; it never touches hardware
//! or the ledger. When a token is configured every `/api/` request must
//! carry it (`Authorization: Bearer TOKEN`); `/metrics` and `/healthz` stay
//! open for Prometheus and health checks (they hold no secrets).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use crate::control::{Action, Controller};
use crate::live::Live;

/// What the server serves.
#[derive(Clone)]
pub struct Api {
    pub live: Arc<Live>,
    pub controller: Arc<dyn Controller>,
    pub token: Option<Arc<Zeroizing<String>>>,
}

/// The reply to an action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReply {
    pub ok: bool,
    pub message: String,
}

/// The content type of the Prometheus text exposition format.
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router(api: Api) -> Router {
    let protected = Router::new()
        .route("/api/status", get(status))
        .route("/api/actions", post(act))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token));
    Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).merge(protected).with_state(api)
}

async fn metrics(State(api): State<Api>) -> Response {
    // Reader gauges come from the latest state.
    api.live.metrics().set_readers(&api.live.snapshot());
    ([(header::CONTENT_TYPE, METRICS_TYPE)], api.live.metrics().encode()).into_response()
}

async fn healthz(State(api): State<Api>) -> Response {
    let snap = api.live.snapshot();
    (StatusCode::OK, axum::Json(serde_json::json!({"status": "ok", "mode": snap.mode, "station": snap.station})))
        .into_response()
}

async fn status(State(api): State<Api>) -> Response {
    axum::Json(api.live.snapshot().as_ref().clone()).into_response()
}

async fn act(State(api): State<Api>, body: axum::body::Bytes) -> Response {
    let action: Action = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            let message = format!("bad action: {e} (see docs/api.md)");
            return (StatusCode::BAD_REQUEST, axum::Json(ActionReply { ok: false, message })).into_response();
        }
    };
    tracing::info!(?action, "operator action over the API");
    // Controllers never block on card I/O, but keep them off the reactor.
    let controller = Arc::clone(&api.controller);
    let result = tokio::task::spawn_blocking(move || controller.act(action)).await;
    match result {
        Ok(Ok(message)) => (StatusCode::OK, axum::Json(ActionReply { ok: true, message })).into_response(),
        Ok(Err(refused)) => {
            (StatusCode::CONFLICT, axum::Json(ActionReply { ok: false, message: refused.0 })).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(ActionReply { ok: false, message: e.to_string() }))
            .into_response(),
    }
}

/// Compares without an early exit, so the time taken does not tell how much
/// of a guessed token was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(api): State<Api>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(token) = &api.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.as_bytes(), token.as_bytes()) {
            let message = "missing or wrong token (Authorization: Bearer TOKEN)".to_string();
            return (StatusCode::UNAUTHORIZED, axum::Json(ActionReply { ok: false, message })).into_response();
        }
    }
    next.run(req).await
}

/// A server running on its own thread.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` (the error names it) and serves `api` until stopped.
    pub fn start(addr: SocketAddr, api: Api) -> std::io::Result<Server> {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("http".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the HTTP runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot serve HTTP");
                        return;
                    }
                };
                let served = axum::serve(listener, router(api)).with_graceful_shutdown(async {
                    let _ = stopped.await;
                });
                if let Err(e) = served.await {
                    tracing::error!(error = %e, "HTTP server stopped");
                }
            });
        })?;
        tracing::info!(addr = %bound, "HTTP API listening");
        Ok(Server { addr: bound, stop: Some(stop), thread: Some(thread) })
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Refused;
    use std::sync::Mutex;

    struct Recorder(Mutex<Vec<Action>>);

    impl Controller for Recorder {
        fn act(&self, action: Action) -> Result<String, Refused> {
            let refuse = action == Action::Stop;
            self.0.lock().expect("lock").push(action);
            if refuse { Err(Refused("no batch is running".into())) } else { Ok("done".into()) }
        }
    }

    fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
        let mut req = ureq::get(format!("http://{addr}{path}"));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let agent_resp = req.config().http_status_as_error(false).build().call().expect("request");
        let code = agent_resp.status().as_u16();
        (code, agent_resp.into_body().read_to_string().expect("body"))
    }

    fn post(addr: SocketAddr, body: &str, token: Option<&str>) -> (u16, String) {
        let mut req = ureq::post(format!("http://{addr}/api/actions")).header("Content-Type", "application/json");
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = req.config().http_status_as_error(false).build().send(body).expect("request");
        let code = resp.status().as_u16();
        (code, resp.into_body().read_to_string().expect("body"))
    }

    #[test]
    fn serves_status_metrics_and_actions_and_guards_the_api_with_the_token() {
        let live = Live::new("st-http");
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        let api = Api {
            live,
            controller: rec.clone(),
            token: Some(Arc::new(Zeroizing::new("0123456789abcdef-token".to_string()))),
        };
        let server = Server::start("127.0.0.1:0".parse().expect("addr"), api).expect("start");
        let addr = server.addr;
        let tok = Some("0123456789abcdef-token");
        assert_eq!(get(addr, "/healthz", None).0, 200);
        assert_eq!(get(addr, "/metrics", None).0, 200);
        assert_eq!(get(addr, "/api/status", None).0, 401);
        assert_eq!(get(addr, "/api/status", Some("wrong")).0, 401);
        let (code, body) = get(addr, "/api/status", tok);
        assert_eq!(code, 200);
        let snap: crate::state::Snapshot = serde_json::from_str(&body).expect("snapshot json");
        assert_eq!(snap.station, "st-http");
        assert_eq!(post(addr, r#"{"action":"drain"}"#, None).0, 401);
        let (code, body) = post(addr, r#"{"action":"pause_reader","reader":"emu-1"}"#, tok);
        assert_eq!(code, 200, "{body}");
        let (code, body) = post(addr, r#"{"action":"stop"}"#, tok);
        assert_eq!(code, 409);
        assert!(body.contains("no batch is running"), "{body}");
        let (code, body) = post(addr, r#"{"action":"explode"}"#, tok);
        assert_eq!(code, 400);
        assert!(body.contains("bad action"), "{body}");
        assert_eq!(*rec.0.lock().expect("lock"), vec![Action::PauseReader { reader: "emu-1".into() }, Action::Stop]);
        server.stop();
    }

    #[test]
    fn a_taken_port_is_named_in_the_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let api = Api { live: Live::new("s"), controller: Arc::new(Recorder(Mutex::new(Vec::new()))), token: None };
        let e = Server::start(addr, api).err().expect("refused");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}

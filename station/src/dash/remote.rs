//! `station dash --connect`: the HTTP side. `Poller` fetches `/api/status`
//! every quarter second on its own thread and keeps the last snapshot and
//! whether the station answered; `HttpController` posts actions to
//! `/api/actions`. Both send the API token as a Bearer header and never
//! print it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::Lost;
use crate::control::{Action, Controller, Refused};
use crate::http::ActionReply;
use crate::state::{Mode, Snapshot};

/// How often the dashboard asks for the status.
pub const POLL: Duration = Duration::from_millis(250);

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn auth(token: &Option<Arc<Zeroizing<String>>>) -> Option<String> {
    token.as_ref().map(|t| format!("Bearer {}", t.as_str()))
}

/// What a failed request says to the operator.
fn describe(status: u16, body: &str) -> String {
    match status {
        401 => "the station refused the token (--token env:NAME or file:PATH)".into(),
        _ => match serde_json::from_str::<ActionReply>(body) {
            Ok(r) => r.message,
            Err(_) => format!("HTTP {status}"),
        },
    }
}

/// Posts actions to a station's `/api/actions`.
pub struct HttpController {
    base: String,
    token: Option<Arc<Zeroizing<String>>>,
    agent: ureq::Agent,
}

impl HttpController {
    pub fn new(addr: &str, token: Option<Arc<Zeroizing<String>>>) -> Self {
        Self { base: format!("http://{addr}"), token, agent: agent() }
    }
}

impl Controller for HttpController {
    fn act(&self, action: Action) -> Result<String, Refused> {
        let body = serde_json::to_string(&action).map_err(|e| Refused(e.to_string()))?;
        let mut req = self.agent.post(format!("{}/api/actions", self.base)).header("Content-Type", "application/json");
        if let Some(a) = auth(&self.token) {
            req = req.header("Authorization", a);
        }
        let resp = req.send(body).map_err(|e| Refused(format!("cannot reach {}: {e}", self.base)))?;
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().unwrap_or_default();
        match serde_json::from_str::<ActionReply>(&text) {
            Ok(r) if status == 200 && r.ok => Ok(r.message),
            _ => Err(Refused(describe(status, &text))),
        }
    }
}

/// The latest state of a remote station, as the poller left it.
#[derive(Debug, Clone)]
pub struct RemoteFeed {
    pub snapshot: Arc<Snapshot>,
    /// When the last snapshot arrived (none: never).
    pub received: Option<Instant>,
    /// Why the last poll failed, when it did.
    pub error: Option<String>,
}

impl RemoteFeed {
    /// The connection state the dashboard shows, as of `now`.
    pub fn lost(&self, now: Instant) -> Option<Lost> {
        self.error.as_ref().map(|e| Lost {
            error: e.clone(),
            stale_s: self.received.map(|r| now.saturating_duration_since(r).as_secs()),
        })
    }
}

/// What the screen shows before the first answer.
pub fn placeholder(addr: &str) -> Snapshot {
    Snapshot {
        station: addr.to_string(),
        at_ms: 0,
        mode: Mode::Idle,
        batch: None,
        lanes: Vec::new(),
        failures: Vec::new(),
        events: Vec::new(),
        profiles: Vec::new(),
        config_error: None,
        ledger: None,
    }
}

/// Polls `/api/status` on its own thread until dropped.
pub struct Poller {
    feed: Arc<Mutex<RemoteFeed>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    pub fn start(addr: &str, token: Option<Arc<Zeroizing<String>>>) -> Self {
        let feed = Arc::new(Mutex::new(RemoteFeed {
            snapshot: Arc::new(placeholder(addr)),
            received: None,
            error: Some("connecting".into()),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("http://{addr}/api/status");
        let thread = {
            let (feed, stop) = (Arc::clone(&feed), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("dash-poll".into())
                .spawn(move || {
                    let agent = agent();
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let result = fetch(&agent, &url, &token);
                        {
                            let mut f = feed.lock().unwrap_or_else(PoisonError::into_inner);
                            match result {
                                Ok(s) => {
                                    f.snapshot = Arc::new(s);
                                    f.received = Some(Instant::now());
                                    f.error = None;
                                }
                                Err(e) => f.error = Some(e),
                            }
                        }
                        std::thread::sleep(POLL.saturating_sub(started.elapsed()));
                    }
                })
                .ok()
        };
        Self { feed, stop, thread }
    }

    pub fn feed(&self) -> RemoteFeed {
        self.feed.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fetch(agent: &ureq::Agent, url: &str, token: &Option<Arc<Zeroizing<String>>>) -> Result<Snapshot, String> {
    let mut req = agent.get(url);
    if let Some(a) = auth(token) {
        req = req.header("Authorization", a);
    }
    let resp = req.call().map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string().map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(describe(status, &text));
    }
    serde_json::from_str(&text).map_err(|e| format!("not a station status: {e}"))
}

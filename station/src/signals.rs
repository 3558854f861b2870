//! Unix signals for the station's long-running commands, delivered as
//! messages: SIGTERM and SIGINT ask to drain and stop, SIGHUP to reload the
//! profiles. A small tokio runtime on its own thread listens; the batch
//! core never sees a signal handler.

use crossbeam_channel::{Receiver, Sender};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT.
    Terminate,
    /// SIGHUP.
    Reload,
}

/// Starts listening; the returned channel yields each signal as it comes.
pub fn listen() -> std::io::Result<Receiver<Signal>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Register before returning, so a signal sent right after start is not
    // lost to the default action (which would kill the process).
    let (term, int, hup) = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    std::thread::Builder::new().name("signals".into()).spawn(move || rt.block_on(forward(term, int, hup, tx)))?;
    Ok(rx)
}

async fn forward(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    mut hup: tokio::signal::unix::Signal,
    tx: Sender<Signal>,
) {
    loop {
        let s = tokio::select! {
            _ = term.recv() => Signal::Terminate,
            _ = int.recv() => Signal::Terminate,
            _ = hup.recv() => Signal::Reload,
        };
        if tx.send(s).is_err() {
            return;
        }
    }
}

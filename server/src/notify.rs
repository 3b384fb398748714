//! Wakeups across servers. Several servers on one PostgreSQL serve one farm: a job submitted
//! through one must wake the runners long-polling another, and a step or a console piece stored
//! by one must wake the clients following it through another. Each server tells the others with
//! PostgreSQL's NOTIFY on one channel, and listens there (LISTEN); what it hears it wakes
//! locally. On SQLite (one server) nothing leaves the process.
//!
//! A wakeup is a hint, never state: whoever wakes reads the database again. So one lost (the
//! listener's connection broke; a sender's queue was full) costs latency, not correctness, and
//! after its connection comes back a listener wakes everyone it serves, who look again.

use crate::db::DatabaseUrl;
use crate::service::{App, Topic};
use construir_api::types::{AttemptId, JobId};
use sqlx::postgres::PgListener;
use std::sync::Weak;
use std::time::Duration;
use tokio::sync::mpsc;

/// The channel every server of a farm notifies and listens on.
pub const CHANNEL: &str = "construir_wake";

/// What a server tells the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A job may have become claimable: runners' long polls look again.
    Work,
    Topic(Topic),
}

/// A wakeup as sent: `SENDER work`, `SENDER job ID` or `SENDER console ID`, where SENDER
/// names the server (so it skips its own).
pub fn encode(sender: &str, wake: Wake) -> String {
    match wake {
        Wake::Work => format!("{sender} work"),
        Wake::Topic(Topic::Job(id)) => format!("{sender} job {}", id.0),
        Wake::Topic(Topic::Console(id)) => format!("{sender} console {}", id.0),
    }
}

/// A payload heard on the channel: its sender and wakeup; None for anything else (only servers
/// of the farm can notify, but a payload is parsed as any input is).
pub fn decode(payload: &str) -> Option<(&str, Wake)> {
    let mut words = payload.split(' ');
    let sender = words.next().filter(|s| !s.is_empty())?;
    let wake = match (words.next()?, words.next()) {
        ("work", None) => Wake::Work,
        ("job", Some(id)) => Wake::Topic(Topic::Job(JobId(id.parse().ok()?))),
        ("console", Some(id)) => Wake::Topic(Topic::Console(AttemptId(id.parse().ok()?))),
        _ => return None,
    };
    match words.next() {
        None => Some((sender, wake)),
        Some(_) => None,
    }
}

/// Wakeups waiting to be sent, at most this many (past it one is dropped: a hint, see above).
const QUEUED: usize = 4096;

/// A server tells itself a ping this often, and takes its listening connection for dead (a
/// half-open TCP connection waits forever) when it has heard none for [`DEAD_AFTER`].
const PING_EVERY: Duration = Duration::from_secs(20);
const DEAD_AFTER: Duration = Duration::from_secs(65);
/// A NOTIFY or a connection that takes longer is given up (the connection with it).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// This server's side of the channel: what it tells the others.
pub struct Peers {
    me: String,
    queue: mpsc::Sender<String>,
    /// The sending and listening tasks, ended with the server ([`Peers`] is the App's).
    tasks: [tokio::task::AbortHandle; 2],
}

impl Drop for Peers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Peers {
    /// Tells the other servers (never waits: the NOTIFY is sent by a task of its own).
    pub fn tell(&self, wake: Wake) {
        if self.queue.try_send(encode(&self.me, wake)).is_err() {
            tracing::debug!("a wakeup for the other servers was dropped (queue full)");
        }
    }

    pub fn name(&self) -> &str {
        &self.me
    }
}

/// Starts telling and hearing the other servers on `url`'s database: returns this server's
/// [`Peers`]; the tasks end when it is dropped.
pub fn start(url: &DatabaseUrl, me: String, app: Weak<App>) -> Peers {
    let (queue, outgoing) = mpsc::channel(QUEUED);
    let ping = encode_ping(&me);
    let sending = tokio::spawn(send(url.clone(), outgoing, ping)).abort_handle();
    let listening = tokio::spawn(supervise(url.clone(), me.clone(), app)).abort_handle();
    Peers {
        me,
        queue,
        tasks: [sending, listening],
    }
}

/// A server's ping to itself: `SENDER ping`.
fn encode_ping(me: &str) -> String {
    format!("{me} ping")
}

/// Sends queued wakeups, each distinct one once per batch, and this server's ping now and then.
async fn send(url: DatabaseUrl, mut outgoing: mpsc::Receiver<String>, ping: String) {
    let mut conn: Option<sqlx::PgConnection> = None;
    let mut batch: Vec<String> = Vec::new();
    let mut pings = tokio::time::interval(PING_EVERY);
    loop {
        tokio::select! {
            n = outgoing.recv_many(&mut batch, 256) => if n == 0 { return },
            _ = pings.tick() => batch.push(ping.clone()),
        }
        batch.sort();
        batch.dedup();
        for payload in batch.drain(..) {
            for _try in 0..2 {
                if conn.is_none() {
                    use sqlx::Connection;
                    let connecting = sqlx::PgConnection::connect(url.expose());
                    match tokio::time::timeout(STATEMENT_TIMEOUT, connecting).await {
                        Ok(Ok(c)) => conn = Some(c),
                        Ok(Err(e)) => {
                            tracing::warn!("cannot reach the database to wake other servers: {e}");
                            break;
                        }
                        Err(_) => {
                            tracing::warn!("the database did not answer a connection in time");
                            break;
                        }
                    }
                }
                let c = conn.as_mut().expect("connected above");
                let notify = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(&payload)
                    .execute(c);
                // (A statement given up drops its connection: never used again half-read.)
                match tokio::time::timeout(STATEMENT_TIMEOUT, notify).await {
                    Ok(Ok(_)) => break,
                    Ok(Err(e)) => {
                        tracing::debug!("waking other servers: {e}; reconnecting");
                        conn = None;
                    }
                    Err(_) => {
                        tracing::debug!("waking other servers: no answer in time; reconnecting");
                        conn = None;
                    }
                }
            }
        }
    }
}

/// Runs the listener, and a new one (everyone here woken) whenever the current one has heard
/// none of this server's own pings for [`DEAD_AFTER`]: its connection may be half-open, and a
/// wait on it would never end. The old one is dropped whole, connection and all.
async fn supervise(url: DatabaseUrl, me: String, app: Weak<App>) {
    struct Child(tokio::task::JoinHandle<()>);
    impl Drop for Child {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    loop {
        let heard = std::sync::Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
        let child = Child(tokio::spawn(listen(
            url.clone(),
            me.clone(),
            app.clone(),
            heard.clone(),
        )));
        loop {
            tokio::time::sleep(PING_EVERY).await;
            let last = *heard.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() > DEAD_AFTER {
                tracing::warn!(
                    "no word from the database's wakeup channel for {} s: listening anew",
                    last.elapsed().as_secs()
                );
                break;
            }
        }
        drop(child);
    }
}

/// Hears the other servers' wakeups and wakes them here; after a broken connection, wakes
/// everyone here (what was said meanwhile is lost). Notes when it last heard this server's own
/// ping in `heard`.
async fn listen(
    url: DatabaseUrl,
    me: String,
    app: Weak<App>,
    heard: std::sync::Arc<std::sync::Mutex<tokio::time::Instant>>,
) {
    let mut listener: Option<PgListener> = None;
    loop {
        let l = match &mut listener {
            Some(l) => l,
            None => match connect(&url).await {
                Ok(l) => {
                    // Whatever was said while nobody listened is lost: everyone looks again.
                    wake_all(&app);
                    listener.insert(l)
                }
                Err(e) => {
                    tracing::warn!("cannot listen for other servers' wakeups: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            },
        };
        match l.try_recv().await {
            Ok(Some(n)) => {
                let Some(app) = app.upgrade() else { return };
                if n.payload().ends_with(" ping") {
                    // Every server's pings reach every server; only its own tell it anything.
                    if n.payload() == encode_ping(&me) {
                        *heard.lock().unwrap_or_else(|p| p.into_inner()) =
                            tokio::time::Instant::now();
                    }
                    continue;
                }
                match decode(n.payload()) {
                    Some((sender, _)) if sender == me => {}
                    Some((_, Wake::Work)) => app.work.notify_waiters(),
                    Some((_, Wake::Topic(t))) => app.watchers.wake(t),
                    None => tracing::warn!("an unknown wakeup {:?} on {CHANNEL}", n.payload()),
                }
            }
            Ok(None) => {
                tracing::warn!("the connection for other servers' wakeups broke; reconnecting");
                listener = None;
            }
            Err(e) => {
                tracing::warn!("listening for other servers' wakeups: {e}; reconnecting");
                listener = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn connect(url: &DatabaseUrl) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect(url.expose()).await?;
    l.listen(CHANNEL).await?;
    Ok(l)
}

fn wake_all(app: &Weak<App>) {
    if let Some(app) = app.upgrade() {
        app.work.notify_waiters();
        app.watchers.wake_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakeups_round_trip_and_anything_else_is_refused() {
        for wake in [
            Wake::Work,
            Wake::Topic(Topic::Job(JobId(42))),
            Wake::Topic(Topic::Console(AttemptId(u64::MAX))),
        ] {
            assert_eq!(decode(&encode("a1b2", wake)), Some(("a1b2", wake)));
        }
        for bad in [
            "",
            " work",
            "a",
            "a job",
            "a job x",
            "a job -1",
            "a work 1",
            "a console 1 2",
            "a jobs 1",
            "a job 18446744073709551616",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}

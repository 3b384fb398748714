//! One attempt's shared state, and its heartbeats on a thread of their own: every
//! `heartbeat_interval_s` (and at once when the phase changes) the phase and the console bytes
//! seen; a `cancel: true` answer or a `lease-lost` refusal stops the VM. A server that cannot be
//! reached is tried again with back-off, and the VM keeps running meanwhile: the lease may well
//! outlast the outage, and the server says when it did not.

use super::api::AttemptApi;
use super::client::ApiFailure;
use super::retry::Backoff;
use crate::runcore::Children;
use construir_api::types::{HeartbeatRequest, HeartbeatResponse, Phase};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why the runner stops an attempt's VM (the first reason wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhy {
    /// The job was canceled: heartbeats answer `cancel: true`.
    Canceled,
    /// The server no longer holds the attempt for this runner: nothing more is sent.
    LeaseLost,
    /// The runner is shutting down and the grace period is over.
    Shutdown,
}

/// How often the heartbeat thread looks at the attempt between beats.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// How long a VM asked to stop (SIGTERM) may take before it is killed.
pub const STOP_PATIENCE: Duration = Duration::from_secs(30);

/// What an attempt's threads share.
pub struct Live {
    /// Its key in the children registry (the attempt id).
    pub key: String,
    pub console: PathBuf,
    /// When the runner took it on (Unix ms, its own clock: its statement says so).
    pub taken_ms: u64,
    /// Set when the runner stops the VM: the run core then takes its interrupted exit as
    /// [`crate::runcore::Ran::Interrupted`].
    pub stop: AtomicBool,
    why: Mutex<Option<(StopWhy, Instant)>>,
    phase: Mutex<Phase>,
    /// Until when the lease may hold, by this runner's clock (the last answer + the lease).
    lease_until: Mutex<Instant>,
    lease: Duration,
    /// The attempt is over: the threads end.
    done: AtomicBool,
    wake: Condvar,
    wake_lock: Mutex<bool>,
}

impl Live {
    pub fn new(key: String, console: PathBuf, lease: Duration) -> Self {
        Live {
            key,
            console,
            taken_ms: super::sign::now_ms(),
            stop: AtomicBool::new(false),
            why: Mutex::new(None),
            phase: Mutex::new(Phase::Downloading),
            lease_until: Mutex::new(Instant::now() + lease),
            lease,
            done: AtomicBool::new(false),
            wake: Condvar::new(),
            wake_lock: Mutex::new(false),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock().expect("phase lock")
    }

    /// Changes the phase and sends a heartbeat saying so at once.
    pub fn set_phase(&self, phase: Phase) {
        *self.phase.lock().expect("phase lock") = phase;
        self.poke();
    }

    /// The server answered for the attempt: the lease holds for another lease period.
    pub fn lease_renewed(&self) {
        *self.lease_until.lock().expect("lease lock") = Instant::now() + self.lease;
    }

    /// Whether the lease may still hold (a margin for clocks and the way back).
    pub fn lease_may_hold(&self) -> bool {
        Instant::now() < *self.lease_until.lock().expect("lease lock") + Duration::from_secs(15)
    }

    pub fn why(&self) -> Option<StopWhy> {
        self.why.lock().expect("why lock").map(|(w, _)| w)
    }

    pub fn lost(&self) -> bool {
        self.why() == Some(StopWhy::LeaseLost)
    }

    /// Stops the VM for `why` (the first reason stays): SIGTERM to the backend, which ends the
    /// guest and exits as interrupted; a VM not started yet is never started.
    pub fn stop_vm(&self, why: StopWhy, children: &Children) {
        {
            let mut w = self.why.lock().expect("why lock");
            if w.is_none() {
                *w = Some((why, Instant::now()));
            } else if why == StopWhy::LeaseLost {
                // Whatever else stopped it, nothing may be sent once the lease is gone.
                *w = Some((why, w.map(|(_, t)| t).unwrap_or_else(Instant::now)));
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        signal(children, &self.key, libc::SIGTERM);
        self.poke();
    }

    /// Kills a VM that was asked to stop more than [`STOP_PATIENCE`] ago and is still there.
    fn hurry(&self, children: &Children) {
        let asked = self.why.lock().expect("why lock").map(|(_, t)| t);
        if asked.is_some_and(|t| t.elapsed() > STOP_PATIENCE) {
            signal(children, &self.key, libc::SIGKILL);
        }
    }

    /// Ends the attempt's threads.
    pub fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.poke();
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    fn poke(&self) {
        *self.wake_lock.lock().expect("wake lock") = true;
        self.wake.notify_all();
    }

    /// Waits up to `d`, or until poked; returns whether it was poked.
    pub fn wait(&self, d: Duration) -> bool {
        let guard = self.wake_lock.lock().expect("wake lock");
        let (mut poked, _) = self
            .wake
            .wait_timeout_while(guard, d, |p| !*p)
            .expect("wake lock");
        std::mem::replace(&mut *poked, false)
    }
}

/// Signals the backend of `key`, if it runs.
pub fn signal(children: &Children, key: &str, sig: libc::c_int) {
    if let Some(pid) = children.lock().expect("children lock").get(key) {
        // SAFETY: signalling our own child process, registered while it runs.
        unsafe { libc::kill(*pid as libc::pid_t, sig) };
    }
}

/// What a heartbeat's answer means for the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Go on.
    Held,
    /// Stop the VM for this reason.
    Stop(StopWhy),
    /// No answer worth acting on: try again soon.
    Retry,
    /// A refusal that says nothing about the lease (`wrong-state` just before the start is
    /// known, …): go on, try at the next beat.
    Ignore,
}

/// Reads a heartbeat's result.
pub fn read_beat(result: &Result<HeartbeatResponse, ApiFailure>) -> Beat {
    match result {
        Ok(r) if r.cancel => Beat::Stop(StopWhy::Canceled),
        Ok(_) => Beat::Held,
        Err(e) if e.is_lease_lost() => Beat::Stop(StopWhy::LeaseLost),
        Err(e) if e.is_transient() => Beat::Retry,
        Err(_) => Beat::Ignore,
    }
}

/// Starts the heartbeat thread; it ends when the attempt is [`Live::finish`]ed or its lease
/// is lost.
pub fn spawn(
    api: AttemptApi,
    live: Arc<Live>,
    children: Arc<Children>,
    interval: Duration,
) -> JoinHandle<()> {
    let interval = interval.clamp(Duration::from_secs(1), Duration::from_secs(300));
    std::thread::Builder::new()
        .name(format!("heartbeat-{}", live.key))
        .spawn(move || {
            let mut backoff = Backoff::default();
            let mut wait = interval;
            let mut last = Instant::now();
            loop {
                // Looks every second (a VM to hurry, the guest's first words), beats every
                // interval, and at once when the phase changes.
                let poked = live.wait(wait.saturating_sub(last.elapsed()).min(LOOK_EVERY));
                if live.is_done() {
                    return;
                }
                live.hurry(&children);
                let console_bytes = std::fs::metadata(&live.console)
                    .map(|m| m.len())
                    .unwrap_or(0);
                let mut changed = poked;
                if live.phase() == Phase::Booting && console_bytes > 0 {
                    // The guest speaks: it has booted far enough to count as running.
                    *live.phase.lock().expect("phase lock") = Phase::Running;
                    changed = true;
                }
                if !changed && last.elapsed() < wait {
                    continue;
                }
                last = Instant::now();
                let result = api.heartbeat(&HeartbeatRequest {
                    phase: live.phase(),
                    console_bytes,
                });
                wait = interval;
                match read_beat(&result) {
                    Beat::Held => {
                        backoff.reset();
                        live.lease_renewed();
                    }
                    Beat::Stop(why) => {
                        if why == StopWhy::Canceled {
                            live.lease_renewed();
                        }
                        if live.why().is_none() || why == StopWhy::LeaseLost {
                            tracing::info!(
                                "attempt {}: {}: stopping its VM",
                                live.key,
                                match why {
                                    StopWhy::Canceled => "canceled",
                                    _ => "the server no longer holds it for this runner",
                                }
                            );
                        }
                        live.stop_vm(why, &children);
                        if why == StopWhy::LeaseLost {
                            return;
                        }
                    }
                    Beat::Retry => {
                        wait = backoff.next_delay().min(interval);
                        if let Err(e) = &result {
                            tracing::warn!("attempt {}: heartbeat: {e}; trying again", live.key);
                        }
                    }
                    Beat::Ignore => {
                        if let Err(e) = &result {
                            tracing::warn!("attempt {}: heartbeat refused: {e}", live.key);
                        }
                    }
                }
            }
        })
        .expect("spawn the heartbeat thread")
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_api::ApiError;
    use std::collections::HashMap;

    #[test]
    fn answers_decide_whether_the_vm_goes_on() {
        let ok = |cancel| {
            Ok(HeartbeatResponse {
                lease_until_ms: 1,
                cancel,
            })
        };
        let refused = |status, code: &str| {
            Err(ApiFailure::Refused {
                status,
                error: ApiError::new(code, ""),
            })
        };
        assert_eq!(read_beat(&ok(false)), Beat::Held);
        assert_eq!(read_beat(&ok(true)), Beat::Stop(StopWhy::Canceled));
        assert_eq!(
            read_beat(&refused(409, "lease-lost")),
            Beat::Stop(StopWhy::LeaseLost)
        );
        assert_eq!(
            read_beat(&refused(404, "not-found")),
            Beat::Stop(StopWhy::LeaseLost)
        );
        assert_eq!(read_beat(&refused(503, "internal")), Beat::Retry);
        assert_eq!(
            read_beat(&Err(ApiFailure::Network("refused".into()))),
            Beat::Retry
        );
        assert_eq!(read_beat(&refused(409, "wrong-state")), Beat::Ignore);
    }

    #[test]
    fn the_first_reason_stays_but_a_lost_lease_always_wins() {
        let children: Children = Mutex::new(HashMap::new());
        let live = Live::new("1".into(), "/nonexistent".into(), Duration::from_secs(90));
        assert!(live.lease_may_hold());
        assert_eq!(live.why(), None);
        live.stop_vm(StopWhy::Shutdown, &children);
        live.stop_vm(StopWhy::Canceled, &children);
        assert_eq!(live.why(), Some(StopWhy::Shutdown));
        assert!(live.stop.load(Ordering::SeqCst));
        live.stop_vm(StopWhy::LeaseLost, &children);
        assert!(live.lost());
        // A phase change wakes the heartbeat thread at once.
        live.set_phase(Phase::Uploading);
        assert!(live.wait(Duration::from_secs(5)));
        assert!(!live.wait(Duration::from_millis(10)));
        assert_eq!(live.phase(), Phase::Uploading);
    }

    #[test]
    fn stopping_signals_the_registered_backend() {
        let children: Children = Mutex::new(HashMap::new());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        children.lock().unwrap().insert("7".into(), child.id());
        let live = Live::new("7".into(), "/nonexistent".into(), Duration::from_secs(90));
        live.stop_vm(StopWhy::Canceled, &children);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }
}

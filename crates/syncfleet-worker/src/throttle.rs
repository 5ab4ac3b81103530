//! Source protection: the gate every source read of a worker process
//! passes, and the adaptive throttle that sets how wide the fleet opens.
//!
//! The throttle samples a cheap probe query on the source primary (ideally
//! the app's own hot lookup). While the probe stays near its idle baseline
//! the read *level* grows additively; when it rises above `factor` times
//! the baseline the level halves: additive increase, multiplicative
//! decrease, as TCP's congestion control and vector's adaptive request
//! concurrency do.
//!
//! The level counts the whole fleet's reads, up to the fleet-wide ceiling
//! (`max_concurrent_reads`): below it, a read takes one of only
//! `floor(level)` of the ceiling's slots, so three reads run at once at
//! level 3 however many worker processes there are. Every process probes
//! the same source and so comes to about the same level; each reports its
//! level to the control schema about once a second, and a process that
//! starts begins at the level last reported rather than at the ceiling,
//! where it would read unpaced until its own probes caught up. A level of 0.5
//! lets one read run in the fleet, half the time: its query is [paced on
//! the server](syncfleet_db::sql::Pace), the source backend working a
//! millisecond and then sleeping one, so the whole pipeline works in short
//! bursts with idle gaps rather than in one long burst. That is how the
//! fleet backs off below one connection's worth of load, which is where a
//! two-core database needs it: an app query that arrives during a burst
//! waits for a millisecond at most, not for a whole batch.
//!
//! The same gate holds reads back until the fleet's next read under
//! `max_rows_per_second` (see [`ReadGate::hold_until`]).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use syncfleet_core::config::ThrottleConfig;
use syncfleet_core::shutdown::ShutdownSignal;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The lowest level: one read in the fleet at a time, each side of it (the
/// source's query and the destination's) working a fifth of the time in
/// bursts of a quarter millisecond, so a sync under a busy app still moves.
/// In the bench's fleet of two workers re-syncing unchanged rows, whose two
/// fingerprints run at once, that is 0.23–0.29 of the unthrottled rows/s:
/// as much as a floor of 0.4 moved when they ran one after the other, with
/// the app's p99 a little lower (1.68–1.98 ms against 1.80–2.17 ms in four
/// alternating pairs of runs).
pub const MIN_LEVEL: f64 = 0.2;
/// Level regained per second of healthy probes. Slow on purpose: a
/// loaded two-core server shows its stress as rare latency spikes, not as
/// a slower median, so one spike must weigh more than many calm probes.
const INCREASE_PER_SECOND: f64 = 0.05;
/// Probes kept for the baseline (the minimum of the window).
const BASELINE_WINDOW: usize = 240;
/// How often a worker reports its level to the fleet.
const FLEET_LEVEL_EVERY: Duration = Duration::from_secs(1);

/// The AIMD controller, fed probe latencies.
#[derive(Debug, Clone)]
pub struct Controller {
    level: f64,
    max: f64,
    /// Level regained per healthy probe.
    increase: f64,
    factor: f64,
    min_latency: Duration,
    recent: VecDeque<Duration>,
}

impl Controller {
    pub fn new(max: f64, config: &ThrottleConfig) -> Self {
        Self {
            level: max,
            max,
            increase: INCREASE_PER_SECOND * config.interval.as_secs_f64(),
            factor: config.factor,
            min_latency: config.min_latency,
            recent: VecDeque::with_capacity(BASELINE_WINDOW),
        }
    }

    /// The idle baseline: the fastest recent probe. While the fleet reads,
    /// some probes still land in quiet moments, so the minimum tracks the
    /// unloaded latency; it only rises if the source stays slow for a whole
    /// window.
    pub fn baseline(&self) -> Option<Duration> {
        self.recent.iter().min().copied()
    }

    pub fn level(&self) -> f64 {
        self.level
    }

    /// Continues from the fleet's level (within this controller's range).
    pub fn resume(&mut self, level: f64) {
        self.level = level.clamp(MIN_LEVEL, self.max);
    }

    /// Takes one probe latency; returns the new level.
    pub fn observe(&mut self, latency: Duration) -> f64 {
        let baseline = self.baseline().unwrap_or(latency);
        if self.recent.len() == BASELINE_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(latency);
        // Saturating: a huge factor must not overflow a `Duration`.
        let limit = Duration::try_from_secs_f64(baseline.as_secs_f64() * self.factor)
            .unwrap_or(Duration::MAX)
            .max(self.min_latency);
        self.level = if latency > limit {
            (self.level / 2.0).max(MIN_LEVEL)
        } else {
            (self.level + self.increase).min(self.max)
        };
        self.level
    }

    /// Takes a probe that timed out: slower than any limit, whatever the
    /// settings (its bound may lie under `min_latency`), and no measure of
    /// the baseline. Returns the new level.
    pub fn timed_out(&mut self) -> f64 {
        self.level = (self.level / 2.0).max(MIN_LEVEL);
        self.level
    }
}

struct GateState {
    /// Reads running now.
    active: u32,
    /// No read starts before this: the fleet's `max_rows_per_second`.
    not_before: Instant,
}

/// The gate in front of every source read of this process.
pub struct ReadGate {
    state: Mutex<GateState>,
    changed: Notify,
    /// `None` without a throttle: the level is always the maximum.
    controller: Option<Mutex<Controller>>,
    max: f64,
    /// The fleet-wide ceiling on source reads.
    ceiling: Option<u32>,
}

/// A read in progress; give it back with [`ReadGate::finish`].
#[must_use]
pub struct Permit(());

impl ReadGate {
    /// The level ranges up to the fleet-wide `ceiling`, or to the process's
    /// `concurrency` without one.
    pub fn new(concurrency: u16, ceiling: Option<u32>, throttle: Option<&ThrottleConfig>) -> Self {
        let max = f64::from(ceiling.unwrap_or(concurrency.into()).max(1));
        Self {
            state: Mutex::new(GateState {
                active: 0,
                not_before: Instant::now(),
            }),
            changed: Notify::new(),
            controller: throttle.map(|t| Mutex::new(Controller::new(max, t))),
            max,
            ceiling,
        }
    }

    pub fn level(&self) -> f64 {
        self.controller
            .as_ref()
            .map_or(self.max, |c| c.lock().expect("controller").level())
    }

    /// The throttle's idle baseline, once it has probed.
    pub fn baseline(&self) -> Option<Duration> {
        self.controller
            .as_ref()
            .and_then(|c| c.lock().expect("controller").baseline())
    }

    /// Starts from the level the fleet last reported.
    pub fn resume(&self, level: f64) {
        if let Some(c) = &self.controller {
            c.lock().expect("controller").resume(level);
        }
    }

    /// Feeds a probe latency to the throttle; `None` for a probe that
    /// timed out ([`Controller::timed_out`]).
    pub fn observe(&self, latency: Option<Duration>) -> f64 {
        let level = match &self.controller {
            Some(c) => {
                let mut c = c.lock().expect("controller");
                match latency {
                    Some(latency) => c.observe(latency),
                    None => c.timed_out(),
                }
            }
            None => self.max,
        };
        self.changed.notify_waiters();
        level
    }

    /// The number of fleet-wide read slots a read starting now chooses
    /// from (`None`: no limit): the level's whole part, at least one, while
    /// the throttle holds the level below its maximum; the ceiling
    /// otherwise.
    pub fn slots(&self) -> Option<u32> {
        let level = self.level();
        if level >= self.max {
            return self.ceiling;
        }
        let slots = level.floor().max(1.0) as u32;
        Some(self.ceiling.map_or(slots, |c| c.min(slots)))
    }

    /// How a read starting now is paced: not at all from level one up.
    pub fn pace(&self) -> Option<syncfleet_db::sql::Pace> {
        syncfleet_db::sql::Pace::below_one(self.level())
    }

    /// Waits until a read may start.
    pub async fn acquire(&self) -> Permit {
        loop {
            let notified = self.changed.notified();
            let wait = {
                let mut s = self.state.lock().expect("gate");
                let allowed = self.level().floor().max(1.0) as u32;
                let now = Instant::now();
                if s.active < allowed && now >= s.not_before {
                    s.active += 1;
                    return Permit(());
                }
                // Wake at the time limit, on a change (a read ending, a new
                // level), or to re-check the level, whichever comes first.
                // Not on a short tick: on a shared host every wake-up of
                // the fleet's threads takes a core from the app.
                match s.not_before > now {
                    true => s.not_before - now,
                    false => Duration::from_millis(100),
                }
                .min(Duration::from_millis(100))
            };
            let _ = tokio::time::timeout(wait, notified).await;
        }
    }

    /// Ends a read.
    pub fn finish(&self, _permit: Permit) {
        self.state.lock().expect("gate").active -= 1;
        self.changed.notify_waiters();
    }

    /// Starts no read before `until`: when the fleet's rows/s budget allows
    /// its next read, as the worker learns when it charges a batch's rows.
    pub fn hold_until(&self, until: Instant) {
        let mut s = self.state.lock().expect("gate");
        s.not_before = s.not_before.max(until);
    }
}

/// Starts the gate from the level the `fleet` (its broker prefix) last
/// reported in the `destination`'s control schema, if recently.
pub async fn resume_fleet_level(gate: &ReadGate, destination: &syncfleet_db::Pool, fleet: &str) {
    if let Some(level) = syncfleet_db::ceiling::fleet_level(destination, fleet).await {
        gate.resume(level);
        tracing::info!(level, "adaptive throttle starts at the fleet's level");
    }
}

/// Probes the source every `interval` and feeds the gate, until shutdown.
/// A probe that fails is skipped: a source that is down fails the jobs by
/// itself. Reports the gate's level to the `destination`'s control schema
/// for the `fleet`, where [`resume_fleet_level`] finds it.
pub async fn run_probe(
    gate: std::sync::Arc<ReadGate>,
    client: syncfleet_db::Pool,
    destination: syncfleet_db::Pool,
    fleet: String,
    config: ThrottleConfig,
    mut shutdown: ShutdownSignal,
) {
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_level = gate.level();
    let mut reported = Instant::now();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = ticker.tick() => {}
        }
        // Timed from the query, not the checkout (a connection made anew
        // after one closed is no slower app). A probe that times out is
        // slower than any limit (cancelled and its connection closed, so
        // that the next probe does not queue behind it); one that fails
        // says nothing about the app's latency and is skipped, said once
        // while it goes on failing.
        let bound = config.interval * 4;
        let probe = client
            .bounded(bound, async |c| {
                let started = Instant::now();
                c.simple_query(&config.probe)
                    .await
                    .map(|_| started.elapsed())
                    .map_err(syncfleet_db::DbError::from)
            })
            .await;
        let latency = match probe {
            Some(Err(e)) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "the throttle's probe fails; the throttle holds its level until it answers");
                }
                continue;
            }
            Some(Ok(latency)) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("the throttle's probe answers again");
                }
                Some(latency)
            }
            None => None,
        };
        let level = gate.observe(latency);
        metrics::gauge!(syncfleet_core::metrics::THROTTLE_LEVEL).set(level);
        tracing::trace!(?latency, level, "probe");
        if (level < 1.0) != (last_level < 1.0) {
            tracing::info!(
                level,
                "adaptive throttle {}",
                if level < 1.0 {
                    "backing off the source"
                } else {
                    "back to full speed"
                }
            );
        }
        last_level = level;
        if reported.elapsed() >= FLEET_LEVEL_EVERY {
            reported = Instant::now();
            // Off the probe's clock, and best effort: a destination that is
            // down costs a newly started worker only its head start.
            let (destination, fleet) = (destination.clone(), fleet.clone());
            tokio::spawn(async move {
                let report = destination
                    .bounded(FLEET_LEVEL_EVERY, async |c| {
                        syncfleet_db::control::report_level(&***c, &fleet, level).await
                    })
                    .await;
                if let Some(Err(e)) = report {
                    tracing::debug!(error = %e, "could not report the throttle level");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ThrottleConfig {
        ThrottleConfig {
            probe: "SELECT 1".into(),
            interval: Duration::from_millis(250),
            factor: 2.0,
            min_latency: Duration::from_millis(2),
        }
    }

    #[test]
    fn backs_off_multiplicatively_and_recovers_additively() {
        let mut c = Controller::new(4.0, &config());
        for _ in 0..10 {
            c.observe(Duration::from_millis(1));
        }
        assert_eq!(c.level(), 4.0);
        assert_eq!(c.baseline(), Some(Duration::from_millis(1)));
        // The app slows down: 20 ms against a 1 ms baseline.
        let levels: Vec<f64> = (0..8)
            .map(|_| c.observe(Duration::from_millis(20)))
            .collect();
        assert_eq!(levels[0], 2.0);
        assert_eq!(levels[1], 1.0);
        assert!(levels[7] <= MIN_LEVEL + 1e-9, "{levels:?}");
        // It recovers, a step at a time.
        let up: Vec<f64> = (0..400)
            .map(|_| c.observe(Duration::from_millis(1)))
            .collect();
        assert!(up.windows(2).all(|w| w[1] >= w[0]));
        assert!(
            (up[0] - (MIN_LEVEL + 0.0125)).abs() < 1e-9,
            "0.05/s at one probe per 250 ms"
        );
        assert_eq!(*up.last().unwrap(), 4.0);
    }

    #[test]
    fn a_timed_out_probe_is_a_rise_whatever_the_settings() {
        // A floor above the probe's bound (4 intervals): a timed-out probe
        // still halves the level.
        let lenient = ThrottleConfig {
            min_latency: Duration::from_secs(10),
            ..config()
        };
        let mut c = Controller::new(4.0, &lenient);
        c.observe(Duration::from_millis(1));
        assert_eq!(c.timed_out(), 2.0);
        assert_eq!(c.baseline(), Some(Duration::from_millis(1)));
        // A factor too large for a `Duration` saturates.
        let huge = ThrottleConfig {
            factor: 1e30,
            ..config()
        };
        let mut c = Controller::new(4.0, &huge);
        c.observe(Duration::from_secs(1));
        assert_eq!(c.observe(Duration::from_secs(2)), 4.0);
    }

    #[test]
    fn noise_below_the_floor_is_not_a_rise() {
        let mut c = Controller::new(2.0, &config());
        c.observe(Duration::from_micros(100));
        // 1.5 ms is 15x the baseline but under the 2 ms floor.
        assert_eq!(c.observe(Duration::from_micros(1500)), 2.0);
    }

    // Virtual time: the waits are checked exactly, not against a clock.
    #[tokio::test(start_paused = true)]
    async fn below_level_one_reads_run_one_at_a_time_and_are_paced_on_the_server() {
        let gate = std::sync::Arc::new(ReadGate::new(4, None, Some(&config())));
        for _ in 0..4 {
            gate.observe(Some(Duration::from_millis(1)));
        }
        for _ in 0..3 {
            gate.observe(Some(Duration::from_millis(50)));
        }
        assert_eq!(gate.level(), 0.5);
        let first = gate.acquire().await;
        // A second read cannot start while the first runs.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), gate.acquire())
                .await
                .is_err()
        );
        gate.finish(first);
        // At level 0.5 the source works as long as it sleeps.
        let pace = gate.pace().expect("paced below level one");
        assert_eq!(pace.work, pace.sleep);
        // Recovered to level one and above: no pacing.
        for _ in 0..200 {
            gate.observe(Some(Duration::from_millis(1)));
        }
        assert_eq!(gate.pace(), None);
    }

    #[test]
    fn the_level_narrows_the_fleets_read_slots() {
        // Three reads in this process, six in the fleet.
        let gate = ReadGate::new(3, Some(6), Some(&config()));
        assert_eq!(gate.level(), 6.0);
        assert_eq!(gate.slots(), Some(6));
        gate.observe(Some(Duration::from_millis(1)));
        let slow = Duration::from_millis(50);
        let slots: Vec<_> = (0..4)
            .map(|_| {
                gate.observe(Some(slow));
                gate.slots()
            })
            .collect();
        // 3, 1.5, 0.75, 0.375: below level one, one read in the fleet.
        assert_eq!(slots, [Some(3), Some(1), Some(1), Some(1)]);
        // Without a throttle, the ceiling; without a ceiling either, none.
        assert_eq!(ReadGate::new(3, Some(6), None).slots(), Some(6));
        assert_eq!(ReadGate::new(3, None, None).slots(), None);
        // Without a ceiling the level counts up to this process's
        // concurrency, and below it still counts the fleet's reads.
        let gate = ReadGate::new(3, None, Some(&config()));
        gate.observe(Some(Duration::from_millis(1)));
        assert_eq!(gate.slots(), None);
        gate.observe(Some(slow));
        assert_eq!(gate.slots(), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_delays_the_next_read_and_never_shortens() {
        let gate = ReadGate::new(2, None, None);
        let start = Instant::now();
        gate.hold_until(start + Duration::from_millis(500));
        gate.hold_until(start + Duration::from_millis(200));
        let p = gate.acquire().await;
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        gate.finish(p);
        let _p = gate.acquire().await;
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }
}

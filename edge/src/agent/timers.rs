//! The agent's clocks: the heartbeat, the one-second look at the outbox, and the schedule.
//! tokio time only (no I/O), so paused-time tests drive them through hours in an instant.
//!
//! - The heartbeat ticks at once, then every period. A loop busy past a tick gets it as soon
//!   as it asks, and the next one a whole period later (no burst of missed ticks).
//! - The outbox look ticks every second, the same way.
//! - Each scheduled trace is first due one period after the start, then one period after the
//!   moment it was last handed out (a busy loop delays it; it never catches up twice).

use std::time::Duration;
use tokio::time::{Instant, Interval, MissedTickBehavior};

/// Which clock went off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Time for a heartbeat.
    Heartbeat,
    /// Time to look for outbox rows other processes wrote.
    Outbox,
    /// Scheduled trace `i` (index into the schedule) is due.
    Due(usize),
}

/// The heartbeat, outbox and schedule clocks.
#[derive(Debug)]
pub struct Timers {
    heartbeat: Interval,
    outbox: Interval,
    /// Each scheduled trace's period.
    periods: Vec<Duration>,
    /// When each is due next.
    due: Vec<Instant>,
}

impl Timers {
    /// Clocks starting now: a heartbeat every `heartbeat` (at least 1 s), and a schedule with
    /// these periods.
    #[must_use]
    pub fn new(heartbeat: Duration, periods: Vec<Duration>) -> Self {
        let interval = |period: Duration| {
            let mut i = tokio::time::interval(period);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        };
        let start = Instant::now();
        Timers {
            heartbeat: interval(heartbeat.max(Duration::from_secs(1))),
            outbox: interval(Duration::from_secs(1)),
            due: periods.iter().map(|p| start + *p).collect(),
            periods,
        }
    }

    /// Waits for the next clock to go off. Cancel-safe: a call dropped before it returns
    /// loses no tick.
    pub async fn next(&mut self) -> Tick {
        let next_due = self
            .due
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| **t)
            .map(|(i, t)| (i, *t));
        let tick = tokio::select! {
            _ = self.heartbeat.tick() => Tick::Heartbeat,
            _ = self.outbox.tick() => Tick::Outbox,
            i = async {
                match next_due {
                    Some((i, t)) => {
                        tokio::time::sleep_until(t).await;
                        i
                    }
                    None => std::future::pending().await,
                }
            } => Tick::Due(i),
        };
        if let Tick::Due(i) = tick {
            self.due[i] = Instant::now() + self.periods[i];
        }
        tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60;

    /// Every tick but the outbox's up to `until` seconds, as (seconds since the start, tick).
    async fn ticks(t: &mut Timers, until: u64) -> Vec<(u64, Tick)> {
        let start = Instant::now();
        let mut out = Vec::new();
        loop {
            let tick = t.next().await;
            let at = start.elapsed().as_secs();
            if at > until {
                return out;
            }
            if tick != Tick::Outbox {
                out.push((at, tick));
            }
        }
    }

    fn times(ticks: &[(u64, Tick)], which: Tick) -> Vec<u64> {
        ticks
            .iter()
            .filter(|(_, t)| *t == which)
            .map(|(at, _)| *at)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_and_scheduled_runs_come_on_time() {
        let mut t = Timers::new(
            Duration::from_secs(30),
            vec![Duration::from_secs(15 * MIN), Duration::from_secs(60 * MIN)],
        );
        let seen = ticks(&mut t, 2 * 60 * MIN).await;
        let beats = times(&seen, Tick::Heartbeat);
        assert_eq!(beats, (0..=240).map(|n| n * 30).collect::<Vec<_>>());
        assert_eq!(
            times(&seen, Tick::Due(0)),
            (1..=8).map(|n| n * 15 * MIN).collect::<Vec<_>>()
        );
        assert_eq!(times(&seen, Tick::Due(1)), [60 * MIN, 120 * MIN]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_outbox_is_looked_at_every_second() {
        let start = Instant::now();
        let mut t = Timers::new(Duration::from_secs(3600), Vec::new());
        let mut at = Vec::new();
        while at.len() < 5 {
            if t.next().await == Tick::Outbox {
                at.push(start.elapsed().as_secs());
            }
        }
        assert_eq!(at, [0, 1, 2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_loop_gets_one_late_tick_then_whole_periods_again() {
        let start = Instant::now();
        let mut t = Timers::new(Duration::from_secs(30), vec![Duration::from_secs(100)]);
        // The first heartbeat at once (the outbox's first look comes at once too).
        while t.next().await != Tick::Heartbeat {}
        assert_eq!(start.elapsed().as_secs(), 0);
        // The loop is busy (a long install) for 250 s: heartbeats at 30..240 and the run due
        // at 100 are missed.
        tokio::time::advance(Duration::from_secs(250)).await;
        let mut late = Vec::new();
        while late.len() < 2 {
            let tick = t.next().await;
            if tick != Tick::Outbox {
                late.push(tick);
            }
        }
        late.sort_by_key(|t| *t == Tick::Heartbeat);
        assert_eq!(
            late,
            [Tick::Due(0), Tick::Heartbeat],
            "one of each, at once"
        );
        assert_eq!(start.elapsed().as_secs(), 250);
        let seen = ticks(&mut t, 400 - 250).await;
        let since =
            |which| -> Vec<u64> { times(&seen, which).into_iter().map(|s| s + 250).collect() };
        assert_eq!(since(Tick::Heartbeat), [280, 310, 340, 370, 400]);
        assert_eq!(
            since(Tick::Due(0)),
            [350],
            "a period after it was handed out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_schedule_means_only_heartbeats_and_outbox_looks() {
        let mut t = Timers::new(Duration::ZERO, Vec::new());
        let seen = ticks(&mut t, 3).await;
        assert_eq!(
            times(&seen, Tick::Heartbeat),
            [0, 1, 2, 3],
            "at least a second apart"
        );
        assert!(seen.iter().all(|(_, t)| *t == Tick::Heartbeat));
    }
}

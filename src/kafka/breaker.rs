//! The circuit breaker in front of the producer, as a plain state machine.
//!
//! After a failure, deliveries are skipped (the router falls back to the
//! offline file at once instead of making every request wait a delivery
//! timeout). When the cool-down ends, exactly one delivery goes to Kafka as a
//! probe while the others keep being skipped: if every request probed at
//! once, a Kafka that is still down would cost each of them a full timeout,
//! and a Kafka that is coming back would get the whole backlog in one burst.

use std::time::{Duration, Instant};

/// Where the breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Kafka works: every delivery goes.
    Closed,
    /// Kafka failed: deliveries are skipped until the instant.
    Open { until: Instant },
    /// The cool-down is over and one probe is in flight since the instant.
    HalfOpen { since: Instant },
}

/// What a caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Deliver (the breaker is closed).
    Pass,
    /// Deliver as the one probe; report its outcome with [`Breaker::record`].
    Probe,
    /// Do not deliver: fall back.
    Skip,
}

/// The breaker. `probe_timeout` bounds how long a probe may stay unanswered
/// before another caller may probe (a delivery always resolves within the
/// producer's delivery timeout, so this only matters if a caller was dropped
/// before recording).
#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    cooldown: Duration,
    probe_timeout: Duration,
}

impl Breaker {
    pub fn new(cooldown: Duration, probe_timeout: Duration) -> Breaker {
        Breaker {
            state: State::Closed,
            cooldown,
            probe_timeout,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// True while callers are being turned away (open, or half-open with a
    /// probe in flight).
    pub fn is_skipping(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => false,
            State::Open { until } => now < until,
            State::HalfOpen { since } => now < since + self.probe_timeout,
        }
    }

    /// Decides for one caller. A cool-down that ended turns the first caller
    /// into the probe.
    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed => Admit::Pass,
            State::Open { until } if now < until => Admit::Skip,
            State::HalfOpen { since } if now < since + self.probe_timeout => Admit::Skip,
            State::Open { .. } | State::HalfOpen { .. } => {
                self.state = State::HalfOpen { since: now };
                Admit::Probe
            }
        }
    }

    /// Records the outcome of a delivery admitted as `admitted`. `healthy`
    /// is false only for failures that say Kafka is unwell (timeouts, broker
    /// errors), not for a refusal of one message.
    pub fn record(&mut self, admitted: Admit, healthy: bool, now: Instant) {
        match (admitted, healthy) {
            (Admit::Skip, _) => {}
            (Admit::Probe, true) => self.state = State::Closed,
            // A success admitted before another caller tripped the breaker
            // does not close it: only the probe decides.
            (Admit::Pass, true) => {}
            (Admit::Probe, false) => {
                self.state = State::Open {
                    until: now + self.cooldown,
                }
            }
            (Admit::Pass, false) => {
                let until = now + self.cooldown;
                self.state = match self.state {
                    State::Open { until: u } => State::Open {
                        until: u.max(until),
                    },
                    // A probe is in flight: this older failure says nothing
                    // new; let the probe decide.
                    s @ State::HalfOpen { .. } => s,
                    State::Closed => State::Open { until },
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CD: Duration = Duration::from_secs(5);
    const PT: Duration = Duration::from_secs(30);

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn closed_passes_everything() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CD, PT);
        for i in 0..10 {
            assert_eq!(b.admit(ms(t0, i)), Admit::Pass);
            b.record(Admit::Pass, true, ms(t0, i));
        }
        assert_eq!(b.state(), State::Closed);
        assert!(!b.is_skipping(t0));
    }

    #[test]
    fn a_failure_opens_for_the_cooldown_then_exactly_one_probe_goes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CD, PT);
        assert_eq!(b.admit(t0), Admit::Pass);
        b.record(Admit::Pass, false, t0);
        assert!(b.is_skipping(ms(t0, 1)));
        assert_eq!(b.admit(ms(t0, 4_999)), Admit::Skip);
        // Cool-down over: one probe, everyone else still skips.
        assert_eq!(b.admit(ms(t0, 5_000)), Admit::Probe);
        for i in 1..100 {
            assert_eq!(b.admit(ms(t0, 5_000 + i)), Admit::Skip);
        }
        b.record(Admit::Probe, true, ms(t0, 5_200));
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(ms(t0, 5_201)), Admit::Pass);
    }

    #[test]
    fn a_failed_probe_reopens_for_a_full_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CD, PT);
        b.record(Admit::Pass, false, t0);
        assert_eq!(b.admit(ms(t0, 5_000)), Admit::Probe);
        b.record(Admit::Probe, false, ms(t0, 6_000));
        assert_eq!(b.admit(ms(t0, 10_999)), Admit::Skip);
        assert_eq!(b.admit(ms(t0, 11_000)), Admit::Probe);
    }

    #[test]
    fn late_results_of_earlier_deliveries_do_not_decide_for_the_probe() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CD, PT);
        b.record(Admit::Pass, false, t0);
        assert_eq!(b.admit(ms(t0, 5_000)), Admit::Probe);
        // A delivery admitted before the trip fails late, or succeeds late.
        b.record(Admit::Pass, false, ms(t0, 5_001));
        b.record(Admit::Pass, true, ms(t0, 5_002));
        assert_eq!(
            b.state(),
            State::HalfOpen {
                since: ms(t0, 5_000)
            }
        );
        b.record(Admit::Probe, true, ms(t0, 5_100));
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn failures_while_open_extend_the_cooldown_never_shorten_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CD, PT);
        b.record(Admit::Pass, false, ms(t0, 1_000));
        b.record(Admit::Pass, false, ms(t0, 0));
        assert_eq!(
            b.state(),
            State::Open {
                until: ms(t0, 6_000)
            }
        );
        b.record(Admit::Pass, false, ms(t0, 2_000));
        assert_eq!(b.admit(ms(t0, 6_500)), Admit::Skip);
        assert_eq!(b.admit(ms(t0, 7_000)), Admit::Probe);
    }

    #[test]
    fn an_unanswered_probe_is_replaced_after_the_probe_timeout() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CD, PT);
        b.record(Admit::Pass, false, t0);
        assert_eq!(b.admit(ms(t0, 5_000)), Admit::Probe);
        assert_eq!(b.admit(ms(t0, 34_999)), Admit::Skip);
        assert_eq!(b.admit(ms(t0, 35_000)), Admit::Probe);
    }

    #[test]
    fn refusals_of_one_message_do_not_trip() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CD, PT);
        // `healthy = true` is how a caller reports "Kafka answered, it said no".
        b.record(Admit::Pass, true, t0);
        assert_eq!(b.state(), State::Closed);
    }
}

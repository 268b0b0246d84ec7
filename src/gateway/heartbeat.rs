//! Room for Engine.IO's ping in a connection's send buffer, so that a long replay is not cut off.
//!
//! engineioxide (0.17) queues each ping with `try_send` on the same bounded channel as every
//! packet the node emits, and takes a full channel at that instant for a heartbeat timeout. A
//! replay to a client slower than the mailbox keeps that channel full, so a long replay used to
//! be cut off at the first ping that met it full (issue 13, finding 3). socketioxide does not
//! expose the channel's free room, but the ping's schedule is known: the engine pings when the
//! session opens and then every `ping_interval` on a fixed clock (a tokio interval, which stays on
//! its schedule because each answer comes within `ping_timeout` < `ping_interval`). A connection
//! is made after its session opened, so each ping falls at, or a little before,
//! `made + k × ping_interval`. Around that instant a connection whose buffer was full lately
//! emits nothing: the client drains the buffer and the ping finds room. What is held back stays
//! in the mailbox and follows, as for any slow client; a connection whose buffer has not been
//! full within the last interval is never held.
//!
//! Once queued, the ping still waits behind the kernel's socket buffers; the listener caps what
//! the node's side holds unsent (`TCP_NOTSENT_LOWAT`, `crate::listener`), so that wait is bounded
//! by what the client's own receive buffer holds.

use std::time::{Duration, Instant};

/// The longest hold before a ping: it covers the time between the session's opening and the
/// connection's making (one handshake round trip), with time left for the client to read.
const MAX_BEFORE: Duration = Duration::from_secs(2);
/// The longest hold after the ping's instant, for a timer that fires a little late.
const MAX_AFTER: Duration = Duration::from_millis(250);

/// When a connection must leave its send buffer alone for the next ping.
#[derive(Debug, Clone)]
pub struct PingRoom {
    made: Instant,
    interval: Duration,
    before: Duration,
    after: Duration,
    /// When the buffer was last found full.
    full_at: Option<Instant>,
}

impl PingRoom {
    /// For a connection made at `made` on an engine that pings every `interval`.
    pub fn new(made: Instant, interval: Duration) -> Self {
        Self {
            made,
            interval,
            before: (interval / 4).min(MAX_BEFORE),
            after: (interval / 20).min(MAX_AFTER),
            full_at: None,
        }
    }

    /// The buffer was found full at `now`.
    pub fn full(&mut self, now: Instant) {
        self.full_at = Some(now);
    }

    /// Whether the buffer was ever found full (else [`PingRoom::hold`] is false whatever the
    /// time).
    pub fn was_full(&self) -> bool {
        self.full_at.is_some()
    }

    /// Whether to emit nothing at `now`: a ping is due within `before` (or was due less than
    /// `after` ago) and the buffer was full within the last interval.
    pub fn hold(&self, now: Instant) -> bool {
        let Some(full_at) = self.full_at else {
            return false;
        };
        if now.saturating_duration_since(full_at) > self.interval || self.interval.is_zero() {
            return false;
        }
        let since = now.saturating_duration_since(self.made);
        let into = Duration::from_nanos((since.as_nanos() % self.interval.as_nanos()) as u64);
        // The first ping went out as the session opened, before anything was emitted.
        let past_first = since >= self.interval;
        into + self.before >= self.interval || (past_first && into < self.after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_buffer_never_full_is_never_held() {
        let t0 = Instant::now();
        let room = PingRoom::new(t0, 25 * S);
        for ms in (0..100_000).step_by(50) {
            assert!(!room.hold(t0 + Duration::from_millis(ms)));
        }
    }

    #[test]
    fn a_full_buffer_is_held_around_each_ping_only() {
        let t0 = Instant::now();
        let mut room = PingRoom::new(t0, 25 * S);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        room.full(at(1_000));
        assert!(
            !room.hold(at(1_000)),
            "the first ping went out at the opening"
        );
        assert!(!room.hold(at(22_900)));
        assert!(room.hold(at(23_000)), "2 s before the second ping");
        assert!(room.hold(at(24_999)));
        assert!(room.hold(at(25_100)), "a little after it");
        assert!(!room.hold(at(25_300)), "then free again");
        room.full(at(40_000));
        assert!(room.hold(at(48_500)), "before the third");
        assert!(!room.hold(at(50_300)));
        assert!(
            !room.hold(at(73_500)),
            "not full for more than an interval: no hold"
        );
    }

    #[test]
    fn a_short_interval_holds_a_quarter_before() {
        let t0 = Instant::now();
        let mut room = PingRoom::new(t0, S);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        room.full(at(600));
        assert!(!room.hold(at(700)));
        assert!(room.hold(at(750)));
        assert!(room.hold(at(1_049)));
        assert!(!room.hold(at(1_050)));
        assert!(!room.hold(at(1_500)));
        assert!(!room.hold(at(1_800)), "full more than an interval ago");
        room.full(at(1_500));
        assert!(room.hold(at(1_800)));
    }
}

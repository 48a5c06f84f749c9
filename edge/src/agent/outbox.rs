//! The agent's outbox bookkeeping as a state machine without I/O: which outbox rows are on
//! their way to the broker, which MQTT packet id carries which row, what to publish next
//! within the window, and which row a PUBACK lets the agent delete. The agent's loop
//! (`agent/mod.rs`) reads rows from the store, publishes through rumqttc and feeds what
//! happens here; this module only decides.
//!
//! The mapping of packet ids to rows rests on rumqttc announcing every QoS 1 publish it
//! writes as `Event::Outgoing(Outgoing::Publish(pkid))`, in the order the publishes were
//! submitted: each announcement takes the oldest submitted publish. A QoS 0 publish (the
//! heartbeat) is announced with packet id 0 and takes nothing.
//!
//! Rules this holds:
//! - at most `window` publishes are in flight (submitted or written, not yet acknowledged);
//! - a row is deleted only on the PUBACK of the packet that carried it, once: a PUBACK of an
//!   unknown packet id, or a second one, decides nothing;
//! - on a new connection (ConnAck) everything in flight becomes pending again and the rows
//!   are published again from the oldest, in row order (the agent drops rumqttc's own
//!   retransmission queue, so a broker that lost the session loses nothing). Until that
//!   ConnAck nothing is forgotten: rumqttc may still hand out events of the old connection,
//!   and a shutdown waits for what is in flight;
//! - a row offered again while it is in flight on this connection is not published twice.

use std::collections::{HashMap, VecDeque};

/// What the agent asks the store for: up to `limit` rows with ids above `after`, oldest
/// first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    /// Rows with ids above this one (every row already on its way on this connection has an
    /// id at most this).
    pub after: i64,
    /// Room left in the window.
    pub limit: usize,
}

/// What to do with a row the store offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Publish it, then report it with [`Outbox::published`].
    Publish,
    /// It is already on its way on this connection: skip it.
    InFlight,
    /// The window is full: stop offering.
    WindowFull,
}

/// A QoS 1 publish between its submission and its PUBACK: an outbox row, or a publish that
/// is not one (the retained online status), which only takes a place in the window.
type Carried = Option<i64>;

/// QoS 1 publishes on their way to a PUBACK.
#[derive(Debug)]
pub struct Outbox {
    /// Most publishes in flight at once (the broker's receive maximum, rumqttc's inflight).
    window: usize,
    /// Submitted to rumqttc, not yet written, oldest first.
    submitted: VecDeque<Carried>,
    /// Written with this packet id, waiting for its PUBACK.
    by_pkid: HashMap<u16, Carried>,
    /// Highest row id submitted on this connection (0: none yet).
    after: i64,
}

impl Outbox {
    /// An outbox with room for `window` publishes in flight (at least 1).
    #[must_use]
    pub fn new(window: usize) -> Self {
        Outbox {
            window: window.max(1),
            submitted: VecDeque::new(),
            by_pkid: HashMap::new(),
            after: 0,
        }
    }

    /// Publishes on their way (submitted or written, not yet acknowledged).
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.submitted.len() + self.by_pkid.len()
    }

    /// Which rows to read next; `None` when the window is full.
    #[must_use]
    pub fn want(&self) -> Option<Want> {
        let limit = self.window.saturating_sub(self.in_flight());
        (limit > 0).then_some(Want {
            after: self.after,
            limit,
        })
    }

    /// Whether to publish row `id` now (rows are offered in row order).
    #[must_use]
    pub fn offer(&self, id: i64) -> Offer {
        if id <= self.after {
            Offer::InFlight
        } else if self.in_flight() >= self.window {
            Offer::WindowFull
        } else {
            Offer::Publish
        }
    }

    /// Row `id` was submitted to the client (after [`Offer::Publish`]).
    pub fn published(&mut self, id: i64) {
        self.submitted.push_back(Some(id));
        self.after = self.after.max(id);
    }

    /// A QoS 1 publish that is not an outbox row was submitted: it takes a place in the
    /// window until its PUBACK.
    pub fn published_other(&mut self) {
        self.submitted.push_back(None);
    }

    /// The client wrote a publish with packet id `pkid` (`Outgoing::Publish`): the oldest
    /// submitted publish travels under it. Packet id 0 (QoS 0) carries nothing of ours.
    pub fn written(&mut self, pkid: u16) {
        if pkid == 0 {
            return;
        }
        if let Some(carried) = self.submitted.pop_front() {
            self.by_pkid.insert(pkid, carried);
        }
    }

    /// The broker acknowledged packet `pkid`: returns the row to delete now, if it carried
    /// one. An unknown packet id, or one acknowledged before, returns `None`.
    pub fn acked(&mut self, pkid: u16) -> Option<i64> {
        self.by_pkid.remove(&pkid).flatten()
    }

    /// A new connection (ConnAck): nothing is in flight any more; every row still in the
    /// store is pending again, from the oldest.
    pub fn connected(&mut self) {
        self.submitted.clear();
        self.by_pkid.clear();
        self.after = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows of `store` the outbox publishes now, in order, marked published.
    fn fill(o: &mut Outbox, store: &[i64]) -> Vec<i64> {
        let Some(want) = o.want() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for &id in store.iter().filter(|&&id| id > want.after).take(want.limit) {
            match o.offer(id) {
                Offer::Publish => {
                    o.published(id);
                    out.push(id);
                }
                Offer::InFlight => {}
                Offer::WindowFull => break,
            }
        }
        out
    }

    /// Writes every submitted publish with packet ids from `first` on.
    fn write_all(o: &mut Outbox, first: u16) -> Vec<u16> {
        let n = u16::try_from(o.submitted.len()).unwrap();
        let pkids: Vec<u16> = (first..first + n).collect();
        for &p in &pkids {
            o.written(p);
        }
        pkids
    }

    #[test]
    fn the_window_bounds_what_is_in_flight() {
        let mut o = Outbox::new(3);
        let store = [1, 2, 3, 4, 5, 6, 7];
        assert_eq!(o.want(), Some(Want { after: 0, limit: 3 }));
        assert_eq!(fill(&mut o, &store), [1, 2, 3]);
        assert_eq!(o.in_flight(), 3);
        assert_eq!(o.want(), None, "full");
        assert_eq!(o.offer(4), Offer::WindowFull);
        assert_eq!(fill(&mut o, &store), Vec::<i64>::new());
        write_all(&mut o, 1);
        assert_eq!(o.in_flight(), 3, "written is still in flight");
        assert_eq!(o.want(), None);
        assert_eq!(o.acked(2), Some(2));
        assert_eq!(o.want(), Some(Want { after: 3, limit: 1 }));
        assert_eq!(fill(&mut o, &store), [4]);
        assert_eq!(o.in_flight(), 3);
    }

    #[test]
    fn a_window_of_zero_is_one() {
        let mut o = Outbox::new(0);
        assert_eq!(fill(&mut o, &[1, 2]), [1]);
        assert_eq!(o.want(), None);
    }

    #[test]
    fn packet_ids_map_to_rows_in_the_order_publishes_were_submitted() {
        let mut o = Outbox::new(10);
        assert_eq!(fill(&mut o, &[4, 9, 12]), [4, 9, 12]);
        o.written(7);
        o.written(0); // a heartbeat (QoS 0) in between takes nothing
        o.written(8);
        o.written(9);
        // Acknowledged out of order.
        assert_eq!(o.acked(9), Some(12));
        assert_eq!(o.acked(7), Some(4));
        assert_eq!(o.acked(8), Some(9));
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn a_publish_that_is_not_a_row_takes_a_place_but_deletes_nothing() {
        let mut o = Outbox::new(2);
        o.published_other(); // the online status
        assert_eq!(fill(&mut o, &[1, 2, 3]), [1]);
        assert_eq!(o.want(), None);
        o.written(1);
        o.written(2);
        assert_eq!(o.acked(1), None, "the status carried no row");
        assert_eq!(o.acked(2), Some(1));
    }

    #[test]
    fn no_row_is_deleted_before_its_puback() {
        let mut o = Outbox::new(4);
        assert_eq!(fill(&mut o, &[1, 2]), [1, 2]);
        // Submitted, not written: no packet id yet, so no PUBACK can name them.
        for pkid in 0..=u16::MAX {
            assert_eq!(o.acked(pkid), None);
        }
        assert_eq!(o.in_flight(), 2);
        o.written(5);
        assert_eq!(o.acked(6), None, "row 2 is not written yet");
        assert_eq!(o.acked(5), Some(1));
        assert_eq!(o.in_flight(), 1);
    }

    #[test]
    fn a_puback_of_an_unknown_packet_id_is_ignored() {
        let mut o = Outbox::new(4);
        assert_eq!(fill(&mut o, &[1]), [1]);
        o.written(3);
        assert_eq!(o.acked(4), None);
        assert_eq!(o.acked(0), None);
        assert_eq!(o.in_flight(), 1);
        assert_eq!(o.acked(3), Some(1));
    }

    #[test]
    fn a_second_puback_is_harmless() {
        let mut o = Outbox::new(4);
        assert_eq!(fill(&mut o, &[1, 2]), [1, 2]);
        write_all(&mut o, 1);
        assert_eq!(o.acked(1), Some(1));
        assert_eq!(o.acked(1), None);
        assert_eq!(o.in_flight(), 1);
        assert_eq!(o.acked(2), Some(2));
        assert_eq!(o.acked(2), None);
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn a_row_offered_again_while_in_flight_is_not_published_twice() {
        let mut o = Outbox::new(4);
        assert_eq!(fill(&mut o, &[1, 2]), [1, 2]);
        assert_eq!(o.offer(1), Offer::InFlight);
        assert_eq!(o.offer(2), Offer::InFlight);
        assert_eq!(o.offer(3), Offer::Publish);
        // A row written by another process meanwhile (`follower run` by hand) comes next.
        assert_eq!(fill(&mut o, &[1, 2, 3]), [3]);
        assert_eq!(o.in_flight(), 3);
    }

    #[test]
    fn a_reconnect_sends_everything_unacknowledged_again_in_row_order() {
        let mut o = Outbox::new(3);
        let mut store = vec![1, 2, 3, 4, 5];
        assert_eq!(fill(&mut o, &store), [1, 2, 3]);
        o.written(1);
        o.written(2);
        assert_eq!(o.acked(2), Some(2));
        store.retain(|&id| id != 2);
        // The connection drops. Until the ConnAck nothing is forgotten (a shutdown waits).
        assert_eq!(o.in_flight(), 2);
        o.connected();
        assert_eq!(o.in_flight(), 0);
        assert_eq!(o.want(), Some(Want { after: 0, limit: 3 }));
        assert_eq!(fill(&mut o, &store), [1, 3, 4], "from the oldest, in order");
        // Packet ids start over on the new connection; a PUBACK of the old one's means
        // nothing now.
        assert_eq!(o.acked(1), None);
        write_all(&mut o, 1);
        assert_eq!(o.acked(1), Some(1));
        assert_eq!(o.acked(2), Some(3));
        assert_eq!(o.acked(3), Some(4));
        assert_eq!(fill(&mut o, &store), [5]);
    }

    #[test]
    fn every_row_is_deleted_once_and_only_after_its_puback_whatever_the_order() {
        // A small model check: rows 1..=20, window 4, PUBACKs in a scrambled order, a
        // reconnect in the middle, duplicate and unknown PUBACKs.
        let mut o = Outbox::new(4);
        let mut store: Vec<i64> = (1..=20).collect();
        let mut deleted = Vec::new();
        let mut written: Vec<u16> = Vec::new();
        for round in 0..200 {
            fill(&mut o, &store);
            while !o.submitted.is_empty() {
                // As rumqttc does: the lowest packet id not waiting for its PUBACK.
                let p = (1..).find(|p| !written.contains(p)).unwrap();
                o.written(p);
                written.push(p);
            }
            if round == 7 {
                o.connected();
                written.clear();
                continue;
            }
            // Acknowledge the second-newest written packet (the only one when one is left),
            // then the same one again.
            let i = written.len().saturating_sub(2);
            if i < written.len() {
                let p = written.remove(i);
                if let Some(id) = o.acked(p) {
                    assert!(store.contains(&id), "row {id} deleted twice");
                    store.retain(|&r| r != id);
                    deleted.push(id);
                }
                assert_eq!(o.acked(p), None);
            }
            assert!(o.in_flight() <= 4);
            if store.is_empty() {
                break;
            }
        }
        deleted.sort_unstable();
        assert_eq!(deleted, (1..=20).collect::<Vec<_>>());
    }
}

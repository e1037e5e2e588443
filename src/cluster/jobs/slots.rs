//! This agent's job slots (`job_concurrency` of them) and who gets the next one given back:
//! the runs waiting here for one (jobs inserted `running` here while every slot was taken, as
//! in a single node's queue), in order — or the claim loop, when it found every slot taken
//! while queued records may be left in the cluster's queue: the two take turns, so that
//! neither starves the other. Also the places of those waiting runs (at most `job_backlog`).
//!
//! No I/O: the [`super::Scheduler`] decides when to take, wait for and give back a slot; this
//! keeps the count and the hand-overs consistent (every hand-over and every wait under one
//! lock), and is unit-tested below.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::{oneshot, Notify};

/// The slots and the waiting places of one agent.
pub(super) struct Slots {
    /// `job_concurrency`.
    capacity: usize,
    /// Slots taken (by runs, by inserts about to run, by the claim loop's claims, and the one
    /// granted to the claim loop, see [`Turns::granted`]).
    taken: AtomicUsize,
    /// A slot went back to the pool, or was granted to the claim loop: it may claim.
    freed: Notify,
    /// Who gets the next slot given back. Every hand-over and every wait goes under this lock.
    turns: Mutex<Turns>,
    /// `job_backlog`: the places for runs waiting here.
    places: usize,
    /// Places taken.
    waiting: AtomicUsize,
}

/// Who gets the next slot given back ([`Slots::turns`]).
#[derive(Default)]
struct Turns {
    /// The runs waiting here for a slot, in order.
    waiters: VecDeque<oneshot::Sender<()>>,
    /// The claim loop found every slot taken while queued records may be left: it waits for
    /// a slot too.
    claim_waits: bool,
    /// A slot granted to the claim loop, taken for it until it claims with it or gives it back
    /// ([`Slots::reserve_for_claim`]).
    granted: bool,
    /// The last slot given back was granted to the claim loop: the next one goes to a run
    /// waiting here, if any (the two take turns).
    granted_last: bool,
}

/// How a run gets its slot ([`Slots::slot_or_wait`]).
pub(super) enum SlotWait {
    /// Taken already.
    Now,
    /// When a slot is given back (handed over by [`Slots::give_back`]).
    Later(oneshot::Receiver<()>),
    /// Never: the agent stops.
    Never,
}

impl Slots {
    /// `capacity` slots and `places` places to wait here.
    pub(super) fn new(capacity: usize, places: usize) -> Slots {
        Slots {
            capacity,
            taken: AtomicUsize::new(0),
            freed: Notify::new(),
            turns: Mutex::default(),
            places,
            waiting: AtomicUsize::new(0),
        }
    }

    /// Take a free slot; `false` when every one is taken.
    pub(super) fn reserve(&self) -> bool {
        take_one_below(&self.taken, self.capacity)
    }

    /// The claim loop's slot for its next claim: the one granted to it, else a free one;
    /// `false` when every slot is taken — the claim loop then waits for one, in turns with the
    /// runs waiting here ([`Slots::give_back`]).
    pub(super) fn reserve_for_claim(&self) -> bool {
        let mut turns = self.lock_turns();
        if std::mem::take(&mut turns.granted) || self.reserve() {
            return true;
        }
        turns.claim_waits = true;
        false
    }

    /// The claim loop stops: a slot granted to it, or its wait for one, goes back to the
    /// others.
    pub(super) fn claim_loop_stops(&self) {
        let mut turns = self.lock_turns();
        turns.claim_waits = false;
        let granted = std::mem::take(&mut turns.granted);
        drop(turns);
        if granted {
            self.give_back();
        }
    }

    /// Wait until a slot went back to the pool or was granted to the claim loop.
    pub(super) async fn freed(&self) {
        self.freed.notified().await;
    }

    /// Give a slot back: to the claim loop when it waits for one and it is its turn (granted,
    /// the slot stays taken), else to the first run still waiting here, else to the claim loop
    /// if it waits, else to the pool. The claim loop and the runs waiting here take turns:
    /// after a grant, the next slot goes to a waiting run if there is one. The claim loop is
    /// woken unless a waiting run took the slot.
    pub(super) fn give_back(&self) {
        if self.hand_over() {
            self.freed.notify_one();
        }
    }

    /// The claim loop gives back the slot of a claim that found nothing: as
    /// [`Slots::give_back`], without waking the claim loop itself (a busy loop).
    pub(super) fn unreserve(&self) {
        self.hand_over();
    }

    /// Give a slot back (see [`Slots::give_back`]); `true` unless a waiting run took it.
    fn hand_over(&self) -> bool {
        let mut turns = self.lock_turns();
        let a_run_waits = turns.waiters.iter().any(|w| !w.is_closed());
        if turns.claim_waits && !(turns.granted_last && a_run_waits) {
            turns.claim_waits = false;
            turns.granted = true;
            turns.granted_last = true;
            return true;
        }
        while let Some(next) = turns.waiters.pop_front() {
            if next.send(()).is_ok() {
                turns.granted_last = false;
                return false;
            }
        }
        self.taken.fetch_sub(1, Ordering::SeqCst);
        true
    }

    /// A slot for a run that may wait here: taken now, or the wait for the next one given back;
    /// [`SlotWait::Never`] when `stopping` says so (asked under the lock, so that a wait begun
    /// before the agent stops is ended by [`Slots::drop_waiters`]).
    pub(super) fn slot_or_wait(&self, stopping: impl Fn() -> bool) -> SlotWait {
        let mut turns = self.lock_turns();
        if stopping() {
            return SlotWait::Never;
        }
        if self.reserve() {
            return SlotWait::Now;
        }
        let (tx, rx) = oneshot::channel();
        turns.waiters.push_back(tx);
        SlotWait::Later(rx)
    }

    /// A run's wait for a slot is over without one (`rx` its wait): `true` when the slot was
    /// handed over meanwhile (it is the run's); else nothing is handed to it any more (dropped
    /// under the lock, which every hand-over holds).
    pub(super) fn stop_waiting(&self, mut rx: oneshot::Receiver<()>) -> bool {
        let _turns = self.lock_turns();
        let handed = rx.try_recv().is_ok();
        drop(rx);
        handed
    }

    /// End every run's wait for a slot (each gets none).
    pub(super) fn drop_waiters(&self) {
        let dropped = std::mem::take(&mut self.lock_turns().waiters);
        drop(dropped);
    }

    /// Slots taken now.
    pub(super) fn taken(&self) -> usize {
        self.taken.load(Ordering::SeqCst)
    }

    /// Take one of the places to wait here; `false` when all are taken.
    pub(super) fn take_place(&self) -> bool {
        take_one_below(&self.waiting, self.places)
    }

    /// Give back a place [`Slots::take_place`] took.
    pub(super) fn leave_place(&self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// Places taken now.
    pub(super) fn places_taken(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    fn lock_turns(&self) -> MutexGuard<'_, Turns> {
        self.turns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Add one to `counter` if it is below `limit`.
fn take_one_below(counter: &AtomicUsize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(s: &Slots) -> oneshot::Receiver<()> {
        match s.slot_or_wait(|| false) {
            SlotWait::Later(rx) => rx,
            SlotWait::Now => panic!("a slot was free"),
            SlotWait::Never => panic!("stopping"),
        }
    }

    /// Whether the claim loop was woken (a permit is stored).
    fn woken(s: &Slots) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(1), s.freed())
                .await
                .is_ok()
        })
    }

    #[test]
    fn slots_given_back_go_to_the_waiting_runs_in_order_then_to_the_pool() {
        let s = Slots::new(1, 4);
        assert!(s.reserve());
        assert!(!s.reserve());
        let (mut a, mut b) = (waiting(&s), waiting(&s));
        s.give_back();
        assert_eq!(a.try_recv(), Ok(()));
        assert!(b.try_recv().is_err());
        assert_eq!(s.taken(), 1);
        assert!(!woken(&s), "a slot handed to a waiting run wakes no claim");
        s.give_back();
        assert_eq!(b.try_recv(), Ok(()));
        assert_eq!(s.taken(), 1);
        s.give_back();
        assert_eq!(s.taken(), 0);
        assert!(woken(&s));
    }

    #[test]
    fn the_claim_loop_and_the_waiting_runs_take_turns() {
        let s = Slots::new(1, 4);
        assert!(s.reserve());
        let (mut first, mut second) = (waiting(&s), waiting(&s));
        // The claim loop finds every slot taken (queued records may be left).
        assert!(!s.reserve_for_claim());
        s.give_back();
        assert!(first.try_recv().is_err(), "the claim loop's turn");
        assert_eq!(
            s.taken(),
            1,
            "granted to the claim loop, the slot stays taken"
        );
        assert!(woken(&s));
        // A new request finds no free slot meanwhile: the granted one is not in the pool.
        assert!(!s.reserve());
        assert!(s.reserve_for_claim());
        assert_eq!(s.taken(), 1);
        // Its claim found a job: the loop at once asks for the next slot, as it does.
        assert!(!s.reserve_for_claim());
        // The claimed run ends: a waiting run's turn.
        s.give_back();
        assert_eq!(first.try_recv(), Ok(()));
        assert!(!woken(&s), "a slot handed to a waiting run wakes no claim");
        // Then the claim loop's again, then the next waiting run's.
        s.give_back();
        assert!(second.try_recv().is_err());
        assert!(s.reserve_for_claim());
        assert!(!s.reserve_for_claim());
        s.give_back();
        assert_eq!(second.try_recv(), Ok(()));
        // Nobody waits here any more: the claim loop gets the next one, then the pool.
        s.give_back();
        assert!(s.reserve_for_claim());
        s.give_back();
        assert_eq!(s.taken(), 0);
    }

    #[test]
    fn a_waiting_run_gone_is_not_a_turn() {
        let s = Slots::new(1, 4);
        assert!(s.reserve());
        let gone = waiting(&s);
        assert!(!s.reserve_for_claim());
        s.give_back();
        assert!(s.reserve_for_claim());
        assert!(!s.reserve_for_claim());
        // The waiting run timed out: the claim loop need not wait for its turn.
        assert!(!s.stop_waiting(gone));
        s.give_back();
        assert!(s.reserve_for_claim());
        assert_eq!(s.taken(), 1);
    }

    #[test]
    fn a_claim_that_found_nothing_wakes_no_claim() {
        let s = Slots::new(1, 4);
        assert!(s.reserve_for_claim());
        s.unreserve();
        assert_eq!(s.taken(), 0);
        assert!(!woken(&s));
        assert!(s.reserve_for_claim());
        let mut w = waiting(&s);
        s.unreserve();
        assert_eq!(w.try_recv(), Ok(()));
    }

    #[test]
    fn a_claim_loop_that_stops_gives_its_turn_and_its_slot_back() {
        let s = Slots::new(1, 4);
        assert!(s.reserve());
        assert!(!s.reserve_for_claim());
        s.give_back();
        assert_eq!(s.taken(), 1);
        s.claim_loop_stops();
        assert_eq!(s.taken(), 0);
        // Its turn is gone too: the next slot goes to a waiting run.
        assert!(s.reserve());
        assert!(!s.reserve_for_claim());
        s.claim_loop_stops();
        let mut w = waiting(&s);
        s.give_back();
        assert_eq!(w.try_recv(), Ok(()));
    }

    #[test]
    fn a_run_that_stopped_waiting_takes_no_slot() {
        let s = Slots::new(1, 4);
        assert!(s.reserve());
        let (gone, mut next) = (waiting(&s), waiting(&s));
        assert!(!s.stop_waiting(gone));
        s.give_back();
        assert_eq!(next.try_recv(), Ok(()), "the slot skips the run gone");
        let late = waiting(&s);
        s.give_back();
        // Handed over before the wait ended: the slot is the run's.
        assert!(s.stop_waiting(late));
        assert_eq!(s.taken(), 1);
    }

    #[test]
    fn a_stopping_agent_ends_every_wait() {
        let s = Slots::new(1, 4);
        assert!(s.reserve());
        let mut w = waiting(&s);
        s.drop_waiters();
        assert!(matches!(
            w.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(s.slot_or_wait(|| true), SlotWait::Never));
        s.give_back();
        assert_eq!(s.taken(), 0);
        assert!(matches!(s.slot_or_wait(|| false), SlotWait::Now));
    }

    #[test]
    fn places_are_at_most_the_backlog() {
        let s = Slots::new(2, 2);
        assert!(s.take_place());
        assert!(s.take_place());
        assert!(!s.take_place());
        s.leave_place();
        assert_eq!(s.places_taken(), 1);
        assert!(s.take_place());
    }
}

//! Finding the items AWS refuses when it refuses a whole request for them: PutMetricData and
//! PutLogEvents judge a request, not an item, so one bad datum makes AWS refuse the 999 good ones
//! sent with it. A refused group is halved and each half sent again, down to single items; an
//! item refused alone is proven bad (the caller drops and counts it) and every other item goes.
//!
//! Rules, which bound what one flush costs:
//! - Every call on a part of a refused group is an extra call. A flush makes at most `budget`
//!   of them (`budget_for`: 2 * ceil(log2 n) + 4 for the largest request of n items, enough to
//!   single out one bad item in a full request, and a few more).
//! - Parts left untried when the budget is spent are held: they stay in the queue, unjudged and
//!   in order, for the next flush, which starts with them and a fresh budget. They are its
//!   suspects: no request mixes them with newer items, so a pile of refused items at the front
//!   never holds back the valid items recorded after it.
//! - After the budget is spent, a fresh request that AWS refuses is held whole and the flush
//!   stops sending: a refusal of everything (a systematic one) costs at most `budget` + 1
//!   refused calls per flush, and requests that AWS accepts still go until then.
//!
//! Pure: lengths and verdicts in, lengths out. The caller keeps the queue: it sends the `next`
//! group from position `held()`, removes it when AWS accepts it, and removes the one item at
//! `held()` when `refused` says `Bad`.

/// What a refusal means for the group just sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A single item refused alone: proven bad. The caller drops (and counts) the item at
    /// `held()`.
    Bad,
    /// Halved: both halves are tried next (within the budget).
    Split,
    /// Kept unjudged, in the queue, for the next flush.
    Held,
}

/// One flush's search.
#[derive(Debug, Clone)]
pub struct Bisect {
    /// Items at the front of the queue kept for the next flush.
    held: usize,
    /// Lengths of the untried parts of refused groups, contiguous from `held`; the last is next.
    parts: Vec<usize>,
    /// Extra calls left.
    budget: u32,
    /// The group in flight: its length and whether it is a part (an extra call).
    current: Option<(usize, bool)>,
    stopped: bool,
    /// Items at the front held by the last flush and not yet judged (a request never spans
    /// this boundary).
    suspects: usize,
}

/// The extra calls a flush may make when its largest request holds `n` items.
pub fn budget_for(n: usize) -> u32 {
    2 * n.max(1).next_power_of_two().trailing_zeros() + 4
}

impl Bisect {
    /// A flush with `budget` extra calls, whose queue starts with the `suspects` items the last
    /// flush held.
    pub fn new(budget: u32, suspects: usize) -> Bisect {
        Bisect {
            held: 0,
            parts: Vec::new(),
            budget,
            current: None,
            stopped: false,
            suspects,
        }
    }

    /// Where the next group starts in the queue: the items before it are held (at the end of
    /// the flush, the next flush's suspects).
    pub fn held(&self) -> usize {
        self.held
    }

    /// The group in flight left the queue (`n` items at `held`).
    fn removed(&mut self, n: usize) {
        if self.held < self.suspects {
            self.suspects -= n.min(self.suspects - self.held);
        }
    }

    /// The length of the next group to send from `held()`, or `None` when this flush sends no
    /// more. `fresh(start)` is how many untried items from `start` make one request (0 when
    /// there are none).
    pub fn next(&mut self, fresh: impl FnOnce(usize) -> usize) -> Option<usize> {
        if self.stopped {
            return None;
        }
        while let Some(len) = self.parts.pop() {
            if self.budget > 0 {
                self.budget -= 1;
                self.current = Some((len, true));
                return Some(len);
            }
            self.held += len;
        }
        if self.budget == 0 && self.held < self.suspects {
            // The budget is spent on the suspects: the rest of them wait for the next flush
            // unsent, and the items recorded after them go now.
            self.held = self.suspects;
        }
        let mut n = fresh(self.held);
        if self.held < self.suspects {
            n = n.min(self.suspects - self.held);
        }
        if n == 0 {
            return None;
        }
        self.current = Some((n, false));
        Some(n)
    }

    /// AWS accepted the group; the caller removed it from the queue.
    pub fn accepted(&mut self) {
        if let Some((len, _)) = self.current.take() {
            self.removed(len);
        }
    }

    /// The group could not be judged (e.g. the log stream had to be created again): it is sent
    /// again next, at no cost.
    pub fn again(&mut self) {
        if let Some((len, part)) = self.current.take() {
            if part {
                self.budget += 1;
            }
            self.parts.push(len);
        }
    }

    /// AWS refused the group as a whole (a validation error it would repeat).
    pub fn refused(&mut self) -> Verdict {
        let Some((len, part)) = self.current.take() else {
            return Verdict::Held;
        };
        if len <= 1 {
            self.removed(1);
            return Verdict::Bad;
        }
        if self.budget == 0 {
            self.held += len;
            self.stopped |= !part;
            return Verdict::Held;
        }
        let first = len / 2;
        self.parts.push(len - first);
        self.parts.push(first);
        Verdict::Split
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs one flush over `queue` (true = an item AWS refuses) against a fake AWS that refuses
    /// any group holding a bad item, `per_request` items a request. Returns the calls made, the
    /// items dropped as bad, and the queue left (held items) for the next flush.
    fn flush(
        queue: &mut Vec<bool>,
        per_request: usize,
        suspects: &mut usize,
    ) -> (u32, Vec<bool>, usize) {
        let mut b = Bisect::new(budget_for(per_request), *suspects);
        let (mut calls, mut dropped) = (0, Vec::new());
        let mut delivered = 0;
        while let Some(n) = b.next(|start| (queue.len() - start).min(per_request)) {
            calls += 1;
            let at = b.held();
            if queue[at..at + n].iter().any(|bad| *bad) {
                if b.refused() == Verdict::Bad {
                    dropped.push(queue.remove(at));
                }
            } else {
                queue.drain(at..at + n);
                delivered += n;
                b.accepted();
            }
        }
        *suspects = b.held();
        (calls, dropped, delivered)
    }

    #[test]
    fn the_budget_grows_with_the_log_of_the_request() {
        assert_eq!(budget_for(1), 4);
        assert_eq!(budget_for(2), 6);
        assert_eq!(budget_for(1000), 24);
        assert_eq!(budget_for(10_000), 32);
    }

    #[test]
    fn one_bad_item_in_a_full_request_is_found_in_one_flush() {
        let mut q = vec![false; 1000];
        q[637] = true;
        let (calls, dropped, delivered) = flush(&mut q, 1000, &mut 0);
        assert_eq!((dropped.len(), delivered), (1, 999));
        assert!(q.is_empty());
        assert!(calls <= 1 + budget_for(1000), "{calls} calls");
    }

    #[test]
    fn a_request_refused_for_everything_costs_a_bounded_flush_and_nothing_valid_is_lost() {
        // 1000 items AWS refuses, then 2500 good ones: the halving used to cost ~11 calls per
        // bad item (about 11,000 calls in the flush).
        let mut q = vec![true; 1000];
        q.extend(vec![false; 2500]);
        let mut flushes = 0;
        let mut good = 0;
        let mut bad = 0;
        let mut suspects = 0;
        while !q.is_empty() {
            flushes += 1;
            // Each flush records 8 more good items: they go in that same flush.
            q.extend([false; 8]);
            let requests = q.len().div_ceil(1000) as u32 + 1;
            let (calls, dropped, delivered) = flush(&mut q, 1000, &mut suspects);
            assert!(
                q.iter().all(|bad| *bad),
                "flush {flushes}: a good item held back"
            );
            // A request per 1000 items queued, plus the budget, plus the one refused request
            // that stops the flush.
            assert!(
                calls <= requests + budget_for(1000) + 1,
                "flush {flushes}: {calls} calls"
            );
            good += delivered;
            bad += dropped.len();
            assert!(dropped.iter().all(|b| *b), "a good item was dropped");
            assert!(flushes < 1000);
        }
        assert_eq!((good, bad), (2500 + 8 * flushes, 1000));
        eprintln!("1000 refused items judged in {flushes} flushes");
    }

    #[test]
    fn a_pile_of_refused_items_larger_than_a_request_holds_back_newer_items_two_flushes_at_most() {
        // 3000 items AWS refuses at the front: each flush judges some with its budget, takes one
        // more refused request into the suspects and stops; once every refused item is a
        // suspect, the suspects left after the budget wait unsent and newer items go.
        let mut q = vec![true; 3000];
        let mut suspects = 0;
        let mut first_good = None;
        for flush_no in 1..=400 {
            q.extend([false; 8]);
            let (_, dropped, delivered) = flush(&mut q, 1000, &mut suspects);
            assert!(dropped.iter().all(|b| *b), "a good item was dropped");
            if delivered > 0 && first_good.is_none() {
                first_good = Some(flush_no);
            }
            if first_good.is_some() {
                assert_eq!(
                    q.iter().filter(|b| !**b).count(),
                    0,
                    "flush {flush_no}: good items held back behind the suspects"
                );
            }
            if q.is_empty() {
                break;
            }
        }
        assert!(
            first_good.is_some_and(|f| f <= 3),
            "first good item in flush {first_good:?}"
        );
        assert!(q.is_empty(), "{} items never judged", q.len());
    }

    #[test]
    fn a_refusal_after_the_budget_holds_the_group_and_stops_the_flush() {
        let mut b = Bisect::new(0, 0);
        assert_eq!(b.next(|_| 10), Some(10));
        assert_eq!(b.refused(), Verdict::Held);
        assert_eq!(b.held(), 10);
        assert_eq!(b.next(|_| 10), None);
        // A single item refused alone is bad whatever the budget.
        let mut b = Bisect::new(0, 0);
        assert_eq!(b.next(|_| 1), Some(1));
        assert_eq!(b.refused(), Verdict::Bad);
        assert_eq!(b.next(|_| 0), None);
    }

    #[test]
    fn a_group_sent_again_costs_nothing() {
        let mut b = Bisect::new(1, 0);
        assert_eq!(b.next(|_| 8), Some(8));
        assert_eq!(b.refused(), Verdict::Split);
        assert_eq!(b.next(|_| unreachable!()), Some(4));
        b.again();
        assert_eq!(b.next(|_| unreachable!()), Some(4));
        b.accepted();
        // The budget is spent: the other half is held, then fresh items go.
        assert_eq!(b.next(|start| if start == 4 { 3 } else { 0 }), Some(3));
        assert_eq!(b.held(), 4);
    }

    #[test]
    fn no_request_mixes_the_last_flush_s_suspects_with_newer_items() {
        let mut b = Bisect::new(4, 5);
        assert_eq!(b.next(|start| 100 - start), Some(5));
        assert_eq!(b.refused(), Verdict::Split);
        assert_eq!(b.next(|_| unreachable!()), Some(2));
        b.accepted();
        assert_eq!(b.next(|_| unreachable!()), Some(3));
        assert_eq!(b.refused(), Verdict::Split);
        assert_eq!(b.next(|_| unreachable!()), Some(1));
        assert_eq!(b.refused(), Verdict::Bad);
        // Queue: 2 suspects left, then the 95 newer items.
        assert_eq!(b.next(|_| unreachable!()), Some(2));
        b.accepted();
        assert_eq!(b.next(|start| 95 - start), Some(95));
    }
}

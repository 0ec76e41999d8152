//! Fair turns across tasks: the executor's run queue.
//!
//! Delivered events wait in a queue per task. A task with events waiting is *ready* and stands once in a
//! FIFO line; a worker takes the first ready task together with **all** its waiting events (coalesced
//! into one turn) and the task is *busy* until its turn ends. Events that arrive for a busy task wait for
//! its next turn, which it gets at the back of the line. So a task with a backlog of thousands of events
//! costs one turn, never holds more than one worker, and cannot make another task wait longer than one
//! turn of each task ahead of it.

use std::collections::{HashMap, HashSet, VecDeque};

use taskpods_events::TaskId;

/// The waiting items of every task, and the line of ready tasks.
#[derive(Debug)]
pub struct Turns<T> {
    waiting: HashMap<TaskId, Vec<T>>,
    busy: HashSet<TaskId>,
    ready: VecDeque<TaskId>,
}

impl<T> Default for Turns<T> {
    fn default() -> Self {
        Self {
            waiting: HashMap::new(),
            busy: HashSet::new(),
            ready: VecDeque::new(),
        }
    }
}

impl<T> Turns<T> {
    /// Queues `item` for `task`. Returns whether the task joined the line (it was neither waiting nor
    /// busy), i.e. whether a worker may now have something to take.
    pub fn push(&mut self, task: TaskId, item: T) -> bool {
        let queued = self.busy.contains(&task) || self.waiting.contains_key(&task);
        self.waiting.entry(task).or_default().push(item);
        if !queued {
            self.ready.push_back(task);
        }
        !queued
    }

    /// The first ready task with every item it has waiting; the task is busy until [`Self::done`].
    pub fn take_turn(&mut self) -> Option<(TaskId, Vec<T>)> {
        let task = self.ready.pop_front()?;
        let items = self.waiting.remove(&task).unwrap_or_default();
        self.busy.insert(task);
        Some((task, items))
    }

    /// Tasks with items waiting or a turn in progress.
    pub fn tasks(&self) -> usize {
        self.waiting.len()
            + self
                .busy
                .iter()
                .filter(|t| !self.waiting.contains_key(t))
                .count()
    }

    /// Ends `task`'s turn. Returns whether it joined the line again (items arrived during the turn).
    pub fn done(&mut self, task: TaskId) -> bool {
        self.busy.remove(&task);
        let again = self.waiting.contains_key(&task);
        if again {
            self.ready.push_back(task);
        }
        again
    }

    /// Tasks with items waiting or a turn in progress.
    pub fn len(&self) -> usize {
        self.busy.len() + self.ready.len()
    }

    /// Whether no task has items waiting or a turn in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_is_one_turn_and_never_delays_another_task_by_more_than_that() {
        let (flood, quiet) = (TaskId::mint(), TaskId::mint());
        let mut turns = Turns::default();
        assert!(turns.push(flood, 0));
        for i in 1..10_000 {
            assert!(!turns.push(flood, i), "a waiting task stands in line once");
        }
        assert!(turns.push(quiet, 0));
        // The flood's whole backlog is one turn.
        let (task, items) = turns.take_turn().expect("a ready task");
        assert_eq!((task, items.len()), (flood, 10_000));
        // More events for the busy flood wait for its next turn, behind the quiet task.
        for i in 0..500 {
            assert!(!turns.push(flood, i));
        }
        let (task, items) = turns.take_turn().expect("the quiet task");
        assert_eq!((task, items), (quiet, vec![0]));
        assert!(
            turns.take_turn().is_none(),
            "the busy flood is not taken twice"
        );
        assert!(turns.done(flood), "the flood joins the line again");
        assert!(!turns.done(quiet));
        let (task, items) = turns.take_turn().expect("the flood again");
        assert_eq!((task, items.len()), (flood, 500));
        assert!(!turns.done(flood));
        assert!(turns.is_empty(), "nothing is kept once every turn ended");
        assert!(turns.waiting.is_empty() && turns.busy.is_empty());
    }
}

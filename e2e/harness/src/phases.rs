//! How long each phase of a test's flow took, printed for the report:
//! figures, never assertions.

use std::cell::Cell;
use std::time::Instant;

/// A flow's clock: [`Phases::done`] prints the time since the previous
/// phase and since the start.
pub struct Phases {
    label: &'static str,
    started: Instant,
    last: Cell<Instant>,
}

impl Phases {
    /// Starts the clock; `label` starts every line it prints.
    pub fn start(label: &'static str) -> Self {
        let now = Instant::now();
        Phases {
            label,
            started: now,
            last: Cell::new(now),
        }
    }

    /// Prints that `what` is done, with the times.
    pub fn done(&self, what: &str) {
        let now = Instant::now();
        eprintln!(
            "{}: {what}: +{:.1} s ({:.1} s since the start)",
            self.label,
            (now - self.last.get()).as_secs_f64(),
            (now - self.started).as_secs_f64()
        );
        self.last.set(now);
    }
}

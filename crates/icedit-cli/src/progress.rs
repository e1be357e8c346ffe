//! What the user sees while a job runs: notes, warnings, and a progress bar over the steps.
//! `--quiet` silences all but warnings and errors.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use icedit_pipeline::Progress;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Reporter {
    quiet: bool,
    start: Instant,
    bar: RefCell<Option<ProgressBar>>,
}

impl Reporter {
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            start: Instant::now(),
            bar: RefCell::new(None),
        }
    }

    pub fn note(&self, message: &str) {
        if !self.quiet {
            self.print(&format!("note: {message}"));
        }
    }

    pub fn warn(&self, message: &str) {
        self.print(&format!("warning: {message}"));
    }

    pub fn done(&self, message: &str) {
        if let Some(bar) = self.bar.borrow_mut().take() {
            bar.finish_and_clear();
        }
        if !self.quiet {
            eprintln!("{} {message}", self.clock());
        }
    }

    /// Time since start, so that slow phases show.
    fn clock(&self) -> String {
        format!("[{:6.1}s]", self.start.elapsed().as_secs_f64())
    }

    /// Prints above the bar when one is showing.
    fn print(&self, line: &str) {
        match self.bar.borrow().as_ref() {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// The pipeline's progress callback.
    pub fn callback(&self) -> impl FnMut(Progress) + '_ {
        move |event| {
            if self.quiet {
                return;
            }
            match event {
                Progress::Loading(what) => {
                    self.print(&format!("{} loading {what}...", self.clock()))
                }
                Progress::Step { done, total } => {
                    let mut slot = self.bar.borrow_mut();
                    let bar = slot.get_or_insert_with(|| {
                        let bar = ProgressBar::new(total as u64);
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{prefix} [{bar:30}] {pos}/{len} steps, {elapsed} elapsed, ~{eta} left ({per_sec})",
                            )
                            .expect("a valid template")
                            .progress_chars("=> "),
                        );
                        bar.set_prefix("denoising");
                        bar.enable_steady_tick(Duration::from_millis(250));
                        bar
                    });
                    bar.set_position(done as u64);
                    if done == total {
                        bar.finish();
                    }
                }
                Progress::Decoding => {
                    if let Some(bar) = self.bar.borrow_mut().take() {
                        bar.finish();
                    }
                    eprintln!("{} decoding...", self.clock());
                }
            }
        }
    }
}

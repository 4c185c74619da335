//! Progress display: a bar on a terminal, nothing when quiet or when
//! output is for scripts.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use vfs_core::backup::Progress;

pub struct ProgressDisplay {
    bar: Option<ProgressBar>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProgressDisplay {
    /// Starts drawing `progress` on stderr if it is a terminal and `show`.
    pub fn start(progress: Arc<Progress>, verb: &'static str, show: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if !show || !std::io::stderr().is_terminal() {
            return ProgressDisplay {
                bar: None,
                stop,
                thread: None,
            };
        }
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {wide_msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(verb);
        let flag = stop.clone();
        let drawn = bar.clone();
        let thread = std::thread::spawn(move || {
            let bar = drawn;
            while !flag.load(Ordering::Relaxed) {
                bar.set_length(progress.total_bytes.load(Ordering::Relaxed));
                bar.set_position(progress.read_bytes.load(Ordering::Relaxed));
                bar.set_message(progress.current.lock().clone());
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        ProgressDisplay {
            bar: Some(bar),
            stop,
            thread: Some(thread),
        }
    }

    /// Prints a line on stdout without tearing the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }
}

impl Drop for ProgressDisplay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

//! Stop requests from the user or the system, for commands that run until
//! stopped (`mount`, `copy`, `devices`, `export`): SIGINT and SIGTERM on
//! Unix; Ctrl-C and Ctrl-Break on Windows, the console's counterparts
//! (Windows has no signals to send a process).
//!
//! [`Interrupts::wait`] blocks a watcher thread until the first request;
//! [`InterruptHandle::close`] ends that wait from elsewhere when the
//! command finished by itself.

use std::io;

/// Stop requests waited for on one thread.
pub struct Interrupts {
    #[cfg(unix)]
    signals: signal_hook::iterator::Signals,
    #[cfg(not(unix))]
    runtime: tokio::runtime::Runtime,
    #[cfg(not(unix))]
    closed: std::sync::Arc<tokio::sync::Notify>,
}

/// Ends an [`Interrupts::wait`] from another thread.
pub struct InterruptHandle {
    #[cfg(unix)]
    handle: signal_hook::iterator::Handle,
    #[cfg(not(unix))]
    closed: std::sync::Arc<tokio::sync::Notify>,
}

impl InterruptHandle {
    pub fn close(&self) {
        #[cfg(unix)]
        self.handle.close();
        #[cfg(not(unix))]
        self.closed.notify_one();
    }
}

impl Interrupts {
    /// Starts listening, so a request from now on is not missed.
    pub fn new() -> io::Result<Interrupts> {
        #[cfg(unix)]
        {
            let signals = signal_hook::iterator::Signals::new([
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
            ])?;
            Ok(Interrupts { signals })
        }
        #[cfg(not(unix))]
        {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(Interrupts {
                runtime,
                closed: std::sync::Arc::new(tokio::sync::Notify::new()),
            })
        }
    }

    pub fn handle(&self) -> InterruptHandle {
        InterruptHandle {
            #[cfg(unix)]
            handle: self.signals.handle(),
            #[cfg(not(unix))]
            closed: self.closed.clone(),
        }
    }

    /// Blocks until the first stop request and names it (the signal
    /// number on Unix); `None` once the handle closed the wait.
    pub fn wait(self) -> Option<String> {
        #[cfg(unix)]
        {
            let mut signals = self.signals;
            signals.forever().next().map(|sig| sig.to_string())
        }
        #[cfg(not(unix))]
        {
            let closed = self.closed.clone();
            self.runtime.block_on(async move {
                let Ok(mut brk) = tokio::signal::windows::ctrl_break() else {
                    return None;
                };
                tokio::select! {
                    r = tokio::signal::ctrl_c() => r.ok().map(|()| "Ctrl-C".to_string()),
                    r = brk.recv() => r.map(|()| "Ctrl-Break".to_string()),
                    () = closed.notified() => None,
                }
            })
        }
    }
}

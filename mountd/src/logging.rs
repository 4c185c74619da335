//! Where log events go: every library logs through `tracing`; the binary
//! installs one subscriber that writes them to stderr, as human lines
//! (`flr: message`) or, for the daemon with `--log-json`, as one JSON object
//! per line for a log collector.
//!
//! A failed write is dropped, never a panic: a background mount's stderr
//! may be a pipe whose reader has gone.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Human lines: `PREFIX: [warning: ]message field=value ...`.
struct HumanFormat {
    prefix: &'static str,
}

impl<S, N> FormatEvent<S, N> for HumanFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "{}: ", self.prefix)?;
        if *event.metadata().level() == Level::WARN {
            write!(writer, "warning: ")?;
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the process's subscriber; `prefix` starts each human line.
pub fn init(prefix: &'static str, json: bool) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(Level::INFO)
        .log_internal_errors(false);
    let installed = if json {
        builder
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .try_init()
    } else {
        builder.event_format(HumanFormat { prefix }).try_init()
    };
    // Already installed (a test harness, or a second call) is fine.
    let _ = installed;
}

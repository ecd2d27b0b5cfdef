//! What the binary does around its command: log to stderr (honouring RUST_LOG), run
//! on a multi-threaded runtime, and turn an error into a message and a failing exit
//! code.
//!
//! Each binary keeps its own copy of these few lines: process setup is the
//! binary's business, and a shared home for it would pull tracing-subscriber into a
//! library (the engine or the API contract) that has no use for it.

use std::future::Future;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// How log events are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines: time, level, message, fields.
    #[default]
    Text,
    /// The event's stable code (`sidecar-agent explain CODE`) in place of its message,
    /// for the events that have one; other events keep their message.
    Codes,
}

/// Runs `command` with logging set up; `default_filter` applies when RUST_LOG is unset.
pub fn run<F: Future<Output = anyhow::Result<()>>>(
    default_filter: &str,
    format: LogFormat,
    command: impl FnOnce() -> F,
) -> ExitCode {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Codes => builder.with_ansi(false).event_format(CodedEvents).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` shows an anyhow error's whole chain of causes.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--log-format codes`: `TIME LEVEL CODE field=value ...`, the message replaced by its
/// code from [`crate::events`] when it has one.
struct CodedEvents;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for CodedEvents
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        use tracing_subscriber::fmt::time::FormatTime as _;
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut writer)?;
        let label = crate::events::code_for(&fields.message)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{:?}", fields.message));
        write!(writer, " {} {label}", event.metadata().level())?;
        for (name, value) in &fields.rest {
            write!(writer, " {name}={value}")?;
        }
        writeln!(writer)
    }
}

/// An event's message and its other fields, in order.
#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(&'static str, String)>,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.rest.push((field.name(), format!("{value:?}")));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.rest.push((field.name(), format!("{value:?}")));
        }
    }
}

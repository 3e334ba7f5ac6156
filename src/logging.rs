//! Log set-up, once per process: text or JSON lines, filtered by `RUST_LOG`
//! (default `info`, librdkafka at `warn`), to stderr, or to a plain-text file
//! (the demo, whose terminal shows its own view).

use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

fn init<W>(json: bool, colours: bool, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let builder = if colours {
        builder
    } else {
        builder.with_ansi(false)
    };
    // A second subscriber is refused and the first stays.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Logs to stderr.
pub fn to_stderr(json: bool) {
    init(json, true, std::io::stderr);
}

/// Logs to `path` (created, or appended to), without colours.
pub fn to_file(path: &Path, json: bool) -> std::io::Result<()> {
    let file = File::options().create(true).append(true).open(path)?;
    init(json, false, Mutex::new(file));
    Ok(())
}

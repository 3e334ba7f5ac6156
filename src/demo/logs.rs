//! Where the roles' logs go during `switchyard demo`. The terminal shows the
//! demo's own view, so by default every role's log lines go to a plain-text
//! file in the work folder; with `--verbose` they go to stderr, as for any
//! other subcommand. `RUST_LOG` filters either way.

use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"))
}

/// Logs to `path` (created, or appended to), without colours.
pub fn to_file(path: &Path, json: bool) -> std::io::Result<()> {
    let file = File::options().create(true).append(true).open(path)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(false)
        .with_writer(Mutex::new(file));
    // Once per process: a second subscriber is refused, and the first stays.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    Ok(())
}

/// Logs to stderr, as the other subcommands do.
pub fn to_stderr(json: bool) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

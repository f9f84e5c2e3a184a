//! Log output: tracing-subscriber, text or JSON, level from `RUST_LOG` or the config.
//! The access line is `registry_gate::access`, failed logins `registry_gate::auth_failure`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// rustls warns about what a client sent wrong (an IP address as SNI, an unexpected
/// message): one line per connection, written whenever any client likes. The gate
/// logs a failed handshake itself (at debug). A filter that names `rustls` keeps
/// its own level for it.
const RUSTLS_QUIET: &str = "rustls=error";

/// The filter for `spec` (a `RUST_LOG` or `[log] level` value).
fn filter(spec: &str) -> Option<EnvFilter> {
    if spec.contains("rustls") {
        EnvFilter::try_new(spec).ok()
    } else {
        EnvFilter::try_new(format!("{spec},{RUSTLS_QUIET}")).ok()
    }
}

/// Install the global subscriber (once per process; later calls do nothing).
pub fn init(config: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| filter(&spec))
        .or_else(|| filter(&config.level))
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_is_quiet_unless_named() {
        let quiet = filter("info").expect("valid").to_string();
        assert!(quiet.contains("rustls=error"), "{quiet}");
        let named = filter("info,rustls=debug").expect("valid").to_string();
        assert!(!named.contains("rustls=error"), "{named}");
        assert!(filter("info,[").is_none());
    }
}

//! How the text log writes an event's fields: like tracing's own formatter (`message` bare,
//! other fields `name=value`), but every value passed through `observer_core::printable::escape`.
//!
//! tracing-subscriber's formatter writes the message's line breaks and `%value` fields raw
//! (it only neutralises ESC and a few other controls in the message). Many logged values come
//! from outside the process — a `log` action's message rendered from event data, an error text a
//! database function or a receiver wrote — so raw, one could end the line and forge the next
//! (`… WARN dead-lettered` followed by a made-up `INFO delivered`). The JSON log is escaped by
//! its serialiser and does not use this.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// The field formatter of the text log (see the module documentation).
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = EscapedVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapedVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for EscapedVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `log.*` are the metadata of records bridged from the `log` crate, shown by the
        // formatter itself.
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let text = format!("{value:?}");
        let text = observer_core::printable::escape(&text);
        let separator = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{separator}{text}")
        } else {
            write!(self.writer, "{separator}{}={text}", field.name())
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Captures what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn values_print_on_one_line() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .fmt_fields(EscapedFields)
            .finish();
        let forged = "x\n2026-01-01T00:00:00Z  INFO forged: delivered\u{1b}[2J";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(error = %forged, debug = ?forged, n = 3, "note {forged}");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(
            text.contains(
                "note x\\n2026-01-01T00:00:00Z  INFO forged: delivered\\u{1b}[2J error=x\\n"
            ),
            "{text}"
        );
        assert!(text.contains(" debug=\"x\\n"), "{text}");
        assert!(text.trim_end().ends_with(" n=3"), "{text}");
    }
}

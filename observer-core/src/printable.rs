//! Text from events, receivers and the database made safe to print on a terminal or a log line.
//!
//! Event data, change-log columns, receivers' answers and the error messages built from them
//! can hold line breaks and terminal control sequences. Printed raw they forge output lines (a
//! `signature: verified` line under a delivery that was not) or drive the terminal (ANSI
//! escapes). Every human-readable output of the CLI (`dlq`, `debug-event`, `status`, `listen`)
//! and every field of the daemon's text log passes through [`escape`]; JSON output is escaped
//! by serde_json, and [`escape_json`] adds what serde_json leaves raw.

use std::borrow::Cow;

/// Whether `c` is written escaped: C0 and C1 control characters and DEL (`\n`, ESC, CSI, …),
/// the Unicode line and paragraph separators, and the bidirectional overrides and isolates
/// that reorder how a line reads ("Trojan Source").
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `text` with every character of [`needs_escape`] written as `\n`, `\r`, `\t` or `\u{…}`
/// (hexadecimal), so it prints on one line and moves no cursor. Other text, backslashes
/// included, is unchanged; text with nothing to escape is returned as is.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Serialised JSON with the characters serde_json leaves raw inside strings (DEL, C1 controls,
/// the line separators and bidirectional controls of [`needs_escape`]) written as `\uXXXX`
/// escapes: the same JSON value, safe to print. JSON's structure is ASCII, so such characters
/// can only occur inside strings, where the escape means the same character.
pub fn escape_json(json: &str) -> Cow<'_, str> {
    if !json.chars().any(needs_escape_in_json) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if needs_escape_in_json(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`needs_escape`], except the whitespace that serialised JSON uses between its tokens (pretty
/// printing); the JSON serialiser has already escaped every C0 character inside strings.
fn needs_escape_in_json(c: char) -> bool {
    needs_escape(c) && !matches!(c, '\n' | '\r' | '\t' | ' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        assert!(matches!(escape("plain é ✓ \\n"), Cow::Borrowed(_)));
        assert_eq!(
            escape("a\nb\r\tc\u{1b}[2J\u{7f}\u{9b}\u{0}"),
            "a\\nb\\r\\tc\\u{1b}[2J\\u{7f}\\u{9b}\\u{0}"
        );
        assert_eq!(
            escape("x\u{2028}y\u{202e}z\u{2066}"),
            "x\\u{2028}y\\u{202e}z\\u{2066}"
        );
        assert!(!escape("1\n  signature: verified").contains('\n'));
    }

    #[test]
    fn json_keeps_its_value() {
        let v = serde_json::json!({"a": "x\u{9b}2J\u{7f}\u{2028}\n\u{1b}", "b": [1, "é"]});
        for text in [
            serde_json::to_string(&v).unwrap(),
            serde_json::to_string_pretty(&v).unwrap(),
        ] {
            let escaped = escape_json(&text);
            assert!(
                !escaped.chars().any(|c| needs_escape(c) && c != '\n'),
                "{escaped}"
            );
            let back: serde_json::Value = serde_json::from_str(&escaped).unwrap();
            assert_eq!(back, v);
        }
    }
}

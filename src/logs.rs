//! Log hygiene: one event a line, whatever the clients send. A string that comes from a
//! client (a `requestId`, a name, an id, an engine's reason quoting a document) is logged
//! through [`Untrusted`], escaped and cut to [`FIELD_MAX`] bytes; and [`OneLine`] holds
//! every written event to one line of at most [`LINE_MAX`] bytes, whichever field forgot.

use std::fmt::{self, Write as _};
use std::io;

/// The bytes of a client string kept in a log field.
pub const FIELD_MAX: usize = 256;

/// The longest line an event is written as (text format; a JSON event longer than this
/// is still written whole, so as to stay JSON: its client strings are cut by `Untrusted`).
pub const LINE_MAX: usize = 8192;

/// A client-controlled string, for a log field: control characters, quotes and
/// backslashes escaped as Rust escapes them (`\n`, `\u{1b}`), and cut after
/// [`FIELD_MAX`] bytes with the number of bytes left out.
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    /// Quoted when it holds a space, a `=` or nothing, or is cut (as logfmt quotes), so
    /// that a client's `r-1 reason=refused` is one field's value to a log parser, never
    /// fields of the worker's own.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = self.kept();
        let quoted = kept.is_empty() || kept.contains([' ', '=']) || kept.len() < self.0.len();
        if quoted {
            f.write_char('"')?;
        }
        self.escaped(f)?;
        if quoted {
            f.write_char('"')?;
        }
        Ok(())
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        self.escaped(f)?;
        f.write_char('"')
    }
}

impl Untrusted<'_> {
    /// The part of the string kept: its first [`FIELD_MAX`] bytes at most.
    fn kept(&self) -> &str {
        let text = self.0;
        let mut end = text.len().min(FIELD_MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    }

    fn escaped(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = self.kept();
        for c in kept.chars() {
            if c.is_control() || c == '"' || c == '\\' || is_invisible(c) {
                for escaped in c.escape_default() {
                    f.write_char(escaped)?;
                }
            } else {
                f.write_char(c)?;
            }
        }
        if kept.len() < self.0.len() {
            write!(f, "…(+{} bytes)", self.0.len() - kept.len())?;
        }
        Ok(())
    }
}

/// Characters that move or hide text on a terminal without being control characters:
/// line and paragraph separators, bidirectional overrides.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A log writer that keeps each event on one line: the formatter writes an event in one
/// `write`, so every line end but the last is escaped (`\n`), and so is every other
/// control character when `escape_ansi` (output that is not a terminal: no colour code
/// reaches a file or journald). Text events longer than [`LINE_MAX`] are cut.
pub struct OneLine<W> {
    inner: W,
    escape_ansi: bool,
    json: bool,
}

impl<W: io::Write> OneLine<W> {
    pub fn new(inner: W, escape_ansi: bool, json: bool) -> Self {
        OneLine {
            inner,
            escape_ansi,
            json,
        }
    }
}

impl<W: io::Write> io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        let clean = !body
            .iter()
            .any(|&b| b == b'\n' || b == b'\r' || (self.escape_ansi && b < 0x20 && b != b'\t'));
        if clean && (self.json || body.len() <= LINE_MAX) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut line = Vec::with_capacity(body.len().min(LINE_MAX) + 64);
        for &b in body {
            // Cut on a character's first byte, so the line stays UTF-8.
            if !self.json && line.len() >= LINE_MAX && b & 0xC0 != 0x80 {
                line.extend_from_slice(format!("…(cut at {LINE_MAX} bytes)").as_bytes());
                break;
            }
            match b {
                b'\n' => line.extend_from_slice(b"\\n"),
                b'\r' => line.extend_from_slice(b"\\r"),
                b if self.escape_ansi && b < 0x20 && b != b'\t' => {
                    line.extend_from_slice(format!("\\u{{{b:x}}}").as_bytes())
                }
                b => line.push(b),
            }
        }
        line.push(b'\n');
        self.inner.write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn untrusted_strings_are_escaped_and_cut() {
        let forged = "x\nFORGED INFO replied request_id=victim\r\u{1b}[31m\"q\"\\";
        let shown = Untrusted(forged).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\r') && !shown.contains('\u{1b}'));
        assert_eq!(
            shown,
            "\"x\\nFORGED INFO replied request_id=victim\\r\\u{1b}[31m\\\"q\\\"\\\\\""
        );
        let long = "é".repeat(20_000);
        let shown = Untrusted(&long).to_string();
        assert!(shown.len() < FIELD_MAX + 32, "{}", shown.len());
        assert!(shown.ends_with("…(+39744 bytes)\""), "{shown}");
        assert_eq!(Untrusted("\u{202e}abc").to_string(), "\\u{202e}abc");
        assert_eq!(Untrusted("r-42").to_string(), "r-42");
    }

    /// A client string holding `key=value` pairs is one quoted value in a line of the
    /// text format, never fields of the worker's own (a logfmt parser, Loki's or
    /// Vector's, would read them as such).
    #[test]
    fn a_client_string_forges_no_field() {
        let forged = "r-1 reason=refused applied=true user_id=admin";
        assert_eq!(
            Untrusted(forged).to_string(),
            "\"r-1 reason=refused applied=true user_id=admin\""
        );
        assert_eq!(Untrusted("").to_string(), "\"\"");
        assert_eq!(Untrusted("a=b").to_string(), "\"a=b\"");
        assert_eq!(format!("{:?}", Untrusted("r-42")), "\"r-42\"");
    }

    #[test]
    fn one_event_stays_one_line() {
        let mut out = Vec::new();
        let mut w = OneLine::new(&mut out, true, false);
        w.write_all(b"INFO a\nFORGED line \x1b[31m\n").unwrap();
        w.write_all(b"INFO plain\n").unwrap();
        w.write_all(&[b'x'; 3 * LINE_MAX]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "INFO a\\nFORGED line \\u{1b}[31m");
        assert_eq!(lines[1], "INFO plain");
        assert!(lines[2].len() < LINE_MAX + 64);
    }

    #[test]
    fn colours_pass_on_a_terminal() {
        let mut out = Vec::new();
        OneLine::new(&mut out, false, false)
            .write_all(b"\x1b[32mINFO\x1b[0m ok\n")
            .unwrap();
        assert_eq!(out, b"\x1b[32mINFO\x1b[0m ok\n");
    }
}

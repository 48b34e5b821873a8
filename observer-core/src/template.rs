//! Templates for action fields (webhook URLs, headers and bodies, e-mail subjects, …): compiled
//! once when observers are loaded, rendered once per delivery, and escaped for where the result
//! goes.
//!
//! Syntax: literal text with placeholders `{{ path }}` or `{{ path | filter | filter }}`. Paths are
//! the ones of [`crate::path`] (`data.customer.email`, `before.items[0].sku`, `event.id`,
//! `observer.name`, `delivery.idempotency_key`, `enrich.<lookup>.…`). Filters, applied left to right:
//! `default(<literal>)` (a JSON string, number, `true`, `false` or `null`, or a `'single quoted'`
//! string; used only when the path is missing, not when it holds `null`), `json` (render the JSON
//! encoding of the value even in a text context), `upper` and `lower` (change the case of strings).
//! `\{{` writes a literal `{{`.
//!
//! Everything that can be checked without an event is checked by [`Template::parse`], so a bad
//! template fails `validate` and start-up rather than a delivery. What depends on the event (a
//! missing value, a header value with a line break) is a [`RenderError`] for that delivery;
//! rendering never panics.
//!
//! The [`Target`] decides the escaping. For [`Target::Json`] the parser works out, from the
//! literal text around each placeholder, whether it sits inside a JSON string or in value
//! position, so that no data value can change the structure of the body.

use std::borrow::Cow;

use serde_json::Value;

use crate::path::{Path, Scope};

/// Templates longer than this (in bytes) are refused at load time.
pub const MAX_SOURCE_BYTES: usize = 100 * 1024;

/// Longest rendered result, in bytes. A template can repeat a placeholder, so without a cap a
/// 100 KiB template over a 10 MiB row could ask for gigabytes; past this the rendering fails
/// (a permanent failure, dead-lettered with this reason) instead.
pub const MAX_RENDERED_BYTES: usize = 64 * 1024 * 1024;

/// Where a rendered template goes, which decides how placeholder values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Plain text: strings as-is, numbers and booleans as JSON text, `null` as nothing, arrays
    /// and objects as compact JSON.
    Text,
    /// A JSON document: inside a string literal a placeholder emits its text form (as for
    /// `Text`, so `null` is empty) escaped as string content; elsewhere it emits the value as
    /// JSON. The result is checked to parse. A backslash right before a placeholder inside a
    /// string must be written `\u005c` (a literal `\{{` is the brace escape).
    Json,
    /// A URL: literal text is kept, placeholder values are percent-encoded (RFC 3986 unreserved
    /// characters are kept).
    UrlComponent,
    /// An HTTP header value: like `Text`, but CR, LF and NUL are refused.
    Header,
    /// A Redis glob pattern (`SCAN … MATCH`): literal text is the pattern as written, so its
    /// `*`, `?` and `[…]` match; placeholder values are rendered like `Text` with `*`, `?`,
    /// `[`, `]` and `\` escaped, so a value matches only itself.
    Glob,
}

/// A filter after `|` in a placeholder.
#[derive(Debug, Clone, PartialEq)]
enum Filter {
    /// `default(<literal>)`: the value when the path is missing.
    Default(Value),
    /// `json`: the JSON encoding of the value.
    Json,
    /// `upper`.
    Upper,
    /// `lower`.
    Lower,
}

/// Where a placeholder sits in a `Target::Json` template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    /// Not a JSON template: escaping is decided by the target alone.
    Plain,
    /// Inside a JSON string literal: the text is escaped as string content.
    JsonString,
    /// Where a JSON value is expected: the value is JSON-encoded.
    JsonValue,
}

/// One `{{ … }}`.
#[derive(Debug, Clone, PartialEq)]
struct Placeholder {
    path: Path,
    filters: Vec<Filter>,
    context: Context,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Literal(String),
    Placeholder(Placeholder),
}

/// Resolves one `${…}` secret reference (the whole reference, `${env:NAME}`) to its value, or
/// says why it cannot (the message must not quote the value).
pub type Resolver<'a> = &'a mut dyn FnMut(&str) -> Result<String, String>;

/// A compiled template: parse once with [`Template::parse`], render per delivery with
/// [`Template::render`].
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    source: String,
    target: Target,
    pieces: Vec<Piece>,
}

/// Why a template was refused at load time; `column` counts characters from 1.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct TemplateError {
    pub column: usize,
    pub message: String,
}

/// Why one rendering failed; the message names the placeholder and the problem, e.g.
/// "`data.customer.email` has no value".
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

/// The value of a placeholder while its filters run.
enum Rendered {
    /// A value still to be encoded for the target.
    Value(Value),
    /// Text that is already the JSON encoding of a value (after `json`).
    JsonText(String),
}

impl Template {
    /// Parses and checks at load time: unknown roots/fields, bad filters, unclosed `{{`, and for
    /// `Target::Json` a template whose literal parts cannot form valid JSON are errors.
    pub fn parse(source: &str, target: Target) -> Result<Template, TemplateError> {
        Template::parse_inner(source, target, None)
    }

    /// Like [`Template::parse`], for text that may hold `${…}` secret references (webhook URLs
    /// and headers, lookup URLs): each reference in the literal text is replaced by what
    /// `resolve` returns for it (the whole `${…}`) **as literal text**. A resolved value is
    /// therefore never read as template syntax (a secret holding `{{` stays `{{`), is never
    /// quoted in an error, and keeps the checks of the target (a header secret holding CR or LF
    /// is refused, pointing at the reference). [`Template::source`] stays the text as written.
    ///
    /// `Target::Json` templates do not take references (their literal text is JSON whose
    /// structure a value could change): a `${` there is an error.
    pub fn parse_with_references(
        source: &str,
        target: Target,
        resolve: Resolver<'_>,
    ) -> Result<Template, TemplateError> {
        Template::parse_inner(source, target, Some(resolve))
    }

    fn parse_inner(
        source: &str,
        target: Target,
        resolve: Option<Resolver<'_>>,
    ) -> Result<Template, TemplateError> {
        if source.len() > MAX_SOURCE_BYTES {
            return Err(TemplateError {
                column: 1,
                message: format!(
                    "the template is {} bytes; the limit is {MAX_SOURCE_BYTES}",
                    source.len()
                ),
            });
        }
        if target == Target::Json && resolve.is_some() {
            if let Some(at) = source.find("${") {
                return Err(error(
                    source,
                    at,
                    "`${…}` references are not resolved in a JSON template",
                ));
            }
        }
        let mut raw = tokenize(source, resolve)?;
        match target {
            Target::Json => check_json(source, &mut raw)?,
            Target::Header => check_header(source, &raw)?,
            Target::Text | Target::UrlComponent | Target::Glob => {}
        }
        let pieces = raw
            .into_iter()
            .map(|p| match p {
                RawPiece::Literal { text, .. } => Piece::Literal(text),
                RawPiece::Placeholder { placeholder, .. } => Piece::Placeholder(placeholder),
            })
            .collect();
        Ok(Template {
            source: source.to_string(),
            target,
            pieces,
        })
    }

    /// Renders against one event/delivery. Fails (never panics) when a placeholder without
    /// `default` has no value, or when the result is invalid for the target (JSON that does not
    /// parse; a header value with CR/LF/NUL).
    pub fn render(&self, scope: &Scope<'_>) -> Result<String, RenderError> {
        let mut out = String::with_capacity(self.source.len());
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Placeholder(p) => self.render_placeholder(p, scope, &mut out)?,
            }
            // Checked per piece: one piece is at most one value of the event (or literal text
            // of the template), so the overshoot is bounded by the event's own size.
            if out.len() > MAX_RENDERED_BYTES {
                return Err(RenderError(format!(
                    "the rendered template is more than {} MiB (the limit); it repeats large values",
                    MAX_RENDERED_BYTES >> 20
                )));
            }
        }
        if self.target == Target::Json {
            // The parser already guarantees the structure; this is the last line of defence
            // against a body we would otherwise send broken.
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&out) {
                return Err(RenderError(format!(
                    "the rendered body is not valid JSON: {}",
                    strip_position(&e)
                )));
            }
        }
        Ok(out)
    }

    /// The template text as written (secret references unresolved).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The literal text with each placeholder replaced by `marker`: the shape of what renders
    /// (e.g. to check that a URL starts with `http://` or has a fixed authority). For a static
    /// template it is the rendered text. It may hold resolved secrets: never show it.
    pub fn literal_text(&self, marker: &str) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Placeholder(_) => out.push_str(marker),
            }
        }
        out
    }

    /// The target the template was compiled for.
    pub fn target(&self) -> Target {
        self.target
    }

    /// True when the template has no placeholders (callers may skip rendering: `render` then
    /// returns the literal text, with `\{{` already unescaped).
    pub fn is_static(&self) -> bool {
        !self
            .pieces
            .iter()
            .any(|p| matches!(p, Piece::Placeholder(_)))
    }

    /// The paths it reads, in order of appearance (for `validate` output and docs).
    pub fn paths(&self) -> Vec<&Path> {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Placeholder(p) => Some(&p.path),
                Piece::Literal(_) => None,
            })
            .collect()
    }

    fn render_placeholder(
        &self,
        p: &Placeholder,
        scope: &Scope<'_>,
        out: &mut String,
    ) -> Result<(), RenderError> {
        let mut current: Option<Rendered> = scope
            .resolve(&p.path)
            .map(|v| Rendered::Value(v.into_owned()));
        // Filters run left to right; a missing value flows through every filter except
        // `default`, so `{{ x | upper | default("n/a") }}` works as well as the usual order.
        for f in &p.filters {
            current = match (f, current) {
                (Filter::Default(d), None) => Some(Rendered::Value(d.clone())),
                (_, None) => None,
                (Filter::Default(_), some) => some,
                (Filter::Json, Some(Rendered::Value(v))) => Some(Rendered::JsonText(to_json(&v)?)),
                (Filter::Json, some @ Some(Rendered::JsonText(_))) => some,
                (Filter::Upper, Some(r)) => Some(change_case(r, true)),
                (Filter::Lower, Some(r)) => Some(change_case(r, false)),
            };
        }
        let Some(value) = current else {
            return Err(RenderError(format!("`{}` has no value", p.path)));
        };
        match (self.target, p.context) {
            (Target::Json, Context::JsonValue) => match value {
                Rendered::Value(v) => out.push_str(&to_json(&v)?),
                Rendered::JsonText(s) => out.push_str(&s),
            },
            (Target::Json, _) => escape_json_content(&text_form(&value)?, out),
            (Target::UrlComponent, _) => percent_encode(&text_form(&value)?, out),
            (Target::Header, _) => {
                let text = text_form(&value)?;
                if text.contains(['\r', '\n', '\0']) {
                    return Err(RenderError(format!(
                        "`{}` has a value containing CR, LF or NUL, which a header cannot carry",
                        p.path
                    )));
                }
                out.push_str(&text);
            }
            (Target::Glob, _) => glob_escape(&text_form(&value)?, out),
            (Target::Text, _) => out.push_str(&text_form(&value)?),
        }
        Ok(())
    }
}

/// Compact JSON for a value; serialising a `Value` cannot really fail, but we do not unwrap.
fn to_json(v: &Value) -> Result<String, RenderError> {
    serde_json::to_string(v).map_err(|e| RenderError(format!("cannot encode a value: {e}")))
}

/// The text form of a value: strings as-is, `null` as nothing, the rest as compact JSON.
fn text_form(r: &Rendered) -> Result<Cow<'_, str>, RenderError> {
    Ok(match r {
        Rendered::Value(Value::String(s)) => Cow::Borrowed(s.as_str()),
        Rendered::Value(Value::Null) => Cow::Borrowed(""),
        Rendered::Value(v) => Cow::Owned(to_json(v)?),
        Rendered::JsonText(s) => Cow::Borrowed(s.as_str()),
    })
}

/// `upper` / `lower`. Strings change case; JSON text (after `json`) becomes a string so the
/// case change cannot produce broken JSON (`true` → `TRUE`); other values are left alone.
fn change_case(r: Rendered, upper: bool) -> Rendered {
    let case = |s: &str| {
        if upper {
            s.to_uppercase()
        } else {
            s.to_lowercase()
        }
    };
    match r {
        Rendered::Value(Value::String(s)) => Rendered::Value(Value::String(case(&s))),
        Rendered::JsonText(s) => Rendered::Value(Value::String(case(&s))),
        other => other,
    }
}

/// Escapes text as the content of a JSON string (without the quotes).
fn escape_json_content(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            // Control characters, plus the two line separators JavaScript treats as newlines.
            c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
}

/// Escapes the metacharacters of a Redis glob (`*`, `?`, `[`, `]`, `\`) so `s` matches only
/// itself.
pub fn glob_escape(s: &str, out: &mut String) {
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Percent-encodes everything except the RFC 3986 unreserved characters.
fn percent_encode(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// serde_json's messages end in " at line L column C", which would point into our substituted
/// text rather than the template; we report our own column instead.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// A piece while parsing, still carrying where it came from in the source.
enum RawPiece {
    /// `src[i]` is the source byte offset that produced byte `i` of `text` (escapes make the
    /// two differ), so errors found in the literal point at the right column.
    Literal { text: String, src: Vec<usize> },
    Placeholder {
        placeholder: Placeholder,
        start: usize,
    },
}

/// The 1-based character column of a byte offset (clamped to the source).
fn column(source: &str, byte: usize) -> usize {
    let mut end = byte.min(source.len());
    while !source.is_char_boundary(end) {
        end -= 1;
    }
    source[..end].chars().count() + 1
}

fn error(source: &str, byte: usize, message: impl Into<String>) -> TemplateError {
    TemplateError {
        column: column(source, byte),
        message: message.into(),
    }
}

fn skip_ws(source: &str, mut i: usize) -> usize {
    while let Some(c) = source[i..].chars().next() {
        if !c.is_whitespace() {
            break;
        }
        i += c.len_utf8();
    }
    i
}

/// Splits the source into literal text and placeholders. With `resolve`, each `${…}` reference
/// in literal text becomes literal text itself: its value, every byte of which is attributed to
/// the reference's `$` (so an error in it points there and never quotes it).
fn tokenize(
    source: &str,
    mut resolve: Option<Resolver<'_>>,
) -> Result<Vec<RawPiece>, TemplateError> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut src = Vec::new();
    let mut i = 0;
    while i < source.len() {
        let rest = &source[i..];
        if let (Some(resolve), true) = (resolve.as_mut(), rest.starts_with("${")) {
            let Some(len) = rest.find('}') else {
                return Err(error(source, i, "unterminated `${` reference"));
            };
            let value = resolve(&rest[..=len]).map_err(|m| error(source, i, m))?;
            src.resize(src.len() + value.len(), i);
            text.push_str(&value);
            i += len + 1;
            continue;
        }
        if rest.starts_with("\\{{") {
            text.push_str("{{");
            src.extend([i + 1, i + 2]);
            i += 3;
            continue;
        }
        // In `{{{ data.x }}}` the first brace is literal: a path never starts with `{`, so this
        // is the only reading that can parse.
        if rest.starts_with("{{") && !rest.starts_with("{{{") {
            if !text.is_empty() {
                pieces.push(RawPiece::Literal {
                    text: std::mem::take(&mut text),
                    src: std::mem::take(&mut src),
                });
            }
            let (placeholder, end) = parse_placeholder(source, i)?;
            pieces.push(RawPiece::Placeholder {
                placeholder,
                start: i,
            });
            i = end;
            continue;
        }
        // `i` is always on a character boundary: it only moves by whole characters or by the
        // ASCII markers above.
        let Some(c) = rest.chars().next() else { break };
        text.push(c);
        src.resize(src.len() + c.len_utf8(), i);
        i += c.len_utf8();
    }
    if !text.is_empty() {
        pieces.push(RawPiece::Literal { text, src });
    }
    Ok(pieces)
}

/// Parses `{{ path | filter … }}` starting at `open` (the first `{`); returns it and the byte
/// offset just past the closing `}}`.
fn parse_placeholder(source: &str, open: usize) -> Result<(Placeholder, usize), TemplateError> {
    let body = open + 2;
    if !source[body..].contains("}}") {
        return Err(error(source, open, "unclosed `{{`: no matching `}}`"));
    }
    let mut i = skip_ws(source, body);
    let (path, used) = Path::parse_prefix(&source[i..]).map_err(|e| {
        error(
            source,
            i + e.offset,
            format!("in placeholder: {}", e.message),
        )
    })?;
    i += used;
    let mut filters = Vec::new();
    loop {
        i = skip_ws(source, i);
        let rest = &source[i..];
        if rest.starts_with("}}") {
            return Ok((
                Placeholder {
                    path,
                    filters,
                    context: Context::Plain,
                },
                i + 2,
            ));
        }
        if !rest.starts_with('|') {
            return Err(error(source, i, "expected `|` or `}}` after the path"));
        }
        i = skip_ws(source, i + 1);
        let (filter, end) = parse_filter(source, i)?;
        filters.push(filter);
        i = end;
    }
}

fn parse_filter(source: &str, start: usize) -> Result<(Filter, usize), TemplateError> {
    let name_len = source[start..]
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count();
    let name = &source[start..start + name_len];
    let after = start + name_len;
    let unknown = || {
        error(
            source,
            start,
            format!(
                "unknown filter `{}`: expected `default(...)`, `json`, `upper` or `lower`",
                if name.is_empty() {
                    source[start..].chars().take(1).collect::<String>()
                } else {
                    name.to_string()
                }
            ),
        )
    };
    let simple = match name {
        "json" => Some(Filter::Json),
        "upper" => Some(Filter::Upper),
        "lower" => Some(Filter::Lower),
        "default" => None,
        _ => return Err(unknown()),
    };
    if let Some(f) = simple {
        if source[skip_ws(source, after)..].starts_with('(') {
            return Err(error(
                source,
                after,
                format!("the `{name}` filter takes no argument"),
            ));
        }
        return Ok((f, after));
    }
    // default( literal )
    let mut i = skip_ws(source, after);
    if !source[i..].starts_with('(') {
        return Err(error(
            source,
            i,
            "`default` needs a value: `default(\"text\")`",
        ));
    }
    i = skip_ws(source, i + 1);
    let (value, end) = parse_literal(source, i)?;
    i = skip_ws(source, end);
    if !source[i..].starts_with(')') {
        return Err(error(source, i, "expected `)` after the default value"));
    }
    Ok((Filter::Default(value), i + 1))
}

/// A default value: a JSON string, number, `true`, `false` or `null`, or a `'single quoted'`
/// string (taken literally).
fn parse_literal(source: &str, start: usize) -> Result<(Value, usize), TemplateError> {
    let bytes = source.as_bytes();
    let bad = |msg: String| error(source, start, msg);
    match bytes.get(start) {
        Some(b'"') => {
            let mut j = start + 1;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            if j >= bytes.len() {
                return Err(bad("unterminated string in `default(...)`".into()));
            }
            let text = &source[start..=j];
            let v = serde_json::from_str::<Value>(text).map_err(|e| {
                bad(format!(
                    "bad string in `default(...)`: {}",
                    strip_position(&e)
                ))
            })?;
            Ok((v, j + 1))
        }
        Some(b'\'') => {
            let Some(len) = source[start + 1..].find('\'') else {
                return Err(bad("unterminated string in `default(...)`".into()));
            };
            let end = start + 1 + len;
            Ok((Value::String(source[start + 1..end].to_string()), end + 1))
        }
        _ => {
            let len = source[start..]
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.'))
                .count();
            let text = &source[start..start + len];
            match serde_json::from_str::<Value>(text) {
                Ok(v) if !text.is_empty() => Ok((v, start + len)),
                _ => Err(bad(
                    "`default(...)` takes a string, a number, `true`, `false` or `null`".into(),
                )),
            }
        }
    }
}

/// Header values cannot contain CR, LF or NUL; a literal one is a load-time error.
fn check_header(source: &str, pieces: &[RawPiece]) -> Result<(), TemplateError> {
    for p in pieces {
        if let RawPiece::Literal { text, src } = p {
            if let Some(at) = text.find(['\r', '\n', '\0']) {
                let byte = src.get(at).copied().unwrap_or(0);
                return Err(error(
                    source,
                    byte,
                    "a header value cannot contain CR, LF or NUL",
                ));
            }
        }
    }
    Ok(())
}

/// Where the JSON scanner is in the literal text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scan {
    Outside,
    InString,
    /// Just after a backslash inside a string.
    Escape,
    /// Inside `\uXXXX`, with this many hex digits still to come.
    Unicode(u8),
}

/// Decides the context of every placeholder of a JSON template, then checks the template is
/// JSON with each value-position placeholder read as `null` and each in-string one as nothing.
///
/// Because every rendered value-position placeholder is one complete JSON value and every
/// in-string one is escaped string content, passing this check means any data renders valid
/// JSON with the same structure.
fn check_json(source: &str, pieces: &mut [RawPiece]) -> Result<(), TemplateError> {
    let mut state = Scan::Outside;
    let mut doc = String::new();
    let mut doc_src: Vec<usize> = Vec::new();
    for piece in pieces.iter_mut() {
        match piece {
            RawPiece::Literal { text, src } => {
                for c in text.chars() {
                    state = match (state, c) {
                        (Scan::Outside, '"') => Scan::InString,
                        (Scan::Outside, _) => Scan::Outside,
                        (Scan::InString, '\\') => Scan::Escape,
                        (Scan::InString, '"') => Scan::Outside,
                        (Scan::InString, _) => Scan::InString,
                        (Scan::Escape, 'u') => Scan::Unicode(4),
                        (Scan::Escape, _) => Scan::InString,
                        (Scan::Unicode(n), _) if n <= 1 => Scan::InString,
                        (Scan::Unicode(n), _) => Scan::Unicode(n - 1),
                    };
                }
                doc.push_str(text);
                doc_src.extend_from_slice(src);
            }
            RawPiece::Placeholder { placeholder, start } => {
                placeholder.context = match state {
                    Scan::Outside => Context::JsonValue,
                    Scan::InString => Context::JsonString,
                    Scan::Escape | Scan::Unicode(_) => {
                        return Err(error(
                            source,
                            *start,
                            "a placeholder cannot sit inside a JSON escape sequence \
                             (write a backslash before a placeholder as `\\u005c`)",
                        ))
                    }
                };
                if placeholder.context == Context::JsonValue {
                    doc.push_str("null");
                    doc_src.extend([*start; 4]);
                }
            }
        }
    }
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&doc) {
        let byte = doc_offset(&doc, e.line(), e.column());
        let src_byte = match doc_src.get(byte) {
            Some(b) => *b,
            // Past the end (e.g. "EOF while parsing"): point just past the source.
            None => source.len(),
        };
        return Err(error(
            source,
            src_byte,
            format!("the template is not valid JSON: {}", strip_position(&e)),
        ));
    }
    Ok(())
}

/// The byte offset in `doc` of serde_json's (1-based line, 1-based byte column) position.
fn doc_offset(doc: &str, line: usize, column: usize) -> usize {
    let mut line_start = 0;
    for _ in 1..line {
        match doc[line_start..].find('\n') {
            Some(n) => line_start += n + 1,
            None => break,
        }
    }
    line_start + column.saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ChangeEvent, Operation};
    use serde_json::json;

    fn event(data: Value) -> ChangeEvent {
        ChangeEvent {
            pk: 42,
            id: uuid::Uuid::from_u128(0x1234),
            created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            entity: "Order".into(),
            entity_id: Some("o-1".into()),
            operation: Operation::Update,
            data: Some(data),
            before: Some(json!({"items": [{"sku": "A-1"}, {"sku": "B-2"}], "status": "new"})),
            tenant_id: None,
            txid: 7,
        }
    }

    fn scope(e: &ChangeEvent) -> Scope<'_> {
        Scope {
            event: e,
            observer: Some("order-shipped"),
            idempotency_key: Some("key-1"),
            enrich: None,
        }
    }

    fn render(src: &str, target: Target, data: Value) -> Result<String, RenderError> {
        let e = event(data);
        Template::parse(src, target).unwrap().render(&scope(&e))
    }

    fn parse_err(src: &str, target: Target) -> TemplateError {
        Template::parse(src, target).unwrap_err()
    }

    #[test]
    fn text_target_renders_each_kind_of_value() {
        let data = json!({
            "customer": {"email": "a@b.c", "name": "Zoë"},
            "total": 12.5, "paid": true, "note": null, "tags": ["x", "y"], "obj": {"k": 1}
        });
        let out = render(
            "{{data.customer.email}}|{{ data.total }}|{{data.paid}}|{{ data.note }}|{{data.tags}}|{{data.obj}}",
            Target::Text,
            data,
        )
        .unwrap();
        assert_eq!(out, r#"a@b.c|12.5|true||["x","y"]|{"k":1}"#);
    }

    #[test]
    fn metadata_paths_and_array_indexes() {
        let out = render(
            "{{event.entity}} {{ event.entity_id }} {{event.operation}} {{event.pk}} {{event.txid}} \
             {{observer.name}} {{delivery.idempotency_key}} {{before.items[1].sku}} {{event.tenant_id}}.",
            Target::Text,
            json!({}),
        )
        .unwrap();
        assert_eq!(out, "Order o-1 UPDATE 42 7 order-shipped key-1 B-2 .");
        let out = render(
            "{{ event.id }} {{event.created_at}}",
            Target::Text,
            json!({}),
        )
        .unwrap();
        let id = uuid::Uuid::from_u128(0x1234);
        assert_eq!(out, format!("{id} 2023-11-14T22:13:20.000000Z"));
        let out = render(
            r#"{{ data["odd key"].v }}"#,
            Target::Text,
            json!({"odd key": {"v": 3}}),
        )
        .unwrap();
        assert_eq!(out, "3");
    }

    #[test]
    fn filters() {
        let data = json!({"name": "Zoë Smith", "n": 3, "s": "q\"x"});
        let r = |src| render(src, Target::Text, data.clone()).unwrap();
        assert_eq!(r("{{ data.name | upper }}"), "ZOË SMITH");
        assert_eq!(r("{{data.name|lower}}"), "zoë smith");
        assert_eq!(r("{{ data.n | upper }}"), "3");
        assert_eq!(r("{{ data.s | json }}"), r#""q\"x""#);
        assert_eq!(r(r#"{{ data.missing | default("n/a") }}"#), "n/a");
        assert_eq!(r("{{ data.missing | default( 123 ) }}"), "123");
        assert_eq!(r("{{ data.missing | default(null) }}"), "");
        assert_eq!(r("{{ data.missing | default('a b') | upper }}"), "A B");
        assert_eq!(r("{{ data.missing | upper | default(\"x}}y\") }}"), "x}}y");
        assert_eq!(r("{{ data.name | default(\"unused\") }}"), "Zoë Smith");
        assert_eq!(r("{{ data.missing | default(null) | json }}"), "null");
    }

    #[test]
    fn missing_values_without_default_fail() {
        let e = render("to {{ data.customer.email }}", Target::Text, json!({})).unwrap_err();
        assert_eq!(e.0, "`data.customer.email` has no value");
        let e = render("{{ data.items[5] }}", Target::Json, json!({"items": []})).unwrap_err();
        assert!(e.0.contains("`data.items[5]` has no value"));
        // A null is a value: default does not replace it.
        assert_eq!(
            render(
                "[{{ data.x | default(1) }}]",
                Target::Json,
                json!({"x": null})
            )
            .unwrap(),
            "[null]"
        );
    }

    #[test]
    fn json_target_strings_and_values() {
        let src = r#"{"email": "{{ data.email }}", "total": {{ data.total }}, "items": {{ data.items }}, "note": {{data.note}}, "who": {{ data.who }}, "msg": "n={{data.total}} {{data.items}}"}"#;
        let data = json!({
            "email": "a@b.c", "total": 12.5, "items": [{"sku": "A"}], "note": null, "who": "x\"y"
        });
        let out = render(src, Target::Json, data).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            json!({"email": "a@b.c", "total": 12.5, "items": [{"sku": "A"}], "note": null,
                   "who": "x\"y", "msg": "n=12.5 [{\"sku\":\"A\"}]"})
        );
    }

    #[test]
    fn json_attack_strings_stay_inside_their_string() {
        let attacks = [
            r#""}, "admin": true, "x": ""#,
            "\\",
            "\\\"",
            "line1\nline2\r\n\t\u{0}\u{1f}",
            "ünïcødé ✓ 😀 \u{2028}",
            "{{ data.email }}",
            "\\u0022",
            "</script>",
        ];
        for a in attacks {
            let src = r#"{"email": "<{{ data.email }}>", "k{{data.email}}": 1, "admin": false}"#;
            let out = render(src, Target::Json, json!({ "email": a })).unwrap();
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["email"], json!(format!("<{a}>")), "{out}");
            assert_eq!(v[format!("k{a}")], json!(1));
            assert_eq!(v["admin"], json!(false));
            assert_eq!(v.as_object().unwrap().len(), 3);
            // Value position: the attack string is one JSON string.
            let out = render("[{{ data.email }}]", Target::Json, json!({ "email": a })).unwrap();
            assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!([a]));
        }
    }

    #[test]
    fn json_value_position_objects_arrays_null_and_json_filter() {
        let data = json!({"o": {"a": [1, {"b": null}]}, "n": null, "s": "t"});
        let out = render(
            r#"{"o": {{data.o}}, "n": {{ data.n }}, "s": {{ data.s | json }}, "u": {{ data.s | upper }}, "j": "{{ data.s | json }}", "m": {{ data.m | default(null) }}}"#,
            Target::Json,
            data,
        )
        .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            json!({"o": {"a": [1, {"b": null}]}, "n": null, "s": "t", "u": "T", "j": "\"t\"", "m": null})
        );
        // `{{{`: the first brace is literal.
        assert_eq!(
            render("{{{ data.o }}}", Target::Text, json!({"o": 1})).unwrap(),
            "{1}"
        );
        assert!(Template::parse(r#"[{{{ data.o }}}]"#, Target::Json).is_err());
    }

    #[test]
    fn json_template_errors() {
        let e = parse_err(r#"{"a": {{ data.x }} "b": 1}"#, Target::Json);
        assert!(
            e.message.starts_with("the template is not valid JSON"),
            "{e}"
        );
        assert_eq!(e.column, 20, "{e}");
        let e = parse_err(r#"{"a": {{ data.x }}{{ data.y }}}"#, Target::Json);
        assert!(e.message.contains("not valid JSON"));
        let e = parse_err(r#"{"a": "{{ data.x }}"#, Target::Json);
        assert!(e.message.contains("not valid JSON"));
        let e = parse_err(r#"{"a": "\u00{{ data.x }}41"}"#, Target::Json);
        assert!(e.message.contains("escape sequence"), "{e}");
        assert_eq!(e.column, 12);
        let e = parse_err("", Target::Json);
        assert!(e.message.contains("not valid JSON"));
        // Valid shapes.
        for ok in [
            "{{ data }}",
            r#""{{ data.a }}{{ data.b }}""#,
            r#"{"a": [ {{data.a}} , {{data.b}} ]}"#,
            r#"{"\"{{data.a}}\\": "x\\"}"#,
        ] {
            assert!(Template::parse(ok, Target::Json).is_ok(), "{ok}");
        }
    }

    #[test]
    fn url_component_encoding() {
        let out = render(
            "https://api.example.com/orders/{{ data.id }}?q={{ data.q }}&t={{data.n}}",
            Target::UrlComponent,
            json!({"id": "a/b c", "q": "Zoë & co?=#%", "n": 5}),
        )
        .unwrap();
        assert_eq!(
            out,
            "https://api.example.com/orders/a%2Fb%20c?q=Zo%C3%AB%20%26%20co%3F%3D%23%25&t=5"
        );
        assert_eq!(
            render(
                "{{data.s}}",
                Target::UrlComponent,
                json!({"s": "AZaz09-._~"})
            )
            .unwrap(),
            "AZaz09-._~"
        );
    }

    #[test]
    fn header_injection_is_rejected() {
        let ok = render("Bearer {{ data.t }}", Target::Header, json!({"t": "abc"})).unwrap();
        assert_eq!(ok, "Bearer abc");
        for bad in ["a\r\nX-Admin: 1", "a\nb", "a\0"] {
            let e = render("Bearer {{ data.t }}", Target::Header, json!({ "t": bad })).unwrap_err();
            assert!(
                e.0.contains("`data.t`") && e.0.contains("CR, LF or NUL"),
                "{e}"
            );
        }
        let e = parse_err("ab\r\nX: {{ data.t }}", Target::Header);
        assert_eq!(e.column, 3);
        // Text does not care.
        assert_eq!(
            render("{{data.t}}", Target::Text, json!({"t": "a\nb"})).unwrap(),
            "a\nb"
        );
    }

    #[test]
    fn glob_target_escapes_values_not_the_pattern() {
        let out = render(
            "user:{{ data.id }}:*",
            Target::Glob,
            json!({"id": "a*b?[c]\\d"}),
        )
        .unwrap();
        assert_eq!(out, "user:a\\*b\\?\\[c\\]\\\\d:*");
        assert_eq!(
            render("k:{{ data.n }}", Target::Glob, json!({"n": 5})).unwrap(),
            "k:5"
        );
    }

    #[test]
    fn references_resolve_to_literal_text() {
        let mut resolve = |r: &str| -> Result<String, String> {
            match r {
                "${env:TOKEN}" => Ok("t{{ data.x }}ok".into()),
                "${env:LF}" => Ok("a\r\nX-Evil: 1".into()),
                other => Err(format!("`{other}` is not set")),
            }
        };
        let t = Template::parse_with_references(
            "Bearer ${env:TOKEN} {{ data.x }}",
            Target::Header,
            &mut resolve,
        )
        .unwrap();
        assert_eq!(t.source(), "Bearer ${env:TOKEN} {{ data.x }}");
        assert_eq!(t.paths().len(), 1, "the secret's `{{` is not a placeholder");
        let e = event(json!({"x": 7}));
        assert_eq!(t.render(&scope(&e)).unwrap(), "Bearer t{{ data.x }}ok 7");
        assert_eq!(t.literal_text("{{}}"), "Bearer t{{ data.x }}ok {{}}");
        // Errors point at the reference and never quote its value.
        let e = Template::parse_with_references("ab ${env:LF}", Target::Header, &mut resolve)
            .unwrap_err();
        assert_eq!(e.column, 4);
        assert!(!e.message.contains("Evil"), "{e}");
        let e = Template::parse_with_references("x${env:NOPE}", Target::Text, &mut resolve)
            .unwrap_err();
        assert_eq!(
            (e.column, e.message.as_str()),
            (2, "`${env:NOPE}` is not set")
        );
        let e =
            Template::parse_with_references("x${env:A", Target::Text, &mut resolve).unwrap_err();
        assert!(e.message.contains("unterminated"), "{e}");
        let e =
            Template::parse_with_references(r#"{"a": "${env:TOKEN}"}"#, Target::Json, &mut resolve)
                .unwrap_err();
        assert!(e.message.contains("not resolved in a JSON template"), "{e}");
        // Without references, the same as `parse`; `\{{` is still a literal `{{`.
        let t = Template::parse_with_references(r"\{{ $5", Target::Text, &mut resolve).unwrap();
        assert_eq!(t.render(&scope(&event(json!({})))).unwrap(), "{{ $5");
    }

    #[test]
    fn parse_errors_have_columns() {
        let e = parse_err("hello {{ data.x", Target::Text);
        assert_eq!(e.column, 7);
        assert!(e.message.contains("unclosed"), "{e}");
        let e = parse_err("ab {{ payload.x }}", Target::Text);
        assert_eq!(e.column, 7);
        assert!(e.message.contains("unknown root"), "{e}");
        let e = parse_err("ü {{ event.idd }}", Target::Text);
        assert_eq!(e.column, 6);
        assert!(e.message.contains("`event` has the fields"), "{e}");
        let e = parse_err("{{ data.x | shout }}", Target::Text);
        assert_eq!(e.column, 13);
        assert!(e.message.contains("unknown filter `shout`"), "{e}");
        let e = parse_err("{{ data.x | upper() }}", Target::Text);
        assert!(e.message.contains("no argument"), "{e}");
        let e = parse_err("{{ data.x | default }}", Target::Text);
        assert!(e.message.contains("needs a value"), "{e}");
        let e = parse_err("{{ data.x | default(\"a) }}", Target::Text);
        assert!(e.message.contains("unterminated"), "{e}");
        let e = parse_err("{{ data.x | default(nope) }}", Target::Text);
        assert!(e.message.contains("takes a string"), "{e}");
        let e = parse_err("{{ data.x y }}", Target::Text);
        assert_eq!(e.column, 11);
        let e = parse_err("{{ }}", Target::Text);
        assert_eq!(e.column, 4);
        let e = parse_err("{{ data.x | }}", Target::Text);
        assert!(e.message.contains("unknown filter"), "{e}");
        let big = "x".repeat(MAX_SOURCE_BYTES + 1);
        assert!(parse_err(&big, Target::Text).message.contains("limit"));
        assert_eq!(
            format!("{}", parse_err("{{", Target::Text)),
            "column 1: unclosed `{{`: no matching `}}`"
        );
    }

    #[test]
    fn escape_static_source_and_paths() {
        let t = Template::parse(r"literal \{{ data.x }} and }} {", Target::Text).unwrap();
        assert!(t.is_static());
        assert!(t.paths().is_empty());
        let e = event(json!({}));
        assert_eq!(
            t.render(&scope(&e)).unwrap(),
            "literal {{ data.x }} and }} {"
        );
        let t = Template::parse(r"\{{{{ data.x }}", Target::Text).unwrap();
        assert_eq!(t.render(&scope(&event(json!({"x": 1})))).unwrap(), "{{1");
        let src = "{{ data.a }}-{{ before.items[0].sku | lower }}";
        let t = Template::parse(src, Target::Text).unwrap();
        assert!(!t.is_static());
        assert_eq!(t.source(), src);
        assert_eq!(t.target(), Target::Text);
        let paths: Vec<String> = t.paths().iter().map(|p| p.to_string()).collect();
        assert_eq!(paths, ["data.a", "before.items[0].sku"]);
        // Escaped braces inside a JSON body are just string text.
        let t = Template::parse(r#"{"a": "\{{ {{ data.x }}"}"#, Target::Json).unwrap();
        let out = t.render(&scope(&event(json!({"x": "y"})))).unwrap();
        assert_eq!(out, r#"{"a": "{{ y"}"#);
    }

    #[test]
    fn missing_data_image_is_missing_not_a_panic() {
        let mut e = event(json!({}));
        e.data = None;
        e.before = None;
        let t = Template::parse("{{ data.x }}", Target::Text).unwrap();
        assert!(t.render(&Scope::event(&e)).is_err());
        let t = Template::parse("{{ observer.name | default('none') }}", Target::Text).unwrap();
        assert_eq!(t.render(&Scope::event(&e)).unwrap(), "none");
    }

    /// Deterministic fuzzing: mutate seed templates with a small LCG and push every mutant
    /// through parse and render for every target; nothing may panic, and successful renders must
    /// honour their target's guarantees.
    #[test]
    fn mutation_loop_never_panics() {
        let seeds = [
            r#"{"email": "{{ data.email }}", "total": {{ data.total | default(0) }}, "items": {{ data.items }}}"#,
            "https://x.test/{{ data.id }}?q={{ data.q | lower }}",
            "Bearer {{ data.token | default(\"anon\") }} \\{{ {{{ event.id }}}",
            r#"[{{ before.items[0].sku | json }}, "{{ data["odd key"] | upper }}", {{ observer.name }}]"#,
            "{{ delivery.idempotency_key }}{{event.created_at}}",
        ];
        let alphabet: Vec<char> =
            "{}|\"\\()[].,:' \n\r\0ab0123-_xdatjsonupperlowerdefaultnullé😀\u{2028}"
                .chars()
                .collect();
        let datas = [
            json!({"email": "\"}, \"admin\": true, \"x\": \"", "total": 1, "items": [1, "\\"],
                   "id": "a/b", "q": "\r\n", "token": "t\nX: y", "odd key": "é\u{0}"}),
            json!({}),
            json!(null),
            json!([1, 2, 3]),
        ];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |bound: usize| -> usize {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) as usize) % bound.max(1)
        };
        let mut parsed = 0;
        let mut rendered = 0;
        for round in 0..4000 {
            let mut chars: Vec<char> = seeds[round % seeds.len()].chars().collect();
            for _ in 0..1 + next(4) {
                let at = next(chars.len() + 1);
                match next(4) {
                    0 => chars.insert(at, alphabet[next(alphabet.len())]),
                    1 if at < chars.len() => {
                        chars.remove(at);
                    }
                    2 => {
                        let len = next(8);
                        let from = next(chars.len() + 1);
                        let piece: Vec<char> = chars.iter().skip(from).take(len).copied().collect();
                        for (k, c) in piece.into_iter().enumerate() {
                            chars.insert((at + k).min(chars.len()), c);
                        }
                    }
                    _ if at < chars.len() => chars[at] = alphabet[next(alphabet.len())],
                    _ => {}
                }
            }
            let src: String = chars.into_iter().collect();
            for target in [
                Target::Text,
                Target::Json,
                Target::UrlComponent,
                Target::Header,
                Target::Glob,
            ] {
                let Ok(t) = Template::parse(&src, target) else {
                    continue;
                };
                parsed += 1;
                for data in &datas {
                    let e = event(data.clone());
                    let Ok(out) = t.render(&scope(&e)) else {
                        continue;
                    };
                    rendered += 1;
                    match target {
                        Target::Json => {
                            assert!(
                                serde_json::from_str::<Value>(&out).is_ok(),
                                "{src:?} -> {out:?}"
                            )
                        }
                        Target::Header => assert!(!out.contains(['\r', '\n', '\0']), "{src:?}"),
                        _ => {}
                    }
                }
            }
        }
        // The loop must actually exercise the renderer, not only the error paths.
        assert!(
            parsed > 1000 && rendered > 1000,
            "parsed {parsed}, rendered {rendered}"
        );
    }
}

//! Observer conditions: a small, safe expression language evaluated against a change event.
//!
//! An observer's `condition` (for example `data.status == 'paid' && changed('status')`) is parsed
//! once when the configuration is loaded, so every mistake (typo in an operator, unknown function,
//! a path that can never resolve) is reported at load time with a column, not discovered while
//! events are flowing. Evaluation then never fails: a missing path is `null`, a comparison between
//! mismatched types is `false`, and the whole condition matches only when it yields boolean `true`.
//!
//! Grammar (lowest precedence first):
//!
//! ```text
//! condition  := or
//! or         := and ('||' and)*
//! and        := comparison ('&&' comparison)*
//! comparison := unary (('=='|'!='|'<'|'<='|'>'|'>=') unary | 'in' list | 'not' 'in' list)?
//! unary      := '!' unary | operand
//! operand    := number | string | 'true' | 'false' | 'null' | path | call | '(' or ')'
//! call       := name '(' (arg (',' arg)*)? ')'
//! arg        := list | or
//! list       := '[' (arg (',' arg)* ','?)? ']'
//! ```
//!
//! Untrusted input is bounded: the source length is capped, and nesting (parentheses, `!`, calls
//! and lists) is capped, which also bounds the depth of the tree and therefore the recursion of
//! both the parser and the evaluator. `&&`/`||` chains are stored flat so that long chains do not
//! deepen the tree.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::{Number, Value};

use crate::path::{Path, PathError, Root, Scope};

/// Longest accepted source, in characters.
pub const MAX_SOURCE_CHARS: usize = 10_000;

/// Deepest accepted nesting of parentheses, `!`, function calls and lists.
pub const MAX_DEPTH: usize = 64;

/// A parsed, checked condition, ready to be evaluated against events.
#[derive(Debug, Clone)]
pub struct Condition {
    source: String,
    expr: Expr,
}

/// Why a condition could not be parsed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct ConditionError {
    /// 1-based column of the offending token, counted in characters.
    pub column: usize,
    /// What was expected and what was found.
    pub message: String,
}

impl Condition {
    /// Parses and checks the expression once, at load time.
    pub fn parse(source: &str) -> Result<Condition, ConditionError> {
        let chars = source.chars().count();
        if chars > MAX_SOURCE_CHARS {
            return Err(ConditionError {
                column: MAX_SOURCE_CHARS + 1,
                message: format!(
                    "condition is too long: at most {MAX_SOURCE_CHARS} characters, found {chars}"
                ),
            });
        }
        let mut parser = Parser::new(source)?;
        if parser.tok.kind == Tok::Eof {
            return Err(parser.error_here("expected a condition, found end of input".into()));
        }
        let expr = parser.parse_or("")?;
        if parser.tok.kind != Tok::Eof {
            let found = parser.found();
            return Err(parser.error_here(format!(
                "expected an operator such as `==`, `&&` or `||`, or end of input, found {found}"
            )));
        }
        Ok(Condition {
            source: source.to_string(),
            expr,
        })
    }

    /// Evaluates against a scope; never panics, never errors: missing paths are null.
    ///
    /// The condition holds only when the expression yields boolean `true`.
    pub fn evaluate(&self, scope: &Scope<'_>) -> bool {
        let scope: Scope<'_> = *scope;
        truthy(&eval(&self.expr, &scope))
    }

    /// The source text it was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The enrichment lookups it reads (`enrich.<name>…`), each once, in order of appearance.
    /// A condition that reads any can only be evaluated after the lookups ran.
    pub fn enrich_names(&self) -> Vec<&str> {
        let mut out = Vec::new();
        let mut stack = vec![&self.expr];
        while let Some(e) = stack.pop() {
            match e {
                Expr::Path(p) => {
                    if let Some(n) = p.enrich_name() {
                        if !out.contains(&n) {
                            out.push(n);
                        }
                    }
                }
                Expr::Literal(_) | Expr::Changed { .. } => {}
                Expr::Not(inner) => stack.push(inner),
                Expr::Compare(_, l, r) => {
                    stack.push(r);
                    stack.push(l);
                }
                Expr::In { needle, list, .. } => {
                    stack.extend(list.iter().rev());
                    stack.push(needle);
                }
                Expr::List(items) | Expr::And(items) | Expr::Or(items) | Expr::Call(_, items) => {
                    stack.extend(items.iter().rev())
                }
            }
        }
        out
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

// ---------------------------------------------------------------------------------------------
// Syntax tree
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    Contains,
    StartsWith,
    EndsWith,
    Lower,
    Upper,
    Len,
}

/// Names and arities of the value functions, for lookups and for error messages.
const FUNCTIONS: &[(&str, Func, usize, &str)] = &[
    ("contains", Func::Contains, 2, "(text or array, value)"),
    ("starts_with", Func::StartsWith, 2, "(text, prefix)"),
    ("ends_with", Func::EndsWith, 2, "(text, suffix)"),
    ("lower", Func::Lower, 1, "(text)"),
    ("upper", Func::Upper, 1, "(text)"),
    ("len", Func::Len, 1, "(text, array or object)"),
];

#[derive(Debug, Clone)]
enum Expr {
    Literal(Value),
    Path(Path),
    List(Vec<Expr>),
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    In {
        negated: bool,
        needle: Box<Expr>,
        list: Vec<Expr>,
    },
    /// `changed('x')`, with the argument already resolved against both images.
    Changed {
        data: Path,
        before: Path,
    },
    Call(Func, Vec<Expr>),
}

// ---------------------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Eof,
    Number(Value),
    Str(String),
    Path(Path),
    /// A name directly followed by `(`.
    Func(String),
    /// Any other bare name: always an error, kept as a token so the parser can say where.
    Ident(String),
    True,
    False,
    Null,
    In,
    Not,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    AndAnd,
    OrOr,
    Bang,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Tok,
    /// 1-based character column.
    column: usize,
    /// Byte range in the source, used to quote the token in messages.
    start: usize,
    end: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// How a single character (or the end) is named in messages.
fn describe_char(c: Option<char>) -> String {
    match c {
        None => "end of input".into(),
        Some(' ') => "a space".into(),
        Some(c) if c.is_whitespace() || c.is_control() => format!("{c:?}"),
        Some(c) => format!("`{c}`"),
    }
}

/// Quotes a piece of source for a message, shortened so a long string literal does not swamp it.
fn quote_source(text: &str) -> String {
    const MAX: usize = 40;
    if text.chars().count() > MAX {
        let short: String = text.chars().take(MAX).collect();
        format!("`{short}…`")
    } else {
        format!("`{text}`")
    }
}

/// Tokens are produced lazily so that errors are reported in source order: a bad token late in the
/// input does not hide a grammar mistake earlier on.
struct Lexer<'s> {
    src: &'s str,
    /// Byte offset; always on a character boundary.
    pos: usize,
    /// 1-based character column of `pos`, tracked incrementally to keep lexing linear.
    col: usize,
}

impl<'s> Lexer<'s> {
    fn rest(&self) -> &'s str {
        self.src.get(self.pos..).unwrap_or("")
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn peek2(&self) -> Option<char> {
        self.rest().chars().nth(1)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        self.col += 1;
        Some(c)
    }

    fn err(column: usize, message: String) -> ConditionError {
        ConditionError { column, message }
    }

    fn next_token(&mut self) -> Result<Token, ConditionError> {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
        let start = self.pos;
        let column = self.col;
        let Some(c) = self.peek() else {
            return Ok(Token {
                kind: Tok::Eof,
                column,
                start,
                end: start,
            });
        };
        let kind = match c {
            '(' | ')' | '[' | ']' | ',' => {
                self.bump();
                match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    '[' => Tok::LBracket,
                    ']' => Tok::RBracket,
                    _ => Tok::Comma,
                }
            }
            '=' => {
                self.bump();
                if self.peek() == Some('=') {
                    self.bump();
                    Tok::Eq
                } else {
                    return Err(Self::err(
                        column,
                        "unexpected `=`: did you mean `==`?".into(),
                    ));
                }
            }
            '!' => {
                self.bump();
                if self.peek() == Some('=') {
                    self.bump();
                    Tok::Ne
                } else {
                    Tok::Bang
                }
            }
            '<' | '>' => {
                self.bump();
                let or_equal = self.peek() == Some('=');
                if or_equal {
                    self.bump();
                }
                match (c, or_equal) {
                    ('<', false) => Tok::Lt,
                    ('<', true) => Tok::Le,
                    (_, false) => Tok::Gt,
                    (_, true) => Tok::Ge,
                }
            }
            '&' | '|' => {
                self.bump();
                if self.peek() == Some(c) {
                    self.bump();
                    if c == '&' {
                        Tok::AndAnd
                    } else {
                        Tok::OrOr
                    }
                } else {
                    return Err(Self::err(
                        column,
                        format!("unexpected `{c}`: did you mean `{c}{c}`?"),
                    ));
                }
            }
            '\'' | '"' => self.string(c, column)?,
            '-' | '0'..='9' => self.number(column)?,
            c if is_ident_start(c) => self.word(column)?,
            '.' if self.peek2().is_some_and(|d| d.is_ascii_digit()) => {
                return Err(Self::err(
                    column,
                    "unexpected `.`: write decimals with a leading digit, such as `0.5`".into(),
                ));
            }
            other => {
                return Err(Self::err(
                    column,
                    format!("unexpected character {}", describe_char(Some(other))),
                ));
            }
        };
        Ok(Token {
            kind,
            column,
            start,
            end: self.pos,
        })
    }

    fn string(&mut self, quote: char, column: usize) -> Result<Tok, ConditionError> {
        self.bump();
        let mut out = String::new();
        loop {
            let at = self.col;
            match self.bump() {
                None => {
                    return Err(Self::err(
                        column,
                        format!("unterminated string: expected a closing `{quote}`, found end of input"),
                    ))
                }
                Some(c) if c == quote => return Ok(Tok::Str(out)),
                Some('\\') => match self.bump() {
                    Some('\\') => out.push('\\'),
                    Some('\'') => out.push('\''),
                    Some('"') => out.push('"'),
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    None => {
                        return Err(Self::err(
                            column,
                            format!(
                                "unterminated string: expected a closing `{quote}`, found end of input"
                            ),
                        ))
                    }
                    Some(other) => {
                        return Err(Self::err(
                            at,
                            format!(
                                "unknown escape `\\{other}` in string: expected one of `\\\\`, `\\'`, `\\\"`, `\\n` or `\\t`"
                            ),
                        ))
                    }
                },
                Some(c) => out.push(c),
            }
        }
    }

    fn number(&mut self, column: usize) -> Result<Tok, ConditionError> {
        let start = self.pos;
        if self.peek() == Some('-') {
            self.bump();
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                let found = describe_char(self.peek());
                return Err(Self::err(
                    self.col,
                    format!("expected a digit after `-`, found {found}"),
                ));
            }
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
        }
        let mut decimal = false;
        if self.peek() == Some('.') {
            self.bump();
            decimal = true;
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                let found = describe_char(self.peek());
                return Err(Self::err(
                    self.col,
                    format!("expected a digit after `.` in a number, found {found}"),
                ));
            }
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.bump();
            }
        }
        let text = self.src.get(start..self.pos).unwrap_or("");
        // `12abc` or `1.2.3` is almost certainly a typo, not two tokens.
        if let Some(c) = self.peek().filter(|&c| is_ident_char(c) || c == '.') {
            return Err(Self::err(
                self.col,
                format!("unexpected `{c}` after the number `{text}`"),
            ));
        }
        let number = if decimal { None } else { integer(text) };
        let number = number.or_else(|| text.parse::<f64>().ok().and_then(Number::from_f64));
        match number {
            Some(n) => Ok(Tok::Number(Value::Number(n))),
            None => Err(Self::err(
                column,
                format!("number `{text}` is out of range"),
            )),
        }
    }

    fn word(&mut self, column: usize) -> Result<Tok, ConditionError> {
        let start = self.pos;
        while self.peek().is_some_and(is_ident_char) {
            self.bump();
        }
        let word = self.src.get(start..self.pos).unwrap_or("");
        match word {
            "true" => return Ok(Tok::True),
            "false" => return Ok(Tok::False),
            "null" => return Ok(Tok::Null),
            "in" => return Ok(Tok::In),
            "not" => return Ok(Tok::Not),
            "observer" | "delivery" => {
                return Err(Self::err(
                    column,
                    format!(
                        "`{word}` is not available in conditions: paths in conditions start with `data`, `before`, `event` or `enrich`"
                    ),
                ))
            }
            "data" | "before" | "event" | "enrich" => {}
            _ => {
                // Deciding call-versus-name here keeps the parser free of two-token lookahead.
                let after = self.rest().trim_start();
                let name = word.to_string();
                return Ok(if after.starts_with('(') { Tok::Func(name) } else { Tok::Ident(name) });
            }
        }
        // The path parser does its own scanning, so hand it the text from the root onwards.
        let text = self.src.get(start..).unwrap_or("");
        match Path::parse_prefix(text) {
            Ok((path, used)) => {
                let consumed = text.get(..used).unwrap_or("");
                self.pos = start + consumed.len();
                self.col = column + consumed.chars().count();
                Ok(Tok::Path(path))
            }
            Err(e) => Err(path_error(text, column, &e)),
        }
    }
}

/// Parses an integer literal exactly, so that large ids compare without float rounding.
fn integer(text: &str) -> Option<Number> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(Number::from(i));
    }
    text.parse::<u64>().ok().map(Number::from)
}

/// Turns a path error (a byte offset inside `text`) into a condition error (a column).
fn path_error(text: &str, column: usize, e: &PathError) -> ConditionError {
    let before = text.get(..e.offset).unwrap_or("");
    let at = column + before.chars().count();
    let found = describe_char(text.get(e.offset..).and_then(|t| t.chars().next()));
    let message = if e.message.starts_with("expected") && !e.message.contains("found") {
        format!("{}, found {found}", e.message)
    } else {
        e.message.clone()
    };
    ConditionError {
        column: at,
        message: format!("invalid path: {message}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

struct Parser<'s> {
    lexer: Lexer<'s>,
    tok: Token,
    depth: usize,
}

impl<'s> Parser<'s> {
    fn new(src: &'s str) -> Result<Parser<'s>, ConditionError> {
        let mut lexer = Lexer {
            src,
            pos: 0,
            col: 1,
        };
        let tok = lexer.next_token()?;
        Ok(Parser {
            lexer,
            tok,
            depth: 0,
        })
    }

    fn advance(&mut self) -> Result<Token, ConditionError> {
        let next = self.lexer.next_token()?;
        Ok(std::mem::replace(&mut self.tok, next))
    }

    fn found(&self) -> String {
        if self.tok.kind == Tok::Eof {
            return "end of input".into();
        }
        quote_source(
            self.lexer
                .src
                .get(self.tok.start..self.tok.end)
                .unwrap_or(""),
        )
    }

    fn error_here(&self, message: String) -> ConditionError {
        ConditionError {
            column: self.tok.column,
            message,
        }
    }

    /// Counts one level of nesting; the matching `leave` must run on the success path only,
    /// since an error abandons the whole parse anyway.
    fn enter(&mut self, what: &str) -> Result<(), ConditionError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error_here(format!(
                "{what} is nested too deeply: at most {MAX_DEPTH} levels of parentheses, `!`, function calls and lists"
            )));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    /// `context` names what came just before (e.g. "after `==`"), for "expected a value" messages.
    fn parse_or(&mut self, context: &str) -> Result<Expr, ConditionError> {
        let first = self.parse_and(context)?;
        if self.tok.kind != Tok::OrOr {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.tok.kind == Tok::OrOr {
            self.advance()?;
            items.push(self.parse_and(" after `||`")?);
        }
        Ok(Expr::Or(items))
    }

    fn parse_and(&mut self, context: &str) -> Result<Expr, ConditionError> {
        let first = self.parse_comparison(context)?;
        if self.tok.kind != Tok::AndAnd {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.tok.kind == Tok::AndAnd {
            self.advance()?;
            items.push(self.parse_comparison(" after `&&`")?);
        }
        Ok(Expr::And(items))
    }

    fn comparison_op(kind: &Tok) -> Option<(CmpOp, &'static str)> {
        Some(match kind {
            Tok::Eq => (CmpOp::Eq, "=="),
            Tok::Ne => (CmpOp::Ne, "!="),
            Tok::Lt => (CmpOp::Lt, "<"),
            Tok::Le => (CmpOp::Le, "<="),
            Tok::Gt => (CmpOp::Gt, ">"),
            Tok::Ge => (CmpOp::Ge, ">="),
            _ => return None,
        })
    }

    fn parse_comparison(&mut self, context: &str) -> Result<Expr, ConditionError> {
        let left = self.parse_unary(context)?;
        let expr = if let Some((op, text)) = Self::comparison_op(&self.tok.kind) {
            self.advance()?;
            let right = self.parse_unary(&format!(" after `{text}`"))?;
            Expr::Compare(op, Box::new(left), Box::new(right))
        } else if matches!(self.tok.kind, Tok::In | Tok::Not) {
            let negated = self.tok.kind == Tok::Not;
            self.advance()?;
            if negated && self.tok.kind != Tok::In {
                let found = self.found();
                return Err(self.error_here(format!("expected `in` after `not`, found {found}")));
            }
            if negated {
                self.advance()?;
            }
            let keyword = if negated { "not in" } else { "in" };
            if self.tok.kind != Tok::LBracket {
                let found = self.found();
                return Err(self.error_here(format!(
                    "expected a list `[...]` after `{keyword}`, found {found} (to test an array field, use `contains(array, value)`)"
                )));
            }
            let list = self.parse_list()?;
            Expr::In {
                negated,
                needle: Box::new(left),
                list,
            }
        } else {
            return Ok(left);
        };
        // `a < b < c` reads like maths but would compare a boolean with `c`; refuse it.
        if Self::comparison_op(&self.tok.kind).is_some()
            || matches!(self.tok.kind, Tok::In | Tok::Not)
        {
            let found = self.found();
            return Err(self.error_here(format!(
                "comparisons cannot be chained: found {found} after a comparison; combine comparisons with `&&`"
            )));
        }
        Ok(expr)
    }

    fn parse_unary(&mut self, context: &str) -> Result<Expr, ConditionError> {
        if self.tok.kind != Tok::Bang {
            return self.parse_operand(context);
        }
        self.enter("`!`")?;
        self.advance()?;
        let inner = self.parse_unary(" after `!`")?;
        self.leave();
        Ok(Expr::Not(Box::new(inner)))
    }

    fn parse_operand(&mut self, context: &str) -> Result<Expr, ConditionError> {
        let literal = match &self.tok.kind {
            Tok::Number(n) => Some(n.clone()),
            Tok::Str(s) => Some(Value::String(s.clone())),
            Tok::True => Some(Value::Bool(true)),
            Tok::False => Some(Value::Bool(false)),
            Tok::Null => Some(Value::Null),
            _ => None,
        };
        if let Some(value) = literal {
            self.advance()?;
            return Ok(Expr::Literal(value));
        }
        match self.tok.kind.clone() {
            Tok::Path(path) => {
                self.advance()?;
                Ok(Expr::Path(path))
            }
            Tok::Func(name) => self.parse_call(name),
            Tok::LParen => {
                let open = self.tok.column;
                self.enter("`(`")?;
                self.advance()?;
                let inner = self.parse_or(" after `(`")?;
                if self.tok.kind != Tok::RParen {
                    let found = self.found();
                    return Err(self.error_here(format!(
                        "expected `)` to close the `(` at column {open}, found {found}"
                    )));
                }
                self.advance()?;
                self.leave();
                Ok(inner)
            }
            Tok::LBracket => Err(self.error_here(
                "a list `[...]` is only allowed after `in`/`not in` or as a function argument"
                    .into(),
            )),
            Tok::Not => Err(self.error_here(
                "unexpected `not`: use `!` to negate, or `not in [...]` after a value".into(),
            )),
            Tok::Ident(name) => Err(self.error_here(unknown_name(&name))),
            _ => {
                let found = self.found();
                Err(self.error_here(format!("expected a value{context}, found {found}")))
            }
        }
    }

    fn parse_list(&mut self) -> Result<Vec<Expr>, ConditionError> {
        let open = self.tok.column;
        self.enter("`[`")?;
        self.advance()?;
        let mut items = Vec::new();
        while self.tok.kind != Tok::RBracket {
            items.push(self.parse_arg(" in a list")?);
            match self.tok.kind {
                Tok::Comma => {
                    self.advance()?;
                }
                Tok::RBracket => {}
                _ => {
                    let found = self.found();
                    return Err(self.error_here(format!(
                        "expected `,` or `]` to continue the list opened at column {open}, found {found}"
                    )));
                }
            }
        }
        self.advance()?;
        self.leave();
        Ok(items)
    }

    fn parse_arg(&mut self, context: &str) -> Result<Expr, ConditionError> {
        if self.tok.kind == Tok::LBracket {
            Ok(Expr::List(self.parse_list()?))
        } else {
            self.parse_or(context)
        }
    }

    fn parse_call(&mut self, name: String) -> Result<Expr, ConditionError> {
        let name_column = self.tok.column;
        self.enter(&format!("`{name}(`"))?;
        self.advance()?; // the name
        self.advance()?; // the `(`, guaranteed by the lexer's `Func` classification
                         // Checked before the arguments so an unknown name is reported at the name, first.
        let func = if name == "changed" {
            None
        } else {
            match FUNCTIONS.iter().find(|f| f.0 == name) {
                Some(f) => Some(*f),
                None => {
                    return Err(ConditionError {
                        column: name_column,
                        message: unknown_function(&name),
                    })
                }
            }
        };
        let mut args = Vec::new();
        let mut arg_columns = Vec::new();
        let context = format!(" in the call to `{name}`");
        while self.tok.kind != Tok::RParen {
            arg_columns.push(self.tok.column);
            args.push(self.parse_arg(&context)?);
            match self.tok.kind {
                Tok::Comma => {
                    self.advance()?;
                    if self.tok.kind == Tok::RParen {
                        return Err(self.error_here(format!(
                            "expected an argument after `,`{context}, found `)`"
                        )));
                    }
                }
                Tok::RParen => {}
                _ => {
                    let found = self.found();
                    return Err(
                        self.error_here(format!("expected `,` or `)`{context}, found {found}"))
                    );
                }
            }
        }
        let close_column = self.tok.column;
        self.advance()?;
        self.leave();

        let Some((_, func, arity, shape)) = func else {
            return changed(args, &arg_columns, name_column, close_column);
        };
        if args.len() != arity {
            let plural = if arity == 1 { "argument" } else { "arguments" };
            return Err(ConditionError {
                column: name_column,
                message: format!(
                    "`{name}` takes {arity} {plural} {shape}, found {}",
                    args.len()
                ),
            });
        }
        Ok(Expr::Call(func, args))
    }
}

/// Builds `changed('x')`: the argument must be a literal so the path is checked at load time.
fn changed(
    args: Vec<Expr>,
    columns: &[usize],
    name_column: usize,
    close_column: usize,
) -> Result<Expr, ConditionError> {
    let column = columns.first().copied().unwrap_or(close_column);
    let text = match args.as_slice() {
        [Expr::Literal(Value::String(s))] => s,
        [_] => {
            return Err(ConditionError {
                column,
                message: "`changed` expects a quoted path relative to the row, such as `changed('status')`, found an expression".into(),
            })
        }
        _ => {
            return Err(ConditionError {
                column: name_column,
                message: format!(
                    "`changed` takes 1 argument (a quoted path such as 'status'), found {}",
                    args.len()
                ),
            })
        }
    };
    // The argument is relative to the images; `['odd key']` and `[0]` attach without a dot.
    let full = if text.starts_with('[') {
        format!("data{text}")
    } else {
        format!("data.{text}")
    };
    let path = Path::parse(&full).map_err(|e| ConditionError {
        column,
        message: format!("invalid path in `changed('{text}')`: {}", e.message),
    })?;
    let before = Path {
        root: Root::Before,
        segments: path.segments.clone(),
    };
    Ok(Expr::Changed { data: path, before })
}

fn unknown_function(name: &str) -> String {
    let known: Vec<String> = std::iter::once("changed")
        .chain(FUNCTIONS.iter().map(|f| f.0))
        .map(|n| format!("`{n}`"))
        .collect();
    format!(
        "unknown function `{name}`: expected one of {}",
        known.join(", ")
    )
}

fn unknown_name(name: &str) -> String {
    let hint = match name.to_ascii_lowercase().as_str() {
        "and" => " (did you mean `&&`?)".to_string(),
        "or" => " (did you mean `||`?)".to_string(),
        lower @ ("true" | "false" | "null") => format!(" (did you mean `{lower}`?)"),
        _ => String::new(),
    };
    format!(
        "unknown name `{name}`{hint}: expected a path starting with `data`, `before`, `event` or `enrich`, a string, a number, `true`, `false`, `null` or a function call"
    )
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

static NULL: Value = Value::Null;

fn truthy(v: &Value) -> bool {
    matches!(v, Value::Bool(true))
}

fn resolve<'e>(scope: &Scope<'e>, path: &Path) -> Cow<'e, Value> {
    scope.resolve(path).unwrap_or(Cow::Borrowed(&NULL))
}

fn boolean<'e>(b: bool) -> Cow<'e, Value> {
    Cow::Owned(Value::Bool(b))
}

/// Recursion here is bounded: the parser caps nesting at `MAX_DEPTH`, and `&&`/`||` chains are
/// flat vectors, so the tree is at most a small constant times `MAX_DEPTH` deep.
fn eval<'e>(expr: &'e Expr, scope: &Scope<'e>) -> Cow<'e, Value> {
    match expr {
        Expr::Literal(v) => Cow::Borrowed(v),
        Expr::Path(p) => resolve(scope, p),
        // The grammar only admits lists as `in` operands and call arguments, which go through
        // `eval_item`; a list is never a plain value, so this arm is not reached.
        Expr::List(_) => Cow::Borrowed(&NULL),
        Expr::Not(inner) => boolean(!truthy(&eval(inner, scope))),
        Expr::And(items) => boolean(items.iter().all(|e| truthy(&eval(e, scope)))),
        Expr::Or(items) => boolean(items.iter().any(|e| truthy(&eval(e, scope)))),
        Expr::Compare(op, l, r) => {
            let (l, r) = (eval(l, scope), eval(r, scope));
            boolean(compare(*op, &l, &r))
        }
        Expr::In {
            negated,
            needle,
            list,
        } => {
            let needle = Item::One(eval(needle, scope));
            let found = list.iter().any(|e| item_eq(&needle, &eval_item(e, scope)));
            boolean(found != *negated)
        }
        Expr::Changed { data, before } => {
            let event = scope.event;
            boolean(match (event.data.is_some(), event.before.is_some()) {
                (true, true) => !json_eq(&resolve(scope, data), &resolve(scope, before)),
                (true, false) => !resolve(scope, data).is_null(),
                (false, true) => !resolve(scope, before).is_null(),
                (false, false) => false,
            })
        }
        Expr::Call(func, args) => {
            let values: Vec<Item<'e>> = args.iter().map(|a| eval_item(a, scope)).collect();
            call(*func, &values)
        }
    }
}

/// An evaluated `in` element or call argument. List literals stay a vector of (usually borrowed)
/// values instead of being assembled into a `Value::Array`, which would deep-clone whatever the
/// paths inside point at; row images can be large and deeply nested.
enum Item<'e> {
    One(Cow<'e, Value>),
    List(Vec<Item<'e>>),
}

fn eval_item<'e>(expr: &'e Expr, scope: &Scope<'e>) -> Item<'e> {
    match expr {
        Expr::List(items) => Item::List(items.iter().map(|e| eval_item(e, scope)).collect()),
        other => Item::One(eval(other, scope)),
    }
}

/// Structural equality between evaluated items; recursion only follows list literals, whose
/// nesting the parser bounds, and defers to the iterative `json_eq` for values.
fn item_eq(a: &Item<'_>, b: &Item<'_>) -> bool {
    match (a, b) {
        (Item::One(x), Item::One(y)) => json_eq(x, y),
        (Item::List(xs), Item::List(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| item_eq(x, y))
        }
        (Item::One(v), Item::List(items)) | (Item::List(items), Item::One(v)) => match v.as_ref() {
            Value::Array(values) => {
                values.len() == items.len()
                    && values
                        .iter()
                        .zip(items)
                        .all(|(x, y)| item_eq(&Item::One(Cow::Borrowed(x)), y))
            }
            _ => false,
        },
    }
}

fn call<'e>(func: Func, args: &[Item<'e>]) -> Cow<'e, Value> {
    let value = |i: usize| match args.get(i) {
        Some(Item::One(v)) => v.as_ref(),
        _ => &NULL,
    };
    let (a, b) = (value(0), value(1));
    match func {
        Func::Contains => boolean(match (args.first(), args.get(1)) {
            (Some(Item::One(hay)), Some(needle)) => match (hay.as_ref(), needle) {
                (Value::String(s), Item::One(t)) => t.as_str().is_some_and(|t| s.contains(t)),
                (Value::Array(values), needle) => values
                    .iter()
                    .any(|v| item_eq(&Item::One(Cow::Borrowed(v)), needle)),
                _ => false,
            },
            (Some(Item::List(items)), Some(needle)) => items.iter().any(|i| item_eq(i, needle)),
            _ => false,
        }),
        Func::StartsWith => boolean(match (a, b) {
            (Value::String(s), Value::String(t)) => s.starts_with(t.as_str()),
            _ => false,
        }),
        Func::EndsWith => boolean(match (a, b) {
            (Value::String(s), Value::String(t)) => s.ends_with(t.as_str()),
            _ => false,
        }),
        Func::Lower => Cow::Owned(match a {
            Value::String(s) => Value::String(s.to_lowercase()),
            _ => Value::Null,
        }),
        Func::Upper => Cow::Owned(match a {
            Value::String(s) => Value::String(s.to_uppercase()),
            _ => Value::Null,
        }),
        Func::Len => Cow::Owned(match args.first() {
            Some(Item::List(items)) => Value::from(items.len()),
            _ => match a {
                Value::String(s) => Value::from(s.chars().count()),
                Value::Array(items) => Value::from(items.len()),
                Value::Object(map) => Value::from(map.len()),
                _ => Value::Null,
            },
        }),
    }
}

fn compare(op: CmpOp, l: &Value, r: &Value) -> bool {
    let ordering = || match (l, r) {
        (Value::Number(a), Value::Number(b)) => num_cmp(a, b),
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        _ => None,
    };
    match op {
        CmpOp::Eq => json_eq(l, r),
        CmpOp::Ne => !json_eq(l, r),
        CmpOp::Lt => ordering() == Some(Ordering::Less),
        CmpOp::Le => matches!(ordering(), Some(Ordering::Less | Ordering::Equal)),
        CmpOp::Gt => ordering() == Some(Ordering::Greater),
        CmpOp::Ge => matches!(ordering(), Some(Ordering::Greater | Ordering::Equal)),
    }
}

/// Integers compare exactly (ids beyond 2^53 must not collide); anything else as floats, which
/// makes `100 == 100.0` hold.
fn num_cmp(a: &Number, b: &Number) -> Option<Ordering> {
    let int = |n: &Number| {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    };
    if let (Some(x), Some(y)) = (int(a), int(b)) {
        return Some(x.cmp(&y));
    }
    a.as_f64()?.partial_cmp(&b.as_f64()?)
}

/// Structural equality with numeric number comparison. Iterative, because row images are
/// arbitrary data whose depth the condition author does not control.
fn json_eq(a: &Value, b: &Value) -> bool {
    let mut stack = vec![(a, b)];
    while let Some(pair) = stack.pop() {
        match pair {
            (Value::Null, Value::Null) => {}
            (Value::Bool(x), Value::Bool(y)) if x == y => {}
            (Value::Number(x), Value::Number(y)) if num_cmp(x, y) == Some(Ordering::Equal) => {}
            (Value::String(x), Value::String(y)) if x == y => {}
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                stack.extend(x.iter().zip(y))
            }
            (Value::Object(x), Value::Object(y)) if x.len() == y.len() => {
                for (k, v) in x {
                    match y.get(k) {
                        Some(w) => stack.push((v, w)),
                        None => return false,
                    }
                }
            }
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ChangeEvent, Operation};
    use serde_json::json;

    fn event(operation: Operation, data: Option<Value>, before: Option<Value>) -> ChangeEvent {
        ChangeEvent {
            pk: 7,
            id: uuid::Uuid::from_u128(0x1234),
            created_at: chrono::Utc::now(),
            entity: "Order".into(),
            entity_id: Some("42".into()),
            operation,
            data,
            before,
            tenant_id: None,
            txid: 99,
        }
    }

    fn order() -> ChangeEvent {
        event(
            Operation::Update,
            Some(json!({
                "status": "paid",
                "total": 100,
                "price": 9.5,
                "active": true,
                "name": "Ada Lovelace",
                "tags": ["vip", "eu"],
                "customer": {"email": "ada@example.com", "country": "UK"},
                "nothing": null,
                "big": 9007199254740993u64
            })),
            Some(json!({
                "status": "pending",
                "total": 100.0,
                "price": 9.5,
                "active": true,
                "name": "Ada Lovelace",
                "tags": ["vip"],
                "customer": {"email": "ada@old.example.com", "country": "UK"},
                "nothing": null,
                "big": 9007199254740992u64
            })),
        )
    }

    fn check_on(src: &str, ev: &ChangeEvent) -> bool {
        let c = Condition::parse(src).unwrap_or_else(|e| panic!("{}: {e}", quote_source(src)));
        c.evaluate(&Scope::event(ev))
    }

    fn check(src: &str) -> bool {
        check_on(src, &order())
    }

    fn err(src: &str) -> ConditionError {
        match Condition::parse(src) {
            Ok(c) => panic!("{src} parsed: {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn comparison_operators() {
        assert!(check("data.status == 'paid'"));
        assert!(check("data.status != \"pending\""));
        assert!(!check("data.status != 'paid'"));
        assert!(check("data.total > 99"));
        assert!(check("data.total >= 100"));
        assert!(!check("data.total > 100"));
        assert!(check("data.total < 100.5"));
        assert!(check("data.total <= 100"));
        assert!(check("data.price > -1"));
        assert!(check("-3 < -2.5"));
        assert!(check("'abc' < 'abd'"));
        assert!(check("'b' > 'abc'"));
        assert!(check("data.active == true"));
        assert!(check("event.operation == 'UPDATE'"));
        assert!(check("event.entity == 'Order' && event.entity_id == '42'"));
        assert!(check("event.pk == 7 && event.txid >= 99"));
    }

    #[test]
    fn logical_operators_and_precedence() {
        assert!(check("true && true"));
        assert!(!check("true && false"));
        assert!(check("false || true"));
        assert!(!check("false || false"));
        assert!(check("!false"));
        assert!(!check("!true"));
        assert!(check("!!true"));
        // `&&` binds tighter than `||`.
        assert!(check("true || false && false"));
        assert!(!check("(true || false) && false"));
        assert!(check("false && false || true"));
        // `!` binds tighter than comparison: `(!data.active) == false`.
        assert!(check("!data.active == false"));
        assert!(!check("!(data.active == true)"));
        assert!(check("!data.missing"));
        assert!(check(
            "data.total > 10 && data.status == 'paid' || data.nothing != null"
        ));
    }

    #[test]
    fn bare_values_are_true_only_when_boolean_true() {
        assert!(check("data.active"));
        assert!(!check("data.status"));
        assert!(!check("data.total"));
        assert!(!check("data.missing"));
        assert!(!check("'true'"));
        assert!(!check("1"));
        assert!(check("true"));
        assert!(!check("null"));
        assert!(!check("len(data.tags)"));
    }

    #[test]
    fn in_and_not_in() {
        assert!(check("data.status in ['paid', 'shipped']"));
        assert!(!check("data.status in ['pending']"));
        assert!(check("data.status not in ['pending', 'cancelled']"));
        assert!(!check("data.status not in ['paid']"));
        assert!(check("data.total in [1, 100.0]"));
        assert!(check("data.missing in [null]"));
        assert!(!check("data.status in []"));
        assert!(check("data.status not in []"));
        assert!(check("data.tags in [['vip', 'eu'], 'x']"));
        assert!(check(
            "data.customer.country in [before.customer.country, 'FR',]"
        ));
        assert!(check("lower(data.status) in [upper('x'), 'paid']"));
        assert!(!check("!data.status in ['paid']"));
        assert!(check("data.status in ['paid'] && data.total in [100]"));
    }

    #[test]
    fn changed_on_update_insert_delete() {
        assert!(check("changed('status')"));
        assert!(check("changed('customer.email')"));
        assert!(!check("changed('customer.country')"));
        assert!(
            !check("changed('total')"),
            "100 and 100.0 are the same number"
        );
        assert!(check("changed('tags')"));
        assert!(check("changed('tags[1]')"));
        assert!(!check("changed('tags[0]')"));
        assert!(!check("changed('missing')"));
        assert!(!check("changed('nothing')"));
        assert!(check("changed('big')"), "integers compare exactly");
        assert!(check("!changed('name') && changed(\"status\")"));

        let insert = event(
            Operation::Insert,
            Some(json!({"a": 1, "n": null, "o": {"b": 2}})),
            None,
        );
        assert!(check_on("changed('a')", &insert));
        assert!(check_on("changed('o.b')", &insert));
        assert!(!check_on("changed('n')", &insert));
        assert!(!check_on("changed('zz')", &insert));

        let delete = event(
            Operation::Delete,
            None,
            Some(json!({"a": 1, "n": null, "o": {"b": 2}})),
        );
        assert!(check_on("changed('a')", &delete));
        assert!(check_on("changed('o.b')", &delete));
        assert!(!check_on("changed('n')", &delete));
        assert!(!check_on("data.a == 1", &delete));
        assert!(check_on("before.a == 1 && data.a == null", &delete));

        let custom = event(Operation::Custom, None, None);
        assert!(!check_on("changed('a')", &custom));

        let odd = event(
            Operation::Update,
            Some(json!({"odd key": 1})),
            Some(json!({"odd key": 2})),
        );
        assert!(check_on("changed('[\"odd key\"]')", &odd));
    }

    #[test]
    fn missing_paths_and_nulls() {
        assert!(check("data.missing == null"));
        assert!(check("data.nothing == null"));
        assert!(check("data.status != null"));
        assert!(check("data.customer.missing.deeper == null"));
        assert!(check("data.tags[5] == null"));
        assert!(
            check("data.status.x == null"),
            "field of a string is missing"
        );
        assert!(!check("data.missing < 1"));
        assert!(!check("data.missing > 1"));
        assert!(!check("data.missing >= null"));
        assert!(!check("null <= null"));
        assert!(!check("data.missing == 0"));
        assert!(!check("data.missing == ''"));
        assert!(!check("data.missing == false"));
        let no_data = event(Operation::Custom, None, None);
        assert!(check_on("data.x == null && before.y == null", &no_data));
        assert!(check_on("event.tenant_id == null", &no_data));
    }

    #[test]
    fn numbers_types_and_structure() {
        assert!(check("data.total == 100.0"));
        assert!(check("100 == 100.0"));
        assert!(check("data.price == 9.5"));
        assert!(check("0.1 < 0.2"));
        assert!(check("data.big == 9007199254740993"));
        assert!(!check("data.big == 9007199254740992"));
        assert!(check("18446744073709551615 > -1"));
        assert!(check("-9223372036854775808 < 18446744073709551615"));
        assert!(check("123456789012345678901234567890 > 1"));
        assert!(!check("'5' == 5"));
        assert!(check("'5' != 5"));
        assert!(!check("'5' < 6"));
        assert!(!check("true > false"));
        assert!(!check("data.tags < data.tags"));
        assert!(!check("data.customer == before.customer"));
        assert!(check("data.tags[0] == before.tags[0]"));
        let ev = event(
            Operation::Update,
            Some(json!({"o": {"a": [1, {"b": 2}]}, "p": [1, 2]})),
            Some(json!({"o": {"a": [1.0, {"b": 2.0}]}, "p": [2, 1]})),
        );
        assert!(check_on("data.o == before.o", &ev));
        assert!(check_on("data.p != before.p", &ev));
        assert!(check_on("contains(data.p, 2.0)", &ev));
    }

    #[test]
    fn string_functions() {
        assert!(check("contains(data.name, 'Love')"));
        assert!(!check("contains(data.name, 'love')"));
        assert!(check("contains(lower(data.name), 'love')"));
        assert!(check("contains(data.tags, 'eu')"));
        assert!(check("contains(['a', 'b'], 'b')"));
        assert!(!check("contains(data.missing, 'x')"));
        assert!(!check("contains(data.total, 1)"));
        assert!(check("starts_with(data.customer.email, 'ada@')"));
        assert!(!check("starts_with(data.customer.email, 'bob')"));
        assert!(!check("starts_with(data.total, '1')"));
        assert!(check("ends_with(data.customer.email, '.com')"));
        assert!(!check("ends_with(data.missing, '.com')"));
        assert!(check("lower(data.name) == 'ada lovelace'"));
        assert!(check("upper(data.status) == 'PAID'"));
        assert!(check("lower(data.total) == null"));
        assert!(check("upper(null) == null"));
        assert!(check("len(data.status) == 4"));
        assert!(check("len('héllo') == 5"));
        assert!(check("len(data.tags) == 2"));
        assert!(check("len(data.customer) == 2"));
        assert!(check("len(data.missing) == null"));
        assert!(check("len(data.total) == null"));
        assert!(check("len([1, 2, 3]) == 3"));
        assert!(check("len(['a', ['b', 'c']]) > 1"));
    }

    #[test]
    fn string_escapes() {
        assert!(check(r#"len('a\'b') == 3"#));
        assert!(check(r#"'a\\b' == "a\\b""#));
        assert!(check(r#"'say "hi"' == "say \"hi\"""#));
        assert!(check(r#"len('\n\t') == 2"#));
        assert!(check("contains('line\\nnext', '\\n')"));
        assert!(check("'' == \"\""));
    }

    #[test]
    fn source_and_display() {
        let c = Condition::parse("  data.active  ").unwrap();
        assert_eq!(c.source(), "  data.active  ");
        assert_eq!(c.to_string(), "  data.active  ");
        let cloned = c.clone();
        assert!(cloned.evaluate(&Scope::event(&order())));
    }

    #[test]
    fn syntax_errors_have_columns_and_messages() {
        let e = err("data.status == ");
        assert_eq!(e.column, 16);
        assert_eq!(e.message, "expected a value after `==`, found end of input");

        let e = err("data.status = 'paid'");
        assert_eq!(e.column, 13);
        assert_eq!(e.message, "unexpected `=`: did you mean `==`?");
        assert_eq!(
            e.to_string(),
            "column 13: unexpected `=`: did you mean `==`?"
        );

        let e = err("data.a & data.b");
        assert_eq!(
            (e.column, e.message.as_str()),
            (8, "unexpected `&`: did you mean `&&`?")
        );
        let e = err("data.a | data.b");
        assert_eq!(
            (e.column, e.message.as_str()),
            (8, "unexpected `|`: did you mean `||`?")
        );

        let e = err("");
        assert_eq!(
            (e.column, e.message.as_str()),
            (1, "expected a condition, found end of input")
        );
        let e = err("   ");
        assert_eq!(e.column, 4);

        let e = err("data.a == 1 data.b");
        assert_eq!(e.column, 13);
        assert!(e.message.contains("found `data.b`"), "{}", e.message);

        let e = err("(data.a == 1");
        assert_eq!(e.column, 13);
        assert!(e
            .message
            .contains("expected `)` to close the `(` at column 1, found end of input"));

        let e = err("data.a == 1)");
        assert_eq!(e.column, 12);
        assert!(e.message.contains("found `)`"));

        let e = err("data.a && || data.b");
        assert_eq!(e.column, 11);
        assert_eq!(e.message, "expected a value after `&&`, found `||`");

        let e = err("1 < data.a < 3");
        assert_eq!(e.column, 12);
        assert!(e.message.contains("cannot be chained"));

        let e = err("é # 1");
        assert_eq!(e.column, 1);
        assert!(e.message.contains("unexpected character `é`"));
        let e = err("data.a == 'é' #");
        assert_eq!(e.column, 15, "columns count characters, not bytes");

        let e = err("!");
        assert_eq!(
            (e.column, e.message.as_str()),
            (2, "expected a value after `!`, found end of input")
        );

        let e = err("data.x == .5");
        assert_eq!(e.column, 11);
        assert!(e.message.contains("0.5"));
    }

    #[test]
    fn literal_errors() {
        let e = err("data.a == 'abc");
        assert_eq!(e.column, 11);
        assert_eq!(
            e.message,
            "unterminated string: expected a closing `'`, found end of input"
        );
        let e = err("data.a == \"abc\\");
        assert_eq!(e.column, 11);
        let e = err(r"data.a == 'a\qb'");
        assert_eq!(e.column, 13);
        assert!(e.message.contains("unknown escape `\\q`"));
        let e = err("data.a == 1.");
        assert_eq!(e.column, 13);
        assert_eq!(
            e.message,
            "expected a digit after `.` in a number, found end of input"
        );
        let e = err("data.a == - 1");
        assert_eq!(
            (e.column, e.message.as_str()),
            (12, "expected a digit after `-`, found a space")
        );
        let e = err("data.a == 12abc");
        assert_eq!(e.column, 13);
        assert!(e.message.contains("after the number `12`"));
        let e = err("data.a == 1.2.3");
        assert_eq!(e.column, 14);
        let e = err(&format!("1{} > 0", "9".repeat(400)));
        assert_eq!(e.column, 1);
        assert!(e.message.contains("out of range"));
    }

    #[test]
    fn enrich_paths_are_listed() {
        let c = Condition::parse(
            "data.total > 3 && (enrich.user.vip == true || 'x' in [enrich.org.tier, enrich.user.tier])",
        )
        .unwrap();
        assert_eq!(c.enrich_names(), vec!["user", "org"]);
        assert!(Condition::parse("data.total > 3")
            .unwrap()
            .enrich_names()
            .is_empty());
        assert!(err("enrich == 1")
            .message
            .contains("`enrich` needs the name"));
    }

    #[test]
    fn path_errors() {
        let e = err("observer.name == 'x'");
        assert_eq!(e.column, 1);
        assert!(e.message.contains("not available in conditions"));
        let e = err("true && delivery.idempotency_key != null");
        assert_eq!(e.column, 9);
        assert!(e.message.contains("not available in conditions"));
        let e = err("data. == 1");
        assert_eq!(e.column, 6);
        assert_eq!(
            e.message,
            "invalid path: expected a field name after `.`, found a space"
        );
        let e = err("x == data.items[x]");
        assert_eq!(e.column, 1);
        assert!(e.message.contains("unknown name `x`"));
        let e = err("data.a == data.items[x]");
        assert_eq!(e.column, 22);
        assert!(e.message.contains("inside `[]`"), "{}", e.message);
        let e = err("event.idd == 1");
        assert_eq!(e.column, 1);
        assert!(e.message.contains("`event` has the fields"));
        let e = err("payload.x == 1");
        assert!(e.message.contains("unknown name `payload`"));
        let e = err("data.a == 1 and data.b == 2");
        assert_eq!(e.column, 13);
        let e = err("data.a == 1 && data.b == True");
        assert_eq!(e.column, 26);
        assert!(e.message.contains("did you mean `true`?"));
        let e = err("not data.a");
        assert_eq!(e.column, 1);
        assert!(e.message.contains("use `!`"));
    }

    #[test]
    fn function_and_list_errors() {
        let e = err("foo(data.a)");
        assert_eq!(e.column, 1);
        assert!(e
            .message
            .starts_with("unknown function `foo`: expected one of `changed`, `contains`"));
        let e = err("data.a && lower(data.a, 'x')");
        assert_eq!(e.column, 11);
        assert_eq!(e.message, "`lower` takes 1 argument (text), found 2");
        let e = err("contains(data.a)");
        assert_eq!(
            e.message,
            "`contains` takes 2 arguments (text or array, value), found 1"
        );
        let e = err("changed()");
        assert_eq!(e.column, 1);
        assert!(e.message.contains("`changed` takes 1 argument"));
        let e = err("changed(data.status)");
        assert_eq!(e.column, 9);
        assert!(e.message.contains("quoted path"));
        let e = err("changed('status.')");
        assert_eq!(e.column, 9);
        assert!(e.message.contains("invalid path in `changed('status.')`"));
        let e = err("changed('')");
        assert_eq!(e.column, 9);
        let e = err("contains(data.a 'x')");
        assert_eq!(e.column, 17);
        assert!(e
            .message
            .contains("expected `,` or `)` in the call to `contains`"));
        let e = err("contains(data.a,)");
        assert_eq!(e.column, 17);
        let e = err("len(");
        assert_eq!(
            (e.column, e.message.as_str()),
            (
                5,
                "expected a value in the call to `len`, found end of input"
            )
        );
        let e = err("data.a in 'x'");
        assert_eq!(e.column, 11);
        assert!(e
            .message
            .starts_with("expected a list `[...]` after `in`, found `'x'`"));
        let e = err("data.a not 'x'");
        assert_eq!(
            (e.column, e.message.as_str()),
            (12, "expected `in` after `not`, found `'x'`")
        );
        let e = err("data.a in [1, 2");
        assert_eq!(e.column, 16);
        assert!(e.message.contains("`]`"));
        let e = err("data.a == [1]");
        assert_eq!(e.column, 11);
        assert!(e.message.contains("only allowed after `in`"));
    }

    #[test]
    fn depth_limit() {
        let ok = format!("{}true{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(check(&ok));
        let e = err(&format!(
            "{}true{}",
            "(".repeat(MAX_DEPTH + 1),
            ")".repeat(MAX_DEPTH + 1)
        ));
        assert_eq!(e.column, MAX_DEPTH + 1);
        assert!(e.message.contains("nested too deeply"));

        let bangs = format!("{}true", "!".repeat(MAX_DEPTH));
        assert!(check(&bangs));
        assert!(err(&format!("{}true", "!".repeat(MAX_DEPTH + 1)))
            .message
            .contains("nested too deeply"));

        let calls = format!(
            "{}'x'{} == 'x'",
            "lower(".repeat(MAX_DEPTH),
            ")".repeat(MAX_DEPTH)
        );
        assert!(check(&calls));
        assert!(err(&format!(
            "{}'x'{}",
            "lower(".repeat(MAX_DEPTH + 1),
            ")".repeat(MAX_DEPTH + 1)
        ))
        .message
        .contains("nested too deeply"));

        let lists = format!(
            "1 in {}1{}",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert!(err(&lists).message.contains("nested too deeply"));

        // Mixed nesting at the limit, with every level of the grammar in between.
        let mut mixed = String::from("true");
        for i in 0..MAX_DEPTH / 2 {
            mixed = if i % 2 == 0 {
                format!("!(false || {mixed} && true)")
            } else {
                format!("!({mixed} == false)")
            };
        }
        Condition::parse(&mixed)
            .unwrap()
            .evaluate(&Scope::event(&order()));
    }

    #[test]
    fn long_flat_chains_do_not_deepen_the_tree() {
        let chain = vec!["data.active"; 600].join(" && ");
        assert!(check(&chain));
        let chain = vec!["false"; 1200].join("||") + "||true";
        assert!(check(&chain));
        let list = format!("data.total in [{}100]", "1,".repeat(4000));
        assert!(check(&list));
    }

    #[test]
    fn length_limit() {
        let at_limit = format!("true{}", " ".repeat(MAX_SOURCE_CHARS - 4));
        assert!(check(&at_limit));
        let too_long = format!("true{}", " ".repeat(MAX_SOURCE_CHARS - 3));
        let e = err(&too_long);
        assert_eq!(e.column, MAX_SOURCE_CHARS + 1);
        assert!(e.message.contains("too long"));
        // Counted in characters: multi-byte text at the limit is accepted.
        let wide = format!("'{}' != ''", "é".repeat(MAX_SOURCE_CHARS - 8));
        assert!(check(&wide));
    }

    fn deep_value(levels: usize) -> Value {
        let mut deep = json!(1);
        for _ in 0..levels {
            deep = Value::Array(vec![deep]);
        }
        deep
    }

    /// serde_json clones and drops values recursively; take deep test data apart by hand so the
    /// test itself does not overflow.
    fn dismantle(mut v: Value) {
        loop {
            v = match v {
                Value::Object(mut m) => match m.remove("d") {
                    Some(d) => d,
                    None => break,
                },
                Value::Array(mut a) => match a.pop() {
                    Some(d) => d,
                    None => break,
                },
                _ => break,
            };
        }
    }

    #[test]
    fn deeply_nested_data_does_not_overflow() {
        let levels = 100_000;
        let mut ev = event(
            Operation::Update,
            Some(Value::Object(
                [("d".to_string(), deep_value(levels))]
                    .into_iter()
                    .collect(),
            )),
            Some(Value::Object(
                [("d".to_string(), deep_value(levels))]
                    .into_iter()
                    .collect(),
            )),
        );
        assert!(check_on("data.d == before.d", &ev));
        assert!(!check_on("changed('d')", &ev));
        assert!(check_on("data.d in [before.d]", &ev));
        assert!(check_on("data.d in [[before.d[0]]]", &ev));
        assert!(check_on("contains([before.d], data.d)", &ev));
        assert!(check_on("contains(before.d, data.d[0])", &ev));
        assert!(check_on("len([data.d, before.d]) == 2", &ev));
        for image in [ev.data.take(), ev.before.take()].into_iter().flatten() {
            dismantle(image);
        }
    }

    #[test]
    fn fuzz_never_panics() {
        let seeds = [
            "data.status == 'paid' && changed('status')",
            "!(data.total >= 10.5 || before.total < -3) && event.operation != \"DELETE\"",
            "data.tags[0] in ['a', \"b\", 1, null, true] || data.x not in [[1], 2]",
            "contains(lower(data.name), 'ada') && starts_with(data.e, 'x') && ends_with(data.e, '\\'')",
            "len(data.items) > 0 && upper(data.c['odd key']) == 'UK'",
            "changed('customer.email') || changed('[\"k\"]') || changed('items[2].sku')",
            "((data.a)) == ((before.a)) && !!data.b",
            "event.pk <= 18446744073709551615 && event.id != 'x\\n\\t\\\\'",
            "data.é == 'ü' || len('日本語') == 3",
        ];
        let alphabet: &[u8] = b"()[]!=<>&|,.'\"\\-0123456789 adtbefornulsinchgmx_\xc3\xa9\xff\n";
        let events = [
            order(),
            event(
                Operation::Insert,
                Some(json!({"a": [1, {"b": null}]})),
                None,
            ),
            event(Operation::Delete, None, Some(json!({"status": "x"}))),
            event(Operation::Custom, None, None),
        ];
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        let mut inputs: Vec<String> = Vec::new();
        for seed in seeds {
            let bytes = seed.as_bytes();
            // Every byte-level prefix and suffix: truncation is the most common real mistake.
            for i in 0..=bytes.len() {
                inputs.push(String::from_utf8_lossy(&bytes[..i]).into_owned());
                inputs.push(String::from_utf8_lossy(&bytes[i..]).into_owned());
            }
            for _ in 0..400 {
                let mut b = bytes.to_vec();
                for _ in 0..1 + next() % 4 {
                    let at = next() % (b.len() + 1);
                    match next() % 4 {
                        0 if at < b.len() => b[at] = alphabet[next() % alphabet.len()],
                        1 if at < b.len() => {
                            b.remove(at);
                        }
                        2 => b.insert(at, alphabet[next() % alphabet.len()]),
                        _ => {
                            let (s, e) = (next() % (b.len() + 1), next() % (b.len() + 1));
                            let (s, e) = (s.min(e), s.max(e));
                            let piece = b[s..e].to_vec();
                            let at = at.min(b.len());
                            b.splice(at..at, piece);
                        }
                    }
                }
                inputs.push(String::from_utf8_lossy(&b).into_owned());
            }
        }
        for _ in 0..500 {
            let n = next() % 60;
            inputs.push(
                (0..n)
                    .map(|_| alphabet[next() % alphabet.len()] as char)
                    .collect(),
            );
        }
        for unit in [
            "(",
            "!",
            "[",
            "lower(",
            "1 in [",
            "!(",
            "contains(",
            "'",
            "data.",
            "-",
        ] {
            inputs.push(unit.repeat(5000));
            inputs.push(format!("{}true", unit.repeat(MAX_DEPTH + 3)));
        }
        assert!(inputs.len() > 3000, "{}", inputs.len());
        let mut parsed = 0;
        for input in &inputs {
            match Condition::parse(input) {
                Ok(c) => {
                    parsed += 1;
                    for ev in &events {
                        c.evaluate(&Scope::event(ev));
                    }
                }
                Err(e) => {
                    assert!(e.column >= 1, "{input:?}: {e}");
                    assert!(
                        e.column <= input.chars().count() + 1 || e.column == MAX_SOURCE_CHARS + 1,
                        "{input:?}: {e}"
                    );
                    assert!(!e.message.is_empty());
                }
            }
        }
        assert!(
            parsed > 50,
            "mutations should still produce some valid conditions: {parsed}"
        );
    }
}

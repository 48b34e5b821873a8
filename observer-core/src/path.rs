//! Dotted paths into an event (`data.customer.email`, `before.items[0].sku`, `event.id`),
//! shared by the condition language and the template renderer.
//!
//! A path is parsed once at load time into a root and segments; resolving it against an event at
//! run time never fails: a missing field, an index out of range or a field of a non-object is
//! simply absent (`None`).

use std::borrow::Cow;

use serde_json::Value;

use crate::event::ChangeEvent;

/// Where a path starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// `data.…`: the after-image.
    Data,
    /// `before.…`: the before-image.
    Before,
    /// `event.<field>`: event metadata (id, entity, entity_id, operation, tenant_id, created_at, pk, txid).
    Event,
    /// `observer.name`: the observer being executed (templates only).
    Observer,
    /// `delivery.idempotency_key`: the stable key of this action delivery (templates only).
    Delivery,
    /// `enrich.<name>.…`: the result of the observer's enrichment lookup `<name>` (resolved at
    /// delivery, after the lookups ran).
    Enrich,
}

/// The event fields reachable as `event.<name>`.
pub const EVENT_FIELDS: &[&str] = &[
    "id",
    "entity",
    "entity_id",
    "operation",
    "tenant_id",
    "created_at",
    "pk",
    "txid",
];

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// `.name` or `["name"]`.
    Field(String),
    /// `[3]`.
    Index(usize),
}

/// A parsed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub root: Root,
    pub segments: Vec<Segment>,
}

/// Why a path could not be parsed; `offset` is the byte offset inside the path text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at offset {offset}: {message}")]
pub struct PathError {
    pub offset: usize,
    pub message: String,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl Path {
    /// Parses `root(.field | [index] | ["key"])*`. The whole input must be the path.
    pub fn parse(text: &str) -> Result<Path, PathError> {
        let (path, used) = Path::parse_prefix(text)?;
        if used != text.len() {
            return Err(PathError {
                offset: used,
                message: format!("unexpected `{}` after path", &text[used..]),
            });
        }
        Ok(path)
    }

    /// Parses a path at the start of `text`; returns it and how many bytes it used.
    pub fn parse_prefix(text: &str) -> Result<(Path, usize), PathError> {
        let bytes = text.as_bytes();
        let mut i = 0;
        let ident = |i: &mut usize| -> Option<String> {
            let start = *i;
            let first = text[start..].chars().next()?;
            if !is_ident_start(first) {
                return None;
            }
            *i += first.len_utf8();
            while let Some(c) = text[*i..].chars().next() {
                if is_ident_char(c) {
                    *i += c.len_utf8();
                } else {
                    break;
                }
            }
            Some(text[start..*i].to_string())
        };
        let root_name = ident(&mut i).ok_or_else(|| PathError {
            offset: 0,
            message: "expected a path such as `data.status` or `event.id`".into(),
        })?;
        let root = match root_name.as_str() {
            "data" => Root::Data,
            "before" => Root::Before,
            "event" => Root::Event,
            "observer" => Root::Observer,
            "delivery" => Root::Delivery,
            "enrich" => Root::Enrich,
            other => {
                return Err(PathError {
                    offset: 0,
                    message: format!(
                        "unknown root `{other}`: expected `data`, `before`, `event`, `observer`, `delivery` or `enrich`"
                    ),
                })
            }
        };
        let mut segments = Vec::new();
        loop {
            match bytes.get(i) {
                Some(b'.') => {
                    let at = i + 1;
                    i += 1;
                    let name = ident(&mut i).ok_or_else(|| PathError {
                        offset: at,
                        message: "expected a field name after `.`".into(),
                    })?;
                    segments.push(Segment::Field(name));
                }
                Some(b'[') => {
                    let open = i;
                    i += 1;
                    if bytes.get(i) == Some(&b'"') || bytes.get(i) == Some(&b'\'') {
                        let quote = bytes[i];
                        i += 1;
                        let start = i;
                        while i < bytes.len() && bytes[i] != quote {
                            i += 1;
                        }
                        if i >= bytes.len() {
                            return Err(PathError {
                                offset: open,
                                message: "unterminated quoted key".into(),
                            });
                        }
                        let key = text[start..i].to_string();
                        i += 1;
                        if bytes.get(i) != Some(&b']') {
                            return Err(PathError {
                                offset: i,
                                message: "expected `]`".into(),
                            });
                        }
                        i += 1;
                        segments.push(Segment::Field(key));
                    } else {
                        let start = i;
                        while i < bytes.len() && bytes[i].is_ascii_digit() {
                            i += 1;
                        }
                        let index = text[start..i].parse::<usize>().map_err(|_| PathError {
                            offset: start,
                            message: "expected an array index or a quoted key inside `[]`".into(),
                        })?;
                        if bytes.get(i) != Some(&b']') {
                            return Err(PathError {
                                offset: i,
                                message: "expected `]`".into(),
                            });
                        }
                        i += 1;
                        segments.push(Segment::Index(index));
                    }
                }
                _ => break,
            }
        }
        let path = Path { root, segments };
        path.check_shape()
            .map_err(|message| PathError { offset: 0, message })?;
        Ok((path, i))
    }

    /// Checks that metadata roots name a real field (`event.idd` is an error at load time).
    fn check_shape(&self) -> Result<(), String> {
        let first = match self.segments.first() {
            Some(Segment::Field(f)) => Some(f.as_str()),
            _ => None,
        };
        match self.root {
            Root::Data | Root::Before => Ok(()),
            Root::Event => match first {
                Some(f) if EVENT_FIELDS.contains(&f) && self.segments.len() == 1 => Ok(()),
                _ => Err(format!(
                    "`event` has the fields {}",
                    EVENT_FIELDS
                        .iter()
                        .map(|f| format!("`{f}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
            Root::Observer => match first {
                Some("name") if self.segments.len() == 1 => Ok(()),
                _ => Err("`observer` has one field: `observer.name`".into()),
            },
            Root::Delivery => match first {
                Some("idempotency_key") if self.segments.len() == 1 => Ok(()),
                _ => Err("`delivery` has one field: `delivery.idempotency_key`".into()),
            },
            Root::Enrich => match first {
                Some(_) => Ok(()),
                None => {
                    Err("`enrich` needs the name of a lookup, such as `enrich.user.email`".into())
                }
            },
        }
    }

    /// The lookup an `enrich.<name>…` path reads, else `None`.
    pub fn enrich_name(&self) -> Option<&str> {
        match (&self.root, self.segments.first()) {
            (Root::Enrich, Some(Segment::Field(name))) => Some(name),
            _ => None,
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let root = match self.root {
            Root::Data => "data",
            Root::Before => "before",
            Root::Event => "event",
            Root::Observer => "observer",
            Root::Delivery => "delivery",
            Root::Enrich => "enrich",
        };
        f.write_str(root)?;
        for s in &self.segments {
            match s {
                Segment::Field(name) if name.chars().all(is_ident_char) && !name.is_empty() => {
                    write!(f, ".{name}")?
                }
                Segment::Field(name) => write!(f, "[{name:?}]")?,
                Segment::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

/// What a path is resolved against: the event plus, for templates, the delivery it is part of.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub event: &'a ChangeEvent,
    /// The observer being executed, when there is one.
    pub observer: Option<&'a str>,
    /// The idempotency key of the delivery being rendered, when there is one.
    pub idempotency_key: Option<&'a str>,
    /// The results of the observer's enrichment lookups by name, once they ran (`None` before:
    /// every `enrich.…` path is then missing).
    pub enrich: Option<&'a serde_json::Map<String, Value>>,
}

impl<'a> Scope<'a> {
    /// A scope with the event alone (conditions).
    pub fn event(event: &'a ChangeEvent) -> Scope<'a> {
        Scope {
            event,
            observer: None,
            idempotency_key: None,
            enrich: None,
        }
    }

    /// Resolves a path; `None` when any step is missing.
    pub fn resolve(&self, path: &Path) -> Option<Cow<'a, Value>> {
        let e = self.event;
        match path.root {
            Root::Data => walk(e.data.as_ref()?, &path.segments).map(Cow::Borrowed),
            Root::Before => walk(e.before.as_ref()?, &path.segments).map(Cow::Borrowed),
            Root::Event => {
                let Some(Segment::Field(f)) = path.segments.first() else {
                    return None;
                };
                let v = match f.as_str() {
                    "id" => Value::String(e.id.to_string()),
                    "entity" => Value::String(e.entity.clone()),
                    "entity_id" => e
                        .entity_id
                        .clone()
                        .map(Value::String)
                        .unwrap_or(Value::Null),
                    "operation" => Value::String(e.operation.as_str().to_string()),
                    "tenant_id" => e
                        .tenant_id
                        .map(|t| Value::String(t.to_string()))
                        .unwrap_or(Value::Null),
                    "created_at" => Value::String(
                        e.created_at
                            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    ),
                    "pk" => Value::from(e.pk),
                    "txid" => Value::from(e.txid),
                    _ => return None,
                };
                Some(Cow::Owned(v))
            }
            Root::Observer => self
                .observer
                .map(|o| Cow::Owned(Value::String(o.to_string()))),
            Root::Delivery => self
                .idempotency_key
                .map(|k| Cow::Owned(Value::String(k.to_string()))),
            Root::Enrich => {
                let Some((Segment::Field(name), rest)) = path.segments.split_first() else {
                    return None;
                };
                walk(self.enrich?.get(name)?, rest).map(Cow::Borrowed)
            }
        }
    }
}

fn walk<'v>(mut v: &'v Value, segments: &[Segment]) -> Option<&'v Value> {
    for s in segments {
        v = match (s, v) {
            (Segment::Field(name), Value::Object(map)) => map.get(name)?,
            (Segment::Index(i), Value::Array(items)) => items.get(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_indexes_and_quoted_keys() {
        let p = Path::parse(r#"data.items[2]["odd key"].sku"#).unwrap();
        assert_eq!(p.root, Root::Data);
        assert_eq!(
            p.segments,
            vec![
                Segment::Field("items".into()),
                Segment::Index(2),
                Segment::Field("odd key".into()),
                Segment::Field("sku".into())
            ]
        );
        assert_eq!(p.to_string(), r#"data.items[2]["odd key"].sku"#);
    }

    #[test]
    fn rejects_unknown_roots_and_event_fields() {
        assert!(Path::parse("payload.x")
            .unwrap_err()
            .message
            .contains("unknown root"));
        assert!(Path::parse("event.idd").is_err());
        assert!(Path::parse("data.").is_err());
        assert!(Path::parse("data[x]").is_err());
        assert!(Path::parse("data.a b").is_err());
    }

    #[test]
    fn enrich_paths_resolve_against_the_lookup_results() {
        let p = Path::parse("enrich.user.emails[1]").unwrap();
        assert_eq!(p.enrich_name(), Some("user"));
        assert_eq!(p.to_string(), "enrich.user.emails[1]");
        assert!(Path::parse("enrich").is_err());
        let event: ChangeEvent = serde_json::from_value(serde_json::json!({
            "id": "0b7c4c36-3c1c-4a4e-9d43-4f5b8a9c1d2e", "pk": 1, "txid": 1,
            "entity": "Order", "entity_id": "1", "operation": "INSERT",
            "data": {}, "before": null, "tenant_id": null,
            "created_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        let mut scope = Scope::event(&event);
        assert_eq!(scope.resolve(&p), None, "no lookups ran yet");
        let results = serde_json::json!({"user": {"emails": ["a@x", "b@x"]}, "org": null});
        scope.enrich = results.as_object();
        assert_eq!(scope.resolve(&p).unwrap().as_ref(), "b@x");
        assert_eq!(
            scope
                .resolve(&Path::parse("enrich.org").unwrap())
                .unwrap()
                .as_ref(),
            &Value::Null
        );
        assert_eq!(scope.resolve(&Path::parse("enrich.org.x").unwrap()), None);
        assert_eq!(scope.resolve(&Path::parse("enrich.nope").unwrap()), None);
    }

    #[test]
    fn prefix_stops_at_non_path_text() {
        let (p, used) = Path::parse_prefix("data.total > 3").unwrap();
        assert_eq!(p.to_string(), "data.total");
        assert_eq!(used, "data.total".len());
    }
}

//! A YAML tree that remembers where every node came from.
//!
//! serde-based loaders lose positions once a value is deserialized, and the
//! policy compiler must point at `file:line:column` for every error it finds.
//! So this module drives `yaml-rust2`'s event parser directly and builds a
//! small tree of [`Node`]s, each with its 1-based line and column, keeping
//! mapping keys in file order with their own positions.
//!
//! Scalars are kept as text together with their style: the decoder needs to
//! know that `"3"` was quoted (a string) while `3` was plain. Nothing is typed
//! here; `decode.rs` does that against the schema.
//!
//! Deliberate restrictions, each reported as an error rather than guessed at:
//! - one document per file;
//! - duplicate keys in a mapping (YAML forbids them, many loaders keep the
//!   last one silently);
//! - aliases (`*name`) and merge keys, which would make a value's position
//!   ambiguous; anchors on their own are harmless and ignored;
//! - tags (`!!str`, `!custom`);
//! - non-scalar mapping keys;
//! - nesting deeper than [`MAX_DEPTH`].
//!
//! A syntax error stops the parse (the parser cannot recover); the others are
//! collected and returned beside the tree so the compiler can report them
//! together with its own.

use std::collections::HashMap;
use std::str::Chars;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, ScanError, TScalarStyle};

/// Deeper nesting than this is rejected (no policy needs more than ~6).
pub const MAX_DEPTH: usize = 64;

/// One node of the tree, with the 1-based position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// Keys in file order; duplicates have been reported and dropped.
    Map(Vec<(Key, Node)>),
    Seq(Vec<Node>),
    Scalar(String, ScalarStyle),
    /// An empty value, `~` or `null`.
    Null,
}

/// A mapping key and where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub name: String,
    pub line: usize,
    pub col: usize,
}

/// How a scalar was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarStyle {
    /// Unquoted: may be read as a number or a boolean.
    Plain,
    /// `'...'` or `"..."`: always a string.
    Quoted,
    /// `|` or `>` block: always a string.
    Block,
}

/// A problem found while reading the YAML, before any schema check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// The result of [`parse`]: a tree (unless the syntax was broken) and the
/// problems found along the way.
#[derive(Debug)]
pub struct Parsed {
    /// `None` after a syntax error. An empty file gives a `Null` root.
    pub root: Option<Node>,
    pub errors: Vec<YamlError>,
}

impl Node {
    /// The scalar text, if this is a scalar.
    pub fn as_scalar(&self) -> Option<(&str, ScalarStyle)> {
        match &self.kind {
            NodeKind::Scalar(text, style) => Some((text, *style)),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.kind, NodeKind::Null)
    }

    /// A short description for "expected X, got Y" messages.
    pub fn describe(&self) -> String {
        match &self.kind {
            NodeKind::Map(_) => "a mapping".to_string(),
            NodeKind::Seq(_) => "a list".to_string(),
            NodeKind::Null => "an empty value".to_string(),
            NodeKind::Scalar(text, style) => {
                let shown = truncate(text, 60);
                match style {
                    ScalarStyle::Plain => format!("`{shown}`"),
                    ScalarStyle::Quoted | ScalarStyle::Block => format!("the string \"{shown}\""),
                }
            }
        }
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        let head: String = text.chars().take(max_chars).collect();
        format!("{head}…")
    }
}

/// Parses one YAML document into a positioned tree.
pub fn parse(text: &str) -> Parsed {
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        errors: Vec::new(),
    };
    let root = match builder.document() {
        Ok(root) => Some(root),
        Err(e) => {
            builder.errors.push(YamlError {
                line: e.marker().line().max(1),
                col: e.marker().col() + 1,
                message: format!("YAML syntax error: {}", e.info()),
            });
            None
        }
    };
    Parsed {
        root,
        errors: builder.errors,
    }
}

struct Builder<'a> {
    parser: Parser<Chars<'a>>,
    errors: Vec<YamlError>,
}

/// A 1-based (line, column) from a parser marker (whose column is 0-based).
fn pos(mark: &Marker) -> (usize, usize) {
    (mark.line().max(1), mark.col() + 1)
}

impl Builder<'_> {
    fn next(&mut self) -> Result<(Event, Marker), ScanError> {
        self.parser.next_token()
    }

    fn error(&mut self, (line, col): (usize, usize), message: impl Into<String>) {
        self.errors.push(YamlError {
            line,
            col,
            message: message.into(),
        });
    }

    /// The whole stream: exactly zero or one document.
    fn document(&mut self) -> Result<Node, ScanError> {
        let mut root = None;
        loop {
            let (event, mark) = self.next()?;
            match event {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::StreamEnd => break,
                Event::DocumentStart => {
                    if root.is_some() {
                        self.error(pos(&mark), "a policy file holds one YAML document; remove this `---` and what follows");
                        break;
                    }
                    let (event, mark) = self.next()?;
                    root = Some(self.node(event, mark, 1)?);
                }
                other => {
                    // The parser always opens a document first; be safe anyway.
                    root = Some(self.node(other, mark, 1)?);
                }
            }
        }
        Ok(root.unwrap_or(Node {
            kind: NodeKind::Null,
            line: 1,
            col: 1,
        }))
    }

    /// Builds the node that starts with `event`, consuming its children.
    fn node(&mut self, event: Event, mark: Marker, depth: usize) -> Result<Node, ScanError> {
        let (line, col) = pos(&mark);
        let deep = depth > MAX_DEPTH;
        let tag_error = |b: &mut Self, tag: &Option<yaml_rust2::parser::Tag>| {
            if let Some(tag) = tag {
                b.error(
                    (line, col),
                    format!(
                        "YAML tags such as `{}{}` are not supported",
                        tag.handle, tag.suffix
                    ),
                );
            }
        };
        match event {
            Event::Scalar(text, style, _anchor, tag) => {
                tag_error(self, &tag);
                let kind = match style {
                    TScalarStyle::Plain
                        if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") =>
                    {
                        NodeKind::Null
                    }
                    TScalarStyle::Plain => NodeKind::Scalar(text, ScalarStyle::Plain),
                    TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted => {
                        NodeKind::Scalar(text, ScalarStyle::Quoted)
                    }
                    TScalarStyle::Literal | TScalarStyle::Folded => {
                        NodeKind::Scalar(text, ScalarStyle::Block)
                    }
                };
                Ok(Node { kind, line, col })
            }
            Event::Alias(_) => {
                self.error((line, col), "YAML aliases (`*name`) and merge keys are not supported; write the value out in full");
                Ok(Node {
                    kind: NodeKind::Null,
                    line,
                    col,
                })
            }
            Event::SequenceStart(_anchor, tag) => {
                tag_error(self, &tag);
                if deep {
                    self.too_deep((line, col))?;
                    return Ok(Node {
                        kind: NodeKind::Null,
                        line,
                        col,
                    });
                }
                let mut items = Vec::new();
                loop {
                    let (event, mark) = self.next()?;
                    if matches!(event, Event::SequenceEnd | Event::StreamEnd) {
                        break;
                    }
                    items.push(self.node(event, mark, depth + 1)?);
                }
                Ok(Node {
                    kind: NodeKind::Seq(items),
                    line,
                    col,
                })
            }
            Event::MappingStart(_anchor, tag) => {
                tag_error(self, &tag);
                if deep {
                    self.too_deep((line, col))?;
                    return Ok(Node {
                        kind: NodeKind::Null,
                        line,
                        col,
                    });
                }
                self.mapping((line, col), depth)
            }
            // End events are consumed by their start's loop; anything else
            // here is a parser oddity: treat it as an empty value.
            _ => Ok(Node {
                kind: NodeKind::Null,
                line,
                col,
            }),
        }
    }

    fn mapping(&mut self, start: (usize, usize), depth: usize) -> Result<Node, ScanError> {
        let mut entries: Vec<(Key, Node)> = Vec::new();
        // Key name -> where it was first written, for duplicate detection.
        let mut seen: HashMap<String, (usize, usize)> = HashMap::new();
        loop {
            let (event, mark) = self.next()?;
            let key_pos = pos(&mark);
            let key = match event {
                Event::MappingEnd | Event::StreamEnd => break,
                Event::Scalar(text, _, _, _) => Some(text),
                other => {
                    // A complex key (`? [a, b]`): read and discard it.
                    let _ = self.node(other, mark, depth + 1)?;
                    self.error(key_pos, "mapping keys must be plain names");
                    None
                }
            };
            let (event, mark) = self.next()?;
            let mut value = self.node(event, mark, depth + 1)?;
            let Some(name) = key else { continue };
            // An empty value has no position of its own (the parser marks the
            // next token); point at its key instead.
            if value.is_null() && value.line > key_pos.0 {
                (value.line, value.col) = key_pos;
            }
            if let Some((line, col)) = seen.get(&name) {
                let message =
                    format!("duplicate key `{name}` (first defined at line {line}, column {col})");
                self.error(key_pos, message);
                continue;
            }
            seen.insert(name.clone(), key_pos);
            entries.push((
                Key {
                    name,
                    line: key_pos.0,
                    col: key_pos.1,
                },
                value,
            ));
        }
        // A block mapping's start event is marked after its first key; the
        // first key is where a reader would say the mapping starts.
        let (line, col) = match entries.first() {
            Some((k, _)) if (k.line, k.col) < start => (k.line, k.col),
            _ => start,
        };
        Ok(Node {
            kind: NodeKind::Map(entries),
            line,
            col,
        })
    }

    /// Reports nesting past [`MAX_DEPTH`] and skips the rest of the node.
    fn too_deep(&mut self, at: (usize, usize)) -> Result<(), ScanError> {
        self.error(at, format!("nesting is deeper than {MAX_DEPTH} levels"));
        let mut open = 1usize;
        while open > 0 {
            let (event, _) = self.next()?;
            match event {
                Event::SequenceStart(..) | Event::MappingStart(..) => open += 1,
                Event::SequenceEnd | Event::MappingEnd => open -= 1,
                Event::StreamEnd => break,
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(node: &Node) -> &[(Key, Node)] {
        match &node.kind {
            NodeKind::Map(entries) => entries,
            other => panic!("not a map: {other:?}"),
        }
    }

    #[test]
    fn positions_are_one_based_and_keys_keep_order() {
        let parsed = parse("version: 1\nserver:\n  listen: [\"a\", b]\n  admin:\n    listen: x\n");
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let root = parsed.root.unwrap();
        assert_eq!((root.line, root.col), (1, 1));
        let entries = map(&root);
        assert_eq!(
            entries[0].0,
            Key {
                name: "version".into(),
                line: 1,
                col: 1
            }
        );
        assert_eq!((entries[0].1.line, entries[0].1.col), (1, 10));
        assert_eq!(entries[1].0.name, "server");
        let server = map(&entries[1].1);
        assert_eq!((entries[1].1.line, entries[1].1.col), (3, 3));
        let NodeKind::Seq(items) = &server[0].1.kind else {
            panic!()
        };
        assert_eq!(
            items[0].kind,
            NodeKind::Scalar("a".into(), ScalarStyle::Quoted)
        );
        assert_eq!((items[0].line, items[0].col), (3, 12));
        assert_eq!(
            items[1].kind,
            NodeKind::Scalar("b".into(), ScalarStyle::Plain)
        );
        assert_eq!((server[1].0.line, server[1].0.col), (4, 3));
    }

    #[test]
    fn empty_values_are_null_at_their_key() {
        let parsed = parse("a:\nb: ~\nc: null\nd: 'null'\n");
        let root = parsed.root.unwrap();
        let entries = map(&root);
        assert!(entries[0].1.is_null());
        assert_eq!((entries[0].1.line, entries[0].1.col), (1, 1));
        assert!(entries[1].1.is_null());
        assert!(entries[2].1.is_null());
        assert_eq!(
            entries[3].1.as_scalar(),
            Some(("null", ScalarStyle::Quoted))
        );
    }

    #[test]
    fn duplicate_keys_are_reported_at_the_second() {
        let parsed = parse("a: 1\nb: 2\na: 3\n");
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!((parsed.errors[0].line, parsed.errors[0].col), (3, 1));
        assert!(parsed.errors[0]
            .message
            .contains("duplicate key `a` (first defined at line 1, column 1)"));
        assert_eq!(map(parsed.root.as_ref().unwrap()).len(), 2);
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let parsed = parse("a:\n  b: 1\n c: 2\n");
        assert!(parsed.root.is_none());
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!(parsed.errors[0].line, 3);
        assert!(parsed.errors[0].message.starts_with("YAML syntax error"));
    }

    #[test]
    fn aliases_tags_and_extra_documents_are_rejected() {
        let parsed = parse("a: &x 1\nb: *x\nc: !!str 5\n---\nd: 1\n");
        let messages: Vec<_> = parsed
            .errors
            .iter()
            .map(|e| (e.line, e.message.as_str()))
            .collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(messages[0].1.contains("aliases"));
        assert_eq!(messages[0].0, 2);
        assert!(messages[1].1.contains("tags"));
        assert!(messages[2].1.contains("one YAML document"));
    }

    #[test]
    fn empty_file_is_a_null_root() {
        let parsed = parse("# only a comment\n");
        assert!(parsed.errors.is_empty());
        assert!(parsed.root.unwrap().is_null());
    }

    #[test]
    fn deep_nesting_is_cut_off() {
        let text = format!("{}{}", "[".repeat(MAX_DEPTH + 5), "]".repeat(MAX_DEPTH + 5));
        let parsed = parse(&text);
        assert_eq!(parsed.errors.len(), 1);
        assert!(parsed.errors[0].message.contains("deeper"));
    }
}

//! Tool calls read while the answer streams: OpenAI clients expect a call's id and name as soon
//! as the model has written them, then its arguments in fragments (vLLM and llama.cpp users
//! see malformed or all-at-once deltas; agents show progress on long arguments).
//!
//! The Hermes / Qwen2.5 shape `<tool_call>\n{"name": "f", "arguments": {…}}\n</tool_call>` is
//! streamed incrementally: the header is matched as it arrives, then the arguments object is
//! scanned with a JSON brace/string tracker and forwarded byte for byte, so the fragments
//! concatenate to the model's own JSON text. Everything else that may be a call — a tag in
//! another key order, a list, a ```fenced block or a bare JSON answer, which small models write
//! instead of tags — is held back and read whole at the end by [`Hermes`]. Text that cannot
//! start a call streams as content at once; a tag's possible prefix at a chunk's end is held
//! until it is decided, and whitespace just before a call is dropped (as the whole-text parser
//! trims it).

use crate::toolcall::{Hermes, ToolCallParser};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const FENCE: &str = "```";

/// One piece of a streamed answer, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Content(String),
    /// A call begins: its index among this answer's calls and the function's name.
    CallStart { index: usize, name: String },
    /// The next fragment of call `index`'s arguments (JSON text).
    CallArgs { index: usize, fragment: String },
}

#[derive(Debug, Clone, PartialEq)]
enum Mode {
    /// Plain text; `held` may end with the start of a tag or with whitespace.
    Text,
    /// After `<tool_call>`, before the header `{"name": "…", "arguments":` is complete.
    Header,
    /// Inside the arguments object of call `index`.
    Args { index: usize, scan: Scan },
    /// After the arguments: the rest of the tag up to `</tool_call>` is dropped.
    TagEnd,
    /// A tag in a shape not streamed: read whole at `</tool_call>`.
    WholeTag,
    /// A fenced block or bare JSON that may be calls: read whole at the end.
    Rest,
}

/// Brace depth of the arguments object, outside strings.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Scan {
    depth: u32,
    in_string: bool,
    escaped: bool,
}

impl Scan {
    /// Feeds one char; true when it closes the object.
    fn feed(&mut self, c: char) -> bool {
        if self.in_string {
            match (self.escaped, c) {
                (true, _) => self.escaped = false,
                (false, '\\') => self.escaped = true,
                (false, '"') => self.in_string = false,
                _ => {}
            }
            return false;
        }
        match c {
            '"' => self.in_string = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' => {
                self.depth = self.depth.saturating_sub(1);
                return self.depth == 0;
            }
            _ => {}
        }
        false
    }
}

/// Incremental reader of one answer's tool calls ([`Hermes`] family).
#[derive(Debug, Clone)]
pub struct CallStream {
    known: Vec<String>,
    mode: Mode,
    held: String,
    calls: usize,
    /// Whether any content was sent (bare JSON counts as a call only if it is the whole answer).
    sent_content: bool,
    /// At most one call (`parallel_tool_calls: false`): the answer ends with the first.
    one_call: bool,
    /// The answer ended inside a call's arguments (cut by `max_tokens`).
    cut: bool,
}

impl CallStream {
    pub fn new(known: &[&str]) -> Self {
        CallStream { known: known.iter().map(|s| s.to_string()).collect(), mode: Mode::Text, held: String::new(), calls: 0, sent_content: false, one_call: false, cut: false }
    }

    /// At most one call: once it is complete the answer is settled and the rest is ignored.
    pub fn one_call(mut self) -> Self {
        self.one_call = true;
        self
    }

    /// One call allowed, and it is complete (its arguments closed, or read whole).
    fn one_call_done(&self) -> bool {
        self.one_call && self.calls > 0 && !matches!(self.mode, Mode::Args { .. })
    }

    /// Whether more output can no longer change what this answer calls: a fenced block or a bare
    /// JSON object is read by its first block or object only, so once that is complete and holds
    /// calls, generation may stop (small models otherwise repeat the call until `max_tokens`,
    /// billed for nothing).
    pub fn settled(&self) -> bool {
        if self.one_call_done() {
            return true;
        }
        if self.mode != Mode::Rest {
            return false;
        }
        let t = self.held.trim_start();
        let complete = if t.starts_with(FENCE) {
            t.find('\n').is_some_and(|nl| t[nl..].contains(FENCE))
        } else {
            // Not a list: with trailing text the whole-text parser reads only its first object.
            t.starts_with('{') && matches!(serde_json::Deserializer::from_str(t).into_iter::<serde_json::Value>().next(), Some(Ok(_)))
        };
        complete && !Hermes.parse(&self.held, &self.known()).calls.is_empty()
    }

    /// Number of calls started so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// After [`finish`](Self::finish): whether the answer ended inside a call's arguments, so
    /// the last call streamed is incomplete (an agent must not run it).
    pub fn cut(&self) -> bool {
        self.cut
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        if self.one_call_done() {
            return Vec::new();
        }
        self.held.push_str(text);
        let mut out = Vec::new();
        while !self.one_call_done() && self.step(&mut out) {}
        out
    }

    /// The end of the answer: whatever was held is decided.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        if self.one_call_done() {
            return out;
        }
        let held = std::mem::take(&mut self.held);
        match std::mem::replace(&mut self.mode, Mode::Text) {
            Mode::Text => {
                let rest = if self.calls > 0 { held.trim().to_string() } else { held };
                self.content(&mut out, rest);
            }
            // The answer ended inside a call's tag that does not read as a call (`max_tokens`
            // cut its header): a call cut short, like one cut in its arguments, not text; once
            // its function's name was written, the call is sent with it (and no arguments).
            Mode::Header => {
                if let Header::More(Some(name)) = match_header(&held) {
                    if self.known.contains(&name) {
                        self.start_call(&mut out, name);
                    }
                }
                self.cut = true;
            }
            Mode::WholeTag if Hermes.parse(&format!("{OPEN}{held}"), &self.known()).calls.is_empty() => self.cut = true,
            Mode::WholeTag => self.whole(&mut out, &format!("{OPEN}{held}")),
            Mode::Rest => self.whole(&mut out, &held),
            Mode::Args { .. } => self.cut = true,
            Mode::TagEnd => {}
        }
        out
    }

    fn known(&self) -> Vec<&str> {
        self.known.iter().map(String::as_str).collect()
    }

    fn content(&mut self, out: &mut Vec<Piece>, s: String) {
        if s.is_empty() {
            return;
        }
        self.sent_content = true;
        match out.last_mut() {
            Some(Piece::Content(c)) => c.push_str(&s),
            _ => out.push(Piece::Content(s)),
        }
    }

    fn start_call(&mut self, out: &mut Vec<Piece>, name: String) -> usize {
        let index = self.calls;
        self.calls += 1;
        out.push(Piece::CallStart { index, name });
        index
    }

    /// Text read whole: its calls (if any) and the content around them.
    fn whole(&mut self, out: &mut Vec<Piece>, text: &str) {
        // `text` is a tag, a fenced block onward, or a bare JSON answer (only ever entered before
        // any content was sent), so the whole-text parser reads it as it would the whole answer.
        let p = Hermes.parse(text, &self.known());
        if p.calls.is_empty() {
            self.content(out, text.to_string());
            return;
        }
        self.content(out, p.content);
        let keep = if self.one_call { 1 } else { p.calls.len() };
        for c in p.calls.into_iter().take(keep) {
            let index = self.start_call(out, c.name);
            out.push(Piece::CallArgs { index, fragment: c.arguments.to_string() });
        }
    }

    /// One transition; false when more input is needed.
    fn step(&mut self, out: &mut Vec<Piece>) -> bool {
        match self.mode.clone() {
            Mode::Text => self.text(out),
            Mode::Header => self.header(out),
            Mode::Args { index, scan } => self.args(out, index, scan),
            Mode::TagEnd => match self.held.find(CLOSE) {
                Some(i) => {
                    self.held.drain(..i + CLOSE.len());
                    self.mode = Mode::Text;
                    true
                }
                None => false,
            },
            Mode::WholeTag => match self.held.find(CLOSE) {
                Some(i) => {
                    let tag: String = self.held.drain(..i + CLOSE.len()).collect();
                    self.whole(out, &format!("{OPEN}{tag}"));
                    self.mode = Mode::Text;
                    true
                }
                None => false,
            },
            Mode::Rest => false,
        }
    }

    fn text(&mut self, out: &mut Vec<Piece>) -> bool {
        if let Some(i) = self.held.find(OPEN) {
            let before: String = self.held.drain(..i + OPEN.len()).collect();
            let before = &before[..i];
            self.content(out, before.trim_end().to_string());
            self.mode = Mode::Header;
            return true;
        }
        if let Some(i) = self.held.find(FENCE) {
            let before: String = self.held.drain(..i).collect();
            self.content(out, before);
            self.mode = Mode::Rest;
            return false;
        }
        let start = self.held.trim_start();
        if !self.sent_content && self.calls == 0 && (start.starts_with('{') || start.starts_with('[')) {
            self.mode = Mode::Rest;
            return false;
        }
        // Send all but what may still become a tag or a fence, and trailing whitespace.
        let keep_from = [OPEN, FENCE].iter().map(|t| partial_suffix(&self.held, t)).min().unwrap_or(self.held.len());
        let keep_from = self.held[..keep_from].trim_end().len();
        if keep_from > 0 {
            let s: String = self.held.drain(..keep_from).collect();
            self.content(out, s);
        }
        false
    }

    fn header(&mut self, out: &mut Vec<Piece>) -> bool {
        match match_header(&self.held) {
            Header::More(_) => false,
            Header::Other => {
                self.mode = Mode::WholeTag;
                true
            }
            Header::Call { name, args_at } => {
                if !self.known.iter().any(|k| *k == name) || !self.held[args_at..].starts_with('{') {
                    self.mode = Mode::WholeTag;
                    return true;
                }
                self.held.drain(..args_at);
                let index = self.start_call(out, name);
                self.mode = Mode::Args { index, scan: Scan::default() };
                true
            }
        }
    }

    fn args(&mut self, out: &mut Vec<Piece>, index: usize, mut scan: Scan) -> bool {
        let mut end = None;
        for (i, c) in self.held.char_indices() {
            if scan.feed(c) {
                end = Some(i + c.len_utf8());
                break;
            }
        }
        let upto = end.unwrap_or(self.held.len());
        let fragment: String = self.held.drain(..upto).collect();
        if !fragment.is_empty() {
            out.push(Piece::CallArgs { index, fragment });
        }
        self.mode = if end.is_some() { Mode::TagEnd } else { Mode::Args { index, scan } };
        end.is_some()
    }
}

/// The first call of an answer to a `parallel_tool_calls: false` request, read as a stream
/// reads it: the engine ends such an answer on the token that closes its first call's
/// arguments ([`CallStream::settled`]), before the call's closing markup (`}` and the closing
/// tag), so the whole-text parser finds no call in it. The content before the call, and the
/// call; `None` when the text holds no complete call.
pub fn first_call(text: &str, known: &[&str]) -> Option<(String, crate::toolcall::ToolCall)> {
    let mut s = CallStream::new(known).one_call();
    let mut pieces = s.push(text);
    pieces.extend(s.finish());
    let (mut content, mut name, mut args) = (String::new(), None, String::new());
    for p in pieces {
        match p {
            Piece::Content(c) if name.is_none() => content.push_str(&c),
            Piece::CallStart { index: 0, name: n } => name = Some(n),
            Piece::CallArgs { index: 0, fragment } => args.push_str(&fragment),
            _ => {}
        }
    }
    let arguments = serde_json::from_str(&args).ok().filter(serde_json::Value::is_object)?;
    Some((content, crate::toolcall::ToolCall { name: name?, arguments }))
}

/// Where in `s` a suffix starts that is a proper prefix of `tag` (s.len() if none).
fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .map_or(s.len(), |n| s.len() - n)
}

enum Header {
    /// Could still become a header (whose function's name, once read, is given).
    More(Option<String>),
    /// Not the streamed shape.
    Other,
    /// `{"name": "…", "arguments":` matched; the arguments value starts at `args_at`.
    Call { name: String, args_at: usize },
}

/// Matches `\s*{\s*"name"\s*:\s*"NAME"\s*,\s*"arguments"\s*:\s*` at the start of `s`.
fn match_header(s: &str) -> Header {
    let mut m = Matcher { s, at: 0 };
    let steps: [&dyn Fn(&mut Matcher) -> Option<bool>; 7] = [
        &|m| m.lit("{"),
        &|m| m.lit("\"name\""),
        &|m| m.lit(":"),
        &|m| m.lit("\""),
        &|_| Some(true), // the name, read below
        &|m| m.lit(","),
        &|m| m.lit("\"arguments\""),
    ];
    let mut name = String::new();
    for (k, step) in steps.iter().enumerate() {
        if k == 4 {
            let rest = &s[m.at..];
            match rest.find(['"', '\\']) {
                None => return Header::More(None),
                Some(j) if rest.as_bytes()[j] == b'\\' => return Header::Other,
                Some(j) => {
                    name = rest[..j].to_string();
                    m.at += j + 1;
                }
            }
            continue;
        }
        match step(&mut m) {
            None => return Header::More((k > 4).then(|| name.clone())),
            Some(false) => return Header::Other,
            Some(true) => {}
        }
    }
    match m.lit(":") {
        None => Header::More(Some(name)),
        Some(false) => Header::Other,
        Some(true) => {
            m.ws();
            if m.at == s.len() {
                Header::More(Some(name))
            } else {
                Header::Call { name, args_at: m.at }
            }
        }
    }
}

struct Matcher<'a> {
    s: &'a str,
    at: usize,
}

impl Matcher<'_> {
    fn ws(&mut self) {
        let rest = &self.s[self.at..];
        self.at += rest.len() - rest.trim_start().len();
    }

    /// Whitespace then `lit`: Some(true) matched, Some(false) mismatch, None need more input.
    fn lit(&mut self, lit: &str) -> Option<bool> {
        self.ws();
        let rest = &self.s[self.at..];
        if rest.starts_with(lit) {
            self.at += lit.len();
            Some(true)
        } else if lit.starts_with(rest) {
            None
        } else {
            Some(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const KNOWN: &[&str] = &["get_weather", "add"];

    /// What a client rebuilds from the pieces: content, and (name, arguments) per call.
    fn rebuild(pieces: &[Piece]) -> (String, Vec<(String, Value)>) {
        let mut content = String::new();
        let mut calls: Vec<(String, String)> = Vec::new();
        for p in pieces {
            match p {
                Piece::Content(s) => content.push_str(s),
                Piece::CallStart { index, name } => {
                    assert_eq!(*index, calls.len(), "calls start in order");
                    calls.push((name.clone(), String::new()));
                }
                Piece::CallArgs { index, fragment } => calls[*index].1.push_str(fragment),
            }
        }
        let calls = calls.into_iter().map(|(n, a)| (n, serde_json::from_str(&a).unwrap_or_else(|e| panic!("{a:?}: {e}")))).collect();
        (content, calls)
    }

    fn streamed(text: &str, chunks: &[usize]) -> Vec<Piece> {
        let mut s = CallStream::new(KNOWN);
        let mut out = Vec::new();
        let mut at = 0;
        for &c in chunks {
            let end = (at + c).min(text.len());
            if !text.is_char_boundary(end) {
                continue;
            }
            out.extend(s.push(&text[at..end]));
            at = end;
        }
        out.extend(s.push(&text[at..]));
        out.extend(s.finish());
        out
    }

    /// Every way of cutting `text` in two, and one byte at a time, gives the whole-text answer.
    fn agrees_with_whole_text(text: &str) {
        let whole = Hermes.parse(text, KNOWN);
        let want_calls: Vec<(String, Value)> = whole.calls.iter().map(|c| (c.name.clone(), c.arguments.clone())).collect();
        let want_content = if whole.calls.is_empty() { text.to_string() } else { whole.content.clone() };
        for cut in 0..=text.len() {
            if text.is_char_boundary(cut) {
                let (c, calls) = rebuild(&streamed(text, &[cut]));
                assert_eq!((c.trim(), &calls), (want_content.trim(), &want_calls), "cut at {cut}: {text:?}");
            }
        }
        let (c, calls) = rebuild(&streamed(text, &vec![1; text.len()]));
        assert_eq!((c.trim(), &calls), (want_content.trim(), &want_calls), "byte by byte: {text:?}");
    }

    #[test]
    fn tagged_calls_stream_name_first_then_argument_fragments() {
        let t = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris }\\\" {\", \"days\": [1, 2]}}\n</tool_call>";
        let pieces = streamed(t, &vec![3; t.len() / 3]);
        assert_eq!(pieces[0], Piece::CallStart { index: 0, name: "get_weather".into() });
        let frags = pieces.iter().filter(|p| matches!(p, Piece::CallArgs { .. })).count();
        assert!(frags > 5, "arguments arrive in fragments: {pieces:?}");
        let (content, calls) = rebuild(&pieces);
        assert_eq!(content, "");
        assert_eq!(calls, vec![("get_weather".to_string(), json!({"city": "Paris }\" {", "days": [1, 2]}))]);
        agrees_with_whole_text(t);
    }

    #[test]
    fn text_before_and_several_calls() {
        agrees_with_whole_text("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>");
    }

    #[test]
    fn other_shapes_are_read_whole() {
        // arguments first, a string of JSON, an unknown name, an unclosed tag
        agrees_with_whole_text("<tool_call>\n{\"arguments\": {\"a\": 1}, \"name\": \"add\"}\n</tool_call>");
        agrees_with_whole_text("<tool_call>\n{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1}\"}\n</tool_call>");
        agrees_with_whole_text("<tool_call>\n{\"name\": \"rm_rf\", \"arguments\": {}}\n</tool_call>");
        agrees_with_whole_text("<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}");
    }

    /// An answer that ends inside a call's tag before it reads as a call (`max_tokens` cut its
    /// header) is a cut call: no template syntax reaches `content`; once the function's name is
    /// written, the call starts with it (and has no arguments).
    #[test]
    fn an_answer_ending_in_a_calls_header_is_a_cut_call() {
        let named = ["<tool_call>\n{\"name\": \"add\"", "<tool_call>\n{\"name\": \"add\", \"argu", "<tool_call>\n{\"name\": \"add\", \"arguments\": "];
        let unnamed = ["<tool_call>\n{\"na", "<tool_call>\n{\"name\": \"ad", "Let me see.\n<tool_call>\n{\"arguments\": {\"a\": 1", "<tool_call>\n{\"name\": \"rm\""];
        for text in named.iter().chain(&unnamed) {
            let mut s = CallStream::new(KNOWN);
            let mut pieces = s.push(text);
            pieces.extend(s.finish());
            let content: String = pieces.iter().filter_map(|p| if let Piece::Content(c) = p { Some(c.as_str()) } else { None }).collect();
            let started: Vec<&Piece> = pieces.iter().filter(|p| matches!(p, Piece::CallStart { .. })).collect();
            assert!(s.cut() && !content.contains('<'), "{text:?}: {pieces:?}");
            let want: &[Piece] = if named.contains(text) { &[Piece::CallStart { index: 0, name: "add".into() }] } else { &[] };
            assert_eq!(started, want.iter().collect::<Vec<_>>(), "{text:?}");
        }
    }

    #[test]
    fn fenced_and_bare_json_answers() {
        agrees_with_whole_text("```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n```");
        agrees_with_whole_text("Sure:\n```\n[{\"name\": \"add\", \"parameters\": {\"a\": 2}}]\n```");
        agrees_with_whole_text(" {\"name\": \"add\", \"arguments\": {}} ");
        agrees_with_whole_text("```python\nprint(1)\n```");
    }

    #[test]
    fn a_complete_fenced_or_bare_call_settles_the_answer() {
        let settled_after = |text: &str| {
            let mut s = CallStream::new(KNOWN);
            (1..=text.len()).find(|&n| text.is_char_boundary(n) && {
                s = CallStream::new(KNOWN);
                s.push(&text[..n]);
                s.settled()
            })
        };
        let fenced = "```json\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}\n```";
        assert_eq!(settled_after(&format!("{fenced}\n{fenced}")), Some(fenced.len()));
        let bare = "{\"name\": \"add\", \"arguments\": {\"a\": 1}}";
        assert_eq!(settled_after(&format!("{bare}{bare}")), Some(bare.len()));
        // Not calls, a list, tags, or plain text: never settled early.
        assert_eq!(settled_after("```python\nprint(1)\n```\nmore"), None);
        assert_eq!(settled_after("[{\"name\": \"add\", \"arguments\": {}}] "), None);
        assert_eq!(settled_after("<tool_call>\n{\"name\": \"add\", \"arguments\": {}}\n</tool_call>"), None);
        assert_eq!(settled_after("{\"weather\": \"sunny\"} and more"), None);
    }

    #[test]
    fn the_first_call_is_read_from_an_answer_the_engine_ended_at_its_arguments() {
        // As the engine ends a `parallel_tool_calls: false` answer: on the `}` that closes the
        // arguments, before the call object's own `}` and the closing tag.
        let text = "Sure. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\n    \"city\": \"Paris\"\n}";
        assert!(Hermes.parse(text, KNOWN).calls.is_empty(), "the whole-text parser needs the closing markup");
        let (content, call) = first_call(text, KNOWN).expect("a call");
        assert_eq!((content.as_str(), call.name.as_str(), call.arguments.clone()), ("Sure.", "get_weather", serde_json::json!({"city": "Paris"})));
        // Arguments cut short, or no call at all: none.
        assert_eq!(first_call("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par", KNOWN), None);
        assert_eq!(first_call("It is sunny.", KNOWN), None);
    }

    #[test]
    fn one_call_ends_the_answer_at_its_first_call() {
        let two = "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2}}\n</tool_call>";
        for chunk in [1, 7, two.len()] {
            let mut s = CallStream::new(KNOWN).one_call();
            let mut pieces = Vec::new();
            let mut settled_at = None;
            for (k, piece) in two.as_bytes().chunks(chunk).enumerate() {
                pieces.extend(s.push(std::str::from_utf8(piece).unwrap()));
                if s.settled() && settled_at.is_none() {
                    settled_at = Some(k);
                }
            }
            pieces.extend(s.finish());
            assert!(settled_at.is_some());
            assert_eq!(rebuild(&pieces), (String::new(), vec![("add".to_string(), json!({"a": 1}))]), "chunk {chunk}");
        }
        let list = "```json\n[{\"name\": \"add\", \"arguments\": {\"a\": 1}}, {\"name\": \"add\", \"arguments\": {\"a\": 2}}]\n```";
        let mut s = CallStream::new(KNOWN).one_call();
        let mut pieces = s.push(list);
        assert!(s.settled());
        pieces.extend(s.finish());
        assert_eq!(rebuild(&pieces).1, vec![("add".to_string(), json!({"a": 1}))]);
    }

    #[test]
    fn plain_text_streams_at_once_and_whole() {
        let mut s = CallStream::new(KNOWN);
        assert_eq!(s.push("The weather "), vec![Piece::Content("The weather".into())]);
        assert_eq!(s.push("is fine <tool"), vec![Piece::Content(" is fine".into())]);
        assert_eq!(s.push("s are nice."), vec![Piece::Content(" <tools are nice.".into())]);
        assert_eq!(s.finish(), vec![]);
        agrees_with_whole_text("The weather is fine. {braces} later are text.");
        agrees_with_whole_text("Prices: ```a``` and <tool_ not a tag");
    }
}

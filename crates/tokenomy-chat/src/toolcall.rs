//! Tool calls in model output.

use serde_json::{Map, Value};

/// One call the model asked for. `arguments` is a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

/// Output split into the text meant for the user and the calls.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    pub content: String,
    pub calls: Vec<ToolCall>,
}

/// One model family's tool-call syntax.
pub trait ToolCallParser: Send + Sync {
    /// Splits `text` into content and calls to functions named in `known` (others stay text).
    fn parse(&self, text: &str, known: &[&str]) -> Parsed;
    /// A grammar (llguidance's Lark dialect) whose every sentence is one call, in this family's
    /// syntax, to one of `tools` (`(name, JSON Schema of the arguments)`): constraining decoding
    /// with it makes `tool_choice: required` (or a named function) always yield a valid call.
    /// `tag_tokens`: the model's own tokens for the syntax's opening and closing tags, where it
    /// has them (Qwen2.5's `<tool_call>` is one token): the grammar names them, so the call is
    /// written as the model was trained to write it, not with its tags spelled out in pieces.
    fn call_grammar(&self, tools: &[(&str, &Value)], tag_tokens: Option<(i32, i32)>) -> String;
    /// A grammar whose sentences are [`call_grammar`](Self::call_grammar)'s calls, or an answer
    /// valid against `answer` (a JSON Schema): `tool_choice: auto` with a JSON response format.
    fn call_or_answer_grammar(&self, tools: &[(&str, &Value)], tag_tokens: Option<(i32, i32)>, answer: &Value) -> String;
    /// A grammar for `tool_choice: auto` with strict tools, applied lazily from one of
    /// [`call_openings`](Self::call_openings) on: one call, tagged, or in the fence small models
    /// write (with the blanks they put in it).
    fn lazy_call_grammar(&self, tools: &[(&str, &Value)], tag_tokens: Option<(i32, i32)>) -> String;
    /// The texts, blanks aside, that open a call as [`lazy_call_grammar`](Self::lazy_call_grammar)
    /// reads it: anywhere, the tag where it is not one token of the model's and for each tool a
    /// fence whose object names it (a fenced answer that is JSON of another kind stays free);
    /// and, at the start of the answer only, a bare object that names a tool.
    fn call_openings(&self, tag_tokens: Option<(i32, i32)>, names: &[&str]) -> (Vec<String>, Vec<String>);
}

/// Blanks in a fenced call, bounded (as in llama.cpp's grammars).
const BLANKS: &str = "[ \\t\\n]{0,20}";

/// Hermes-style `<tool_call>{"name": …, "arguments": …}</tool_call>` (Qwen2.5, Hermes, many
/// fine-tunes), and the fenced or bare JSON objects small models write instead.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hermes;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

impl ToolCallParser for Hermes {
    fn parse(&self, text: &str, known: &[&str]) -> Parsed {
        if text.contains(OPEN) {
            return tagged(text, known);
        }
        if let Some(p) = fenced(text, known) {
            return p;
        }
        match calls_in(text.trim(), known) {
            Some(calls) => Parsed { content: String::new(), calls },
            None => Parsed { content: text.to_string(), calls: vec![] },
        }
    }

    /// One rule per tool: its name written out, then its parameters' schema as a JSON
    /// grammar of its own, so the schema's `$ref`s (`#/$defs/…`, which Pydantic writes for every
    /// nested model or enum) resolve against the schema itself.
    fn call_grammar(&self, tools: &[(&str, &Value)], tag_tokens: Option<(i32, i32)>) -> String {
        let calls: Vec<String> = (0..tools.len()).map(|i| format!("call_{i}")).collect();
        let mut g = match tag_tokens {
            Some((open, close)) => format!("start: <[{open}]> \"\\n\" call \"\\n\" <[{close}]>\n"),
            None => format!("start: \"{OPEN}\\n\" call \"\\n{CLOSE}\"\n"),
        };
        g.push_str(&format!("call: {}\n", calls.join(" | ")));
        for (i, (name, params)) in tools.iter().enumerate() {
            let args = if params.is_object() { (*params).clone() } else { serde_json::json!({"type": "object"}) };
            let head = format!("{{\"name\": {}, \"arguments\": ", Value::from(*name));
            // A JSON string is a Lark string literal (the same escapes).
            g.push_str(&format!("call_{i}: {} args_{i} \"}}\"\nargs_{i}: %json {args}\n", Value::from(head)));
        }
        g
    }

    /// A tagged call, a bare one (small models write their calls as bare JSON as often as
    /// tagged: `parse` reads both), or the answer.
    fn call_or_answer_grammar(&self, tools: &[(&str, &Value)], tag_tokens: Option<(i32, i32)>, answer: &Value) -> String {
        let calls = self.call_grammar(tools, tag_tokens);
        let tagged = calls.strip_prefix("start:").expect("the call grammar opens with its start rule");
        format!("start: tagged | call | answer\nanswer: %json {answer}\ntagged:{tagged}")
    }

    fn lazy_call_grammar(&self, tools: &[(&str, &Value)], tag_tokens: Option<(i32, i32)>) -> String {
        let calls = self.call_grammar(tools, tag_tokens);
        let tagged = calls.strip_prefix("start:").expect("the call grammar opens with its start rule");
        let b = BLANKS;
        let fcalls: Vec<String> = (0..tools.len()).map(|i| format!("fcall_{i}")).collect();
        let bcalls: Vec<String> = (0..tools.len()).map(|i| format!("bcall_{i}")).collect();
        let mut g = format!("start: tagged | fenced | bare\nfenced: /{b}```(json)?{b}\\{{{b}\"name\"{b}:{b}/ fcall\nfcall: {}\n", fcalls.join(" | "));
        g.push_str(&format!("bare: /{b}\\{{{b}\"name\"{b}:{b}/ bcall\nbcall: {}\n", bcalls.join(" | ")));
        for (i, (name, _)) in tools.iter().enumerate() {
            // The name as a JSON string, written as a Lark string literal.
            let name = Value::from(Value::from(*name).to_string());
            let head = format!("{name} /{b},{b}\"arguments\"{b}:{b}/ args_{i} /{b}\\}}");
            g.push_str(&format!("fcall_{i}: {head}{b}```/\nbcall_{i}: {head}/\n"));
        }
        g.push_str(&format!("tagged:{tagged}"));
        g
    }

    fn call_openings(&self, tag_tokens: Option<(i32, i32)>, names: &[&str]) -> (Vec<String>, Vec<String>) {
        let tag = tag_tokens.is_none().then(|| OPEN.to_string());
        let heads: Vec<String> = names.iter().map(|n| format!("{{\"name\":{}", Value::from(*n))).collect();
        let fences = heads.iter().flat_map(|h| [format!("```json{h}"), format!("```{h}")]);
        (tag.into_iter().chain(fences).collect(), heads)
    }
}

fn tagged(text: &str, known: &[&str]) -> Parsed {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(OPEN) {
        content.push_str(&rest[..i]);
        let after = &rest[i + OPEN.len()..];
        let (inner, next) = match after.find(CLOSE) {
            Some(j) => (&after[..j], &after[j + CLOSE.len()..]),
            None => (after, ""),
        };
        match calls_in(inner.trim(), known) {
            Some(c) => calls.extend(c),
            None => {
                content.push_str(OPEN);
                content.push_str(inner);
            }
        }
        rest = next;
    }
    content.push_str(rest);
    Parsed { content: content.trim().to_string(), calls }
}

/// A ```json … ``` (or bare ```) block holding a call or a list of calls.
fn fenced(text: &str, known: &[&str]) -> Option<Parsed> {
    let start = text.find("```")?;
    let body_start = start + 3 + text[start + 3..].find('\n')? + 1;
    let end = body_start + text[body_start..].find("```")?;
    let calls = calls_in(text[body_start..end].trim(), known)?;
    let content = format!("{}{}", &text[..start], &text[end + 3..]).trim().to_string();
    Some(Parsed { content, calls })
}

/// One call object, or a list of them; `None` unless every element is a call to a known function.
fn calls_in(json: &str, known: &[&str]) -> Option<Vec<ToolCall>> {
    let v: Value = serde_json::from_str(json).ok().or_else(|| first_object(json))?;
    let items = match v {
        Value::Array(a) => a,
        o => vec![o],
    };
    let calls: Option<Vec<ToolCall>> = items.into_iter().map(|i| call(i, known)).collect();
    calls.filter(|c| !c.is_empty())
}

/// The first complete JSON object in `s` (models add words around it).
fn first_object(s: &str) -> Option<Value> {
    let start = s.find('{')?;
    let mut de = serde_json::Deserializer::from_str(&s[start..]).into_iter::<Value>();
    de.next()?.ok()
}

fn call(v: Value, known: &[&str]) -> Option<ToolCall> {
    let Value::Object(mut o) = v else { return None };
    // {"name", "arguments"} or OpenAI's own {"function": {"name", "arguments"}}
    if let Some(Value::Object(f)) = o.remove("function") {
        o = f;
    }
    let name = o.get("name")?.as_str()?.to_string();
    if !known.contains(&name.as_str()) {
        return None;
    }
    // An object with other keys is data that happens to name a tool, not a call.
    if o.keys().any(|k| !matches!(k.as_str(), "name" | "arguments" | "parameters")) {
        return None;
    }
    let args = o.remove("arguments").or_else(|| o.remove("parameters")).unwrap_or(Value::Object(Map::new()));
    let arguments = match args {
        Value::String(s) => serde_json::from_str(&s).ok().filter(Value::is_object)?,
        Value::Object(m) => Value::Object(m),
        Value::Null => Value::Object(Map::new()),
        _ => return None,
    };
    Some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KNOWN: &[&str] = &["get_weather", "add"];

    fn call(name: &str, args: Value) -> ToolCall {
        ToolCall { name: name.into(), arguments: args }
    }

    #[test]
    fn hermes_tags_one_or_many_with_text_around() {
        let t = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1, \\\"b\\\": 2}\"}\n</tool_call>";
        let p = Hermes.parse(t, KNOWN);
        assert_eq!(p.content, "Let me check.");
        assert_eq!(p.calls, vec![call("get_weather", json!({"city": "Paris"})), call("add", json!({"a": 1, "b": 2}))]);
    }

    #[test]
    fn unclosed_tag_at_the_end_still_parses() {
        let p = Hermes.parse("<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}", KNOWN);
        assert_eq!(p.calls, vec![call("add", json!({"a": 1}))]);
        assert_eq!(p.content, "");
    }

    #[test]
    fn fenced_json_as_small_models_write_it() {
        let t = "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n```";
        assert_eq!(Hermes.parse(t, KNOWN).calls, vec![call("get_weather", json!({"city": "Oslo"}))]);
        let list = "Sure:\n```\n[{\"name\": \"add\", \"parameters\": {\"a\": 2}}, {\"function\": {\"name\": \"add\", \"arguments\": {\"a\": 3}}}]\n```\nDone.";
        let p = Hermes.parse(list, KNOWN);
        assert_eq!(p.calls, vec![call("add", json!({"a": 2})), call("add", json!({"a": 3}))]);
        assert_eq!(p.content, "Sure:\n\nDone.");
    }

    #[test]
    fn bare_json_and_plain_text() {
        assert_eq!(Hermes.parse(" {\"name\": \"add\", \"arguments\": {}} ", KNOWN).calls, vec![call("add", json!({}))]);
        let plain = Hermes.parse("The weather is fine.", KNOWN);
        assert_eq!((plain.content.as_str(), plain.calls.len()), ("The weather is fine.", 0));
    }

    #[test]
    fn unknown_functions_and_broken_json_stay_text() {
        let t = "<tool_call>\n{\"name\": \"rm_rf\", \"arguments\": {}}\n</tool_call>";
        let p = Hermes.parse(t, KNOWN);
        assert!(p.calls.is_empty() && p.content.contains("rm_rf"));
        let broken = Hermes.parse("```json\n{\"name\": \"add\", \"arguments\": {\n```", KNOWN);
        assert!(broken.calls.is_empty());
        let not_object = Hermes.parse("{\"name\": \"add\", \"arguments\": [1]}", KNOWN);
        assert!(not_object.calls.is_empty());
        // Data that names a tool among other keys is not a call.
        let data = Hermes.parse("```json\n{\"id\": 5, \"name\": \"add\", \"note\": \"example only\"}\n```", KNOWN);
        assert!(data.calls.is_empty() && data.content.contains("example only"), "{data:?}");
    }

    #[test]
    fn the_call_grammar_names_every_tool_and_its_schema() {
        let params = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let g = Hermes.call_grammar(&[("add", &params), ("get_weather", &Value::Null)], None);
        // (The schema as serde_json writes it: its key order depends on the build's features.)
        let want = format!(
            concat!(
                "start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\n",
                "call: call_0 | call_1\n",
                "call_0: \"{{\\\"name\\\": \\\"add\\\", \\\"arguments\\\": \" args_0 \"}}\"\n",
                "args_0: %json {}\n",
                "call_1: \"{{\\\"name\\\": \\\"get_weather\\\", \\\"arguments\\\": \" args_1 \"}}\"\n",
                "args_1: %json {{\"type\":\"object\"}}\n",
            ),
            params
        );
        assert_eq!(g, want);
        // With the model's own tag tokens, the grammar names them.
        let g = Hermes.call_grammar(&[("add", &params)], Some((151657, 151658)));
        assert!(g.starts_with("start: <[151657]> \"\\n\" call \"\\n\" <[151658]>\ncall: call_0\n"), "{g}");
        // Or the answer: the same calls, tagged or bare, beside a schema's JSON.
        let g = Hermes.call_or_answer_grammar(&[("add", &params)], Some((151657, 151658)), &json!({"type": "object"}));
        let calls = Hermes.call_grammar(&[("add", &params)], Some((151657, 151658)));
        assert_eq!(g, format!("start: tagged | call | answer\nanswer: %json {{\"type\":\"object\"}}\ntagged:{}", &calls["start:".len()..]));
    }
}

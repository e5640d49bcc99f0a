//! Chat templates: the Jinja template stored in a GGUF's `tokenizer.chat_template`, rendered
//! with `minijinja` (plus Python string methods from `minijinja-contrib`, which HF templates use).
//!
//! A model without a template (Gemma-3-270M's GGUF has none) gets a template named on the
//! command line (`--chat-template chatml|gemma|FILE`) or a clear error.

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use tokenomy_core::ChatMessage;

/// ChatML, used by SmolLM2, Qwen2.5 and many others.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Gemma's turn format (system text is folded into the first user turn, as Gemma 3 does).
pub const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// Resolves a `--chat-template` argument: a built-in name or a file's contents.
pub fn builtin(name: &str) -> Option<&'static str> {
    match name {
        "chatml" => Some(CHATML),
        "gemma" => Some(GEMMA),
        _ => None,
    }
}

/// A compiled chat template with the model's special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Whether the template writes `tools` (and assistants' `tool_calls`) into the prompt.
    /// One that does not (SmolLM2's, ChatML, Gemma's) gets them as text: see [`Self::render`].
    reads_tools: bool,
    reads_tool_calls: bool,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("the chat template does not compile: {e}"))?;
        let mut t = ChatTemplate { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string(), reads_tools: true, reads_tool_calls: true };
        (t.reads_tools, t.reads_tool_calls) = (t.probe_tools(), t.probe_tool_calls());
        Ok(t)
    }

    /// Whether offering a tool changes the rendering (a template that fails either way is
    /// taken to read them: nothing is added to it).
    fn probe_tools(&self) -> bool {
        let chat = [ChatMessage::new("system", "s"), ChatMessage::new("user", "u")];
        let tool = serde_json::json!({"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}});
        match (self.render_with(&chat, &[tool], true), self.render_with(&chat, &[], true)) {
            (Ok(with), Ok(without)) => with != without,
            _ => true,
        }
    }

    /// Whether an assistant's tool call shows in the rendering.
    fn probe_tool_calls(&self) -> bool {
        let call = serde_json::json!({"id": "call_1", "type": "function", "function": {"name": "probe", "arguments": "{}"}});
        let chat = |calls: Vec<serde_json::Value>| {
            let mut a = ChatMessage::new("assistant", "");
            a.tool_calls = calls;
            [ChatMessage::new("system", "s"), ChatMessage::new("user", "u"), a, ChatMessage::new("user", "v")]
        };
        match (self.render_with(&chat(vec![call]), &[], true), self.render_with(&chat(Vec::new()), &[], true)) {
            (Ok(with), Ok(without)) => with != without,
            _ => true,
        }
    }

    /// Renders `messages` and opens the assistant's turn. A final assistant message with text
    /// (and no tool calls) is continued instead, left open: an assistant prefill, as
    /// Anthropic's API and llama-server do, so the answer is its continuation.
    ///
    /// A template that does not write tools gets them in the system message, with the Hermes
    /// call syntax (`<tool_call>{"name": …, "arguments": …}</tool_call>`, which the answer is
    /// read for), and earlier calls written in that syntax: offered tools are never silently
    /// dropped, and a forced call is not made to a schema the model never saw.
    pub fn render(&self, messages: &[ChatMessage], tools: &[serde_json::Value]) -> Result<String, String> {
        if (!tools.is_empty() && !self.reads_tools) || (!self.reads_tool_calls && messages.iter().any(|m| !m.tool_calls.is_empty())) {
            let messages = tools_as_text(messages, if self.reads_tools { &[] } else { tools }, !self.reads_tool_calls);
            let tools = if self.reads_tools { tools } else { &[] };
            return self.render_messages(&messages, tools);
        }
        self.render_messages(messages, tools)
    }

    fn render_messages(&self, messages: &[ChatMessage], tools: &[serde_json::Value]) -> Result<String, String> {
        match messages.last() {
            Some(last) if last.is_prefill() => {
                // Rendered as a closed turn with a marker after its text; the text is cut there,
                // whatever the template writes to close a turn.
                let mut marked = messages.to_vec();
                marked.last_mut().expect("not empty").content.push_str(PREFILL_MARKER);
                let text = self.render_with(&marked, tools, false)?;
                let at = text.rfind(PREFILL_MARKER).ok_or("the chat template drops the final assistant message, so it cannot be continued")?;
                Ok(text[..at].to_string())
            }
            _ => self.render_with(messages, tools, true),
        }
    }

    fn render_with(&self, messages: &[ChatMessage], tools: &[serde_json::Value], add_generation_prompt: bool) -> Result<String, String> {
        let template = self.env.get_template("chat").expect("added in new");
        let tools = if tools.is_empty() { Value::from(()) } else { Value::from_serialize(tools) };
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template.render(ctx).map_err(|e| format!("the chat template failed: {e:#}"))
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }
}

/// `messages` with `tools` described in the system message (one is added if there is none) and,
/// with `calls_as_text`, each assistant's tool calls written into its text and each tool result
/// given as a user turn, in the Hermes syntax that Qwen2.5's and Hermes' templates use.
fn tools_as_text(messages: &[ChatMessage], tools: &[serde_json::Value], calls_as_text: bool) -> Vec<ChatMessage> {
    let mut out = messages.to_vec();
    if calls_as_text {
        for m in out.iter_mut().filter(|m| m.role == "tool") {
            (m.role, m.content) = ("user".into(), format!("<tool_response>\n{}\n</tool_response>", m.content));
        }
        for m in out.iter_mut().filter(|m| !m.tool_calls.is_empty()) {
            for call in std::mem::take(&mut m.tool_calls) {
                let f = &call["function"];
                let arguments = match &f["arguments"] {
                    serde_json::Value::String(a) => serde_json::from_str(a).unwrap_or_else(|_| serde_json::Value::String(a.clone())),
                    other => other.clone(),
                };
                let call = serde_json::json!({"name": f["name"], "arguments": arguments});
                let sep = if m.content.is_empty() { "" } else { "\n" };
                m.content = format!("{}{sep}<tool_call>\n{}\n</tool_call>", m.content, python_json(&call));
            }
        }
    }
    if tools.is_empty() {
        return out;
    }
    let listed: Vec<String> = tools.iter().map(python_json).collect();
    let block = format!(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\n\
         For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n\
         <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
        listed.join("\n")
    );
    match out.first_mut().filter(|m| m.role == "system") {
        Some(system) => system.content = format!("{}\n\n{block}", system.content),
        None => out.insert(0, ChatMessage::new("system", block)),
    }
    out
}

/// `v` as Python's `json.dumps(v, ensure_ascii=False)` writes it.
fn python_json(v: &serde_json::Value) -> String {
    let mut out = String::new();
    JsonStyle { item: ", ".into(), key: ": ".into(), indent: None }.write(v, 0, &mut out);
    out
}

/// Marks where a prefilled assistant message's text ends in its rendering.
const PREFILL_MARKER: &str = "\u{1}tokenomy:prefill-ends-here\u{1}";

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as Hugging Face renders chat templates (Python's `json.dumps` with
/// `ensure_ascii=False`): `", "` and `": "` between items (`","` once indented), keys in their
/// order, nothing escaped for HTML. minijinja's own filter escapes `<`, `>`, `&` and `'` for HTML
/// and writes no spaces, so a tool's description would reach the model as `user\u0027s`, in
/// tokens it was never trained on and the caller pays for.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(value).map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    if sort_keys == Some(true) {
        json.sort_all_objects();
    }
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators is a pair (item, key)")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle { item, key, indent };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    if ensure_ascii == Some(true) {
        out = out.chars().map(|c| if c.is_ascii() { c.to_string() } else { c.encode_utf16(&mut [0; 2]).iter().map(|u| format!("\\u{u:04x}")).collect() }).collect();
    }
    Ok(Value::from_safe_string(out))
}

/// Python's `json.dumps` layout.
struct JsonStyle {
    item: String,
    key: String,
    indent: Option<usize>,
}

impl JsonStyle {
    fn write(&self, v: &serde_json::Value, level: usize, out: &mut String) {
        use serde_json::Value as J;
        match v {
            J::Array(a) if !a.is_empty() => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    self.next(i, level + 1, out);
                    self.write(x, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            J::Object(m) if !m.is_empty() => {
                out.push('{');
                for (i, (k, x)) in m.iter().enumerate() {
                    self.next(i, level + 1, out);
                    out.push_str(&J::from(k.as_str()).to_string());
                    out.push_str(&self.key);
                    self.write(x, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
            scalar_or_empty => out.push_str(&scalar_or_empty.to_string()),
        }
    }

    fn next(&self, i: usize, level: usize, out: &mut String) {
        if i > 0 {
            out.push_str(&self.item);
        }
        self.newline(level, out);
    }

    fn newline(&self, level: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    }
}

fn strftime_now(format: String) -> String {
    // Templates use this for "today's date" in the system prompt. Formatting a clock is I/O
    // free; we support the two formats seen in real templates and fall back to ISO dates.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = tokenomy_core::civil_from_days((secs / 86_400) as i64);
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    match format.as_str() {
        "%d %b %Y" => format!("{d:02} {} {y}", &MONTHS[(m - 1) as usize][..3]),
        "%d %B %Y" => format!("{d:02} {} {y}", MONTHS[(m - 1) as usize]),
        _ => format!("{y:04}-{m:02}-{d:02}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ]
    }

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        expect_test::expect![[r#"
            <|im_start|>system
            Be brief.<|im_end|>
            <|im_start|>user
            Hi<|im_end|>
            <|im_start|>assistant
        "#]]
        .assert_eq(&t.render(&msgs(), &[]).unwrap());
    }

    #[test]
    fn a_final_assistant_message_is_continued_not_closed() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let mut m = msgs();
        m.push(ChatMessage::new("assistant", "{\"capital\": \""));
        expect_test::expect![[r#"
            <|im_start|>system
            Be brief.<|im_end|>
            <|im_start|>user
            Hi<|im_end|>
            <|im_start|>assistant
            {"capital": ""#]]
        .assert_eq(&t.render(&m, &[]).unwrap());
        // An empty one, or one with tool calls, is a closed turn: a new one opens after it.
        m.last_mut().unwrap().content.clear();
        assert!(t.render(&m, &[]).unwrap().ends_with("<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn gemma_folds_system_into_first_user_turn() {
        let t = ChatTemplate::new(GEMMA, "<bos>", "<eos>").unwrap();
        expect_test::expect![[r#"
            <bos><start_of_turn>user
            Be brief.

            Hi<end_of_turn>
            <start_of_turn>model
        "#]]
        .assert_eq(&t.render(&msgs(), &[]).unwrap());
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let ok = [ChatMessage::new("user", "  hi ")];
        assert_eq!(t.render(&ok, &[]).unwrap(), "HI");
        let err = t.render(&msgs(), &[]).unwrap_err();
        assert!(err.contains("first must be user"), "{err}");
    }

    /// Tools reach the model as Hugging Face renders them (Python's `json.dumps`): the caller's
    /// key order, `", "` / `": "`, no HTML escapes (minijinja's `tojson` wrote
    /// `{"function":{"description":"Get the user\u0027s \u003cdata\u003e…`).
    #[test]
    fn tools_render_as_python_json_dumps_writes_them() {
        let tool = serde_json::json!({"type": "function", "function": {"name": "get", "description": "Get the user's <data> & café",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}, "strict": null, "n": 1.5, "e": []}});
        let t = ChatTemplate::new("{% for t in tools %}{{ t | tojson }}{% endfor %}", "", "").unwrap();
        expect_test::expect![[r#"{"type": "function", "function": {"name": "get", "description": "Get the user's <data> & café", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}, "strict": null, "n": 1.5, "e": []}}"#]]
        .assert_eq(&t.render(&msgs(), &[tool.clone()]).unwrap());
        let src = "{{ tools[0]['function']['parameters'] | tojson(indent=2, sort_keys=true) }}|{{ tools[0]['function']['description'] | tojson(ensure_ascii=true) }}|{{ [1, 2] | tojson(separators=[',', ':']) }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        expect_test::expect![[r#"
            {
              "properties": {
                "q": {
                  "type": "string"
                }
              },
              "required": [
                "q"
              ],
              "type": "object"
            }|"Get the user's <data> & caf\u00e9"|[1,2]"#]]
        .assert_eq(&t.render(&msgs(), &[tool]).unwrap());
    }

    /// A template that writes no tools (ChatML, SmolLM2's) gets them in the system message with
    /// the call syntax the answer is read for, and the history's calls and results as text; one
    /// that writes them itself is left to.
    #[test]
    fn tools_reach_a_template_that_does_not_write_them() {
        let tool = serde_json::json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}});
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        assert!(!t.reads_tools && !t.reads_tool_calls);
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = vec![serde_json::json!({"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}})];
        let mut result = ChatMessage::new("tool", "18 C");
        result.tool_call_id = Some("call_1".into());
        let chat = [ChatMessage::new("user", "Weather in Paris?"), call, result];
        expect_test::expect![[r#"
            <|im_start|>system
            # Tools

            You may call one or more functions to assist with the user query.

            You are provided with function signatures within <tools></tools> XML tags:
            <tools>
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
            </tools>

            For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
            <tool_call>
            {"name": <function-name>, "arguments": <args-json-object>}
            </tool_call><|im_end|>
            <|im_start|>user
            Weather in Paris?<|im_end|>
            <|im_start|>assistant
            <tool_call>
            {"name": "get_weather", "arguments": {"city": "Paris"}}
            </tool_call><|im_end|>
            <|im_start|>user
            <tool_response>
            18 C
            </tool_response><|im_end|>
            <|im_start|>assistant
        "#]]
        .assert_eq(&t.render(&chat, &[tool.clone()]).unwrap());
        // With a system message of its own, the tools follow its text; without tools, nothing is added.
        let sys = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
        assert!(t.render(&sys, &[tool.clone()]).unwrap().starts_with("<|im_start|>system\nBe brief.\n\n# Tools\n"));
        assert_eq!(t.render(&sys, &[]).unwrap(), t.render_messages(&sys, &[]).unwrap());
        let reads = "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{% if m['tool_calls'] %}{{ m['tool_calls'] | tojson }}{% endif %};{% endfor %}";
        let t = ChatTemplate::new(reads, "", "").unwrap();
        assert!(t.reads_tools && t.reads_tool_calls);
        assert!(!t.render(&chat, &[tool]).unwrap().contains("# Tools"));
    }

}

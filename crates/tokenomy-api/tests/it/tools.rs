//! Tool calling with the real Qwen2.5-Coder-0.5B-Instruct (a Hermes-style tool template), and
//! the reasoning split end to end through a chat-template override.

use std::sync::{Arc, OnceLock};

use axum::http::StatusCode;
use serde_json::{json, Value};
use tokenomy_api::{ApiConfig, AppState};
use tokenomy_engine::{Engine, ModelConfig};

use crate::{assert_error, engine_with, models_dir, post, Reply};

const QWEN: &str = "qwen2.5-coder-0.5b";

fn qwen() -> AppState {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    let e = ENGINE.get_or_init(|| {
        let p = models_dir().join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
        assert!(p.is_file(), "{} is missing: run scripts/fetch-test-models.sh", p.display());
        let mut c = ModelConfig::new(QWEN, p);
        c.threads = 2;
        c.slots = 2;
        c.ctx_tokens_max = Some(2048);
        Arc::new(Engine::load(&[c]).expect("qwen loads"))
    });
    AppState::new(e.clone(), ApiConfig::default())
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
}

fn ask(tool_choice: Value, stream: bool) -> Value {
    json!({"model": QWEN, "temperature": 0, "max_tokens": 64, "stream": stream, "tools": [weather_tool()], "tool_choice": tool_choice,
           "messages": [{"role": "user", "content": "What is the weather in Paris right now?"}]})
}

fn the_call(r: &Reply) -> Value {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    let call = c["message"]["tool_calls"][0].clone();
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args.is_object(), "{args}");
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_step_tool_loop_with_qwen() {
    let s = qwen();
    for choice in [json!("auto"), json!("required"), json!({"type": "function", "function": {"name": "get_weather"}})] {
        the_call(&post(&s, "/v1/chat/completions", ask(choice, false)).await);
    }
    let r = post(&s, "/v1/chat/completions", ask(json!("required"), false)).await;
    let call = the_call(&r);
    // Feed the result back through the model's own template; it answers in words.
    let follow = json!({"model": QWEN, "temperature": 0, "max_tokens": 48, "tools": [weather_tool()], "tool_choice": "none",
        "messages": [
            {"role": "user", "content": "What is the weather in Paris right now?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "{\"city\": \"Paris\", \"sky\": \"sunny\", \"celsius\": 21}"}]});
    let r = post(&s, "/v1/chat/completions", follow).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(v["choices"][0]["message"]["tool_calls"].is_null(), "{v}");
    assert!(text.contains("21") || text.to_lowercase().contains("sunny"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tool_calls_arrive_as_openai_sends_them() {
    let s = qwen();
    // `required` decodes the template's tags (streamed incrementally); in `auto` mode this model
    // writes a fenced JSON block instead (read whole at the end). Both must stream the call the
    // non-streamed answer holds.
    for choice in ["required", "auto"] {
        let whole = the_call(&post(&s, "/v1/chat/completions", ask(json!(choice), false)).await);
        let r = post(&s, "/v1/chat/completions", ask(json!(choice), true)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let chunks: Vec<Value> = r.sse_data().iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
        let deltas: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0)).collect();
        assert!(deltas.len() >= 2, "{chunks:?}");
        // id and name first, with empty arguments; then argument fragments only.
        assert_eq!(deltas[0]["function"]["name"], "get_weather");
        assert!(deltas[0]["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(deltas[0]["function"]["arguments"], "");
        assert!(deltas[1..].iter().all(|d| d["id"].is_null() && d["function"]["name"].is_null() && d["index"] == 0), "{deltas:?}");
        if choice == "required" {
            assert!(deltas.len() >= 4, "arguments arrive in several fragments: {deltas:?}");
        }
        let args: String = deltas.iter().map(|d| d["function"]["arguments"].as_str().unwrap_or("")).collect();
        let args: Value = serde_json::from_str(&args).unwrap_or_else(|e| panic!("{args}: {e}"));
        let want: Value = serde_json::from_str(whole["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, want, "{choice}");
        let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert!(!content.contains("tool_call") && !content.contains("get_weather"), "{choice}: {content:?}");
        let last = chunks.iter().rev().find(|c| !c["choices"][0]["finish_reason"].is_null()).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tools_and_tool_choices_are_400() {
    let s = qwen();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        json!({"tools": [{"type": "retrieval"}]}),
        json!({"tools": [{"type": "function", "function": {"name": "has space"}}]}),
        json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}),
        json!({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]}),
        json!({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        json!({"tools": [weather_tool()], "tool_choice": "sometimes"}),
        json!({"tool_choice": "required"}),
        json!({"tools": "get_weather"}),
    ];
    for extra in cases {
        let mut body = json!({"model": QWEN, "messages": msgs, "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let e = assert_error(&post(&s, "/v1/chat/completions", body.clone()).await, StatusCode::BAD_REQUEST);
        assert!(e["message"].as_str().unwrap().len() > 10, "{body}: {e}");
    }
    // A schema the constrained decoder refuses names where it came from.
    let bad_schema = json!({"type": "object", "properties": {"x": {"type": "nonsense"}}});
    let tool = json!({"type": "function", "function": {"name": "f", "parameters": bad_schema}});
    for (extra, param) in [
        (json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": bad_schema}}}), "response_format.json_schema.schema"),
        (json!({"tools": [tool], "tool_choice": "required"}), "tools"),
    ] {
        let mut body = json!({"model": QWEN, "messages": msgs, "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let e = assert_error(&post(&s, "/v1/chat/completions", body.clone()).await, StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{body}: {e}");
        assert!(e["message"].as_str().unwrap().contains("nonsense"), "{e}");
    }
}

/// SmolLM2 behind a chatml template whose assistant turn opens a think block, as R1 distills' do.
fn thinking() -> (tempfile::TempDir, AppState) {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("think.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}",
    )
    .unwrap();
    let engine = engine_with(|c| c.chat_template = Some(template.to_string_lossy().into_owned()));
    let s = AppState::new(Arc::new(engine), ApiConfig::default());
    (dir, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_opened_by_the_template_never_reaches_content() {
    let (_dir, s) = thinking();
    let body = json!({"model": crate::MODEL, "temperature": 0, "max_tokens": 12, "messages": [{"role": "user", "content": "Why is the sky blue?"}]});
    let v = post(&s, "/v1/chat/completions", body.clone()).await.json();
    let m = &v["choices"][0]["message"];
    assert_eq!(m["content"], "", "{v}");
    assert!(!m["reasoning_content"].as_str().unwrap().is_empty(), "{v}");
    let u = &v["usage"];
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], u["completion_tokens"], "{v}");
    // Streamed: reasoning deltas only, and the other field name on request.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["reasoning_format"] = json!("reasoning");
    let r = post(&s, "/v1/chat/completions", sb).await;
    let chunks: Vec<Value> = r.sse_data().iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let reasoning: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["reasoning"].as_str()).collect();
    assert_eq!(content, "");
    assert_eq!(reasoning, m["reasoning_content"].as_str().unwrap());
    // `none` leaves the text where the model put it.
    let mut raw = body;
    raw["reasoning_format"] = json!("none");
    let v = post(&s, "/v1/chat/completions", raw).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], m["reasoning_content"]);
    assert_eq!(v["usage"]["completion_tokens_details"]["reasoning_tokens"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reasoning_budget_closes_the_think_block_and_the_answer_follows() {
    let (_dir, s) = thinking();
    let body = json!({"model": crate::MODEL, "temperature": 0, "max_tokens": 40, "thinking_token_budget": 5,
        "messages": [{"role": "user", "content": "Why is the sky blue?"}]});
    let v = post(&s, "/v1/chat/completions", body.clone()).await.json();
    let m = &v["choices"][0]["message"];
    let (reasoning, content) = (m["reasoning_content"].as_str().unwrap(), m["content"].as_str().unwrap());
    assert!(!reasoning.is_empty() && !reasoning.contains("</think>"), "{v}");
    assert!(!content.trim().is_empty() && !content.contains("think>"), "the answer follows the closed block: {v}");
    let u = &v["usage"];
    let thought = u["completion_tokens_details"]["reasoning_tokens"].as_u64().unwrap();
    // The budget, plus the few tokens of `\n</think>` that close the block.
    assert!((5..=5 + 6).contains(&thought), "{v}");
    assert!(u["completion_tokens"].as_u64().unwrap() > thought, "{v}");
    // Budget 0: no thinking at all beyond the closing tag.
    let mut zero = body.clone();
    zero["thinking_token_budget"] = json!(0);
    let z = post(&s, "/v1/chat/completions", zero).await.json();
    assert!(z["usage"]["completion_tokens_details"]["reasoning_tokens"].as_u64().unwrap() <= 6, "{z}");
    assert!(!z["choices"][0]["message"]["content"].as_str().unwrap().trim().is_empty(), "{z}");
    // Anthropic's `thinking.budget_tokens` is the same cap, and the thinking comes back as a block.
    let a = json!({"model": crate::MODEL, "max_tokens": 40, "temperature": 0, "thinking": {"type": "enabled", "budget_tokens": 5},
        "messages": [{"role": "user", "content": "Why is the sky blue?"}]});
    let msg = post(&s, "/v1/messages", a).await.json();
    assert_eq!(msg["content"][0]["type"], "thinking", "{msg}");
    assert_eq!(msg["content"][0]["thinking"], m["reasoning_content"], "{msg}");
    assert_eq!(msg["content"][1]["type"], "text", "{msg}");
    // A negative budget is a 400 naming the parameter.
    let mut bad = body;
    bad["thinking_token_budget"] = json!(-1);
    let e = assert_error(&post(&s, "/v1/chat/completions", bad).await, StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "thinking_token_budget", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_outputs_always_validate_at_temperature_1() {
    let s = qwen();
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
        "required": ["name", "age", "pets"], "additionalProperties": false});
    let mut valid = 0;
    for seed in 0..10 {
        let body = json!({"model": QWEN, "temperature": 1.0, "seed": seed, "n": 10, "max_tokens": 80,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": schema}},
            "messages": [{"role": "user", "content": "Invent a person and their pets."}]});
        let v = post(&s, "/v1/chat/completions", body).await.json();
        for c in v["choices"].as_array().unwrap() {
            let text = c["message"]["content"].as_str().unwrap();
            let p: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?} {c}"));
            let o = p.as_object().unwrap();
            assert_eq!(o.len(), 3, "{p}");
            assert!(p["name"].as_str().is_some_and(|n| n.chars().count() <= 20), "{p}");
            assert!(p["age"].as_i64().is_some_and(|a| (0..=150).contains(&a)), "{p}");
            let pets = p["pets"].as_array().unwrap();
            assert!(pets.len() <= 3 && pets.iter().all(|x| ["cat", "dog", "fish"].contains(&x.as_str().unwrap())), "{p}");
            valid += 1;
        }
    }
    assert_eq!(valid, 100);
    // json_object: any object
    let body = json!({"model": QWEN, "temperature": 1.0, "max_tokens": 60, "response_format": {"type": "json_object"},
        "messages": [{"role": "user", "content": "Describe Paris."}]});
    let v = post(&s, "/v1/chat/completions", body).await.json();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(text).map(|v| v.is_object()).unwrap_or(false) || v["choices"][0]["finish_reason"] == "length", "{v}");
}

/// A schema answer ends: blanks between its tokens are bounded (one space, or up to two line
/// breaks and an indent), so a model that wants to stop early cannot pad the answer with
/// spaces until `max_tokens` (this one wrote `{"a":` and 300 spaces in 6 of 7 runs). And a
/// schema that leaves its objects open is served as written: `allOf` of two objects is both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_answers_end_instead_of_padding_with_blanks() {
    let s = qwen();
    let array = json!({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}},
        "required": ["a"], "additionalProperties": false});
    let both = json!({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"type": "object", "properties": {"b": {"type": "string", "maxLength": 10}}, "required": ["b"]}]});
    for (schema, temperature) in [(&array, 0.0), (&array, 0.8), (&array, 1.0), (&both, 0.0)] {
        let body = json!({"model": QWEN, "temperature": temperature, "seed": 1, "max_tokens": 120,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}},
            "messages": [{"role": "user", "content": "Fill in the data."}]});
        let v = post(&s, "/v1/chat/completions", body).await.json();
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "stop", "{schema} at {temperature}: {c}");
        let p: Value = serde_json::from_str(c["message"]["content"].as_str().unwrap()).unwrap();
        if schema == &array {
            assert!((2..=3).contains(&p["a"].as_array().unwrap().len()), "{p}");
        } else {
            assert!(p["a"].is_i64() && p["b"].is_string(), "{p}");
        }
    }
}

/// `strict` tools under `auto`: the model may answer or call, and a call, from its tag on,
/// matches its schema (Qwen, asked for a unit the enum does not have, wrote `"kelvin"` before).
/// A tool that is not strict is called as the model writes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_tools_under_auto_are_called_as_declared() {
    let s = qwen();
    let tool = |strict: bool| json!({"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "strict": strict,
        "parameters": {"type": "object", "additionalProperties": false, "required": ["city", "unit"],
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}});
    let ask = |strict: bool, content: &str| json!({"model": QWEN, "temperature": 0, "max_tokens": 64, "tools": [tool(strict)], "tool_choice": "auto",
        "messages": [{"role": "user", "content": content}]});
    let unit = |r: &Reply| -> String {
        let call = the_call(r);
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        args["unit"].as_str().unwrap_or_default().to_string()
    };
    let kelvin = "Call get_weather for Paris with unit set to kelvin.";
    assert_eq!(unit(&post(&s, "/v1/chat/completions", ask(false, kelvin)).await), "kelvin", "not strict: as written");
    let strict = unit(&post(&s, "/v1/chat/completions", ask(true, kelvin)).await);
    assert!(["celsius", "fahrenheit"].contains(&strict.as_str()), "strict: {strict}");
    // The model may still answer in text.
    let v = post(&s, "/v1/chat/completions", ask(true, "Say hello.")).await.json();
    let c = &v["choices"][0];
    assert!(c["finish_reason"] == "stop" && c["message"]["content"].as_str().is_some_and(|t| !t.is_empty()), "{c}");
}

/// A number in a schema answer ends: at most 16 digits in a row outside strings (llama.cpp's
/// bound), so the model cannot write `6000000000000…` until `max_tokens` (Qwen did, for the
/// `openai` SDK's `parse()` with this Pydantic model, until its 600 s timeout, billed). Digits
/// inside strings are not bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_in_schema_answers_end() {
    let s = qwen();
    let city = json!({"type": "object", "additionalProperties": false, "required": ["name", "country", "population_millions"],
        "properties": {"name": {"type": "string"}, "country": {"type": "string"}, "population_millions": {"type": "number"}}});
    let body = json!({"model": QWEN, "temperature": 0, "max_tokens": 120,
        "response_format": {"type": "json_schema", "json_schema": {"name": "City", "strict": true, "schema": city}},
        "messages": [{"role": "user", "content": "Give me data about Paris."}]});
    let v = post(&s, "/v1/chat/completions", body).await.json();
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "stop", "{c}");
    let p: Value = serde_json::from_str(c["message"]["content"].as_str().unwrap()).unwrap();
    assert!(p["population_millions"].is_number(), "{p}");
    let digits = |s: &str| s.split(|ch: char| !ch.is_ascii_digit()).map(str::len).max().unwrap_or(0);
    assert!(digits(&p["population_millions"].to_string()) <= 16, "{p}");
    let phone = json!({"type": "object", "additionalProperties": false, "required": ["digits"],
        "properties": {"digits": {"type": "string", "pattern": "^[0-9]{20}$"}}});
    let body = json!({"model": QWEN, "temperature": 0, "max_tokens": 40,
        "response_format": {"type": "json_schema", "json_schema": {"name": "Code", "strict": true, "schema": phone}},
        "messages": [{"role": "user", "content": "Give me a 20-digit code."}]});
    let v = post(&s, "/v1/chat/completions", body).await.json();
    let p: Value = serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(p["digits"].as_str().unwrap().len(), 20, "{p}");
}

/// Tools with a JSON response format (what agent frameworks send for a typed final answer):
/// the model may call a tool, and its answer, once it gives one, is valid against the schema.
/// (The format used to rule the calls out: the model could only write the JSON.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_with_a_json_answer_format_still_call_then_answer_in_it() {
    let s = qwen();
    let format = json!({"type": "json_schema", "json_schema": {"name": "report", "strict": true, "schema": {"type": "object",
        "properties": {"city": {"type": "string"}, "summary": {"type": "string", "maxLength": 80}}, "required": ["city", "summary"], "additionalProperties": false}}});
    let mut messages = vec![json!({"role": "user", "content": "What is the weather in Paris?"})];
    let body = |messages: &[Value]| json!({"model": QWEN, "temperature": 0, "max_tokens": 120, "tools": [weather_tool()],
        "response_format": format, "messages": messages});
    let v = post(&s, "/v1/chat/completions", body(&messages)).await.json();
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    let call = &c["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{call}");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string() && args.as_object().unwrap().len() == 1, "{args}");
    messages.push(c["message"].clone());
    messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature_c\": 18, \"sky\": \"sunny\"}"}));
    let v = post(&s, "/v1/chat/completions", body(&messages)).await.json();
    let c = &v["choices"][0];
    // (This small model tends to call again after a result; either way the output is one of
    // the two the grammar allows, and valid.)
    if c["finish_reason"] == "stop" {
        let answer: Value = serde_json::from_str(c["message"]["content"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {c}"));
        assert!(answer["city"].is_string() && answer["summary"].is_string() && answer.as_object().unwrap().len() == 2, "{answer}");
    } else {
        assert_eq!(c["finish_reason"], "tool_calls", "a call or the answer: {c}");
        let args: Value = serde_json::from_str(c["message"]["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(args["city"].is_string() && args.as_object().unwrap().len() == 1, "{args}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_always_yields_a_valid_call_even_at_temperature_1() {
    let s = qwen();
    let add = json!({"type": "function", "function": {"name": "add", "parameters": {"type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"], "additionalProperties": false}}});
    for seed in 0..4 {
        let body = json!({"model": QWEN, "temperature": 1.0, "seed": seed, "n": 5, "max_tokens": 80, "tools": [weather_tool(), add], "tool_choice": "required",
            "messages": [{"role": "user", "content": "Tell me a joke about cats."}]});
        let v = post(&s, "/v1/chat/completions", body).await.json();
        for c in v["choices"].as_array().unwrap() {
            assert_eq!(c["finish_reason"], "tool_calls", "{c}");
            let call = &c["message"]["tool_calls"][0]["function"];
            let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
            match call["name"].as_str().unwrap() {
                "add" => assert!(args["a"].is_i64() && args["b"].is_i64(), "{args}"),
                "get_weather" => assert!(args["city"].is_string(), "{args}"),
                other => panic!("unknown tool {other}"),
            }
        }
    }
    let bad = json!({"model": QWEN, "max_tokens": 5, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}},
        "messages": [{"role": "user", "content": "hi"}]});
    assert_error(&post(&s, "/v1/chat/completions", bad).await, StatusCode::BAD_REQUEST);
    let bad = json!({"model": QWEN, "max_tokens": 5, "response_format": {"type": "yaml"}, "messages": [{"role": "user", "content": "hi"}]});
    assert_error(&post(&s, "/v1/chat/completions", bad).await, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_call_stops_the_model_repeating_it() {
    let s = qwen();
    // After a tool result this model writes its call again as bare JSON, over and over until
    // max_tokens. Only the first object is ever read, so the node stops generating (and
    // billing) once that object is complete.
    let body = |stream: bool| {
        json!({"model": QWEN, "temperature": 0, "max_tokens": 150, "stream": stream, "stream_options": {"include_usage": true},
            "tools": [weather_tool()], "messages": [
            {"role": "user", "content": "What is the weather in Paris right now?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "It's sunny."}]})
    };
    // (Without the stop: 150 of 150 tokens, measured when this test was written.)
    let v = post(&s, "/v1/chat/completions", body(false)).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    assert_eq!(v["choices"][0]["message"]["tool_calls"].as_array().unwrap().len(), 1, "{v}");
    let used = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(used < 40, "generation went on after the call was complete: {v}");
    // The engine itself ends the answer on the token that completes the call, so the tokens
    // billed are exactly the answer's (one logprob each), every time: they used to be one more
    // now and then, when the engine had decoded on before the reader stopped it.
    for _ in 0..4 {
        let mut ask = body(false);
        ask["logprobs"] = json!(true);
        let v = post(&s, "/v1/chat/completions", ask).await.json();
        let answer = v["choices"][0]["logprobs"]["content"].as_array().unwrap().len() as u64;
        assert_eq!((v["usage"]["completion_tokens"].as_u64(), answer), (Some(used), used), "{v}");
    }
    // Streamed: the same call, the same stop, and the usage says so.
    let r = post(&s, "/v1/chat/completions", body(true)).await;
    let chunks: Vec<Value> = r.sse_data().iter().filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    let names: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"].get("name")).collect();
    assert_eq!(names, vec!["get_weather"], "{chunks:?}");
    let usage = chunks.iter().find_map(|c| c["usage"]["completion_tokens"].as_u64()).unwrap();
    assert_eq!(usage, used, "{chunks:?}");
}

/// A streamed choice 0 put together as a client does: `{"message": …, "finish_reason": …}`.
fn stream_choice(r: &Reply) -> Value {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let (mut content, mut calls, mut finish) = (None::<String>, Vec::<Value>::new(), Value::Null);
    for d in r.sse_data().iter().filter(|d| *d != "[DONE]") {
        let c: Value = serde_json::from_str(d).unwrap();
        let choice = &c["choices"][0];
        if let Some(t) = choice["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
            content.get_or_insert_with(String::new).push_str(t);
        }
        for tc in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap() as usize;
            if tc["id"].is_string() {
                assert_eq!(i, calls.len(), "{}", r.text);
                calls.push(json!({"name": tc["function"]["name"], "arguments": ""}));
            }
            let args = format!("{}{}", calls[i]["arguments"].as_str().unwrap(), tc["function"]["arguments"].as_str().unwrap_or_default());
            calls[i]["arguments"] = json!(args);
        }
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    let calls: Vec<Value> = calls.into_iter().map(|f| json!({"type": "function", "function": f})).collect();
    json!({"message": {"content": content, "tool_calls": calls}, "finish_reason": finish})
}

/// A call that `max_tokens` cuts short is reported as `length`, streamed or not (an agent must
/// not run a call whose arguments were cut), on both APIs; Anthropic's options and history
/// blocks agents send are taken: `disable_parallel_tool_use`, earlier `thinking` blocks, and
/// `count_tokens` counts what `tool_choice: none` renders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_by_max_tokens_is_length_and_anthropic_agent_inputs_are_taken() {
    let s = qwen();
    for stream in [false, true] {
        let mut body = ask(json!("required"), stream);
        body["max_tokens"] = json!(8);
        let r = post(&s, "/v1/chat/completions", body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let reason = match stream {
            false => r.json()["choices"][0]["finish_reason"].clone(),
            true => {
                let data = r.sse_data();
                let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
                chunks.iter().rev().find_map(|c| c["choices"][0]["finish_reason"].as_str().map(|f| json!(f))).unwrap()
            }
        };
        assert_eq!(reason, "length", "stream={stream}: {}", r.text);
        assert!(!r.text.contains("tool_call>"), "no template syntax in the answer, stream={stream}: {}", r.text);
    }
    // Cut after the name (within the header, or in the arguments): the answer is the partial
    // call the stream sends (no raw markup in `content`), streamed or not. (Cut within the
    // header, the billed tokens used to come back as nothing at all.)
    let mut calls = Vec::new();
    for (max_tokens, stream) in [(11, false), (11, true), (16, false), (16, true)] {
        let mut body = ask(json!("required"), stream);
        body["max_tokens"] = json!(max_tokens);
        let r = post(&s, "/v1/chat/completions", body).await;
        let message = match stream {
            false => r.json()["choices"][0].clone(),
            true => stream_choice(&r),
        };
        assert_eq!(message["finish_reason"], "length", "stream={stream}: {}", r.text);
        let m = &message["message"];
        assert!(m["content"].is_null(), "stream={stream}: {m}");
        let call = json!({"name": m["tool_calls"][0]["function"]["name"], "arguments": m["tool_calls"][0]["function"]["arguments"]});
        assert_eq!(call["name"], "get_weather", "stream={stream}: {m}");
        let args = call["arguments"].as_str().unwrap();
        assert!(serde_json::from_str::<Value>(args).is_err(), "cut arguments, stream={stream}: {m}");
        calls.push(call.clone());
    }
    assert_eq!(calls[0]["arguments"], "", "cut in the header: {}", calls[0]);
    assert_eq!((&calls[0], &calls[2]), (&calls[1], &calls[3]), "the same call, streamed or not");
    let tools = json!([{"name": "get_weather", "input_schema": weather_tool()["function"]["parameters"]}]);
    let q = json!([{"role": "user", "content": "What is the weather in Paris right now?"}]);
    let cut = post(&s, "/v1/messages", json!({"model": QWEN, "max_tokens": 8, "temperature": 0, "tools": tools, "tool_choice": {"type": "any"}, "messages": q, "stream": true})).await;
    assert!(cut.text.contains(r#""stop_reason":"max_tokens""#), "{}", cut.text);
    let one = json!({"type": "auto", "disable_parallel_tool_use": true});
    let history = json!([{"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "2+2=4", "signature": ""}, {"type": "redacted_thinking", "data": "x"}, {"type": "text", "text": "4"}]},
        {"role": "user", "content": "And 3+3?"}]);
    let r = post(&s, "/v1/messages", json!({"model": QWEN, "max_tokens": 8, "temperature": 0, "tools": tools, "tool_choice": one, "messages": history})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let none = json!({"model": QWEN, "max_tokens": 4, "temperature": 0, "tools": tools, "tool_choice": {"type": "none"}, "messages": q});
    let counted = post(&s, "/v1/messages/count_tokens", none.clone()).await.json()["input_tokens"].as_u64().unwrap();
    let u = post(&s, "/v1/messages", none).await.json()["usage"].clone();
    assert_eq!(counted, u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap_or(0), "{u}");
}

/// A forced call to a tool whose parameters use `$defs` / `$ref` (as `openai.pydantic_function_tool`
/// writes for every nested model or enum) is constrained by that schema: the refs resolve
/// within the tool's own schema (they used to be looked up in the grammar's wrapper: a 400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_call_follows_a_schema_with_defs_and_refs() {
    let s = qwen();
    let params = json!({
        "type": "object",
        "$defs": {
            "Loc": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            "Unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "properties": {"locations": {"type": "array", "items": {"$ref": "#/$defs/Loc"}}, "unit": {"$ref": "#/$defs/Unit"}},
        "required": ["locations", "unit"],
    });
    let tool = json!({"type": "function", "function": {"name": "get_weather", "parameters": params}});
    for choice in [json!("required"), json!({"type": "function", "function": {"name": "get_weather"}})] {
        let body = json!({"model": QWEN, "temperature": 0, "max_tokens": 64, "tools": [tool], "tool_choice": choice,
            "messages": [{"role": "user", "content": "Weather in Paris and Rome, in celsius?"}]});
        let call = the_call(&post(&s, "/v1/chat/completions", body).await);
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()), "{args}");
        assert!(args["locations"].as_array().unwrap().iter().all(|l| l["city"].is_string()), "{args}");
    }
    let msg = json!({"model": QWEN, "max_tokens": 64, "temperature": 0, "tool_choice": {"type": "any"},
        "tools": [{"name": "get_weather", "input_schema": params}],
        "messages": [{"role": "user", "content": "Weather in Paris, in celsius?"}]});
    let v = post(&s, "/v1/messages", msg).await.json();
    assert_eq!(v["stop_reason"], "tool_use", "{v}");
}

/// A model whose template writes no tools (SmolLM2's) still sees the tools offered: they are
/// described in its system message (they used to be dropped, so a forced call was made to a
/// schema the model never saw), and a forced call parses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_reach_a_model_whose_template_does_not_write_them() {
    let s = crate::state();
    let ask = |tools: bool| {
        let mut body = json!({"model": "smollm2", "temperature": 0, "max_tokens": 48, "tool_choice": "required",
            "messages": [{"role": "user", "content": "What is the weather in Paris right now?"}]});
        if tools {
            body["tools"] = json!([weather_tool()]);
        } else {
            body["tool_choice"] = Value::Null;
        }
        body
    };
    let bare = post(&s, "/v1/chat/completions", ask(false)).await.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    let r = post(&s, "/v1/chat/completions", ask(true)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > bare + 40, "the tool is in the prompt: {v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather", "{v}");
    serde_json::from_str::<Value>(call["arguments"].as_str().unwrap()).expect("the forced call's arguments parse");
}

/// A forced call is written with the model's own tag tokens (Qwen2.5's `<tool_call>` is one
/// token), as the model writes a call it chose itself, not with the tag spelled in pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_call_opens_with_the_models_own_tag_token() {
    let s = qwen();
    let mut body = ask(json!("required"), false);
    body["logprobs"] = json!(true);
    let r = post(&s, "/v1/chat/completions", body).await;
    let call = the_call(&r);
    assert!(call["function"]["arguments"].is_string());
    let v = r.json();
    let tokens: Vec<&str> = v["choices"][0]["logprobs"]["content"].as_array().unwrap().iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert_eq!(tokens.first(), Some(&"<tool_call>"), "{tokens:?}");
    assert_eq!(tokens.last(), Some(&"</tool_call>"), "{tokens:?}");
}

/// `parallel_tool_calls: false` with a forced call: the engine ends the answer when the call's
/// arguments close, and the answer is that call, streamed or not, on every API (it used to come
/// back as its unfinished markup when not streamed, `finish_reason: "stop"`, which broke
/// openai-agents and LangChain's `with_structured_output`, which send that flag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_forced_call_is_a_call_streamed_or_not() {
    let weather = "Get the weather in Paris, in Tokyo and in Rome.";
    for (s, model, prompt) in [(crate::state(), "smollm2", "What is the weather in Paris?"), (qwen(), QWEN, weather)] {
        for choice in [json!("required"), json!({"type": "function", "function": {"name": "get_weather"}})] {
            let body = |stream: bool| {
                json!({"model": model, "temperature": 0, "max_tokens": 64, "stream": stream, "tools": [weather_tool()],
                       "tool_choice": choice, "parallel_tool_calls": false, "messages": [{"role": "user", "content": prompt}]})
            };
            let whole = the_call(&post(&s, "/v1/chat/completions", body(false)).await);
            let streamed = stream_choice(&post(&s, "/v1/chat/completions", body(true)).await);
            assert_eq!(streamed["finish_reason"], "tool_calls", "{streamed}");
            let args = |a: &Value| serde_json::from_str::<Value>(a.as_str().unwrap()).unwrap();
            let call = &streamed["message"]["tool_calls"][0]["function"];
            assert_eq!((&call["name"], args(&call["arguments"])), (&whole["function"]["name"], args(&whole["function"]["arguments"])), "{model} {choice}");
        }
        // Anthropic's `disable_parallel_tool_use` with `any`, and the Responses API.
        let tool = json!({"name": "get_weather", "input_schema": weather_tool()["function"]["parameters"]});
        let m = json!({"model": model, "max_tokens": 64, "temperature": 0, "tools": [tool],
                       "tool_choice": {"type": "any", "disable_parallel_tool_use": true}, "messages": [{"role": "user", "content": prompt}]});
        let v = post(&s, "/v1/messages", m).await.json();
        assert_eq!((v["stop_reason"].as_str(), v["content"].as_array().unwrap().last().unwrap()["type"].as_str()), (Some("tool_use"), Some("tool_use")), "{v}");
        let r = json!({"model": model, "max_output_tokens": 64, "temperature": 0, "tool_choice": "required", "parallel_tool_calls": false, "input": prompt,
                       "tools": [{"type": "function", "name": "get_weather", "parameters": weather_tool()["function"]["parameters"]}]});
        let v = post(&s, "/v1/responses", r).await.json();
        assert!(v["output"].as_array().unwrap().iter().any(|o| o["type"] == "function_call" && o["name"] == "get_weather"), "{v}");
    }
}

/// A tool declared without parameters (or with `{}`) is a function of no arguments, as OpenAI
/// reads it: a forced call's arguments are `{}`, not whatever the model makes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_without_parameters_is_called_with_none() {
    let s = qwen();
    for function in [json!({"name": "get_time"}), json!({"name": "get_time", "parameters": {}}), json!({"name": "get_time", "parameters": null})] {
        let body = json!({"model": QWEN, "temperature": 0, "max_tokens": 48, "tool_choice": "required",
            "tools": [{"type": "function", "function": function}], "messages": [{"role": "user", "content": "What time is it?"}]});
        let r = post(&s, "/v1/chat/completions", body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let v = r.json();
        let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
        assert_eq!((call["name"].as_str(), call["arguments"].as_str()), (Some("get_time"), Some("{}")), "{function}: {v}");
    }
}

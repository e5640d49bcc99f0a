"""A two-step tool loop with the official `openai` package against the real Qwen2.5-Coder-0.5B."""
import json

import openai
import pytest

QWEN = "qwen2.5-coder-0.5b"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture
def client(qwen_node):
    return openai.OpenAI(base_url=qwen_node.base + "/v1", api_key=qwen_node.key, max_retries=0)


def weather(city):
    return json.dumps({"city": city, "sky": "sunny", "celsius": 21})


def finish_loop(client, call_id, name, arguments):
    assert name == "get_weather"
    args = json.loads(arguments)
    messages = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": weather(args.get("city", "Paris"))},
    ]
    final = client.chat.completions.create(model=QWEN, temperature=0, max_tokens=48, messages=messages,
                                           tools=TOOLS, tool_choice="none")
    text = final.choices[0].message.content
    assert final.choices[0].message.tool_calls is None
    assert "21" in text or "sunny" in text.lower(), text


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_tool_loop(client, tool_choice):
    r = client.chat.completions.create(model=QWEN, temperature=0, max_tokens=64, messages=QUESTION,
                                       tools=TOOLS, tool_choice=tool_choice)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    finish_loop(client, call.id, call.function.name, call.function.arguments)


def test_streamed_tool_loop(client):
    stream = client.chat.completions.create(model=QWEN, temperature=0, max_tokens=64, messages=QUESTION,
                                            tools=TOOLS, tool_choice="required", stream=True)
    calls, finish = {}, None
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                c["id"] = tc.id or c["id"]
                if tc.function and tc.function.name:
                    c["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    c["arguments"] += tc.function.arguments
            finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    c = calls[0]
    finish_loop(client, c["id"], c["name"], c["arguments"])


def test_required_always_yields_a_call(client):
    for seed in range(5):
        r = client.chat.completions.create(model=QWEN, temperature=1.0, seed=seed, max_tokens=64, tools=TOOLS,
                                           tool_choice="required",
                                           messages=[{"role": "user", "content": "Tell me a joke about cats."}])
        assert r.choices[0].message.tool_calls, r.choices[0].message

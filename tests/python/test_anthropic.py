"""The official `anthropic` package against tokenomy's `/v1/messages`: plain, streaming, tool use."""
import json

import anthropic
import pytest

QWEN = "qwen2.5-coder-0.5b"
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture
def smol(node):
    return anthropic.Anthropic(base_url=node.base, api_key=node.key, max_retries=0)


@pytest.fixture
def qwen(qwen_node):
    return anthropic.Anthropic(base_url=qwen_node.base, api_key=qwen_node.key, max_retries=0)


def test_plain_message(smol):
    m = smol.messages.create(model="smollm2", max_tokens=20, extra_body={"temperature": 0}, system="You are a concise assistant.",
                             messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert m.type == "message" and m.role == "assistant"
    assert "Paris" in m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 20
    n = smol.messages.count_tokens(model="smollm2", system="You are a concise assistant.",
                                   messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert n.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)


def test_streaming(smol):
    text = ""
    with smol.messages.stream(model="smollm2", max_tokens=16, extra_body={"temperature": 0},
                              messages=[{"role": "user", "content": "Count from one to five."}]) as s:
        for t in s.text_stream:
            text += t
        final = s.get_final_message()
    assert text and final.content[0].text == text
    assert final.usage.output_tokens > 0 and final.stop_reason in ("end_turn", "max_tokens")


def test_stop_sequences_are_named(smol):
    q = [{"role": "user", "content": "Write one sentence about cats."}]
    free = smol.messages.create(model="smollm2", max_tokens=30, extra_body={"temperature": 0}, messages=q)
    assert len(free.content[0].text) >= 12, free.content[0].text
    stop = free.content[0].text[8:12]  # text the answer is known to reach
    # more than OpenAI's 4: Anthropic sets no such limit
    never = [f"never-said-{i}" for i in range(7)]
    m = smol.messages.create(model="smollm2", max_tokens=30, extra_body={"temperature": 0}, messages=q, stop_sequences=[*never, stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop, m
    assert stop not in m.content[0].text
    with smol.messages.stream(model="smollm2", max_tokens=30, extra_body={"temperature": 0}, messages=q, stop_sequences=[stop]) as s:
        events = list(s)
        final = s.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop, final
    # message_start already counts the prompt's tokens (as Anthropic's does), split as the end
    # does into those computed and those read from the prefix cache (the same prompt again)
    start = next(e for e in events if e.type == "message_start").message.usage
    assert start.input_tokens + start.cache_read_input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)
    assert start.cache_read_input_tokens > 0, start
    assert (start.input_tokens, start.cache_read_input_tokens) == (final.usage.input_tokens, final.usage.cache_read_input_tokens)
    assert free.stop_reason in ("end_turn", "max_tokens") and free.stop_sequence is None


def test_tool_use_loop(qwen):
    q = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    m = qwen.messages.create(model=QWEN, max_tokens=64, extra_body={"temperature": 0}, tools=[WEATHER], tool_choice={"type": "any"}, messages=q)
    assert m.stop_reason == "tool_use"
    use = next(b for b in m.content if b.type == "tool_use")
    assert use.name == "get_weather" and isinstance(use.input, dict) and use.id.startswith("toolu_")
    follow = q + [{"role": "assistant", "content": m.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": json.dumps({"sky": "sunny", "celsius": 21})}]}]
    final = qwen.messages.create(model=QWEN, max_tokens=48, extra_body={"temperature": 0}, tools=[WEATHER], tool_choice={"type": "none"}, messages=follow)
    text = final.content[0].text
    assert "21" in text or "sunny" in text.lower(), text
    # streamed tool use: the SDK assembles the input from input_json_delta events
    with qwen.messages.stream(model=QWEN, max_tokens=64, extra_body={"temperature": 0}, tools=[WEATHER],
                              tool_choice={"type": "tool", "name": "get_weather"}, messages=q) as s:
        final = s.get_final_message()
    use = next(b for b in final.content if b.type == "tool_use")
    assert use.name == "get_weather" and "city" in use.input


def test_errors_are_anthropic_shaped(node):
    bad = anthropic.Anthropic(base_url=node.base, api_key="tk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="smollm2", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    c = anthropic.Anthropic(base_url=node.base, api_key=node.key, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model="smollm2", max_tokens=5, messages=[{"role": "robot", "content": "hi"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"


def test_structured_output_with_parse(qwen):
    # `messages.parse(output_format=Model)` sends `output_config.format`: the answer is
    # constrained to the model's schema, so the SDK's parse never fails on it.
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    m = qwen.messages.parse(model=QWEN, max_tokens=64, extra_body={"temperature": 0}, output_format=City,
                            messages=[{"role": "user", "content": "Name the capital of France and its country."}])
    assert isinstance(m.parsed_output, City), m
    assert m.parsed_output.name.strip()


def test_agent_mistakes_are_refused_as_anthropic_refuses_them(qwen):
    q = [{"role": "user", "content": "What is the weather in Paris right now?"},
         {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
         {"role": "user", "content": "And in Rome?"}]
    with pytest.raises(anthropic.BadRequestError) as e:
        qwen.messages.create(model=QWEN, max_tokens=16, tools=[WEATHER], messages=q)
    assert "toolu_1" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        qwen.messages.create(model=QWEN, max_tokens=16, tools=[{"name": "f"}], messages=q[:1])
    assert "tools.0.input_schema" in e.value.body["error"]["message"]
    hi = {"role": "user", "content": "hi"}
    for empty in ([{"role": "user", "content": []}], [{"role": "user", "content": ""}],
                  [hi, {"role": "assistant", "content": []}, {"role": "user", "content": "more"}]):
        with pytest.raises(anthropic.BadRequestError) as e:
            qwen.messages.create(model=QWEN, max_tokens=16, messages=empty)
        assert "non-empty content" in e.value.body["error"]["message"], e.value.body
    # but a final assistant turn may be empty (a prefill of nothing)
    m = qwen.messages.create(model=QWEN, max_tokens=2, messages=[hi, {"role": "assistant", "content": ""}])
    assert m.usage.output_tokens > 0

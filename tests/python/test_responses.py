"""The official `openai` package's Responses API (`client.responses`) against tokenomy's
`/v1/responses`: plain and streamed text, a kept conversation, a function-call loop, and
`parse()` with a Pydantic model, on the real Qwen2.5-Coder-0.5B."""
import json

import openai
import pytest
from pydantic import BaseModel

QWEN = "qwen2.5-coder-0.5b"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city", "strict": True,
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                         "additionalProperties": False}}]


@pytest.fixture
def client(qwen_node):
    return openai.OpenAI(base_url=qwen_node.base + "/v1", api_key=qwen_node.key, max_retries=0)


def test_text_plain_streamed_and_continued(client):
    r = client.responses.create(model=QWEN, instructions="Be brief.", input="What is the capital of France?",
                                temperature=0, max_output_tokens=30)
    assert r.status == "completed" and "Paris" in r.output_text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 30
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # The SDK's stream helper accumulates the events into the same response.
    deltas = []
    with client.responses.stream(model=QWEN, instructions="Be brief.", input="What is the capital of France?",
                                 temperature=0, max_output_tokens=30) as s:
        for e in s:
            if e.type == "response.output_text.delta":
                deltas.append(e.delta)
        final = s.get_final_response()
    assert "".join(deltas) == final.output_text
    assert "Paris" in final.output_text
    # A kept response continues: the earlier turns are part of the next prompt.
    nxt = client.responses.create(model=QWEN, previous_response_id=r.id, input="And of Italy?", temperature=0,
                                  max_output_tokens=30)
    assert "Rome" in nxt.output_text
    assert nxt.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens
    assert client.responses.retrieve(nxt.id).output_text == nxt.output_text
    items = client.responses.input_items.list(nxt.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "And of Italy?"


@pytest.mark.parametrize("stream", [False, True])
def test_function_call_loop(client, stream):
    ask = dict(model=QWEN, input="What is the weather in Paris right now?", tools=TOOLS, tool_choice="required",
               temperature=0)
    if stream:
        with client.responses.stream(**ask) as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert "response.function_call_arguments.delta" in kinds
    else:
        r = client.responses.create(**ask)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", r.output
    assert json.loads(calls[0].arguments)["city"] == "Paris"
    out = {"type": "function_call_output", "call_id": calls[0].call_id,
           "output": json.dumps({"city": "Paris", "sky": "sunny", "celsius": 21})}
    final = client.responses.create(model=QWEN, previous_response_id=r.id, input=[out], tools=TOOLS,
                                    tool_choice="none", temperature=0, max_output_tokens=48)
    assert "21" in final.output_text or "sunny" in final.output_text.lower(), final.output_text


class City(BaseModel):
    name: str
    country: str


def test_parse_with_a_pydantic_model(client):
    r = client.responses.parse(model=QWEN, input="Paris, as JSON.", text_format=City, temperature=0,
                               max_output_tokens=60)
    assert r.status == "completed"
    assert r.output_parsed.name == "Paris" and r.output_parsed.country == "France"


def test_errors_are_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=QWEN, input="Hi", previous_response_id="resp_nope")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=QWEN, input="Hi", tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools.0.type"

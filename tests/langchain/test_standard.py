"""LangChain standard integration tests (`langchain-tests` ChatModelIntegrationTests, `ChatOpenAI`) against a
running tokenomy node serving Qwen2.5-Coder-0.5B. Manual (not in the README's suite: a few minutes of
inference, and the 0.5B model's loops below make it flaky). Run:

    pip install langchain-tests langchain-openai pytest-asyncio
    tokenomy serve --model qwen2.5-coder-0.5b --listen 127.0.0.1:8095 --data-dir /tmp/lc --threads 2
    TK_BASE=http://127.0.0.1:8095 TK_KEY=$(cat /tmp/lc/user.key) pytest tests/langchain

`pytest.ini` here turns on pytest-asyncio's auto mode with one event loop for the session (the
async tests need both). Tally and reasons for what is skipped or expected to fail: docs/benchmarks.md.
"""
import os
import pytest

# At temperature 0 this 0.5B model, asked for "a joke about cats" as JSON, repeats a phrase inside
# the `setup` string ("It's like a superhero, but ...") until max_tokens; the node answers as OpenAI
# does for a truncated output (finish_reason "length"), and the openai package raises
# LengthFinishReasonError. Whether it loops depends on the exact prompt (and, near ties, on the KV
# placement the prefix cache gives), so these may also pass: not strict.
MODEL_LOOPS = "Qwen2.5-Coder-0.5B loops inside a JSON string until max_tokens (LengthFinishReasonError)"
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests


class TestTokenomyChat(ChatModelIntegrationTests):
    @property
    def chat_model_class(self):
        return ChatOpenAI

    @property
    def chat_model_params(self):
        return {"model": "qwen2.5-coder-0.5b", "base_url": os.environ["TK_BASE"] + "/v1", "api_key": os.environ["TK_KEY"],
                "temperature": 0, "max_tokens": 400, "stream_usage": True, "max_retries": 0}

    @property
    def has_tool_calling(self):
        return True

    @property
    def has_structured_output(self):
        return True

    @property
    def supports_json_mode(self):
        return True

    @property
    def supports_image_inputs(self):
        return False

    # The cases this model cannot always finish (see MODEL_LOOPS). langchain-tests wants the mark on
    # the override itself, so the typeddict and json_schema cases (which finish) show as XPASS.
    @pytest.mark.xfail(reason=MODEL_LOOPS + " (the pydantic case)", strict=False)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model, schema_type):
        super().test_structured_output(model, schema_type)

    @pytest.mark.xfail(reason=MODEL_LOOPS + " (the pydantic case)", strict=False)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model, schema_type):
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(reason=MODEL_LOOPS, strict=False)
    def test_structured_output_pydantic_2_v1(self, model):
        super().test_structured_output_pydantic_2_v1(model)

    @pytest.mark.xfail(reason=MODEL_LOOPS, strict=False)
    def test_structured_output_optional_param(self, model):
        super().test_structured_output_optional_param(model)

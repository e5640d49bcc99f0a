"""The official `openai` package as a client of a real tokenomy node."""
import signal
import threading
import time

import openai
import pytest

from conftest import MODEL


@pytest.fixture
def client(node):
    return openai.OpenAI(base_url=node.base + "/v1", api_key=node.key, max_retries=0)


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]


def test_chat(client):
    r = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=20,
        messages=[{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_embeddings(client):
    # The SDK asks for base64 and decodes it itself.
    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Quarterly revenue grew five percent."]
    r = client.embeddings.create(model=MODEL, input=texts)
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(v) == 576 for v in vectors)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    assert all(abs(dot(v, v) - 1) < 1e-4 for v in vectors)
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2]), "the two cats are nearer each other"
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    floats = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="float")
    assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, vectors[0])) < 1e-6


def test_chat_stream_with_usage(client):
    plain = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": "Say hello to Bob."}],
    )
    stream = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Say hello to Bob."}],
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == plain.choices[0].message.content
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert finish == plain.choices[0].finish_reason


def test_completions_echo_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="The cat sat on the mat.", max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == r.usage.prompt_tokens
    assert r.choices[0].text.endswith("The cat sat on the mat.")


def test_completions_plain_and_stream(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_errors_are_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert "nope" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, temperature=9, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "temperature"


def test_sigterm_finishes_in_flight_streams_and_meters_them(fresh_node):
    c = openai.OpenAI(base_url=fresh_node.base + "/v1", api_key=fresh_node.key, max_retries=0)
    got = {}

    def consume():
        stream = c.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=64, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Write a poem about the sea."}])
        text = ""
        for chunk in stream:
            if chunk.usage:
                got["usage"] = chunk.usage
            if (chunk.model_extra or {}).get("receipt"):
                got["receipt"] = chunk.model_extra["receipt"]
            for ch in chunk.choices:
                text += ch.delta.content or ""
        got["text"] = text

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.5)
    fresh_node.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert fresh_node.proc.wait(60) == 0
    assert got.get("usage") is not None, "the in-flight stream was not finished: " + fresh_node.read_log()
    assert got["usage"].completion_tokens > 0
    assert got.get("receipt", {}).get("amount_micros", 0) > 0, "the drained stream was charged with a receipt"
    assert "metered" in fresh_node.read_log()


def test_a_shutdown_delay_reports_draining_and_still_serves(tmp_path):
    from conftest import Node
    import urllib.error
    import urllib.request
    n = Node(tmp_path, "--shutdown-delay-ms", "3000")
    try:
        c = openai.OpenAI(base_url=n.base + "/v1", api_key=n.key, max_retries=0)
        n.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 2
        status = None
        while time.time() < deadline and status != 503:
            try:
                status = urllib.request.urlopen(n.base + "/ready", timeout=1).status
            except urllib.error.HTTPError as e:
                status = e.code
        assert status == 503, "/ready says draining once SIGTERM arrives"
        # ...while requests are still served until the delay ends and the listener closes.
        r = c.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        assert r.usage.completion_tokens > 0
        assert n.proc.wait(30) == 0
    finally:
        n.stop()


def test_receipts_ride_along_without_breaking_the_client(node, client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, temperature=0, max_tokens=8, messages=[{"role": "user", "content": "Say hi."}])
    r = raw.parse()
    receipt = r.model_extra["receipt"]
    assert raw.headers["tokenomy-receipt"] == receipt["id"]
    assert receipt["amount_micros"] > 0 and r.usage.completion_tokens > 0
    # the full receipt is there for the key that paid
    import json, urllib.request
    req = urllib.request.Request(node.base + receipt["url"], headers={"Authorization": "Bearer " + node.key})
    with urllib.request.urlopen(req) as resp:
        bundle = json.load(resp)
    assert bundle["receipt"]["receipt_id"] == receipt["id"]
    assert bundle["proof"].startswith("c2sp.org/tlog-proof@v1")


def test_bad_key_and_no_credit_are_openai_errors(node):
    bad = openai.OpenAI(base_url=node.base + "/v1", api_key="tk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "invalid_api_key"
    import json, urllib.request
    def admin(method, path, body=None):
        req = urllib.request.Request(node.base + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": "Bearer " + node.admin_key, "Content-Type": "application/json"})
        with urllib.request.urlopen(req) as resp:
            return json.load(resp)
    acc = admin("POST", "/admin/v1/accounts", {"name": "broke", "kind": "user"})
    key = admin("POST", f"/admin/v1/accounts/{acc['id']}/keys", {"scopes": ["inference"]})["key"]
    broke = openai.OpenAI(base_url=node.base + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        broke.chat.completions.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 402 and e.value.body["code"] == "insufficient_quota"

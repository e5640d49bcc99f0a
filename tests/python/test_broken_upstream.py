"""An upstream that reports usage it cannot have used (negative counts): the node charges
nothing and shows the client what it charged, whole or streamed.

The upstream is a stand-in: no real provider can be made to send such an answer."""
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from conftest import Node

BAD_USAGE = {"prompt_tokens": -5, "completion_tokens": -5, "total_tokens": -10}


class Broken(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, obj, ctype="application/json"):
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send({"object": "list", "data": [{"id": "remote-m", "object": "model", "owned_by": "broken"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))) or b"{}")
        base = {"id": "chatcmpl-up", "created": 1, "model": req["model"]}
        if not req.get("stream"):
            message = {"role": "assistant", "content": "Hello from upstream"}
            return self.send({**base, "object": "chat.completion", "usage": BAD_USAGE,
                              "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"}, "finish_reason": None}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": BAD_USAGE},
        ]
        self.send("".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n", "text/event-stream")


@pytest.fixture
def broken_node(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    n = Node(tmp_path, "--upstream", f"broken=http://127.0.0.1:{server.server_address[1]}/v1")
    yield n
    n.stop()
    server.shutdown()


def balance(node):
    req = urllib.request.Request(node.base + "/v1/me", headers={"Authorization": f"Bearer {node.key}"})
    return json.load(urllib.request.urlopen(req))["account"]["balance_micros"]


def test_negative_upstream_usage_is_shown_as_the_nothing_charged(broken_node):
    client = openai.OpenAI(base_url=broken_node.base + "/v1", api_key=broken_node.key)
    before = balance(broken_node)
    q = [{"role": "user", "content": "hi"}]
    raw = client.chat.completions.with_raw_response.create(model="remote-m", messages=q, max_tokens=20)
    whole = raw.parse()
    assert whole.choices[0].message.content == "Hello from upstream"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (0, 0, 0), whole.usage
    assert raw.headers.get("tokenomy-receipt") is None
    chunks = list(client.chat.completions.create(model="remote-m", messages=q, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (0, 0, 0), chunks[-1]
    assert balance(broken_node) == before
    assert "the upstream reported no usage" in broken_node.read_log()

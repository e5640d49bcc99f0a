"""Starts a real tokenomy node (the built binary, the real SmolLM2 model) for the Python client tests."""
import os
import pathlib
import socket
import subprocess
import time
import urllib.request

import pytest

MODEL = "smollm2"


def models_dir() -> pathlib.Path:
    if os.environ.get("TOKENOMY_TEST_MODELS"):
        return pathlib.Path(os.environ["TOKENOMY_TEST_MODELS"])
    home = os.environ.get("TOKENOMY_HOME") or os.path.join(os.environ["HOME"], ".tokenomy")
    return pathlib.Path(home) / "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, tmp: pathlib.Path, *extra: str, model_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"node-{self.port}.log"
        binary = os.environ.get("TOKENOMY_BIN", "target/debug/tokenomy")
        model = models_dir() / model_file
        assert model.is_file(), f"{model} missing: run scripts/fetch-test-models.sh"
        self.data = tmp / "data"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--model", str(model), "--listen", f"127.0.0.1:{self.port}",
             "--data-dir", str(tmp / "data"), "--threads", "2", "--ctx-size", "2048", *extra],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.read_log()
            try:
                with urllib.request.urlopen(self.base + "/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(self.read_log())

    @property
    def key(self) -> str:
        """The local user's inference key, written on first start."""
        return (self.data / "user.key").read_text().strip()

    @property
    def admin_key(self) -> str:
        return (self.data / "admin.key").read_text().strip()

    def read_log(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("node"))
    yield n
    n.stop()


@pytest.fixture
def fresh_node(tmp_path):
    n = Node(tmp_path)
    yield n
    n.stop()


@pytest.fixture(scope="session")
def qwen_node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("qwen"), "--parallel", "2", model_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    yield n
    n.stop()

"""The web console (`/console/`) in a real browser: Debian's Chromium, driven by Selenium
through chromedriver, against a real node. The receipt verifier in the page
(`console/verify.js`) is held to the same verdicts as the node's own `tokenomy verify`."""
import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.support.ui import WebDriverWait


def chromium_paths():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert browser and driver, "Chromium and chromedriver missing: run scripts/install-deps.sh"
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"]:
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=options)
    yield d
    d.quit()


def api(node, path, key=None, body=None):
    req = urllib.request.Request(node.base + path, data=None if body is None else json.dumps(body).encode())
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read().decode()
    return json.loads(text) if text.startswith(("{", "[")) else text


def credits(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    return f"{sign}{abs(micros) // 1_000_000}.{abs(micros) % 1_000_000:06d}"


def open_console(d, node, key):
    d.get(node.base + "/")
    wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    d.execute_script("sessionStorage.clear(); localStorage.clear();")
    d.get(node.base + "/console/")
    wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    d.find_element(By.ID, "key-input").send_keys(key)
    d.find_element(By.ID, "key-use").click()
    wait(d, lambda d: d.find_element(By.ID, "balance").text != "")


def wait(d, until, timeout=120):
    # The page re-renders its tables after each action: look again rather than fail.
    return WebDriverWait(d, timeout, ignored_exceptions=[StaleElementReferenceException]).until(until)


def text(d, id_):
    return d.find_element(By.ID, id_).text


def test_the_page_is_served_with_a_strict_policy(node):
    with urllib.request.urlopen(node.base + "/", timeout=10) as r:
        assert r.url.endswith("/console/")
        csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp


def test_a_user_sees_the_balance_streams_tokens_and_verifies_the_receipt(node, browser):
    d = browser
    open_console(d, node, node.key)
    me = api(node, "/v1/me", node.key)
    assert text(d, "balance") == credits(me["account"]["balance_micros"])
    assert text(d, "account-id") == me["account"]["id"]

    d.find_element(By.CSS_SELECTOR, "nav button[data-tab=playground]").click()
    d.find_element(By.ID, "chat-message").send_keys("Name three colours.")
    d.find_element(By.ID, "chat-max").clear()
    d.find_element(By.ID, "chat-max").send_keys("12")
    d.find_element(By.ID, "chat-temp").clear()
    d.find_element(By.ID, "chat-temp").send_keys("0")
    d.find_element(By.ID, "chat-send").click()
    wait(d, lambda d: "charged" in text(d, "chat-usage"))
    answer = text(d, "chat-output")
    assert answer.strip(), "the streamed answer is shown"

    # What the page says was charged is what the node's ledger and receipt say.
    d.find_element(By.ID, "chat-verify").click()
    wait(d, lambda d: text(d, "receipt-verdict") != "")
    assert text(d, "receipt-verdict").startswith("✓"), text(d, "receipt-verdict")
    receipt_id = text(d, "receipt-id")
    bundle = api(node, f"/v1/receipts/{receipt_id}", node.key)
    r = bundle["receipt"]
    assert f"{r['completion_tokens']} completion tokens" in text(d, "chat-usage")
    assert f"charged {credits(-r['amount_micros'])} credits" in text(d, "chat-usage")
    assert r["completion_tokens"] == 12 or d.find_element(By.ID, "chat-output").get_attribute("data-finish") == "stop"
    fields = {row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text
              for row in d.find_elements(By.CSS_SELECTOR, "#receipt-fields tr")}
    assert fields["receipt_id"] == receipt_id and fields["prompt_tokens"] == str(r["prompt_tokens"])

    # The ledger tab shows the new balance and the charge, with a receipt that verifies, and
    # what the same tokens would have cost at the reference list price.
    d.find_element(By.CSS_SELECTOR, "nav button[data-tab=account]").click()
    after = api(node, "/v1/me", node.key)
    wait(d, lambda d: text(d, "balance") == credits(after["account"]["balance_micros"]))
    ref = after["usage"]["reference"]
    usage = after["usage"]  # the ledger's, from the receipts: this charge is in it
    day = time.strftime("%Y-%m-%d", time.gmtime(usage["since"]))
    assert text(d, "usage-charged") == credits(usage["charged_micros"] - usage["refunded_micros"])
    assert f"{usage['requests']} requests" in text(d, "usage-detail") and f"since {day}" in text(d, "usage-detail")
    # The usage-by-day table shows today's rows as /v1/me/usage reports them.
    want = usage_today(node, "/v1/me/usage", node.key)
    assert r["model"] in [w[1] for w in want], want
    wait(d, lambda d: usage_rows(d, "usage-days") == want)
    assert text(d, "saved") == credits(ref["saved_micros"]) and ref["name"] in text(d, "saved-label")
    row = d.find_element(By.CSS_SELECTOR, f"#transfers button[data-receipt='{receipt_id}']")
    assert credits(r["amount_micros"]) in row.find_element(By.XPATH, "./ancestor::tr").text
    row.click()
    wait(d, lambda d: "only grew" in text(d, "receipt-log") or "remembered" in text(d, "receipt-log"))
    assert text(d, "receipt-verdict").startswith("✓")


VERIFY_ALL = """
const [cases, key, done] = arguments;
import('/console/verify.js').then(async (v) => {
  const out = {};
  for (const [name, bundle] of Object.entries(cases)) {
    try { await v.verifyBundle(bundle, key); out[name] = 'ok'; }
    catch (e) { out[name] = e.code || ('exception ' + e); }
  }
  done(out);
}).catch((e) => done('import failed: ' + e));
"""


def tampered_cases(bundle_text: str, other_key: str) -> dict:
    b = json.loads(bundle_text)
    cases = {"original": bundle_text}

    def case(name, f):
        c = json.loads(bundle_text)
        f(c)
        cases[name] = json.dumps(c)

    def flip_b64(s, byte=0):
        raw = bytearray(base64.b64decode(s))
        raw[byte] ^= 1
        return base64.b64encode(bytes(raw)).decode()

    canonical = base64.b64decode(b["canonical"]).decode()
    case("readable_amount", lambda c: c["receipt"].update(amount_micros=c["receipt"]["amount_micros"] - 1))
    case("readable_extra_field", lambda c: c["receipt"].update(note="x"))
    case("canonical_amount", lambda c: c.update(canonical=base64.b64encode(
        canonical.replace("\ncompletion_tokens ", "\ncompletion_tokens 1").encode()).decode()))
    case("signature", lambda c: c.update(signature=flip_b64(c["signature"], 7)))
    case("key", lambda c: c.update(key=other_key))
    lines = b["proof"].split("\n")
    index_at = next(i for i, l in enumerate(lines) if l.startswith("index "))
    if len(lines) > index_at + 1 and lines[index_at + 1]:
        case("proof_hash", lambda c: c.update(proof="\n".join(
            lines[:index_at + 1] + [flip_b64(lines[index_at + 1], 3)] + lines[index_at + 2:])))
    case("proof_index", lambda c: c.update(proof=b["proof"].replace(
        lines[index_at], f"index {int(lines[index_at][6:]) + 1}")))
    sig_line = [l for l in lines if l.startswith("\u2014 ")][0]
    name, sig = sig_line[2:].split(" ")
    case("checkpoint_signature", lambda c: c.update(proof=b["proof"].replace(sig_line, f"\u2014 {name} {flip_b64(sig, 10)}")))
    body_line = [l for l in lines if l.count("=") and len(l) == 44][-1]  # the checkpoint's root
    case("checkpoint_root", lambda c: c.update(proof=b["proof"].replace(body_line, flip_b64(body_line, 0))))
    case("not_json", lambda c: None)
    cases["not_json"] = bundle_text[:-3]
    return cases


def cli_verdict(tmp_path, name, bundle_text, key) -> bool:
    path = tmp_path / f"{name}.json"
    path.write_text(bundle_text)
    binary = os.environ.get("TOKENOMY_BIN", "target/debug/tokenomy")
    return subprocess.run([binary, "verify", "--key", key, str(path)], capture_output=True).returncode == 0


def test_the_browser_verifier_agrees_with_tokenomy_verify(node, browser, tmp_path):
    d = browser
    d.get(node.base + "/console/")
    api(node, "/v1/chat/completions", node.key,
        {"model": "smollm2", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]})
    api(node, "/v1/chat/completions", node.key,
        {"model": "smollm2", "max_tokens": 3, "messages": [{"role": "user", "content": "Hello"}]})
    key = api(node, "/v1/node/key").strip()
    transfers = api(node, "/v1/me/transfers?limit=1000", node.key)["data"]
    receipt_ids = [t["receipt_id"] for t in transfers if t["receipt_id"]]
    assert len(receipt_ids) >= 3
    other = "tokenomy.local/other+00000000+AYLMzvV7nlBlJ6hIeKLpdt+EC4yQJRRpNpxZUBn1Aimw"
    bundles = {f"receipt{i}": api_text(node, f"/v1/receipts/{rid}", node.key) for i, rid in enumerate(receipt_ids)}
    # Every receipt of the account (a mint, charges) verifies in the browser; a mint is a v2 receipt.
    verdicts = d.execute_async_script(VERIFY_ALL, bundles, key)
    assert verdicts == {name: "ok" for name in bundles}, verdicts

    cases = tampered_cases(bundles[f"receipt{len(receipt_ids) - 1}"], other)
    verdicts = d.execute_async_script(VERIFY_ALL, cases, key)
    expected = {
        "original": "ok", "readable_amount": "field_mismatch", "readable_extra_field": "field_mismatch",
        "canonical_amount": "signature", "signature": "signature", "key": "key_mismatch",
        "proof_hash": "inclusion", "proof_index": "log_index_mismatch",
        "checkpoint_signature": "checkpoint_signature", "checkpoint_root": "checkpoint_signature",
        "not_json": "malformed_json",
    }
    assert verdicts == {k: v for k, v in expected.items() if k in cases}, verdicts
    for name, bundle_text in cases.items():
        assert cli_verdict(tmp_path, name, bundle_text, key) == (verdicts[name] == "ok"), name


def api_text(node, path, key):
    req = urllib.request.Request(node.base + path)
    req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()


GROWTH = """
const [key, oldNote, newNote, proof, done] = arguments;
import('/console/verify.js').then(async (v) => {
  const k = await v.parseVerifierKey(key);
  const a = await v.openCheckpoint(oldNote, k), b = await v.openCheckpoint(newNote, k);
  const out = [String(a.size), String(b.size)];
  for (const p of [proof, proof.slice(1), proof.map((h, i) => i ? h : btoa('x'.repeat(32)))]) {
    try { await v.verifyLogGrowth(a, b, p); out.push('ok'); } catch (e) { out.push(e.code); }
  }
  done(out);
}).catch((e) => done('failed: ' + e));
"""


def test_the_browser_checks_that_the_log_only_grew(node, browser):
    d = browser
    d.get(node.base + "/console/")
    key = api(node, "/v1/node/key").strip()
    old = api(node, "/v1/log/checkpoint")
    for word in ["one", "two", "three"]:
        api(node, "/v1/chat/completions", node.key,
            {"model": "smollm2", "max_tokens": 2, "messages": [{"role": "user", "content": word}]})
    new = api(node, "/v1/log/checkpoint")
    old_size, new_size = int(old.split("\n")[1]), int(new.split("\n")[1])
    assert new_size >= old_size + 3
    proof = api(node, f"/v1/log/consistency?old={old_size}&new={new_size}")["proof"]
    out = d.execute_async_script(GROWTH, key, old, new, proof)
    assert out[:3] == [str(old_size), str(new_size), "ok"], out
    assert out[3:] == ["consistency", "consistency"], out


def usage_today(node, path, key):
    """Today's usage rows of a usage route as the console's tables show them."""
    midnight = int(time.time()) // 86_400 * 86_400
    today = api(node, f"{path}?group_by=model&start_time={midnight}", key)["data"][0]
    day = time.strftime("%Y-%m-%d", time.gmtime(today["start_time"]))
    return [[day, x["model"] or "refunds", str(x["num_model_requests"]), str(x["input_tokens"]),
             str(x["input_cached_tokens"]), str(x["output_tokens"])] for x in today["results"]]


def usage_rows(d, table):
    """Today's rows of a usage table (the first six cells)."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    return [[c.text for c in row.find_elements(By.TAG_NAME, "td")][:6]
            for row in d.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr[data-day='{day}']")]


def test_an_operator_opens_an_account_whose_key_then_works(node, browser):
    d = browser
    # Someone was served today: the operator sees it in the ledger's usage.
    chat = {"model": "smollm2", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    api(node, "/v1/chat/completions", node.key, chat)
    open_console(d, node, node.admin_key)
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "nav button[data-tab=operator]").is_displayed())
    d.find_element(By.CSS_SELECTOR, "nav button[data-tab=operator]").click()
    wait(d, lambda d: text(d, "ledger-check") != "")
    assert text(d, "ledger-check").startswith("✓ The ledger balances"), text(d, "ledger-check")
    want = usage_today(node, "/admin/v1/usage", node.admin_key)
    assert want, "today's charge"
    wait(d, lambda d: usage_rows(d, "ledger-usage-days") == want)
    # Each account's row shows what it was charged in those days (the local user was served).
    user = api(node, "/v1/me", node.key)["account"]["id"]
    week = api(node, f"/admin/v1/usage?group_by=account_id&limit=7&account_id={user}", node.admin_key)
    rows = [r for b in week["data"] for r in b["results"]]
    net, requests = sum(r["charged_micros"] - r["refunded_micros"] for r in rows), sum(r["num_model_requests"] for r in rows)
    cell = d.find_element(By.CSS_SELECTOR, f"#accounts tr[data-account='{user}'] td[data-usage]")
    assert requests >= 1 and cell.text == f"{credits(net)} ({requests} requests)", cell.text
    d.find_element(By.ID, "new-account-name").send_keys("console-customer")
    d.find_element(By.ID, "new-account-credits").send_keys("2.5")
    d.find_element(By.CSS_SELECTOR, "#new-account button").click()
    wait(d, lambda d: text(d, "new-key-value").startswith("tk-"))
    new_key = text(d, "new-key-value")
    me = api(node, "/v1/me", new_key)
    assert me["account"]["name"] == "console-customer" and me["account"]["balance_micros"] == 2_500_000
    row = d.find_element(By.CSS_SELECTOR, f"#accounts tr[data-account='{me['account']['id']}']")
    assert "2.500000" in row.text
    # Add credits from the row: exact micro-credits, one mint however fast the button is clicked.
    row.find_element(By.TAG_NAME, "input").send_keys("0.000001")
    d.execute_script("const b = arguments[0]; b.click(); b.click();", row.find_element(By.TAG_NAME, "button"))
    wait(d, lambda d: "2.500001" in d.find_element(By.CSS_SELECTOR, f"#accounts tr[data-account='{me['account']['id']}']").text)
    assert api(node, "/v1/me", new_key)["account"]["balance_micros"] == 2_500_001
    assert api(node, "/admin/v1/ledger/check", node.admin_key)["ok"]
    # An amount the ledger would refuse is refused before the account is made (no half-made
    # account left behind), and the banner goes once an action succeeds.
    d.find_element(By.ID, "new-account-name").send_keys("too-rich")
    d.find_element(By.ID, "new-account-credits").send_keys("1000000000")
    d.find_element(By.CSS_SELECTOR, "#new-account button").click()
    wait(d, lambda d: "under a billion" in text(d, "banner"))
    assert not any(a["name"] == "too-rich" for a in api(node, "/admin/v1/accounts", node.admin_key)["data"])
    d.find_element(By.ID, "accounts-refresh").click()
    wait(d, lambda d: not d.find_element(By.ID, "banner").is_displayed())
    # The customer's own view: a person with the new key sees exactly that balance.
    d.find_element(By.ID, "key-input").send_keys(new_key)
    d.find_element(By.ID, "key-use").click()
    wait(d, lambda d: text(d, "balance") == "2.500001")
    assert not d.find_element(By.CSS_SELECTOR, "nav button[data-tab=operator]").is_displayed()


def test_a_key_with_the_transfer_scope_sends_credits_once_and_verifies_the_receipt(node, browser):
    d = browser
    payer = api(node, "/admin/v1/accounts", node.admin_key, {"name": "console-payer", "kind": "agent"})
    payee = api(node, "/admin/v1/accounts", node.admin_key, {"name": "console-payee", "kind": "agent"})
    api(node, f"/admin/v1/accounts/{payer['id']}/mint", node.admin_key, {"amount_micros": 3_000_000, "idempotency_key": "console-payer"})
    key = api(node, f"/admin/v1/accounts/{payer['id']}/keys", node.admin_key, {"scopes": ["transfer"]})["key"]
    # An inference key's page has no such form.
    open_console(d, node, node.key)
    assert not d.find_element(By.ID, "send").is_displayed()
    d.find_element(By.ID, "key-input").send_keys(key)
    d.find_element(By.ID, "key-use").click()
    wait(d, lambda d: text(d, "balance") == "3.000000")
    assert d.find_element(By.ID, "send").is_displayed()
    d.find_element(By.ID, "send-to").send_keys(payee["id"])
    d.find_element(By.ID, "send-amount").send_keys("1.25")
    # However fast the button is clicked, the credits move once.
    d.execute_script("const b = arguments[0]; b.click(); b.click();", d.find_element(By.ID, "send-go"))
    wait(d, lambda d: text(d, "balance") == "1.750000")
    assert api(node, f"/admin/v1/accounts/{payee['id']}", node.admin_key)["balance_micros"] == 1_250_000
    d.find_element(By.ID, "send-verify").click()
    wait(d, lambda d: text(d, "receipt-verdict") != "")
    assert text(d, "receipt-verdict").startswith("✓"), text(d, "receipt-verdict")
    fields = {row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text
              for row in d.find_elements(By.CSS_SELECTOR, "#receipt-fields tr")}
    assert fields["counterparty_id"] == payee["id"] and fields["amount_micros"].startswith("-1250000 "), fields
    # The ledger tab lists it as a transfer out; an amount the account lacks is refused.
    assert "-1.250000" in d.find_element(By.ID, "transfers").text
    d.find_element(By.ID, "send-to").send_keys(payee["id"])
    d.find_element(By.ID, "send-amount").send_keys("5")
    d.find_element(By.ID, "send-go").click()
    wait(d, lambda d: "short by" in text(d, "banner"))
    assert api(node, "/admin/v1/ledger/check", node.admin_key)["ok"]


def fresh_database(name: str) -> str:
    """A new, empty PostgreSQL database on the test server; its URL."""
    server = os.environ["TOKENOMY_TEST_POSTGRES_URL"]
    for sql in [f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}"]:
        subprocess.run(["psql", server, "-qc", sql], check=True, capture_output=True)
    return server.rsplit("/", 1)[0] + "/" + name


@pytest.mark.skipif(not os.environ.get("TOKENOMY_TEST_POSTGRES_URL"), reason="TOKENOMY_TEST_POSTGRES_URL is not set")
def test_the_console_of_one_node_verifies_a_receipt_another_node_issued(browser, tmp_path):
    """Two nodes of one PostgreSQL ledger: a charge on node a, verified in node b's console
    against node a's key (which b lists at /v1/node/keys), not against b's own."""
    from conftest import Node

    url = fresh_database("tokenomy_console_two_nodes")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Node(tmp_path / "a", "--database", url, "--origin", "console.test/a")
    b = None
    try:
        b = Node(tmp_path / "b", "--database", url, "--origin", "console.test/b")
        reply = api(a, "/v1/chat/completions", a.key,
                    {"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
        receipt_id = reply["receipt"]["id"]
        d = browser
        open_console(d, b, a.key)
        button = f"#transfers button[data-receipt='{receipt_id}']"
        wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, button))
        d.find_element(By.CSS_SELECTOR, button).click()
        wait(d, lambda d: text(d, "receipt-verdict") != "")
        assert text(d, "receipt-verdict").startswith("✓"), text(d, "receipt-verdict")
        checks = d.find_element(By.ID, "receipt-checks").text
        assert "node console.test/a, which issued it" in checks, checks
        assert text(d, "node-key").startswith("console.test/b+")
    finally:
        if b:
            b.stop()
        a.stop()

// The tokenomy console: one page over the node's public HTTP API (the same endpoints any
// client uses; the page has no API of its own). The API key stays in this tab's
// sessionStorage; the node key the user trusts and the last log checkpoint they saw stay in
// localStorage, so that a changed key or a rewritten log is noticed on the next visit.
import * as v from "/console/verify.js";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("tokenomy.key") || "", me: null, after: null };
const PIN = "tokenomy.pinnedKey";
/** The last checkpoint seen from one node key (one per key, so checking another node's
 * receipt does not forget this one's). */
const seenKey = (keyText) => `tokenomy.checkpoint.${keyText}`;

// ---- small helpers ---------------------------------------------------------------------------

/** Micro-credits (a number or decimal string) as credits with six decimals, exactly. */
export function credits(micros) {
  const m = BigInt(micros);
  const sign = m < 0n ? "-" : "";
  const a = m < 0n ? -m : m;
  return `${sign}${a / 1000000n}.${String(a % 1000000n).padStart(6, "0")}`;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function banner(text, kind = "error") {
  const b = $("banner");
  b.textContent = text || "";
  b.className = kind;
  b.hidden = !text;
}

class ApiError extends Error {
  constructor(status, body) {
    const e = body && body.error;
    super(e && e.message ? e.message : `HTTP ${status}`);
    this.status = status;
    this.code = e && e.code;
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function api(path, init = {}) {
  const r = await fetch(path, { ...init, headers: headers(init.headers) });
  const type = r.headers.get("content-type") || "";
  const body = type.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

// ---- the node key the user trusts ------------------------------------------------------------

async function loadNodeKey() {
  const current = (await api("/v1/node/key")).trim();
  const parsed = await v.parseVerifierKey(current).catch(() => null);
  $("node-origin").textContent = parsed ? parsed.name : "";
  let pinned = localStorage.getItem(PIN);
  if (!pinned) {
    localStorage.setItem(PIN, current);
    pinned = current;
    $("key-pin").textContent = "(trusted from this first visit)";
  } else if (pinned === current) {
    $("key-pin").textContent = "(the key you trusted before)";
  } else {
    $("key-pin").textContent = `(CHANGED: you trusted ${pinned}; receipts are checked against that key)`;
    $("key-pin").className = "bad";
    $("unpin").hidden = false;
    banner("This node's signing key is not the one you trusted before: its receipts will not verify here. " +
      "If the operator did not tell you the key changed, do not trust this node's receipts.");
  }
  $("node-key").textContent = current;
  $("verify-key").value = pinned;
  state.pinned = pinned;
}

function trustCurrentKey() {
  localStorage.setItem(PIN, $("node-key").textContent);
  location.reload();
}

// ---- account ---------------------------------------------------------------------------------

async function loadAccount() {
  try {
    state.me = await api("/v1/me");
  } catch (e) {
    state.me = null;
    showOperator(false);
    $("account").hidden = true;
    $("account-empty").hidden = false;
    if (e.status === 401) {
      $("account-empty").textContent = state.key ? `The node refused this key: ${e.message}` : "Enter an API key to see its account.";
      return;
    }
    throw e;
  }
  showAccount(state.me);
  const operator = (state.me.scopes || []).includes("admin");
  showOperator(operator);
  if (operator) await loadOperator();
  state.after = null;
  $("transfers").tBodies[0].replaceChildren();
  await Promise.all([loadTransfers(), loadUsageDays("/v1/me/usage", "usage-days")]);
}

// Usage by UTC day and model (the key's account's, or the ledger's on the operator tab), newest
// day first; refunds are rows of no model.
async function loadUsageDays(path, tableId) {
  const page = await api(`${path}?group_by=model&limit=7`);
  const rows = [];
  for (const b of [...page.data].reverse()) {
    const day = new Date(b.start_time * 1000).toISOString().slice(0, 10);
    for (const r of b.results) {
      const tr = el("tr");
      tr.dataset.day = day;
      const charged = r.model === null ? `-${credits(r.refunded_micros)} (refunded)` : credits(r.charged_micros);
      tr.append(el("td", day), el("td", r.model ?? "refunds"), el("td", String(r.num_model_requests), "num"),
        el("td", String(r.input_tokens), "num"), el("td", String(r.input_cached_tokens), "num"),
        el("td", String(r.output_tokens), "num"), el("td", charged, "num"));
      rows.push(tr);
    }
  }
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", "No charges in these days.", "muted");
    td.colSpan = 7;
    tr.append(td);
    rows.push(tr);
  }
  $(tableId).tBodies[0].replaceChildren(...rows);
}

function showOperator(shown) {
  document.querySelector("nav button[data-tab=operator]").hidden = !shown;
  if (!shown && !$("tab-operator").hidden) showTab("account");
}

function showAccount(me) {
  const a = me.account;
  $("account-empty").hidden = true;
  $("account").hidden = false;
  $("balance").textContent = credits(a.balance_micros);
  $("available").textContent = credits(a.available_micros);
  const u = me.usage;
  $("usage-charged").textContent = credits(u.charged_micros - u.refunded_micros);
  const since = u.since === null ? "no charges yet" : `since ${new Date(u.since * 1000).toISOString().slice(0, 10)}`;
  const refunded = u.refunded_micros ? `, ${credits(u.refunded_micros)} credits refunded` : "";
  $("usage-detail").textContent = `${u.requests} requests, ${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens${refunded}, ${since}`;
  const ref = me.usage.reference;
  $("saved-card").hidden = !ref;
  if (ref) {
    $("saved-label").textContent = `Saved against ${ref.name}`;
    $("saved").textContent = credits(ref.saved_micros);
    $("saved-detail").textContent = `the same tokens at ${ref.name}'s list price: ${credits(ref.cost_micros)} credits`;
  }
  $("account-name").textContent = a.name;
  $("account-id").textContent = a.id;
  $("key-id").textContent = me.key_id;
  $("key-scopes").textContent = (me.scopes || []).join(", ");
  const l = me.limits;
  const parts = [
    l.rpm != null ? `${l.rpm} requests/min` : null,
    l.tpm != null ? `${l.tpm} tokens/min` : null,
    l.spend_cap_day_micros != null ? `${credits(l.spend_cap_day_micros)} credits/day` : null,
    l.spend_cap_month_micros != null ? `${credits(l.spend_cap_month_micros)} credits/month` : null,
  ].filter(Boolean);
  $("limits").textContent = parts.length ? parts.join(", ") : "none";
  $("send").hidden = !(me.scopes || []).includes("transfer");
}

// ---- credits to another account (a key with the "transfer" scope) ----------------------------

async function sendCredits(event) {
  event.preventDefault();
  await once($("send-go"), sendCreditsNow);
}

async function sendCreditsNow() {
  $("send-result").replaceChildren(); // an earlier success must not stand beside a new failure
  const to = $("send-to").value.trim();
  const micros = parseCredits($("send-amount").value);
  if (micros === null || micros === 0n) throw new Error("Credits: a positive amount under a billion, at most six decimals");
  // One transfer per form: a retry after a failure (a lost answer) reuses the key, so the
  // node sends the credits once; new values make a new transfer.
  const what = `${to}|${micros}`;
  if (!state.send || state.send.what !== what) state.send = { what, key: `console:${crypto.randomUUID()}` };
  const r = await api("/v1/transfers", {
    method: "POST",
    headers: { "content-type": "application/json", "idempotency-key": state.send.key },
    body: `{"to":${JSON.stringify(to)},"amount_micros":${micros}}`,
  });
  state.send = null;
  $("send").reset();
  const out = $("send-result");
  out.replaceChildren(`Sent ${credits(r.transfer.amount_micros)} credits, receipt `, el("code", r.receipt.id), " ");
  const b = el("button", "Verify", "small");
  b.type = "button";
  b.id = "send-verify";
  b.addEventListener("click", () => verifyById(r.receipt.id));
  out.append(b);
  await loadAccount();
}

const CODE_NAMES = { mint: "credits added", usagecharge: "tokens", transfer: "transfer", refund: "refund" };

async function loadTransfers() {
  const q = new URLSearchParams({ order: "desc", limit: "50" });
  if (state.after != null) q.set("before", state.after);
  const page = await api(`/v1/me/transfers?${q}`);
  const body = $("transfers").tBodies[0];
  // A settled hold is followed by its settlement, which carries the amount charged.
  for (const t of page.data) if (!(t.is_hold && t.state === "posted")) body.append(transferRow(t));
  state.after = page.next_before;
  $("more").hidden = !page.has_more;
}

function transferRow(t) {
  const mine = state.me.account.id;
  const tr = el("tr");
  if (t.is_hold) tr.className = "hold";
  const sign = t.from === mine ? -1n : 1n;
  const hold = { pending: " (held: an answer in flight)", voided: " (hold released)" }[t.state] || "";
  const what = (CODE_NAMES[t.code] || t.code) + (t.is_hold ? hold : "");
  const amount = t.is_hold ? `(${credits(t.amount_micros)})` : credits(sign * BigInt(t.amount_micros));
  tr.append(el("td", new Date(t.created_at_ms).toLocaleString()), el("td", what),
    el("td", amount, "num"), el("td", t.state));
  const cell = el("td");
  if (t.receipt_id) {
    const b = el("button", "Verify", "small");
    b.type = "button";
    b.dataset.receipt = t.receipt_id;
    b.addEventListener("click", () => verifyById(t.receipt_id));
    cell.append(b);
  }
  tr.append(cell);
  return tr;
}

// ---- receipts --------------------------------------------------------------------------------

async function verifyById(id) {
  let bundle, trusted;
  try {
    bundle = await api(`/v1/receipts/${encodeURIComponent(id)}`);
    trusted = await trustedKeyFor(bundle.receipt && bundle.receipt.origin);
  } catch (e) {
    showVerdict(id, null, e, []);
    return;
  }
  await verifyAndShow(bundle, trusted.key, id, trusted.how);
}

const keyName = (keyText) => keyText.split("+")[0];

/** The key a receipt of the node named `origin` is checked against. This node's own: the key
 * the user trusts. Another node of the same ledger (every node serves every node's receipts):
 * that node's key as this node lists it (`/v1/node/keys`), trusted from its first use in this
 * browser and checked against that from then on, as this node's own key is. */
async function trustedKeyFor(origin) {
  const own = { key: state.pinned, how: "signed by the trusted node key" };
  if (!origin || origin === keyName(state.pinned)) return own;
  const pin = `${PIN}.${origin}`;
  const before = localStorage.getItem(pin);
  if (before) return { key: before, how: `signed by the key of node ${origin} you trusted before` };
  const listed = (await api("/v1/node/keys")).split("\n").map((l) => l.trim()).find((k) => keyName(k) === origin);
  if (!listed) return own; // then the check says whose key the bundle names instead
  localStorage.setItem(pin, listed);
  return { key: listed, how: `signed by the key of node ${origin}, which issued it (as this node lists it; trusted from this first use)` };
}

async function verifyAndShow(bundle, keyText, label, signedBy = "signed by the trusted node key") {
  const checks = [];
  let result = null, error = null;
  try {
    result = await v.verifyBundle(bundle, keyText);
    checks.push(signedBy, "every readable field matches the signed bytes",
      `logged at index ${result.receipt.log_index} of a log of ${result.checkpoint.size} receipts, whose signed checkpoint includes it`);
  } catch (e) {
    error = e;
  }
  showVerdict(label, result, error, checks);
  if (result) await checkLogGrowth(result.checkpoint, keyText);
}

function showVerdict(label, result, error, checks) {
  $("receipt").hidden = false;
  $("receipt-id").textContent = label || "";
  const verdict = $("receipt-verdict");
  if (result) {
    verdict.textContent = "✓ Verified in this browser";
    verdict.className = "good";
  } else {
    verdict.textContent = `✗ Not verified: ${error.message}`;
    verdict.className = "bad";
    verdict.dataset.code = error.code || "";
  }
  $("receipt-checks").replaceChildren(...checks.map((c) => el("li", c)));
  $("receipt-log").textContent = "";
  const rows = result ? Object.entries(result.receipt).map(([k, val]) => {
    const tr = el("tr");
    tr.append(el("th", k), el("td", k === "amount_micros" ? `${val} (${credits(val)} credits)` : val));
    return tr;
  }) : [];
  $("receipt-fields").tBodies[0].replaceChildren(...rows);
  $("receipt").scrollIntoView({ block: "nearest" });
}

/** Proves that the log only grew since the last checkpoint this browser saw from this key. */
async function checkLogGrowth(checkpoint, keyText) {
  const out = $("receipt-log");
  out.className = "";
  const seenRaw = localStorage.getItem(seenKey(keyText));
  const remember = () => localStorage.setItem(seenKey(keyText), checkpoint.note);
  if (!seenRaw) { remember(); out.textContent = `Log checkpoint of size ${checkpoint.size} remembered.`; return; }
  try {
    const key = await v.parseVerifierKey(keyText);
    const old = await v.openCheckpoint(seenRaw, key);
    const [a, b] = old.size <= checkpoint.size ? [old, checkpoint] : [checkpoint, old];
    const proof = a.size === b.size || a.size === 0n ? { proof: [] }
      : await api(`/v1/log/consistency?old=${a.size}&new=${b.size}`);
    await v.verifyLogGrowth(a, b, proof.proof);
    if (b === checkpoint) remember();
    out.textContent = b === checkpoint
      ? `✓ The log only grew since you last looked (size ${old.size} → ${checkpoint.size}): no receipt was removed or rewritten.`
      : `✓ This receipt's checkpoint (size ${checkpoint.size}) is an earlier state of the log you saw before (size ${old.size}).`;
    out.className = "good";
  } catch (e) {
    out.textContent = `✗ The log is not consistent with the checkpoint this browser saw before: ${e.message}. ` +
      "The node rewrote or forked its log: keep this receipt and the earlier one.";
    out.className = "bad";
    const verdict = $("receipt-verdict");
    verdict.textContent = "✗ The receipt is signed, but the log that holds it contradicts what this browser saw before";
    verdict.className = "bad";
    verdict.dataset.code = "log_inconsistent";
  }
}

async function verifyPasted() {
  await verifyAndShow($("verify-bundle").value, $("verify-key").value.trim(), "pasted bundle");
}

// ---- playground ------------------------------------------------------------------------------

async function loadModels() {
  const models = await api("/v1/models");
  $("chat-model").replaceChildren(...models.data.map((m) => el("option", m.id)));
}

let inFlight = null;

async function sendChat(event) {
  event.preventDefault();
  const messages = [];
  if ($("chat-system").value.trim()) messages.push({ role: "system", content: $("chat-system").value });
  messages.push({ role: "user", content: $("chat-message").value });
  const body = {
    model: $("chat-model").value, messages, stream: true, stream_options: { include_usage: true },
    max_tokens: Number($("chat-max").value), temperature: Number($("chat-temp").value),
  };
  $("chat-output").textContent = "";
  $("chat-reasoning").textContent = "";
  $("chat-reasoning-box").hidden = true;
  $("chat-usage").textContent = "";
  inFlight = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), signal: inFlight.signal,
      headers: headers({ "content-type": "application/json" }),
    });
    if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
    await readStream(r.body);
  } catch (e) {
    if (e.name === "AbortError") {
      $("chat-usage").textContent = "Stopped: the node charges what was produced before you left " +
        "(for a model served through an upstream, the whole answer, which the upstream finishes); see the ledger.";
    } else {
      $("chat-usage").textContent = `Error: ${e.message}`;
      $("chat-usage").className = "bad";
    }
  } finally {
    inFlight = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
    loadAccount().catch(() => {});
  }
}

async function readStream(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ") && line !== "data: [DONE]") onChunk(JSON.parse(line.slice(6)));
      }
    }
  }
}

function onChunk(chunk) {
  if (chunk.error) throw new ApiError(500, chunk);
  for (const c of chunk.choices || []) {
    const d = c.delta || {};
    if (d.content) $("chat-output").textContent += d.content;
    const reasoning = d.reasoning_content || d.reasoning;
    if (reasoning) {
      $("chat-reasoning-box").hidden = false;
      $("chat-reasoning").textContent += reasoning;
    }
    if (c.finish_reason) $("chat-output").dataset.finish = c.finish_reason;
  }
  if (chunk.usage) showUsage(chunk.usage, chunk.receipt);
}

function showUsage(u, receipt) {
  const p = $("chat-usage");
  p.className = "muted";
  const cached = u.prompt_tokens_details ? u.prompt_tokens_details.cached_tokens : 0;
  p.replaceChildren(`${u.prompt_tokens} prompt tokens (${cached} cached), ${u.completion_tokens} completion tokens`);
  if (receipt) {
    p.append(`, charged ${credits(receipt.amount_micros)} credits. `);
    const b = el("button", "Verify the receipt", "small");
    b.type = "button";
    b.id = "chat-verify";
    b.addEventListener("click", () => verifyById(receipt.id));
    p.append(b);
  }
}

// ---- operator (an admin key) -----------------------------------------------------------------

/** A credits amount typed by a person ("12", "0.5") as exact micro-credits, or null. */
export function parseCredits(text) {
  // At most 999 999 999.999999 credits: under the ledger's largest amount (10^15 micros).
  const m = /^\s*(\d{1,9})(?:\.(\d{1,6}))?\s*$/.exec(text);
  if (!m) return null;
  return BigInt(m[1]) * 1000000n + BigInt((m[2] || "").padEnd(6, "0"));
}

async function loadOperator() {
  const check = await api("/admin/v1/ledger/check");
  const p = $("ledger-check");
  p.textContent = check.ok
    ? `✓ The ledger balances: ${check.accounts} accounts, ${check.transfers} transfers, sum ${check.sum_micros}.`
    : `✗ The ledger check failed: ${check.problems.join("; ")}`;
  p.className = check.ok ? "good" : "bad";
  state.accountsAfter = null;
  $("accounts").tBodies[0].replaceChildren();
  await loadAccountUsage();
  await Promise.all([loadAccounts(), loadUsageDays("/admin/v1/usage", "ledger-usage-days")]);
}

/** What each account was charged in the last 7 UTC days, net of refunds, and for how many
 * requests (`group_by=account_id`: every account in one call). */
async function loadAccountUsage() {
  let page;
  try {
    page = await api("/admin/v1/usage?group_by=account_id&limit=7");
  } catch (e) {
    console.warn("usage by account:", e);
    state.accountUsage = null; // the accounts still show, without it
    return;
  }
  const usage = new Map();
  for (const b of page.data) {
    for (const r of b.results) {
      const t = usage.get(r.account_id) || { requests: 0, net_micros: 0 };
      t.requests += r.num_model_requests;
      t.net_micros += r.charged_micros - r.refunded_micros;
      usage.set(r.account_id, t);
    }
  }
  state.accountUsage = usage;
}

async function loadAccounts() {
  const q = new URLSearchParams({ limit: "100" });
  if (state.accountsAfter) q.set("after", state.accountsAfter);
  const page = await api(`/admin/v1/accounts?${q}`);
  $("accounts").tBodies[0].append(...page.data.map(accountRow));
  state.accountsAfter = page.next_after;
  $("accounts-more").hidden = !page.has_more;
}

function accountRow(a) {
  const tr = el("tr");
  tr.dataset.account = a.id;
  const name = el("td", a.name);
  name.title = a.id;
  const used = (state.accountUsage && state.accountUsage.get(a.id)) || { requests: 0, net_micros: 0 };
  const usedCell = el("td", used.requests || used.net_micros ? `${credits(used.net_micros)} (${used.requests} requests)` : "—", "num");
  usedCell.dataset.usage = "7d";
  tr.append(name, el("td", a.kind), el("td", credits(a.balance_micros), "num"), el("td", credits(a.available_micros), "num"), usedCell);
  const mintCell = el("td");
  const keyCell = el("td");
  if (a.kind === "user" || a.kind === "agent") {
    const form = el("form", null, "row");
    const input = el("input");
    input.inputMode = "decimal";
    input.placeholder = "credits";
    input.size = 8;
    const add = el("button", "Add", "small");
    form.append(input, add);
    form.addEventListener("submit", guard(async (e) => {
      e.preventDefault();
      await once(add, async () => {
        await mint(a.id, input.value);
        await loadOperator();
      });
    }));
    mintCell.append(form);
    const key = el("button", "New key", "small");
    key.type = "button";
    key.addEventListener("click", guard(() => newKey(a.id, a.name)));
    keyCell.append(key);
  }
  tr.append(mintCell, keyCell);
  return tr;
}

async function mint(accountId, text) {
  const micros = parseCredits(text);
  if (micros === null || micros === 0n) throw new Error("Credits: a positive amount under a billion, at most six decimals");
  await api(`/admin/v1/accounts/${accountId}/mint`, {
    method: "POST", headers: { "content-type": "application/json" },
    // One click, one mint: a retried request with this key is answered with the same mint.
    body: `{"amount_micros":${micros},"idempotency_key":"console:${crypto.randomUUID()}"}`,
  });
}

async function newKey(accountId, name) {
  const k = await api(`/admin/v1/accounts/${accountId}/keys`, {
    method: "POST", headers: { "content-type": "application/json" }, body: "{}",
  });
  showKey(name, k);
}

function showKey(name, k) {
  $("new-key").hidden = false;
  $("new-key-account").textContent = name;
  $("new-key-value").textContent = k.key;
}

/** Runs `f` with `button` disabled, so that a double click cannot do it twice. */
async function once(button, f) {
  if (button.disabled) return;
  button.disabled = true;
  try { await f(); } finally { button.disabled = false; }
}

async function createAccount(event) {
  event.preventDefault();
  await once(event.submitter || $("new-account").querySelector("button"), () => createAccountNow());
}

async function createAccountNow() {
  const credit = $("new-account-credits").value.trim();
  if (credit && parseCredits(credit) === null) throw new Error("Credits: a positive amount under a billion, at most six decimals");
  const a = await api("/admin/v1/accounts", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ name: $("new-account-name").value.trim(), kind: $("new-account-kind").value }),
  });
  if (credit && parseCredits(credit) > 0n) await mint(a.id, credit);
  const k = await api(`/admin/v1/accounts/${a.id}/keys`, {
    method: "POST", headers: { "content-type": "application/json" }, body: "{}",
  });
  $("new-account").reset();
  await loadOperator();
  showKey(a.name, k);
}

// ---- wiring ----------------------------------------------------------------------------------

function showTab(name) {
  $("new-key").hidden = true; // a key is shown once, where it was made
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of ["account", "playground", "verify", "operator"]) $(`tab-${s}`).hidden = s !== name;
}

async function useKey(event) {
  event.preventDefault();
  state.key = $("key-input").value.trim();
  $("key-input").value = "";
  if (state.key) sessionStorage.setItem("tokenomy.key", state.key);
  else sessionStorage.removeItem("tokenomy.key");
  banner("");
  await loadAccount().catch((e) => banner(e.message));
}

function forgetKey() {
  state.key = "";
  sessionStorage.removeItem("tokenomy.key");
  loadAccount().catch((e) => banner(e.message));
}

/** Runs an action of the user's: a banner says what failed, and goes once one succeeds. */
function guard(f) {
  return (...args) => Promise.resolve(f(...args)).then(() => banner(""), (e) => banner(e.message));
}

async function start() {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("key-form").addEventListener("submit", guard(useKey));
  $("key-forget").addEventListener("click", forgetKey);
  $("refresh").addEventListener("click", guard(loadAccount));
  $("more").addEventListener("click", guard(loadTransfers));
  $("chat-form").addEventListener("submit", guard(sendChat));
  $("send").addEventListener("submit", guard(sendCredits));
  $("chat-stop").addEventListener("click", () => inFlight && inFlight.abort());
  $("verify-run").addEventListener("click", guard(verifyPasted));
  $("unpin").addEventListener("click", trustCurrentKey);
  $("new-account").addEventListener("submit", guard(createAccount));
  $("accounts-refresh").addEventListener("click", guard(loadOperator));
  $("accounts-more").addEventListener("click", guard(loadAccounts));
  const loopback = ["localhost", "127.0.0.1", "[::1]"].includes(location.hostname);
  if (location.protocol === "http:" && !loopback) {
    banner("This page is served over plain HTTP: a key typed here crosses the network unencrypted, and the node key trusted on this first visit could be anyone's. Serve the node behind HTTPS.", "warn");
  } else if (!v.hasWebCrypto()) {
    banner("This page is not served over HTTPS or localhost, so the browser gives it no WebCrypto: receipts cannot be verified here (use `tokenomy verify`).", "warn");
  }
  await Promise.all([loadNodeKey(), loadModels(), loadAccount()]);
  document.body.dataset.ready = "1";
}

start().catch((e) => { banner(e.message); document.body.dataset.ready = "1"; });

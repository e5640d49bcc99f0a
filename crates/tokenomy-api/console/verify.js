// tokenomy receipt verifier for the browser: the same checks as `tokenomy verify` and the
// `tokenomy-receipts` crate (`verify_bundle`, `verify_consistency_notes`), written again so
// that a receipt can be checked by code the node did not run. Only the node's verifier key
// string is trusted; everything else is recomputed here with the browser's WebCrypto
// (SHA-256, Ed25519). No network access: callers fetch, this module only checks.
//
// Formats (all standard, see crates/tokenomy-receipts): canonical receipts
// `tokenomy-receipt/v1|v2`, C2SP signed notes, tlog checkpoints and tlog proofs, RFC 6962 /
// RFC 9162 Merkle hashing.

export class VerifyError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "VerifyError";
    this.code = code;
  }
}

const fail = (code, message) => { throw new VerifyError(code, message); };

export const SIGNATURE_CONTEXT = "tokenomy-receipt-signature/v1\n";
export const TLOG_PROOF_HEADER = "c2sp.org/tlog-proof@v1";
const SIG_PREFIX = "\u2014 ";
const MAX_SIGNATURES = 100;
const U64_MAX = (1n << 64n) - 1n;
const I64_MIN = -(1n << 63n);
const I64_MAX = (1n << 63n) - 1n;

const FIELDS_V1 = [
  ["origin", "text"], ["receipt_id", "text"], ["request_id", "text"], ["account_id", "text"],
  ["key_id", "text"], ["kind", "kind"], ["model", "text"], ["model_sha256", "hex"],
  ["prompt_tokens", "u64"], ["cached_tokens", "u64"], ["completion_tokens", "u64"],
  ["reasoning_tokens", "u64"], ["price_input_micros_per_mtok", "u64"],
  ["price_cached_input_micros_per_mtok", "u64"], ["price_output_micros_per_mtok", "u64"],
  ["amount_micros", "i64"], ["transfer_id", "text"], ["started_at_ms", "u64"],
  ["ended_at_ms", "u64"], ["request_sha256", "hex"], ["output_sha256", "hex"],
  ["log_index", "u64"],
];
const KINDS = ["usage", "mint", "transfer", "refund"];

export function hasWebCrypto() {
  return typeof crypto !== "undefined" && !!crypto.subtle;
}

function requireWebCrypto() {
  if (!hasWebCrypto()) {
    fail("no_webcrypto", "this page is not a secure context (HTTPS or localhost), so the browser " +
      "offers no WebCrypto to check signatures; open it over HTTPS or use `tokenomy verify`");
  }
}

// ---- bytes ---------------------------------------------------------------------------------

const utf8 = new TextEncoder();

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

function equalBytes(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

export function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function toBase64(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

/** Standard base64, canonical only (re-encoding gives the same text), or null. */
export function fromBase64(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 !== 0) {
    return null;
  }
  let raw;
  try { raw = atob(text); } catch { return null; }
  const bytes = Uint8Array.from(raw, (c) => c.charCodeAt(0));
  return toBase64(bytes) === text ? bytes : null;
}

function decodeUtf8(bytes) {
  try { return new TextDecoder("utf-8", { fatal: true }).decode(bytes); } catch { return null; }
}

export async function sha256(bytes) {
  requireWebCrypto();
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

async function ed25519Verify(publicKey, message, signature) {
  requireWebCrypto();
  const key = await crypto.subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
  return crypto.subtle.verify({ name: "Ed25519" }, key, signature, message);
}

// ---- keys and signed notes (C2SP signed-note, Ed25519) -----------------------------------

function isValidName(name) {
  return name.length > 0 && !/[\s+\u0000-\u001f\u007f]/.test(name);
}

async function keyHash(name, encodedKey) {
  const h = await sha256(concat(utf8.encode(name + "\n"), encodedKey));
  return ((h[0] << 24) | (h[1] << 16) | (h[2] << 8) | h[3]) >>> 0;
}

/** Parses `name+hex8+base64(0x01 || pubkey)` and checks its key hash. */
export async function parseVerifierKey(text) {
  const s = String(text).trim();
  const first = s.indexOf("+");
  const second = first < 0 ? -1 : s.indexOf("+", first + 1);
  if (second < 0) fail("bad_key", "a verifier key is name+hash+key");
  const [name, hashHex, keyB64] = [s.slice(0, first), s.slice(first + 1, second), s.slice(second + 1)];
  if (!isValidName(name)) fail("bad_key", "the key's name is invalid");
  if (!/^[0-9a-f]{8}$/.test(hashHex)) fail("bad_key", "the key hash is not 8 lowercase hex digits");
  const encoded = fromBase64(keyB64);
  if (!encoded || encoded.length !== 33 || encoded[0] !== 1) {
    fail("bad_key", "the key is not base64 of an Ed25519 key (0x01 || 32 bytes)");
  }
  const hash = parseInt(hashHex, 16) >>> 0;
  if ((await keyHash(name, encoded)) !== hash) fail("bad_key", "the key hash does not match the key");
  return { text: s, name, keyHash: hash, publicKey: encoded.slice(1) };
}

/** Opens a signed note with one trusted key (as Go's note.Open); returns its text. */
export async function openNote(note, key) {
  if (/[\u0000-\u0009\u000b-\u001f]/.test(note)) fail("checkpoint_signature", "note: control character");
  const split = note.lastIndexOf("\n\n");
  if (split < 0) fail("checkpoint_signature", "note: no blank line before signatures");
  const text = note.slice(0, split + 1);
  const sigs = note.slice(split + 2);
  if (sigs === "" || !sigs.endsWith("\n")) {
    fail("checkpoint_signature", "note: signature block must end with a newline");
  }
  const lines = sigs.slice(0, -1).split("\n");
  if (lines.length > MAX_SIGNATURES) fail("checkpoint_signature", "note: too many signatures");
  let verified = false;
  for (const line of lines) {
    const sig = parseSignatureLine(line);
    if (sig.name !== key.name || sig.keyHash !== key.keyHash || verified) continue;
    if (!(await ed25519Verify(key.publicKey, utf8.encode(text), sig.signature))) {
      fail("checkpoint_signature", `note: the signature by ${key.name} does not verify`);
    }
    verified = true;
  }
  if (!verified) fail("checkpoint_signature", "note: not signed by the trusted key");
  return text;
}

function parseSignatureLine(line) {
  if (!line.startsWith(SIG_PREFIX)) fail("checkpoint_signature", "note: signature line must start with an em dash");
  const rest = line.slice(SIG_PREFIX.length);
  const space = rest.indexOf(" ");
  if (space < 0) fail("checkpoint_signature", "note: signature line needs a name and a signature");
  const name = rest.slice(0, space);
  if (!isValidName(name)) fail("checkpoint_signature", "note: invalid signer name");
  const blob = fromBase64(rest.slice(space + 1));
  if (!blob) fail("checkpoint_signature", "note: signature is not base64");
  if (blob.length < 5) fail("checkpoint_signature", "note: signature too short");
  const keyHash = ((blob[0] << 24) | (blob[1] << 16) | (blob[2] << 8) | blob[3]) >>> 0;
  return { name, keyHash, signature: blob.slice(4) };
}

// ---- checkpoints and tlog proofs ------------------------------------------------------------

function parseDecimal(s, code, what) {
  if (!/^(0|[1-9][0-9]*)$/.test(s)) fail(code, `${what} must be decimal without leading zeros`);
  const v = BigInt(s);
  if (v > U64_MAX) fail(code, `${what} overflows u64`);
  return v;
}

function parseHash(s, code, what) {
  const h = fromBase64(s);
  if (!h || h.length !== 32) fail(code, `${what} is not canonical base64 of 32 bytes`);
  return h;
}

/** Parses a checkpoint body `origin\nsize\nbase64(root)\n[extension\n]*`. */
export function parseCheckpoint(text) {
  const code = "checkpoint_signature";
  if (!text.endsWith("\n")) fail(code, "malformed checkpoint: no final newline");
  const lines = text.slice(0, -1).split("\n");
  if (lines.length < 3) fail(code, "malformed checkpoint: fewer than three lines");
  const [origin, size, root, ...extensions] = lines;
  if (origin === "") fail(code, "malformed checkpoint: empty origin");
  if (extensions.some((e) => e === "")) fail(code, "malformed checkpoint: empty extension line");
  return {
    origin,
    size: parseDecimal(size, code, "checkpoint size"),
    root: parseHash(root, code, "checkpoint root"),
    extensions,
  };
}

/** Opens a signed checkpoint with the trusted key; its origin must be the key's name. */
export async function openCheckpoint(note, key) {
  const cp = parseCheckpoint(await openNote(note, key));
  if (cp.origin !== key.name) {
    fail("checkpoint_signature", `checkpoint origin ${JSON.stringify(cp.origin)} is not the key's ${JSON.stringify(key.name)}`);
  }
  return { ...cp, note };
}

/** Parses the text of a c2sp.org/tlog-proof@v1. */
export function parseTlogProof(text) {
  const code = "malformed_proof";
  if (typeof text !== "string") fail(code, "the proof is not text");
  const blank = text.indexOf("\n\n");
  if (blank < 0) fail(code, "malformed tlog proof: no blank line before the checkpoint");
  const head = text.slice(0, blank).split("\n");
  const checkpointNote = text.slice(blank + 2);
  if (checkpointNote === "") fail(code, "malformed tlog proof: empty checkpoint");
  if (head.shift() !== TLOG_PROOF_HEADER) fail(code, "malformed tlog proof: wrong header");
  let extra = null;
  if (head.length && head[0].startsWith("extra ")) {
    extra = fromBase64(head.shift().slice(6));
    if (!extra) fail(code, "malformed tlog proof: extra is not base64");
  }
  const indexLine = head.shift();
  if (!indexLine || !indexLine.startsWith("index ")) fail(code, "malformed tlog proof: no index line");
  const index = parseDecimal(indexLine.slice(6), code, "index");
  const hashes = head.map((h) => parseHash(h, code, "a proof hash"));
  return { extra, index, hashes, checkpointNote };
}

// ---- Merkle trees (RFC 6962 hashing, RFC 9162 proofs) --------------------------------------

export const leafHash = (data) => sha256(concat(new Uint8Array([0]), data));
const nodeHash = (left, right) => sha256(concat(new Uint8Array([1]), left, right));

function shiftWhileEven(s) {
  while ((s.fn & 1n) === 0n && s.fn !== 0n) { s.fn >>= 1n; s.sn >>= 1n; }
}

/** RFC 9162 §2.1.3.2: `leaf` is leaf `index` of the tree of `size` leaves with `root`. */
export async function verifyInclusion(leaf, index, size, proof, root) {
  const code = "inclusion";
  if (index >= size) fail(code, `inclusion proof does not verify: index ${index} is not below tree size ${size}`);
  const s = { fn: index, sn: size - 1n };
  let r = leaf;
  for (const p of proof) {
    if (s.sn === 0n) fail(code, "inclusion proof does not verify: proof too long");
    if ((s.fn & 1n) === 1n || s.fn === s.sn) {
      r = await nodeHash(p, r);
      if ((s.fn & 1n) === 0n) shiftWhileEven(s);
    } else {
      r = await nodeHash(r, p);
    }
    s.fn >>= 1n; s.sn >>= 1n;
  }
  if (s.sn !== 0n) fail(code, "inclusion proof does not verify: proof too short");
  if (!equalBytes(r, root)) fail(code, "inclusion proof does not verify: root mismatch");
}

/** RFC 9162 §2.1.4.2: the tree (`oldSize`, `oldRoot`) is a prefix of (`newSize`, `newRoot`). */
export async function verifyConsistency(oldSize, newSize, oldRoot, newRoot, proof) {
  const code = "consistency";
  if (oldSize > newSize) fail(code, `consistency proof does not verify: old size ${oldSize} exceeds new size ${newSize}`);
  if (oldSize === newSize || oldSize === 0n) {
    if (proof.length) fail(code, "consistency proof does not verify: proof too long");
    if (oldSize === newSize && !equalBytes(oldRoot, newRoot)) {
      fail(code, "consistency proof does not verify: the same size with another root (a fork)");
    }
    return;
  }
  if (!proof.length) fail(code, "consistency proof does not verify: proof too short");
  const path = (oldSize & (oldSize - 1n)) === 0n ? [oldRoot, ...proof] : [...proof];
  const s = { fn: oldSize - 1n, sn: newSize - 1n };
  while ((s.fn & 1n) === 1n) { s.fn >>= 1n; s.sn >>= 1n; }
  let fr = path[0], sr = path[0];
  for (const c of path.slice(1)) {
    if (s.sn === 0n) fail(code, "consistency proof does not verify: proof too long");
    if ((s.fn & 1n) === 1n || s.fn === s.sn) {
      fr = await nodeHash(c, fr);
      sr = await nodeHash(c, sr);
      if ((s.fn & 1n) === 0n) shiftWhileEven(s);
    } else {
      sr = await nodeHash(sr, c);
    }
    s.fn >>= 1n; s.sn >>= 1n;
  }
  if (s.sn !== 0n) fail(code, "consistency proof does not verify: proof too short");
  if (!equalBytes(fr, oldRoot)) fail(code, "consistency proof does not verify: old root mismatch");
  if (!equalBytes(sr, newRoot)) fail(code, "consistency proof does not verify: new root mismatch");
}

// ---- receipts -------------------------------------------------------------------------------

function checkValue(name, type, value) {
  const bad = (reason) => fail("non_canonical_receipt", `canonical bytes do not decode to a receipt: field ${name}: ${reason}`);
  switch (type) {
    case "text":
      if (/[\u0000-\u001f\u007f-\u009f]/.test(value)) bad("control character");
      return value;
    case "kind":
      if (!KINDS.includes(value)) bad("unknown kind");
      return value;
    case "hex":
      if (!/^[0-9a-f]{64}$/.test(value)) bad("expected 64 lowercase hex digits");
      return value;
    case "u64":
      if (!/^(0|[1-9][0-9]*)$/.test(value) || BigInt(value) > U64_MAX) bad("not a canonical u64");
      return value;
    case "i64":
      if (!/^(0|-?[1-9][0-9]*)$/.test(value) || BigInt(value) < I64_MIN || BigInt(value) > I64_MAX) {
        bad("not a canonical i64");
      }
      return value;
  }
  throw new Error("unreachable");
}

/** Decodes canonical receipt bytes into { field: canonical string }, refusing other spellings. */
export function decodeReceipt(bytes) {
  const bad = (reason) => fail("non_canonical_receipt", `canonical bytes do not decode to a receipt: ${reason}`);
  const text = decodeUtf8(bytes);
  if (text === null) bad("not UTF-8");
  if (!text.endsWith("\n")) bad("no final newline");
  const lines = text.slice(0, -1).split("\n");
  const header = lines.shift();
  const version = { "tokenomy-receipt/v1": 1, "tokenomy-receipt/v2": 2 }[header];
  if (!version) bad(`unsupported header ${JSON.stringify(header)}`);
  const fields = [...FIELDS_V1];
  if (version === 2) fields.splice(4, 0, ["counterparty_id", "text"]);
  if (lines.length !== fields.length) bad(`expected ${fields.length} field lines, found ${lines.length}`);
  const out = { version };
  fields.forEach(([name, type], i) => {
    if (!lines[i].startsWith(name + " ")) bad(`line ${i + 2} is not field ${name}`);
    out[name] = checkValue(name, type, lines[i].slice(name.length + 1));
  });
  if (version === 2 && out.counterparty_id === "") bad("field counterparty_id: must not be empty");
  if (out.origin === "") bad("field origin: must not be empty");
  if (out.receipt_id === "") bad("field receipt_id: must not be empty");
  if (BigInt(out.cached_tokens) > BigInt(out.prompt_tokens)) bad("field cached_tokens: exceeds prompt_tokens");
  if (BigInt(out.ended_at_ms) < BigInt(out.started_at_ms)) bad("field ended_at_ms: is before started_at_ms");
  return out;
}

const NUMERIC = new Set(FIELDS_V1.filter(([, t]) => t === "u64" || t === "i64").map(([n]) => n));

/** The first readable field that differs from the canonical receipt, or null. */
function firstDifference(readable, canonical) {
  if (readable === null || typeof readable !== "object") return "receipt";
  const names = ["version", ...FIELDS_V1.map(([n]) => n), "counterparty_id"];
  const known = new Set(names);
  const unknown = Object.keys(readable).find((k) => !known.has(k));
  if (unknown) return unknown;
  for (const name of names) {
    const want = canonical[name] ?? (name === "counterparty_id" ? "" : undefined);
    const got = readable[name] ?? (name === "counterparty_id" ? "" : undefined);
    const same = name === "version" ? got === want
      : NUMERIC.has(name) ? typeof got === "number" && got === Number(want)
      : got === want;
    if (!same) return name;
  }
  return null;
}

/**
 * Verifies a receipt bundle (the JSON of `GET /v1/receipts/{id}`, text or parsed) against the
 * trusted key string: the bundle names that key, the Ed25519 signature over the canonical
 * bytes, every readable field, the log index, the checkpoint's signature and origin, and the
 * inclusion of the canonical bytes in that checkpoint's tree. Resolves to
 * `{ receipt, leafHash, checkpoint }` (receipt fields as canonical strings) or rejects with a
 * VerifyError whose `code` says what failed.
 */
export async function verifyBundle(bundle, trustedKey) {
  requireWebCrypto();
  const key = typeof trustedKey === "string" ? await parseVerifierKey(trustedKey) : trustedKey;
  const b = typeof bundle === "string" ? parseBundle(bundle) : bundle;
  if (b.key !== key.text) fail("key_mismatch", `bundle key ${JSON.stringify(b.key)} is not the trusted key ${JSON.stringify(key.text)}`);
  const canonical = fromBase64(b.canonical);
  if (!canonical) fail("malformed_canonical", "canonical bytes are not valid base64");
  const signature = fromBase64(b.signature);
  if (!signature || signature.length !== 64) fail("malformed_signature", "signature is not 64 bytes of base64");
  const message = concat(utf8.encode(SIGNATURE_CONTEXT), canonical);
  if (!(await ed25519Verify(key.publicKey, message, signature))) {
    fail("signature", "receipt signature does not verify");
  }
  const receipt = decodeReceipt(canonical);
  const differs = firstDifference(b.receipt, receipt);
  if (differs) fail("field_mismatch", `readable field ${differs} does not match the canonical bytes`);
  const proof = parseTlogProof(b.proof);
  if (proof.index !== BigInt(receipt.log_index)) {
    fail("log_index_mismatch", `proof index ${proof.index} is not the receipt's log_index ${receipt.log_index}`);
  }
  const checkpoint = await openCheckpoint(proof.checkpointNote, key);
  if (checkpoint.origin !== receipt.origin) {
    fail("origin_mismatch", `checkpoint origin ${JSON.stringify(checkpoint.origin)} is not the receipt origin ${JSON.stringify(receipt.origin)}`);
  }
  const leaf = await leafHash(canonical);
  await verifyInclusion(leaf, proof.index, checkpoint.size, proof.hashes, checkpoint.root);
  return { receipt, leafHash: leaf, checkpoint };
}

function parseBundle(text) {
  let b;
  try { b = JSON.parse(text); } catch (e) { fail("malformed_json", `bundle is not valid JSON: ${e.message}`); }
  const want = ["canonical", "key", "proof", "receipt", "signature"];
  const have = b && typeof b === "object" ? Object.keys(b).sort() : [];
  if (JSON.stringify(have) !== JSON.stringify(want) || want.some((k) => k !== "receipt" && typeof b[k] !== "string")) {
    fail("malformed_json", `bundle is not valid JSON of the expected shape: it needs exactly ${want.join(", ")}`);
  }
  return b;
}

/**
 * Verifies that the log grew append-only from checkpoint `older` to `newer` (both opened with
 * openCheckpoint), given the base64 hashes of `GET /v1/log/consistency?old=&new=`.
 */
export async function verifyLogGrowth(older, newer, proofBase64) {
  const hashes = proofBase64.map((h) => parseHash(h, "consistency", "a consistency hash"));
  await verifyConsistency(older.size, newer.size, older.root, newer.root, hashes);
}

//! The shared language of tokenomy.
//!
//! Every other crate speaks in these types: what a generation request is once it has been
//! validated (no wire format here: the HTTP crate owns OpenAI's and Anthropic's JSON), what the
//! engine streams back, and how tokens are counted. The [`Backend`] trait is the seam between
//! the HTTP front end and whatever produces tokens (the local llama.cpp engine today, remote
//! upstreams later), so the API crate can be tested against any backend and the engine knows
//! nothing of HTTP.
//!
//! Architecture Invariant: this crate does no I/O and depends on no other tokenomy crate.

use std::fmt;

use tokio::sync::{mpsc, oneshot};

/// A token id in a model's vocabulary.
pub type TokenId = i32;

/// Token counts for one generation, taken from the token ids the engine actually processed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens of the request (including those served from the prefix cache).
    pub prompt_tokens: u32,
    /// Of `prompt_tokens`, how many were reused from the prefix cache instead of recomputed.
    pub cached_tokens: u32,
    /// Tokens sampled by the engine (every one, including a final end-of-generation token).
    pub completion_tokens: u32,
    /// Of `completion_tokens`, how many were reasoning (thinking) tokens.
    pub reasoning_tokens: u32,
}

impl Usage {
    pub fn total_tokens(&self) -> u32 {
        self.prompt_tokens + self.completion_tokens
    }

    /// Adds another choice's usage, counting the shared prompt once.
    pub fn add_choice(&mut self, other: &Usage) {
        self.completion_tokens += other.completion_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token, or a stop string matched.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The client went away; what was produced is still counted.
    Cancelled,
    /// The engine failed.
    Error,
}

impl FinishReason {
    pub fn as_openai(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::Error => "length",
            // Cut before its end by the node (a shutdown past its drain deadline; a client that
            // left reads nothing): vLLM's name for an aborted answer, so an agent does not take
            // it for one that reached max_tokens.
            FinishReason::Cancelled => "abort",
        }
    }
}

/// Sampling parameters, already validated (ranges checked by the API layer).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax), deterministic.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: u32,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1.0 disables the repetition penalty.
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(TokenId, f32)>,
    pub stop: Vec<String>,
    /// Upper bound on sampled tokens; the engine also stops at the context window.
    pub max_tokens: u32,
    /// Return the log-probability of each sampled token and this many alternatives.
    pub logprobs: Option<u8>,
    /// Do not stop at the end-of-generation token.
    pub ignore_eos: bool,
    /// Which completion tokens count as reasoning (`<think>…</think>`), for exact usage.
    pub reasoning: ReasoningMode,
    /// At most this many reasoning tokens: then the engine closes the think block itself
    /// (`\n</think>\n\n`, forced, billed as output) and the model writes its answer.
    pub reasoning_budget: Option<u32>,
    /// A constraint every sampled token must keep satisfiable; generation ends when it is complete.
    pub grammar: Option<Grammar>,
    /// Makes `grammar` lazy when not empty: free text until the output reaches a trigger (a
    /// tool call's opening tag, or the fence small models open a call with), whose tokens the
    /// grammar then begins with; once it is complete the text is free again.
    pub grammar_triggers: Vec<GrammarTrigger>,
}

/// Where a lazy grammar starts to apply.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarTrigger {
    /// The model samples this token (Qwen2.5's `<tool_call>` is one).
    Token(TokenId),
    /// The output's last tokens spell this text, blanks aside (from a token's start; the last
    /// of them completes it).
    Text(String),
    /// [`Text`](Self::Text), when nothing but blanks was written before it (since the start,
    /// or the grammar's last use).
    TextAtStart(String),
}

/// How a backend's [`BackendError::InvalidRequest`] begins when the request's schema or grammar
/// cannot be compiled: the API, which knows which field it came from, names that field.
pub const INVALID_GRAMMAR_PREFIX: &str = "invalid grammar or schema: ";

/// What a constrained JSON value may have between its tokens (a regex): one space, or one or
/// two line breaks and an indent of up to 20, as llama.cpp's schema grammars allow. Any run
/// (llguidance's default) lets a small model that wants to end early write blanks until
/// `max_tokens`, paid for and never valid.
pub const JSON_WHITESPACE_PATTERN: &str = r"[\x20]|[\x0A]{1,2}[\x20\x09]{0,20}";

/// `schema` with [`JSON_WHITESPACE_PATTERN`] as llguidance's option (`x-guidance`), unless it
/// sets options of its own.
pub fn with_bounded_whitespace(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut().filter(|o| !o.contains_key("x-guidance")) {
        o.insert("x-guidance".into(), serde_json::json!({ "whitespace_pattern": JSON_WHITESPACE_PATTERN }));
    }
    schema
}

/// A constraint on the output, enforced during sampling.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// The output is one JSON value valid against this JSON Schema.
    JsonSchema(serde_json::Value),
    /// A Lark grammar in llguidance's dialect (may embed `%json {…}` schemas).
    Lark(String),
}

/// Where a think block may be: opened by the prompt (R1 distills' templates end with
/// `<think>`), opened by the model at the start of its output, or not looked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReasoningMode {
    #[default]
    Off,
    OpenedByPrompt,
    Detect,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            stop: Vec::new(),
            max_tokens: 16,
            logprobs: None,
            ignore_eos: false,
            reasoning: ReasoningMode::Off,
            reasoning_budget: None,
            grammar: None,
            grammar_triggers: Vec::new(),
        }
    }
}

/// A fully validated generation request: the prompt is already tokenized.
#[derive(Debug)]
pub struct GenerateRequest {
    pub request_id: String,
    pub model: String,
    pub prompt: Vec<TokenId>,
    pub params: SamplingParams,
    /// Also return log-probabilities of the prompt tokens (the first one has none).
    pub echo_logprobs: bool,
    pub answer_end: Option<AnswerEnd>,
    /// The prefix-cache namespace (vLLM's `cache_salt`): a request reuses cached KV only of
    /// requests with the same salt. The HTTP layer gives each account its own, so no account
    /// can learn (from `cached_tokens`, or from how fast its prompt is read) what another sent.
    pub cache_salt: u64,
}

/// Tells, from each piece of an answer's text as the engine emits it, whether the answer is
/// complete (an agent's tool call after which nothing more is read): the engine then ends the
/// generation at that token, as at a stop string, so the tokens billed are the same however
/// fast the client reads (a reader that stopped the generation itself would race the engine
/// by a token or two).
pub struct AnswerEnd(pub Box<dyn FnMut(&str) -> bool + Send>);

impl fmt::Debug for AnswerEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AnswerEnd")
    }
}

/// One candidate token with its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: TokenId,
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// The log-probability of one chosen token and its strongest alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct LogprobEntry {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// One prompt token and its log-probability given the tokens before it (`None` for the first).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    pub text: String,
    pub entry: Option<LogprobEntry>,
}

/// What a backend streams while it generates.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The generation got its slot: of its prompt, `cached_tokens` were found in the prefix
    /// cache (the first event of every generation that runs).
    Admitted { cached_tokens: u32 },
    /// Log-probabilities of the prompt tokens (only when `echo_logprobs` was asked).
    PromptLogprobs(Vec<PromptLogprob>),
    /// New output text. `text` may be empty while bytes of a multi-byte character or a
    /// possible stop string are held back; `logprobs` is set per sampled token when asked.
    Token { text: String, logprob: Option<LogprobEntry> },
}

/// How a generation ended; always delivered, even if the event receiver was dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// The full output text, as the client saw it (stop string excluded).
    pub text: String,
    pub error: Option<String>,
    /// The stop string that ended the text (`finish_reason` Stop), if one did.
    pub stop_sequence: Option<String>,
}

/// A running generation: a stream of events and the final outcome.
///
/// Dropping `events` cancels the generation; `outcome` still arrives with the usage of what
/// was processed, so a disconnected client is still metered.
#[derive(Debug)]
pub struct Generation {
    pub events: mpsc::UnboundedReceiver<Event>,
    pub outcome: oneshot::Receiver<Outcome>,
}

/// Facts about a served model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The name clients use in `"model"`.
    pub name: String,
    pub architecture: String,
    pub context_length: u32,
    /// The model file's sha256 (hex); `None` while it is still being hashed after load.
    pub sha256: Option<String>,
    pub has_chat_template: bool,
    /// Token ids run from 0 to `vocab_size - 1`.
    pub vocab_size: u32,
    /// The most generations (prompts × `n`) one request may ask for (the model's queue).
    pub generations_max: u32,
}

/// A chat message handed to a chat template. Content is plain text; the API layer flattens
/// structured content parts before this point. Serialized the way chat templates expect
/// (OpenAI's shape): `tool_calls` as `[{"id", "type": "function", "function": {"name",
/// "arguments": {…}}}]` with arguments as an object, `tool_call_id` / `name` on tool results.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), ..ChatMessage::default() }
    }

    /// As the last message, an assistant prefill: the answer continues its text.
    pub fn is_prefill(&self) -> bool {
        self.role == "assistant" && !self.content.is_empty() && self.tool_calls.is_empty()
    }
}

/// A chat as the model's template renders it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatPrompt {
    pub text: String,
    /// The tokens of `text`, where only what the template itself wrote can be a control token:
    /// `<|im_start|>` inside a message is text, not a turn boundary.
    pub tokens: Vec<TokenId>,
}

/// Errors a backend returns before generation starts. Each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    #[error("The model `{0}` does not exist")]
    UnknownModel(String),
    #[error("This model's maximum context length is {context_length} tokens. However, you requested {requested} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). Please reduce the length of the prompt or max_tokens.")]
    ContextLength { context_length: u32, requested: u64, prompt_tokens: u32, max_tokens: u32 },
    #[error("{0}")]
    InvalidRequest(String),
    /// A request parameter (named as the API names it) the model cannot take.
    #[error("{1}")]
    InvalidParam(&'static str, String),
    #[error("The server is overloaded: {0}. Retry later.")]
    Overloaded(String),
    #[error("The engine failed: {0}")]
    Internal(String),
}

impl BackendError {
    /// Whether a prompt of `prompt_tokens` and a completion of up to `max_tokens` fit a context
    /// of `context_length` tokens: the one check of it, by the engine when it is given a
    /// request and by the API before anything is charged for it.
    pub fn check_context(context_length: u32, prompt_tokens: usize, max_tokens: u32) -> Result<(), BackendError> {
        let requested = prompt_tokens as u64 + u64::from(max_tokens);
        if requested > u64::from(context_length) {
            let prompt_tokens = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
            return Err(BackendError::ContextLength { context_length, requested, prompt_tokens, max_tokens });
        }
        Ok(())
    }
}

/// Anything that produces tokens: the local engine, or (later) a remote upstream.
///
/// API Boundary: the HTTP crate sees models only through this trait.
pub trait Backend: Send + Sync + 'static {
    fn models(&self) -> Vec<ModelInfo>;
    /// Whether the models are loaded and the backend accepts work.
    fn ready(&self) -> bool;
    fn tokenize(&self, model: &str, text: &str, add_special: bool) -> Result<Vec<TokenId>, BackendError>;
    fn detokenize(&self, model: &str, tokens: &[TokenId]) -> Result<String, BackendError>;
    /// Renders a chat with the model's template, ending with the assistant's turn (or inside
    /// a prefilled one), offering `tools` (OpenAI function definitions, `[{"type": "function",
    /// "function": {…}}]`) when not empty, and tokenizes it.
    fn render_chat(&self, model: &str, messages: &[ChatMessage], tools: &[serde_json::Value]) -> Result<ChatPrompt, BackendError>;
    /// Starts the generations of one API request (its prompts × `n`), all or none: fails fast,
    /// before any token and with none started, on an unknown model, context overflow, more
    /// generations than the model can ever queue (`InvalidRequest`) or a full queue (`Overloaded`).
    fn generate(&self, requests: Vec<GenerateRequest>) -> Result<Vec<Generation>, BackendError>;
    /// Embeds each input (its tokens) as one unit vector; the vectors arrive in the inputs' order.
    fn embed(&self, model: &str, inputs: Vec<Vec<TokenId>>) -> Result<oneshot::Receiver<Result<Vec<Vec<f32>>, BackendError>>, BackendError> {
        let _ = inputs;
        Err(BackendError::InvalidParam("model", format!("`{model}` serves no embeddings")))
    }
    /// Whether `model` would take `wanted` more generations now (its queue has the places), so
    /// that a router may send a request elsewhere rather than have it refused. Racy by nature:
    /// a request that found room may still be refused.
    fn has_room(&self, model: &str, wanted: usize) -> bool {
        let _ = (model, wanted);
        true
    }
    /// Ends every generation, waiting or running, as `Cancelled` (each still delivers its
    /// outcome with the usage of what was processed, so it is metered and charged), and refuses
    /// new ones: for a shutdown that can wait no longer for answers to finish.
    fn cancel_all(&self) {}
    /// Backend metrics in Prometheus text exposition format.
    fn metrics_text(&self) -> String {
        String::new()
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_openai())
    }
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's algorithm): dates for people, without a date library.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_420), (2025, 11, 28));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}

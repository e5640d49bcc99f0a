//! tokenomy-chat: reading what a chat model wrote.
//!
//! Why a crate of its own: tool-call syntax and think blocks are conventions of model families,
//! not of any wire API and not of the inference engine. Keeping the parsers pure (text in,
//! structure out, no I/O, no model) lets them be tested on recorded outputs cut at arbitrary
//! points, and lets the OpenAI and Anthropic front ends share them.
//!
//! * [`toolcall`]: a [`toolcall::ToolCallParser`] per family (Hermes / Qwen2.5 `<tool_call>`
//!   first), with the fenced-JSON answers small models give instead of their template's tags.
//! * [`callstream`]: the same calls read while the answer streams (name first, then argument
//!   fragments), for OpenAI's streamed `tool_calls` deltas and Anthropic's `input_json_delta`.
//! * [`reasoning`]: a streaming splitter of `<think>…</think>` reasoning from the answer,
//!   including R1 distills whose template opens the block in the prompt.

pub mod callstream;
pub mod reasoning;
pub mod toolcall;

//! OpenAI-compatible upstreams: OpenAI itself, another tokenomy node, llama.cpp's and vLLM's
//! servers, and the many clouds that speak the same API.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde_json::Value;

use crate::UpstreamError;

/// A stream's chunks, each a parsed `data:` payload; `[DONE]` ends it.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Value, UpstreamError>> + Send>>;

/// The longest SSE event an upstream may send (a chunk is a token or a few).
pub const SSE_EVENT_BYTES_MAX: usize = 1 << 20;

/// The largest whole answer read from an upstream.
pub const BODY_BYTES_MAX: usize = 64 << 20;

#[derive(Debug)]
pub struct OpenAi {
    name: String,
    base_url: String,
    api_key: Option<String>,
    client: reqwest::Client,
}

impl OpenAi {
    /// `timeouts`: (connect, whole request).
    pub fn new(name: &str, base_url: &str, api_key: Option<String>, timeouts: (Duration, Duration)) -> Result<OpenAi, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.0)
            .timeout(timeouts.1)
            .build()
            .map_err(|e| format!("upstream {name}: {e}"))?;
        Ok(OpenAi { name: name.into(), base_url: base_url.trim_end_matches('/').into(), api_key, client })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        let r = self.client.post(format!("{}{path}", self.base_url)).json(body);
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    fn error(&self, e: reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            UpstreamError::Timeout { upstream: self.name.clone() }
        } else if e.is_connect() || e.is_request() {
            UpstreamError::Connect { upstream: self.name.clone(), detail: e.to_string() }
        } else {
            UpstreamError::Protocol { upstream: self.name.clone(), detail: e.to_string() }
        }
    }

    /// The response if its status is a success, its error otherwise.
    async fn checked(&self, r: Result<reqwest::Response, reqwest::Error>) -> Result<reqwest::Response, UpstreamError> {
        let r = r.map_err(|e| self.error(e))?;
        if r.status().is_success() {
            return Ok(r);
        }
        let status = r.status().as_u16();
        let text = read_capped(r, 64 << 10).await.unwrap_or_default();
        let body: Option<Value> = serde_json::from_slice(&text).ok();
        let message = body
            .as_ref()
            .and_then(|b| b.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&text[..text.len().min(300)]).into_owned());
        Err(UpstreamError::Status { upstream: self.name.clone(), status, message, body })
    }

    pub async fn chat(&self, body: &Value) -> Result<Value, UpstreamError> {
        self.whole("/chat/completions", body).await
    }

    pub async fn completion(&self, body: &Value) -> Result<Value, UpstreamError> {
        self.whole("/completions", body).await
    }

    pub async fn embeddings(&self, body: &Value) -> Result<Value, UpstreamError> {
        self.whole("/embeddings", body).await
    }

    /// A whole JSON answer to a POST of `body` to `path`.
    async fn whole(&self, path: &str, body: &Value) -> Result<Value, UpstreamError> {
        let r = self.checked(self.post(path, body).send().await).await?;
        let bytes = read_capped(r, BODY_BYTES_MAX).await.map_err(|e| self.error(e))?;
        serde_json::from_slice(&bytes).map_err(|e| self.protocol(format!("the answer is not JSON: {e}")))
    }

    pub async fn chat_stream(&self, body: &Value) -> Result<ChunkStream, UpstreamError> {
        self.stream("/chat/completions", body).await
    }

    pub async fn completion_stream(&self, body: &Value) -> Result<ChunkStream, UpstreamError> {
        self.stream("/completions", body).await
    }

    /// The chunks of a streamed answer to a POST of `body` to `path`.
    async fn stream(&self, path: &str, body: &Value) -> Result<ChunkStream, UpstreamError> {
        let r = self.checked(self.post(path, body).send().await).await?;
        let is_sse = r.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse {
            return Err(self.protocol("a stream was asked for, and the answer is not text/event-stream".into()));
        }
        let name = self.name.clone();
        let bytes = r.bytes_stream().map(move |b| {
            b.map_err(|e| match e.is_timeout() {
                true => UpstreamError::Timeout { upstream: name.clone() },
                false => UpstreamError::Protocol { upstream: name.clone(), detail: e.to_string() },
            })
        });
        Ok(Box::pin(sse_chunks(self.name.clone(), bytes)))
    }

    pub async fn models(&self) -> Result<Vec<String>, UpstreamError> {
        let mut r = self.client.get(format!("{}/models", self.base_url));
        if let Some(k) = &self.api_key {
            r = r.bearer_auth(k);
        }
        let r = self.checked(r.send().await).await?;
        let bytes = read_capped(r, BODY_BYTES_MAX).await.map_err(|e| self.error(e))?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| self.protocol(format!("the model list is not JSON: {e}")))?;
        let data = v.get("data").and_then(Value::as_array).ok_or_else(|| self.protocol("the model list has no `data` array".into()))?;
        Ok(data.iter().filter_map(|m| m.get("id").and_then(Value::as_str)).map(str::to_string).collect())
    }

    fn protocol(&self, detail: String) -> UpstreamError {
        UpstreamError::Protocol { upstream: self.name.clone(), detail }
    }
}

async fn read_capped(mut r: reqwest::Response, max: usize) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        if out.len() + chunk.len() > max {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Parses server-sent events into their `data:` JSON payloads, until `[DONE]` or the end.
pub fn sse_chunks<S>(upstream: String, bytes: S) -> impl Stream<Item = Result<Value, UpstreamError>> + Send
where
    S: Stream<Item = Result<bytes::Bytes, UpstreamError>> + Send + Unpin + 'static,
{
    struct St<S> {
        bytes: S,
        buf: Vec<u8>,
        done: bool,
        upstream: String,
    }
    let st = St { bytes, buf: Vec::new(), done: false, upstream };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            if let Some(event) = take_event(&mut st.buf) {
                match event_data(&event) {
                    None => continue,
                    Some(d) if d == "[DONE]" => return None,
                    Some(d) => {
                        let item = serde_json::from_str::<Value>(&d)
                            .map_err(|e| UpstreamError::Protocol { upstream: st.upstream.clone(), detail: format!("a stream chunk is not JSON: {e}") });
                        st.done = item.is_err();
                        return Some((item, st));
                    }
                }
            }
            if st.buf.len() > SSE_EVENT_BYTES_MAX {
                st.done = true;
                let e = UpstreamError::Protocol { upstream: st.upstream.clone(), detail: "a stream event is too long".into() };
                return Some((Err(e), st));
            }
            match st.bytes.next().await {
                Some(Ok(b)) => st.buf.extend_from_slice(&b),
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                None => {
                    // The stream ended without `[DONE]`: a last event without its blank line
                    // still counts (some servers end so).
                    st.done = true;
                    let rest = String::from_utf8_lossy(&std::mem::take(&mut st.buf)).into_owned();
                    let d = event_data(&rest).filter(|d| d != "[DONE]")?;
                    let item = serde_json::from_str::<Value>(&d)
                        .map_err(|e| UpstreamError::Protocol { upstream: st.upstream.clone(), detail: format!("a stream chunk is not JSON: {e}") });
                    return Some((item, st));
                }
            }
        }
    })
}

/// Removes and returns the first complete event (up to a blank line) from `buf`.
fn take_event(buf: &mut Vec<u8>) -> Option<String> {
    let (at, sep) = (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else if buf[i..].starts_with(b"\n\n") {
            Some((i, 2))
        } else {
            None
        }
    })?;
    let event = String::from_utf8_lossy(&buf[..at]).into_owned();
    buf.drain(..at + sep);
    Some(event)
}

/// The event's data: its `data:` lines joined by newlines (SSE), or `None` for a comment or
/// an event without data.
fn event_data(event: &str) -> Option<String> {
    let lines: Vec<&str> = event
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pieces: &[&str]) -> Vec<Result<Value, String>> {
        let bytes: Vec<Result<bytes::Bytes, UpstreamError>> = pieces.iter().map(|p| Ok(bytes::Bytes::from(p.to_string()))).collect();
        let s = sse_chunks("u".into(), futures::stream::iter(bytes));
        futures::executor::block_on(s.map(|r| r.map_err(|e| e.to_string())).collect())
    }

    #[test]
    fn events_are_parsed_whatever_the_chunking() {
        let text = ": keep-alive\n\ndata: {\"a\":1}\n\ndata: {\"b\":\ndata: 2}\r\n\r\nevent: x\ndata: {\"c\":3}\n\ndata: [DONE]\n\ndata: {\"after\":1}\n\n";
        // Whole, then cut at every byte.
        let whole = parse(&[text]);
        for cut in 1..text.len() {
            assert_eq!(parse(&[&text[..cut], &text[cut..]]), whole, "cut at {cut}");
        }
        let want: Vec<Result<Value, String>> = vec![Ok(serde_json::json!({"a": 1})), Ok(serde_json::json!({"b": 2})), Ok(serde_json::json!({"c": 3}))];
        assert_eq!(whole, want);
        assert_eq!(parse(&["data: {\"x\":1}"]), [Ok(serde_json::json!({"x": 1}))], "a last event without its blank line");
        // A broken chunk is an error, and ends the stream.
        let broken = parse(&["data: {\"x\":\n\ndata: {\"y\":1}\n\n"]);
        assert_eq!(broken.len(), 1);
        assert!(broken[0].as_ref().unwrap_err().contains("not JSON"), "{broken:?}");
    }
}

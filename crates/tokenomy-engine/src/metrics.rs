//! Counters and gauges of one model's worker, rendered in Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokenomy_core::Usage;

#[derive(Debug, Default)]
pub struct Metrics {
    requests_finished: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    decoded_tokens: AtomicU64,
    queue_depth: AtomicU64,
    running: AtomicU64,
    kv_cells_reserved: AtomicU64,
    kv_cells_cached: AtomicU64,
}

impl Metrics {
    pub fn add_decoded(&self, n: u64) {
        self.decoded_tokens.fetch_add(n, Relaxed);
    }

    pub fn add_finished(&self, usage: &Usage) {
        self.requests_finished.fetch_add(1, Relaxed);
        self.prompt_tokens.fetch_add(usage.prompt_tokens.into(), Relaxed);
        self.cached_tokens.fetch_add(usage.cached_tokens.into(), Relaxed);
        self.completion_tokens.fetch_add(usage.completion_tokens.into(), Relaxed);
    }

    pub fn set_gauges(&self, queue: u64, running: u64, reserved: u64, cached: u64) {
        self.queue_depth.store(queue, Relaxed);
        self.running.store(running, Relaxed);
        self.kv_cells_reserved.store(reserved, Relaxed);
        self.kv_cells_cached.store(cached, Relaxed);
    }

    /// Appends this model's series to `out`.
    pub fn render(&self, model: &str, out: &mut String) {
        let series: [(&str, &str, &AtomicU64, &str); 9] = [
            ("tokenomy_requests_finished_total", "counter", &self.requests_finished, "Generations finished"),
            ("tokenomy_prompt_tokens_total", "counter", &self.prompt_tokens, "Prompt tokens of finished generations"),
            ("tokenomy_prompt_cached_tokens_total", "counter", &self.cached_tokens, "Prompt tokens served from the prefix cache"),
            ("tokenomy_completion_tokens_total", "counter", &self.completion_tokens, "Completion tokens sampled"),
            ("tokenomy_decoded_tokens_total", "counter", &self.decoded_tokens, "Tokens fed to llama_decode"),
            ("tokenomy_queue_depth", "gauge", &self.queue_depth, "Requests waiting for a slot"),
            ("tokenomy_running_sequences", "gauge", &self.running, "Sequences being generated"),
            ("tokenomy_kv_cells_reserved", "gauge", &self.kv_cells_reserved, "KV cells reserved by running and cached sequences"),
            ("tokenomy_kv_cells_cached", "gauge", &self.kv_cells_cached, "KV cells holding cached tokens"),
        ];
        for (name, kind, value, help) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model=\"{model}\"}} {}", value.load(Relaxed));
        }
    }
}

//! Constrained decoding with llguidance (the constraint engine of llama.cpp, vLLM and
//! mistral.rs): a grammar (JSON Schema, or Lark with embedded schemas) becomes a per-token
//! mask, so the output always parses and validates.
//!
//! The vocabulary index (`TokEnv`: a byte trie over every token) is built once per model, on
//! first use, because it walks the whole vocabulary (~0.1–0.5 s for 150k tokens).

use std::sync::{Arc, OnceLock};

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::model::LlamaModel;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use tokenomy_core::{Grammar, TokenId};

/// One model's grammar compiler.
#[derive(Default)]
pub struct Compiler {
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl Compiler {
    fn factory(&self, model: &LlamaModel) -> Result<Arc<ParserFactory>, String> {
        self.factory
            .get_or_init(|| {
                let env = LlamaSampler::llguidance_tok_env(model);
                let mut f = ParserFactory::new_simple(&env).map_err(|e| format!("llguidance: {e}"))?;
                f.quiet();
                Ok(Arc::new(f))
            })
            .clone()
    }

    /// Compiles `g` into a fresh matcher; a schema or grammar llguidance refuses is the caller's error.
    pub fn matcher(&self, model: &LlamaModel, g: &Grammar) -> Result<Constraint, String> {
        let grammar = match g {
            Grammar::JsonSchema(s) => TopLevelGrammar::from_json_schema(tokenomy_core::with_bounded_whitespace(s.clone())),
            Grammar::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
        };
        let parser = self.factory(model)?.create_parser(grammar).map_err(|e| format!("invalid grammar or schema: {e}"))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(format!("invalid grammar or schema: {e}"));
        }
        Ok(Constraint { matcher: m })
    }
}

/// One sequence's constraint state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets the logit of every token the grammar forbids now to −∞ (EOS is allowed only when
    /// the output is complete).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        for (t, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(t as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    pub fn accept(&mut self, token: TokenId) -> Result<(), String> {
        self.matcher.consume_token(token as u32).map_err(|e| e.to_string())
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}

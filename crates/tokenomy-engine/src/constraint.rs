//! Constrained decoding with llguidance (the constraint engine of llama.cpp, vLLM and
//! mistral.rs): a grammar (JSON Schema, or Lark with embedded schemas) becomes a per-token
//! mask, so the output always parses and validates.
//!
//! The vocabulary index (`TokEnv`: a byte trie over every token) is built once per model, on
//! first use, because it walks the whole vocabulary (~0.1–0.5 s for 150k tokens).
//!
//! JSON Schema leaves a number's length unbounded, and a small model will write digits until
//! `max_tokens` (`6000000000000…`), each one billed. llama.cpp's schema grammars cap a number's
//! integral, fraction and exponent parts at 16 digits each; llguidance has no such option, so
//! [`Constraint`] adds it: outside JSON strings, after [`DIGITS_RUN_MAX`] digits in a row, tokens
//! that begin with a digit are masked too, and the grammar's other ways on (`.`, `,`, `}`, …)
//! remain.

use std::sync::{Arc, OnceLock};

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::model::LlamaModel;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use tokenomy_core::{Grammar, GrammarTrigger, TokenId};

/// One model's grammar compiler.
#[derive(Default)]
pub struct Compiler {
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
    /// Per token: whether its text begins with an ASCII digit.
    digit_led: OnceLock<Arc<Vec<bool>>>,
}

/// Digits a constrained output may write in a row outside a JSON string (llama.cpp's grammars
/// allow 16 in each part of a number).
pub const DIGITS_RUN_MAX: u32 = 16;

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
        let parser = self.factory(model)?.create_parser(grammar).map_err(|e| format!("{}{e}", tokenomy_core::INVALID_GRAMMAR_PREFIX))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(format!("{}{e}", tokenomy_core::INVALID_GRAMMAR_PREFIX));
        }
        let factory = self.factory(model)?;
        let digit_led = self
            .digit_led
            .get_or_init(|| {
                let trie = factory.tok_env().tok_trie();
                Arc::new((0..trie.vocab_size() as u32).map(|t| trie.token(t).first().is_some_and(u8::is_ascii_digit)).collect())
            })
            .clone();
        Ok(Constraint { matcher: m, factory, digit_led, digits: JsonDigits::default(), lazy: None })
    }
}

/// Where a JSON text stands for the digit bound: inside a string or not, and the digits just
/// written outside one.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct JsonDigits {
    in_string: bool,
    escaped: bool,
    run: u32,
}

impl JsonDigits {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'0'..=b'9' => self.run += 1,
                b'"' => (self.in_string, self.run) = (true, 0),
                _ => self.run = 0,
            }
        }
    }
}

/// One sequence's constraint state.
pub struct Constraint {
    matcher: Matcher,
    factory: Arc<ParserFactory>,
    digit_led: Arc<Vec<bool>>,
    digits: JsonDigits,
    lazy: Option<Lazy>,
}

/// A grammar that applies only from a trigger on, each time the output reaches one.
struct Lazy {
    triggers: Triggers,
    /// The grammar before its first token, copied for each use.
    pristine: Matcher,
    active: bool,
}

/// A lazy grammar's triggers, and the last tokens written while it is inactive.
#[derive(Default)]
struct Triggers {
    triggers: Vec<GrammarTrigger>,
    recent: std::collections::VecDeque<u32>,
    /// A token with text other than blanks left `recent` (for `TextAtStart`).
    text_dropped: bool,
}

/// Tokens kept to find a text trigger in.
const TRIGGER_TOKENS_MAX: usize = 32;

/// `bytes` without ASCII blanks (text triggers ignore them).
fn unblanked(bytes: &[u8]) -> impl Iterator<Item = u8> + '_ {
    bytes.iter().copied().filter(|b| !b.is_ascii_whitespace())
}

impl Triggers {
    /// The tokens that end the output with a trigger, just after `token` was added.
    fn fired(&mut self, token: u32, trie: &toktrie::TokTrie) -> Option<Vec<u32>> {
        if self.recent.len() == TRIGGER_TOKENS_MAX {
            let gone = self.recent.pop_front().expect("full");
            self.text_dropped |= unblanked(trie.token(gone)).next().is_some();
        }
        self.recent.push_back(token);
        for t in &self.triggers {
            match t {
                GrammarTrigger::Token(id) if *id as u32 == token => return Some(vec![token]),
                GrammarTrigger::Token(_) => {}
                GrammarTrigger::Text(text) | GrammarTrigger::TextAtStart(text) => {
                    let target: Vec<u8> = unblanked(text.as_bytes()).collect();
                    let at_start = matches!(t, GrammarTrigger::TextAtStart(_));
                    if at_start && self.text_dropped {
                        continue;
                    }
                    // The earliest token from which the output, blanks aside, begins with the
                    // trigger, which this token completes.
                    for s in 0..self.recent.len() {
                        let blank_before = self.recent.iter().take(s).all(|&t| unblanked(trie.token(t)).next().is_none());
                        if at_start && !blank_before {
                            break;
                        }
                        let written: Vec<u8> = self.recent.iter().skip(s).flat_map(|&t| unblanked(trie.token(t))).collect();
                        let before: usize = unblanked(trie.token(token)).count();
                        if written.starts_with(&target) && written.len() - before < target.len() {
                            return Some(self.recent.iter().skip(s).copied().collect());
                        }
                    }
                }
            }
        }
        None
    }
}

impl Constraint {
    /// Makes the constraint lazy when `triggers` are given (see `SamplingParams::grammar_triggers`).
    pub fn lazy(mut self, triggers: &[GrammarTrigger]) -> Constraint {
        if !triggers.is_empty() {
            let pristine = self.matcher.deep_clone();
            self.lazy = Some(Lazy { triggers: Triggers { triggers: triggers.to_vec(), ..Default::default() }, pristine, active: false });
        }
        self
    }

    /// Sets the logit of every token the grammar forbids now to −∞ (EOS is allowed only when
    /// the output is complete).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        if self.lazy.as_ref().is_some_and(|l| !l.active) {
            return Ok(());
        }
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        for (t, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(t as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        if self.digits.run >= DIGITS_RUN_MAX {
            bound_digits(logits, &self.digit_led);
        }
        Ok(())
    }

    pub fn accept(&mut self, token: TokenId) -> Result<(), String> {
        if let Some(l) = &mut self.lazy {
            if !l.active {
                let Some(tokens) = l.triggers.fired(token as u32, self.factory.tok_env().tok_trie()) else { return Ok(()) };
                (self.matcher, self.digits) = (l.pristine.deep_clone(), JsonDigits::default());
                (l.triggers.recent, l.triggers.text_dropped) = (Default::default(), false);
                // A trigger the grammar cannot begin with as written (a tag spelled with other
                // blanks around it) leaves that call unconstrained rather than failing the answer.
                l.active = self.matcher.consume_tokens(&tokens).is_ok() && !self.matcher.is_stopped();
                return Ok(());
            }
        }
        self.matcher.consume_token(token as u32).map_err(|e| e.to_string())?;
        if let Some(l) = &mut self.lazy {
            // Complete: free text again, until the next trigger.
            l.active = !self.matcher.is_stopped();
        }
        let bytes = self.factory.tok_env().tok_trie().token(token as u32);
        // (A special token's bytes start with 0xFF: not JSON text.)
        if bytes.first() != Some(&0xFF) {
            self.digits.push(bytes);
        }
        Ok(())
    }

    /// The grammar is complete and allows nothing more (never, for a lazy one: the text goes
    /// on after each use).
    pub fn is_done(&self) -> bool {
        self.lazy.is_none() && self.matcher.is_stopped()
    }
}

/// Masks the tokens that begin with a digit, unless nothing else is allowed (a grammar that
/// wants more digits gets them: the bound never leaves a sequence without a token).
fn bound_digits(logits: &mut [f32], digit_led: &[bool]) {
    let other = logits.iter().zip(digit_led).any(|(l, &d)| !d && *l > f32::NEG_INFINITY);
    if other {
        for (l, _) in logits.iter_mut().zip(digit_led).filter(|(_, &d)| d) {
            *l = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_count_outside_strings_only() {
        let mut d = JsonDigits::default();
        d.push(br#"{"id": "12345678901234567890", "n": 1234"#);
        assert_eq!((d.in_string, d.run), (false, 4));
        d.push(br#"5.6"#);
        assert_eq!(d.run, 1, "a point starts the fraction's count");
        d.push(br#", "s": "a\"9"#);
        assert!(d.in_string, "an escaped quote does not end the string");
        assert_eq!(d.run, 0);
    }

    /// A text trigger fires on the token that completes it, blanks aside, and hands over the
    /// tokens it spans; a token trigger fires on its token.
    #[test]
    fn triggers_fire_on_the_token_that_completes_them() {
        let words: Vec<Vec<u8>> = ["```", "json", "\n", "{\n", " ", " \"", "name", "\":", "f", "\"", "hello", "<t>"].iter().map(|w| w.as_bytes().to_vec()).collect();
        let trie = toktrie::TokTrie::from(&toktrie::TokRxInfo::new(words.len() as u32, 0), &words);
        let lazy = |triggers: Vec<GrammarTrigger>| Triggers { triggers, recent: Default::default(), text_dropped: false };
        let mut l = lazy(vec![GrammarTrigger::Text("```json{\"name\":\"f\"".into()), GrammarTrigger::Token(11)]);
        // hello ``` json \n {\n ␠ ␠" name ": ␠" f "
        let out = [10, 0, 1, 2, 3, 4, 5, 6, 7, 4, 9, 8];
        let fired: Vec<Option<Vec<u32>>> = out.iter().map(|&t| l.fired(t, &trie)).collect();
        assert!(fired[..out.len() - 1].iter().all(Option::is_none), "{fired:?}");
        assert_eq!(fired.last().unwrap().clone(), None, "`f` alone does not close the name's quote");
        assert_eq!(l.fired(9, &trie), Some(vec![0, 1, 2, 3, 4, 5, 6, 7, 4, 9, 8, 9]), "the closing quote completes it, from the fence on");
        let mut t = lazy(vec![GrammarTrigger::Token(11)]);
        assert_eq!((t.fired(10, &trie), t.fired(11, &trie)), (None, Some(vec![11])));
        // A bare object fires only where nothing but blanks came before it.
        let bare = || lazy(vec![GrammarTrigger::TextAtStart("{\"name\":\"f\"".into())]);
        let object = [3, 4, 5, 6, 7, 4, 9, 8, 9]; // {\n ␠ ␠" name ": ␠ " f "
        let (mut first, mut later) = (bare(), bare());
        let fired: Vec<_> = [2].iter().chain(&object).map(|&t| first.fired(t, &trie)).collect();
        assert_eq!(fired.last().unwrap().clone(), Some(vec![2, 3, 4, 5, 6, 7, 4, 9, 8, 9]));
        let fired: Vec<_> = [10].iter().chain(&object).map(|&t| later.fired(t, &trie)).collect();
        assert!(fired.iter().all(Option::is_none), "after `hello`: {fired:?}");
    }

    #[test]
    fn the_bound_masks_digits_only_when_something_else_is_allowed() {
        let digit_led = [true, false, true];
        let mut l = [1.0, 2.0, 3.0];
        bound_digits(&mut l, &digit_led);
        assert_eq!(l, [f32::NEG_INFINITY, 2.0, f32::NEG_INFINITY]);
        let mut only_digits = [1.0, f32::NEG_INFINITY, 3.0];
        bound_digits(&mut only_digits, &digit_led);
        assert_eq!(only_digits, [1.0, f32::NEG_INFINITY, 3.0]);
    }
}

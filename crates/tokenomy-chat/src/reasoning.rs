//! Splitting `<think>…</think>` reasoning from the answer, chunk by chunk.
//!
//! R1 distills' templates end the prompt with `<think>\n`, so the model never writes the
//! opening tag and everything up to `</think>` is reasoning ([`Start::InReasoning`]); other
//! models may open the block themselves ([`Start::Detect`]: a `<think>` at the very start of
//! the output, after whitespace). Tags split across chunks are held back until they can be
//! decided, and an unclosed block stays reasoning: reasoning text never reaches `content`.

pub const OPEN: &str = "<think>";
pub const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The prompt opened the block (it ends with `<think>`); an opening tag is tolerated.
    InReasoning,
    /// Reasoning only if the output starts with `<think>`.
    Detect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting to see whether the output opens with `<think>` (leading whitespace skipped).
    Opening { required: bool },
    Reasoning,
    /// After `</think>`: leading whitespace of the answer is dropped.
    AnswerStart,
    Answer,
}

/// What one chunk added to each side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    state: State,
    held: String,
}

impl ReasoningSplitter {
    pub fn new(start: Start) -> Self {
        let state = match start {
            Start::InReasoning => State::Opening { required: false },
            Start::Detect => State::Opening { required: true },
        };
        ReasoningSplitter { state, held: String::new() }
    }

    /// Whether text pushed now would be reasoning (for counting reasoning tokens).
    pub fn in_reasoning(&self) -> bool {
        matches!(self.state, State::Reasoning | State::Opening { required: false })
    }

    pub fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            let before = (self.state, self.held.len());
            self.step(&mut out, false);
            if (self.state, self.held.len()) == before {
                return out;
            }
        }
    }

    /// Flushes what was held back at the end of the output.
    pub fn finish(&mut self) -> Split {
        let mut out = Split::default();
        self.step(&mut out, true);
        if !self.held.is_empty() {
            let rest = std::mem::take(&mut self.held);
            match self.state {
                State::Reasoning | State::Opening { required: false } => out.reasoning.push_str(&rest),
                _ => out.content.push_str(rest.trim_start_matches(|c: char| self.state == State::AnswerStart && c.is_whitespace())),
            }
        }
        out
    }

    fn step(&mut self, out: &mut Split, end: bool) {
        match self.state {
            State::Opening { required } => {
                let t = self.held.trim_start();
                if let Some(rest) = t.strip_prefix(OPEN) {
                    self.held = rest.to_string();
                    self.state = State::Reasoning;
                } else if !end && OPEN.starts_with(t) {
                    // undecided: maybe the start of `<think>`
                } else if required {
                    self.state = State::Answer;
                } else {
                    self.state = State::Reasoning;
                }
            }
            State::Reasoning => match self.held.find(CLOSE) {
                Some(i) => {
                    out.reasoning.push_str(&self.held[..i]);
                    self.held.drain(..i + CLOSE.len());
                    self.state = State::AnswerStart;
                }
                None => {
                    let keep = if end { 0 } else { partial_suffix(&self.held, CLOSE) };
                    let emit = self.held.len() - keep;
                    out.reasoning.push_str(&self.held[..emit]);
                    self.held.drain(..emit);
                }
            },
            State::AnswerStart => {
                let trimmed = self.held.trim_start().len();
                self.held.drain(..self.held.len() - trimmed);
                if !self.held.is_empty() {
                    self.state = State::Answer;
                }
            }
            State::Answer => {
                out.content.push_str(&self.held);
                self.held.clear();
            }
        }
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag` (on char boundaries).
fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

/// Splits a complete output at once.
pub fn split(text: &str, start: Start) -> Split {
    let mut s = ReasoningSplitter::new(start);
    let mut a = s.push(text);
    let b = s.finish();
    a.reasoning.push_str(&b.reasoning);
    a.content.push_str(&b.content);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outputs in the shape R1 distills write them (the prompt opened the block).
    const R1_NO_OPEN: &str = "Okay, the user asks for 2+2. That is 4.\n</think>\n\nThe answer is **4**.";
    const R1_WITH_OPEN: &str = "<think>\nLet me think: 3 × 3 = 9.\n</think>\n\n9";
    const PLAIN: &str = "Paris is the capital of France.";

    fn chunked(text: &str, start: Start, cuts: &[usize]) -> Split {
        let mut s = ReasoningSplitter::new(start);
        let mut out = Split::default();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&text.len())) {
            let c = (0..=c.min(text.len())).rev().find(|&i| text.is_char_boundary(i)).unwrap().max(prev);
            let piece = s.push(&text[prev..c]);
            out.reasoning.push_str(&piece.reasoning);
            out.content.push_str(&piece.content);
            prev = c;
        }
        let last = s.finish();
        out.reasoning.push_str(&last.reasoning);
        out.content.push_str(&last.content);
        out
    }

    #[test]
    fn recorded_outputs_split_the_same_at_every_chunk_boundary() {
        let cases = [
            (R1_NO_OPEN, Start::InReasoning, "Okay, the user asks for 2+2. That is 4.\n", "The answer is **4**."),
            (R1_WITH_OPEN, Start::InReasoning, "\nLet me think: 3 × 3 = 9.\n", "9"),
            (R1_WITH_OPEN, Start::Detect, "\nLet me think: 3 × 3 = 9.\n", "9"),
            (PLAIN, Start::Detect, "", PLAIN),
        ];
        for (text, start, reasoning, content) in cases {
            let want = Split { reasoning: reasoning.into(), content: content.into() };
            assert_eq!(split(text, start), want, "{text:?}");
            for a in 0..=text.len() {
                for b in (a..=text.len()).step_by(3) {
                    assert_eq!(chunked(text, start, &[a, b]), want, "{text:?} cut at {a}, {b}");
                }
            }
            // one byte (char) at a time
            let cuts: Vec<usize> = (0..text.len()).collect();
            assert_eq!(chunked(text, start, &cuts), want);
        }
    }

    #[test]
    fn an_unclosed_block_is_all_reasoning_never_content() {
        let s = split("I am still thinking about </thi", Start::InReasoning);
        assert_eq!(s.content, "");
        assert_eq!(s.reasoning, "I am still thinking about </thi");
        let s = split("<think>half a thought", Start::Detect);
        assert_eq!((s.reasoning.as_str(), s.content.as_str()), ("half a thought", ""));
    }

    #[test]
    fn in_reasoning_tracks_the_block_for_token_counting() {
        let mut s = ReasoningSplitter::new(Start::InReasoning);
        assert!(s.in_reasoning());
        s.push("thinking");
        assert!(s.in_reasoning());
        s.push("</think>");
        assert!(!s.in_reasoning());
        let mut d = ReasoningSplitter::new(Start::Detect);
        assert!(!d.in_reasoning());
        d.push("<think>");
        assert!(d.in_reasoning());
    }

    #[test]
    fn a_detect_model_that_does_not_think_streams_at_once() {
        let mut s = ReasoningSplitter::new(Start::Detect);
        assert_eq!(s.push("Hello").content, "Hello");
        assert_eq!(s.push(" <think> is just text here").content, " <think> is just text here");
    }
}

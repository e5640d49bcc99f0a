//! Turning sampled token bytes into text a client may see.
//!
//! Tokens are byte pieces: a multi-byte UTF-8 character can span tokens, and a stop string can
//! span tokens. [`TextStream`] holds back both until they are resolved, so a streamed delta is
//! always valid UTF-8 and never contains (a prefix of) a stop string that later matches.

/// Incremental decoder with stop-string detection.
#[derive(Debug, Default)]
pub struct TextStream {
    stops: Vec<String>,
    /// Bytes of an incomplete UTF-8 sequence.
    partial: Vec<u8>,
    /// Decoded text not yet released (it could be the start of a stop string).
    held: String,
    stopped: bool,
    /// The stop string that matched, once one has.
    matched: Option<usize>,
}

/// What one push released.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop string matched: `text` ends right before it and generation must stop.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> TextStream {
        TextStream { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), ..Default::default() }
    }

    pub fn push(&mut self, bytes: &[u8]) -> Released {
        assert!(!self.stopped, "push after a stop string matched");
        self.partial.extend_from_slice(bytes);
        let ready_len = utf8_ready_len(&self.partial);
        self.held.push_str(&String::from_utf8_lossy(&self.partial[..ready_len]));
        self.partial.drain(..ready_len);
        self.release()
    }

    /// Releases whatever is held (incomplete UTF-8 is replaced lossily).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let tail = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        self.held.push_str(&tail);
        std::mem::take(&mut self.held)
    }

    fn release(&mut self) -> Released {
        if let Some((at, which)) = self.earliest_stop() {
            self.matched = Some(which);
            self.held.truncate(at);
            self.stopped = true;
            return Released { text: std::mem::take(&mut self.held), stopped: true };
        }
        let keep = self.longest_stop_prefix_suffix();
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released { text, stopped: false }
    }

    /// Where the earliest stop string starts in `held`, and which one it is.
    fn earliest_stop(&self) -> Option<(usize, usize)> {
        self.stops.iter().enumerate().filter_map(|(i, s)| Some((self.held.find(s.as_str())?, i))).min()
    }

    /// The stop string that ended the text, if one did.
    pub fn matched_stop(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            for len in (1..stop.len()).rev() {
                if len <= best || !stop.is_char_boundary(len) {
                    continue;
                }
                if self.held.ends_with(&stop[..len]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

/// How many leading bytes can be decoded now: all but a trailing incomplete UTF-8 sequence.
/// Invalid bytes in the middle are decoded (lossily, as U+FFFD) rather than held forever.
fn utf8_ready_len(bytes: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match std::str::from_utf8(&bytes[at..]) {
            Ok(_) => return bytes.len(),
            Err(e) => match e.error_len() {
                None => return at + e.valid_up_to(),
                Some(bad) => at += e.valid_up_to() + bad,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_characters_wait_for_all_their_bytes() {
        let mut t = TextStream::new(vec![]);
        let euro = "€".as_bytes();
        assert_eq!(t.push(&euro[..1]).text, "");
        assert_eq!(t.push(&euro[1..]).text, "€");
    }

    #[test]
    fn the_earliest_stop_string_is_the_one_named() {
        let mut t = TextStream::new(vec!["zz".into(), "b".into(), "a".into()]);
        assert_eq!(t.matched_stop(), None);
        assert_eq!(t.push(b"xxbyya").text, "xx");
        assert_eq!(t.matched_stop(), Some("b"));
    }

    #[test]
    fn stop_string_across_tokens_is_cut() {
        let mut t = TextStream::new(vec!["END".into()]);
        assert_eq!(t.push(b"hello E").text, "hello ");
        assert_eq!(t.push(b"N").text, "");
        let r = t.push(b"D and more");
        assert_eq!(r, Released { text: String::new(), stopped: true });
    }

    #[test]
    fn false_start_of_stop_string_is_released() {
        let mut t = TextStream::new(vec!["END".into()]);
        assert_eq!(t.push(b"E").text, "");
        assert_eq!(t.push(b"X").text, "EX");
        assert_eq!(t.finish(), "");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut t = TextStream::new(vec!["b".into(), "a".into()]);
        let r = t.push(b"xxab");
        assert_eq!(r, Released { text: "xx".into(), stopped: true });
    }

    #[test]
    fn finish_flushes_held_text() {
        let mut t = TextStream::new(vec!["STOP".into()]);
        assert_eq!(t.push(b"go ST").text, "go ");
        assert_eq!(t.finish(), "ST");
    }

    #[test]
    fn invalid_bytes_do_not_block_the_stream() {
        let mut t = TextStream::new(vec![]);
        assert_eq!(t.push(&[b'a', 0xff, b'b']).text, "a\u{fffd}b");
    }
}

//! Streams whose every byte says where it belongs: each 8-byte word of the
//! payload is its own index, mixed with a key. A receiver checks the stream
//! as it arrives and, at the first wrong byte, says which offset of the
//! payload it got instead: a replay of the last N bytes, a gap, or garbage.
//! A SHA-256 says only that a transfer was wrong; this says how.

use std::fmt;

/// The payload of one direction: `len` bytes under `key`.
#[derive(Debug, Clone, Copy)]
pub struct PositionalPayload {
    pub key: u64,
    pub len: u64,
}

impl PositionalPayload {
    /// The byte at `offset`.
    #[must_use]
    pub fn byte_at(self, offset: u64) -> u8 {
        self.word(offset / 8)[(offset % 8) as usize]
    }

    fn word(self, index: u64) -> [u8; 8] {
        (index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.key).to_le_bytes()
    }

    /// The word index a word's bytes encode (the inverse of [`Self::word`]).
    fn index_of(self, word: [u8; 8]) -> u64 {
        // 0x9E37_79B9_7F4A_7C15 is odd, so it has an inverse modulo 2^64.
        (u64::from_le_bytes(word) ^ self.key).wrapping_mul(MULTIPLIER_INVERSE)
    }

    /// Fills `buf` with the payload from `offset`; returns how many bytes (0 at the end).
    pub fn fill(self, offset: u64, buf: &mut [u8]) -> usize {
        let n = usize::try_from(self.len.saturating_sub(offset)).unwrap_or(usize::MAX).min(buf.len());
        let head = ((8 - offset % 8) % 8).min(n as u64) as usize;
        for (i, byte) in buf[..head].iter_mut().enumerate() {
            *byte = self.byte_at(offset + i as u64);
        }
        let mut index = (offset + head as u64) / 8;
        let mut words = buf[head..n].chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.word(index));
            index += 1;
        }
        let tail = words.into_remainder();
        let last = self.word(index);
        let tail_len = tail.len();
        tail.copy_from_slice(&last[..tail_len]);
        n
    }
}

/// The inverse of the payload's multiplier modulo 2^64.
const MULTIPLIER_INVERSE: u64 = {
    // Newton's iteration: each step doubles the correct low bits.
    let a: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut x = a;
    let mut i = 0;
    while i < 6 {
        x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
        i += 1;
    }
    x
};

/// The first wrong byte of a received stream, and what came instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// Offset in the stream of the first byte that differs.
    pub at: u64,
    /// The payload offset the received bytes from `at` came from, when they
    /// are a stretch of the payload (at least [`MATCH_LEN`] bytes in order).
    pub source: Option<u64>,
    /// Bytes received in all (once the stream ended).
    pub received: u64,
}

/// Bytes that must match in order before a stretch is called a copy of the payload.
pub const MATCH_LEN: usize = 64;

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "first wrong byte at offset {}", self.at)?;
        match self.source {
            Some(source) if source < self.at => {
                write!(f, ": a replay of the {} bytes before it (from offset {source})", self.at - source)
            }
            Some(source) => {
                write!(f, ": {} bytes missing (continues from offset {source})", source - self.at)
            }
            None => write!(f, ": bytes that are not the payload"),
        }?;
        write!(f, "; {} bytes received", self.received)
    }
}

/// Checks a stream against its payload as it arrives.
#[derive(Debug)]
pub struct StreamChecker {
    payload: PositionalPayload,
    received: u64,
    divergence: Option<Divergence>,
    /// After a divergence: bytes kept from it to find their source.
    evidence: Vec<u8>,
    /// What the next bytes should be (reused from one update to the next).
    expected: Vec<u8>,
}

impl StreamChecker {
    #[must_use]
    pub fn new(payload: PositionalPayload) -> Self {
        Self { payload, received: 0, divergence: None, evidence: Vec::new(), expected: Vec::new() }
    }

    /// Checks the next bytes of the stream.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        if self.divergence.is_none() {
            self.expected.resize(rest.len(), 0);
            let n = self.payload.fill(self.received, &mut self.expected);
            let good = if n == rest.len() && self.expected[..] == *rest {
                n
            } else {
                rest.iter().zip(&self.expected[..n]).take_while(|(got, want)| got == want).count()
            };
            self.received += good as u64;
            rest = &rest[good..];
            if rest.is_empty() {
                return;
            }
            self.divergence = Some(Divergence { at: self.received, source: None, received: 0 });
        }
        let keep = (2 * MATCH_LEN).saturating_sub(self.evidence.len()).min(rest.len());
        self.evidence.extend_from_slice(&rest[..keep]);
        self.received += rest.len() as u64;
    }

    /// The whole stream has arrived: `Ok(bytes)` when it is exactly the payload.
    pub fn finish(mut self) -> Result<u64, Divergence> {
        if let Some(mut divergence) = self.divergence.take() {
            divergence.received = self.received;
            divergence.source = self.source_of_evidence();
            return Err(divergence);
        }
        if self.received == self.payload.len {
            Ok(self.received)
        } else {
            Err(Divergence { at: self.received, source: None, received: self.received })
        }
    }

    /// The payload offset the bytes kept after the divergence came from.
    fn source_of_evidence(&self) -> Option<u64> {
        if self.evidence.len() < MATCH_LEN + 8 {
            return None;
        }
        (0..8).find_map(|shift| {
            let word: [u8; 8] = self.evidence[shift..shift + 8].try_into().ok()?;
            let source = self.payload.index_of(word).checked_mul(8)?.checked_sub(shift as u64)?;
            let matches = self.evidence[..MATCH_LEN].iter().enumerate().all(|(i, b)| {
                source + (i as u64) < self.payload.len && *b == self.payload.byte_at(source + i as u64)
            });
            matches.then_some(source)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAYLOAD: PositionalPayload = PositionalPayload { key: 0xfeed, len: 1 << 20 };

    /// The payload's bytes over `(start, end)` ranges, one after another.
    fn stream(ranges: &[(u64, u64)]) -> Vec<u8> {
        ranges.iter().flat_map(|&(start, end)| (start..end).map(|o| PAYLOAD.byte_at(o))).collect()
    }

    fn check(bytes: &[u8], chunk: usize) -> Result<u64, Divergence> {
        let mut checker = StreamChecker::new(PAYLOAD);
        for piece in bytes.chunks(chunk) {
            checker.update(piece);
        }
        checker.finish()
    }

    #[test]
    fn the_whole_payload_passes_whatever_the_chunking() {
        let whole = stream(&[(0, PAYLOAD.len)]);
        for start in [0, 1, 5, 8, 1001] {
            let mut filled = vec![0u8; whole.len()];
            assert_eq!(PAYLOAD.fill(start, &mut filled), whole.len() - start as usize);
            assert_eq!(filled[..whole.len() - start as usize], whole[start as usize..]);
        }
        for chunk in [1, 7, 4096, 1 << 20] {
            assert_eq!(check(&whole, chunk), Ok(PAYLOAD.len));
        }
    }

    #[test]
    fn a_replay_is_found_with_its_length_at_any_alignment() {
        for (at, replayed) in [(160_061, 65_372), (100_003, 17), (8, 8), (500_001, 4096)] {
            let bytes = stream(&[(0, at), (at - replayed, PAYLOAD.len)]);
            let divergence = check(&bytes, 65_536).expect_err("a replay passed");
            assert_eq!(divergence.at, at);
            assert_eq!(divergence.source, Some(at - replayed));
            assert_eq!(divergence.received, PAYLOAD.len + replayed);
            assert!(
                divergence.to_string().contains(&format!("a replay of the {replayed} bytes")),
                "{divergence}"
            );
        }
    }

    #[test]
    fn a_gap_a_short_stream_and_garbage_are_told_apart() {
        let gap = check(&stream(&[(0, 1000), (5000, PAYLOAD.len)]), 333).expect_err("a gap passed");
        assert_eq!((gap.at, gap.source), (1000, Some(5000)));
        assert!(gap.to_string().contains("4000 bytes missing"), "{gap}");

        let short = check(&stream(&[(0, PAYLOAD.len - 1)]), 4096).expect_err("a short stream passed");
        assert_eq!((short.at, short.source), (PAYLOAD.len - 1, None));

        let mut garbage = stream(&[(0, PAYLOAD.len)]);
        garbage[777..777 + 200].fill(0);
        let garbage = check(&garbage, 4096).expect_err("garbage passed");
        assert_eq!((garbage.at, garbage.source), (777, None));
    }
}

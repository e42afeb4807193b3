//! A small mutator for the brief, stable run in `make test`: byte flips, inserts, deletes,
//! repeats and splices of tokens the parsers care about, from a seeded generator so a
//! failure is reproduced by its seed. libFuzzer (`make fuzz`) explores far more; this
//! catches regressions on every test run.

pub use sluice_placement::Rng;

/// Tokens that reach interesting branches of the parsers: units, separators, numbers at
/// the edges of their types, JSON and exposition-format syntax, multi-byte UTF-8.
const TOKENS: &[&[u8]] = &[
    b"ms",
    b"s",
    b"m",
    b"h",
    b"0",
    b"1",
    b"-",
    b"+",
    b".",
    b"e308",
    b"NaN",
    b"inf",
    b"+Inf",
    b"18446744073709551616",
    b"340282366920938463463374607431768211456",
    b"4294967295",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"=",
    b" ",
    b"\n",
    b"\t",
    b"#",
    b"null",
    b"true",
    b"le=",
    b"code=\"5",
    b"_total",
    b"_bucket",
    b"connection",
    b"te",
    b"trailers",
    b"upgrade",
    b"keep-alive",
    b"\xc3\xa9",
    b"\xe2\x82\xac",
    b"\xff",
];

/// One mutation of `input` (which may be empty), up to `max_len` bytes long.
pub fn mutate(rng: &mut Rng, input: &[u8], max_len: usize) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = if out.is_empty() {
            0
        } else {
            rng.below(out.len() + 1)
        };
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(out.len());
                out.drain(at.min(end)..end);
            }
            2 => {
                let b = rng.next_u64() as u8;
                out.insert(at, b);
            }
            3 if !out.is_empty() => {
                // Repeat a slice: long numbers, deep nesting, many lines.
                let start = rng.below(out.len());
                let end = (start + 1 + rng.below(16)).min(out.len());
                let piece = out[start..end].to_vec();
                for _ in 0..1 + rng.below(8) {
                    out.splice(at..at, piece.iter().copied());
                }
            }
            _ => {
                let token = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
        }
    }
    out.truncate(max_len);
    out
}

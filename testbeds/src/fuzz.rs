//! Inputs for hostile-input tests: mutations of valid inputs (byte flips,
//! inserted tokens, cut and repeated ranges, spliced seeds) and plain
//! garbage, as a proptest strategy.

use proptest::prelude::*;

/// Tokens that tend to reach the corners of the parsers.
const TOKENS: &[&str] = &[
    "\"",
    "'",
    "=",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    ",",
    ":",
    "\n",
    "\0",
    "\\",
    "/",
    "..",
    "../",
    "-",
    "-1",
    "0",
    "1e309",
    "NaN",
    "inf",
    "18446744073709551616",
    "9223372036854775808",
    "4294967296",
    "0x10",
    "1.",
    ".5",
    "mbit",
    "gbit",
    "tbit",
    "bps",
    "MiB",
    "GiB",
    "TiB",
    "K",
    "/s",
    "é",
    "\u{202e}",
    "🦀",
    " ",
    "\t",
    "true",
    "null",
    "#",
];

/// An input mutated from one of `seeds`, or garbage.
pub fn mutated(seeds: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let edit = (any::<usize>(), 0u8..6, any::<usize>(), any::<u8>());
    let from_seed =
        (0..seeds.len(), prop::collection::vec(edit, 0..10)).prop_map(move |(seed, edits)| {
            let mut b = seeds[seed].as_bytes().to_vec();
            for (pos, kind, arg, byte) in edits {
                let at = if b.is_empty() { 0 } else { pos % (b.len() + 1) };
                match kind {
                    0 if at < b.len() => b[at] ^= 1 << (byte % 8),
                    1 => {
                        let t = TOKENS[arg % TOKENS.len()].as_bytes();
                        b.splice(at..at, t.iter().copied());
                    }
                    2 => {
                        let end = (at + arg % 16).min(b.len());
                        b.drain(at..end);
                    }
                    3 => {
                        let end = (at + arg % 32).min(b.len());
                        let range: Vec<u8> = b[at..end].to_vec();
                        b.splice(at..at, range);
                    }
                    4 => {
                        let other = seeds[arg % seeds.len()].as_bytes();
                        let from = byte as usize % (other.len() + 1);
                        b.truncate(at);
                        b.extend_from_slice(&other[from..]);
                    }
                    _ => b.insert(at.min(b.len()), byte),
                }
            }
            b
        });
    prop_oneof![
        8 => from_seed,
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => "\\PC{0,128}".prop_map(String::into_bytes),
    ]
}

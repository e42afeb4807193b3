#![no_main]
//! Duration flags (`500ms`, `2s`, `1m`) must parse or fail cleanly.
use libfuzzer_sys::fuzz_target;
use sluice_agent::config::parse_duration;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_duration(s);
    }
});

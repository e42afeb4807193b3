#![no_main]
//! The procfs parsers must never panic, whatever the bytes, and what they return must be
//! consistent with the input.
use libfuzzer_sys::fuzz_target;
use sluice_agent::procfs::{parse_snmp, parse_tcp_line, parse_tcp_table, passive_opens, port_view};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let table = parse_tcp_table(text);
    assert!(table.len() <= text.lines().count());
    for line in text.lines() {
        let _ = parse_tcp_line(line);
    }
    if let Some(first) = table.first() {
        let view = port_view(&table, first.local.port());
        assert!(view.established.len() <= table.len());
    }
    let _ = passive_opens(&parse_snmp(text));
});

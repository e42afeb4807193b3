#![no_main]
//! The agent's own handling of untrusted request headers (hop-by-hop stripping, `TE:
//! trailers`, upgrade detection) must never panic, and what it forwards must carry no
//! hop-by-hop header but `TE: trailers`.
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use sluice_agent::proxy_http::{requested_upgrade, strip_hop_by_hop, strip_hop_by_hop_keep_te_trailers};

fuzz_target!(|data: &[u8]| {
    // One header per line, `name:value`.
    let mut h = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(i) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..i]),
            HeaderValue::from_bytes(&line[i + 1..]),
        ) {
            h.append(n, v);
        }
    }
    let _ = requested_upgrade(&h);
    let mut req = h.clone();
    strip_hop_by_hop_keep_te_trailers(&mut req);
    for n in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"] {
        assert!(!req.contains_key(n), "{n} forwarded");
    }
    if let Some(te) = req.get("te") {
        assert_eq!(te, "trailers");
    }
    let mut resp = h;
    strip_hop_by_hop(&mut resp);
    assert!(!resp.contains_key("te") && !resp.contains_key("connection"));
});

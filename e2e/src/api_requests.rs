//! Requests the API server served during a window, by verb and resource, read from its own
//! `apiserver_request_total` counter: what a release asks of the control plane, measured
//! by the control plane and not by the client that asked.

use std::collections::BTreeMap;

use kube::Client;

/// `apiserver_request_total` summed by "VERB resource[/subresource]".
pub fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |name: &str| {
            let key = format!("{name}=\"");
            labels.split(',').find_map(|kv| {
                kv.strip_prefix(&key)
                    .and_then(|v| v.strip_suffix('"'))
                    .map(str::to_string)
            })
        };
        let (Some(verb), Some(resource)) = (label("verb"), label("resource")) else {
            continue;
        };
        let key = match label("subresource").filter(|s| !s.is_empty()) {
            Some(sub) => format!("{verb} {resource}/{sub}"),
            None => format!("{verb} {resource}"),
        };
        *out.entry(key).or_insert(0.0) += value;
    }
    out
}

/// `after - before`, only what grew.
pub fn delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d >= 1.0).then(|| (k.clone(), d.round() as u64))
        })
        .collect()
}

/// The API server's counts now; empty when it cannot be read (the report then says
/// nothing rather than something wrong).
pub async fn read(client: &Client) -> BTreeMap<String, f64> {
    let req = match http::Request::get("/metrics").body(Vec::new()) {
        Ok(r) => r,
        Err(_) => return BTreeMap::new(),
    };
    match client.request_text(req).await {
        Ok(text) => parse(&text),
        Err(e) => {
            tracing::warn!(error = %e, "reading the API server's /metrics");
            BTreeMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_by_verb_and_resource_and_subtracts() {
        let before = parse(
            r#"# HELP apiserver_request_total [STABLE] Counter of apiserver requests
# TYPE apiserver_request_total counter
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="",verb="LIST",version="v1"} 10
apiserver_request_total{code="404",component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="",verb="LIST",version="v1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="sluice.dev",resource="releases",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 5
apiserver_request_duration_seconds_count{verb="LIST",resource="pods"} 99
"#,
        );
        assert_eq!(before["LIST pods"], 12.0);
        assert_eq!(before["APPLY releases/status"], 5.0);
        assert_eq!(before.len(), 2);
        let mut after = before.clone();
        *after.get_mut("LIST pods").unwrap() += 30.0;
        after.insert("GET deployments".into(), 4.0);
        let d = delta(&before, &after);
        assert_eq!(d["LIST pods"], 30);
        assert_eq!(d["GET deployments"], 4);
        assert!(!d.contains_key("APPLY releases/status"));
    }
}

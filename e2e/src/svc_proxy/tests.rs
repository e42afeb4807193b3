use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::discovery::v1::{
    Endpoint as K8sEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};

use super::*;

fn ep(ip: [u8; 4], ready: bool, serving: bool, terminating: bool) -> Endpoint {
    Endpoint {
        ip: Ipv4Addr::from(ip),
        ports: BTreeMap::from([("http".to_string(), 8080)]),
        ready,
        serving,
        terminating,
        pod: None,
    }
}

#[test]
fn picks_ready_endpoints_round_robin() {
    let eps = vec![
        ep([10, 245, 0, 2], true, true, false),
        ep([10, 245, 0, 3], false, true, true),
        ep([10, 245, 0, 4], true, true, false),
    ];
    let picked: Vec<_> = (0..4).map(|i| pick(&eps, "http", i).unwrap()).collect();
    assert_eq!(picked[0], "10.245.0.2:8080".parse().unwrap());
    assert_eq!(picked[1], "10.245.0.4:8080".parse().unwrap());
    assert_eq!(picked[2], picked[0]);
    assert_eq!(picked[3], picked[1]);
}

#[test]
fn falls_back_to_serving_terminating_only_when_none_ready() {
    let eps = vec![
        ep([10, 245, 0, 3], false, true, true),
        ep([10, 245, 0, 5], false, false, true),
        ep([10, 245, 0, 6], false, false, false),
    ];
    for i in 0..5 {
        assert_eq!(
            pick(&eps, "http", i),
            Some("10.245.0.3:8080".parse().unwrap())
        );
    }
    let none_serving = vec![ep([10, 245, 0, 5], false, false, true)];
    assert_eq!(pick(&none_serving, "http", 0), None);
    assert_eq!(pick(&[], "http", 0), None);
    // An endpoint without the port is never picked.
    assert_eq!(
        pick(&[ep([10, 245, 0, 2], true, true, false)], "grpc", 0),
        None
    );
}

#[test]
fn slice_conditions_follow_api_defaults() {
    let slice = EndpointSlice {
        address_type: "IPv4".into(),
        endpoints: vec![
            K8sEndpoint {
                addresses: vec!["10.245.0.2".into()],
                conditions: None,
                ..Default::default()
            },
            K8sEndpoint {
                addresses: vec!["10.245.0.3".into()],
                conditions: Some(EndpointConditions {
                    ready: Some(false),
                    serving: None,
                    terminating: Some(true),
                }),
                ..Default::default()
            },
        ],
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let eps = endpoints_of([&slice]);
    assert_eq!(eps.len(), 2);
    assert!(eps[0].ready && eps[0].serving && !eps[0].terminating);
    assert!(!eps[1].ready && !eps[1].serving && eps[1].terminating);
    assert_eq!(eps[0].ports["http"], 8080);
    let v6 = EndpointSlice {
        address_type: "IPv6".into(),
        ..slice.clone()
    };
    assert!(endpoints_of([&v6]).is_empty());
}

#[test]
fn addresses_are_stable_loopback_outside_127_0() {
    let a = derive_address("", "default/echo", 0);
    assert_eq!(a, derive_address("", "default/echo", 0));
    assert_ne!(a, derive_address("", "default/echo", 1));
    assert_ne!(a, derive_address("scenario", "default/echo", 0));
    for i in 0..1000 {
        let ip = derive_address("", &format!("ns/svc-{i}"), 0);
        let o = ip.octets();
        assert_eq!(o[0], 127);
        assert_ne!(o[1], 0);
        assert!(o[3] != 0 && o[3] != 255);
    }
}

#[test]
fn address_map_is_written_atomically() {
    let dir = std::env::temp_dir().join(format!("sluice-svc-proxy-test-{}", std::process::id()));
    let path = dir.join("services.json");
    let map = BTreeMap::from([("ns/echo:80".to_string(), "127.1.2.3:80".parse().unwrap())]);
    write_atomically(&path, &map).unwrap();
    let back: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(back["ns/echo:80"], "127.1.2.3:80");
    assert!(!path.with_extension("json.tmp").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

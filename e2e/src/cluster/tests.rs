use std::net::TcpListener;
use std::path::Path;

use super::net::ensure_port_free;
use super::*;

#[test]
fn free_ports_are_bindable_and_outside_the_ephemeral_range() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let bounds: Vec<u16> = range
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    for _ in 0..20 {
        let port = free_port().unwrap();
        assert!(
            port < bounds[0] || port > bounds[1],
            "{port} is in the ephemeral range {range}"
        );
        TcpListener::bind(("0.0.0.0", port)).unwrap();
    }
}

#[test]
fn a_port_in_use_says_who_to_ask_and_what_to_do() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let msg = ensure_port_free(port).unwrap_err().to_string();
    assert!(msg.contains(&format!("port {port}")), "{msg}");
    assert!(msg.contains("--apiserver-port"), "{msg}");
}

#[test]
fn a_missing_go_toolchain_is_named_when_binaries_must_be_built() {
    let plain_path = "/usr/bin:/bin";
    if which_go_in(plain_path) {
        return; // Go is on the plain PATH of this machine: no way to hide it here
    }
    let empty_cache = std::env::temp_dir().join(format!("sluice-nocache-{}", std::process::id()));
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("e2e/cluster/build.sh"))
        .arg("etcd")
        .env("SLUICE_CACHE", &empty_cache)
        .env("PATH", plain_path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&empty_cache);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no Go toolchain"), "{stderr}");
    assert!(stderr.contains("Install Go"), "{stderr}");
}

fn which_go_in(path: &str) -> bool {
    path.split(':').any(|d| Path::new(d).join("go").exists())
}

#[test]
fn a_stale_state_names_the_daemons_that_are_gone() {
    // A child that has exited and been reaped: its PID no longer runs our binary.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    let state = ClusterState {
        server: "https://127.0.0.1:1".into(),
        daemons: vec![Daemon {
            name: "kube-apiserver".into(),
            pid,
            binary: "/bin/true".into(),
            log: "/dev/null".into(),
        }],
        routes: vec![],
        host: None,
    };
    assert_eq!(
        state.dead_daemons(),
        vec![format!("kube-apiserver (pid {pid})")]
    );
}

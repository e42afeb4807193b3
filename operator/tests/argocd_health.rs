//! The Argo CD health checks (`charts/sluice/argocd/sluice.dev/<Kind>/health.lua`) run by a
//! real Lua interpreter (`lua5.4`) on every case of the kind's `health_test.yaml`.
//!
//! Each case's object is handed to the script as the global `obj` (written here as a Lua
//! table literal, the way Argo CD hands it over), and the `hs` it returns must have the
//! expected status and a message containing the expected text. Every status that this
//! operator writes is also read back into the operator's own status type and written out
//! unchanged, so that the cases keep the controller's shape as the types change.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::Value;
use sluice_operator::inference::InferenceSetStatus;
use sluice_operator::release::ReleaseStatus;
use sluice_operator::release::crd::Phase;

/// The interpreter. Argo CD runs gopher-lua (Lua 5.1); the scripts keep to what both have.
const LUA: &str = "lua5.4";
/// What Argo CD accepts in `hs.status`.
const STATUSES: [&str; 6] = [
    "Healthy",
    "Progressing",
    "Degraded",
    "Suspended",
    "Missing",
    "Unknown",
];

#[derive(Deserialize)]
struct TestFile {
    tests: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    input_path: String,
    /// False for a status this operator never writes (a phase of a newer one).
    #[serde(default = "yes")]
    typed: bool,
    health_status: Expected,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Expected {
    status: String,
    message_contains: String,
}

fn kind_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/sluice/argocd/sluice.dev")
        .join(kind)
}

fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            // Lua reads `\ddd` as one byte, so UTF-8 passes through unchanged.
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
    out
}

/// The object as a Lua table literal (JSON null becomes an absent field, as in Argo CD).
fn lua_literal(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) => format!("{f:?}"),
            _ => panic!("number {n} has no Lua form"),
        },
        Value::String(s) => lua_string(s),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(lua_literal).collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Object(fields) => {
            let fields: Vec<String> = fields
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_literal(v)))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
    }
}

/// Run `script` on `obj` the way Argo CD does; returns (status, message).
fn run_health(script: &Path, obj: &Value) -> Result<(String, String), String> {
    let driver = format!(
        "obj = {}\n\
         local hs = dofile({})\n\
         if type(hs) ~= \"table\" then error(\"health.lua returned \" .. type(hs) .. \", not a table\") end\n\
         if type(hs.status) ~= \"string\" then error(\"hs.status is \" .. type(hs.status)) end\n\
         if type(hs.message) ~= \"string\" then error(\"hs.message is \" .. type(hs.message)) end\n\
         io.write(hs.status, \"\\n\", hs.message)\n",
        lua_literal(obj),
        lua_string(script.to_str().expect("UTF-8 path")),
    );
    let mut child = match Command::new(LUA)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{LUA} not found: the Argo CD health checks are tested with a real Lua \
             interpreter; install it (`apt-get install -y lua5.4`; .ci/run installs it in CI)"
        ),
        Err(e) => panic!("cannot run {LUA}: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(driver.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(format!(
            "{LUA} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let stdout = String::from_utf8(out.stdout).map_err(|e| e.to_string())?;
    let (status, message) = stdout
        .split_once('\n')
        .ok_or_else(|| format!("unexpected driver output {stdout:?}"))?;
    Ok((status.to_string(), message.to_string()))
}

fn check(script: &Path, what: &str, obj: &Value, expected: &Expected, failures: &mut Vec<String>) {
    match run_health(script, obj) {
        Err(e) => failures.push(format!("{what}: {e}")),
        Ok((status, message)) => {
            if !STATUSES.contains(&status.as_str()) {
                failures.push(format!("{what}: {status:?} is no Argo CD health status"));
            }
            if message.is_empty() {
                failures.push(format!("{what}: empty message"));
            }
            if status != expected.status || !message.contains(&expected.message_contains) {
                failures.push(format!(
                    "{what}: got {status} {message:?}, want {} with a message containing {:?}",
                    expected.status, expected.message_contains
                ));
            }
        }
    }
}

/// Reads `health_test.yaml` of `kind` and its inputs: (case, object) pairs. Every file in
/// `testdata/` must be a case.
fn cases(kind: &str) -> Vec<(Case, Value)> {
    let dir = kind_dir(kind);
    let file: TestFile = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("health_test.yaml")).expect("health_test.yaml"),
    )
    .expect("health_test.yaml parses");
    let mut listed = BTreeSet::new();
    let mut out = Vec::new();
    for case in file.tests {
        let path = dir.join(&case.input_path);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let obj: Value =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            obj["apiVersion"], "sluice.dev/v1alpha1",
            "{}",
            case.input_path
        );
        assert_eq!(obj["kind"], kind, "{}", case.input_path);
        assert!(
            STATUSES.contains(&case.health_status.status.as_str()),
            "{}: expected status {:?} is no Argo CD health status",
            case.input_path,
            case.health_status.status
        );
        listed.insert(case.input_path.clone());
        out.push((case, obj));
    }
    for entry in std::fs::read_dir(dir.join("testdata")).unwrap() {
        let name = format!("testdata/{}", entry.unwrap().file_name().to_string_lossy());
        assert!(
            listed.contains(&name),
            "{kind}/{name} is in no case of health_test.yaml"
        );
    }
    out
}

/// The status reads into `T` and writes back unchanged: the case has the controller's shape.
fn assert_typed<T: serde::de::DeserializeOwned + serde::Serialize>(what: &str, status: &Value) {
    let typed: T = serde_json::from_value(status.clone())
        .unwrap_or_else(|e| panic!("{what}: status does not read as the operator's type: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back, status,
        "{what}: status does not round-trip through the operator's type (a field it lacks or spells otherwise?)"
    );
}

fn run_cases(kind: &str, typed: fn(&str, &Value)) -> Vec<(Case, Value)> {
    let script = kind_dir(kind).join("health.lua");
    let cases = cases(kind);
    let mut failures = Vec::new();
    for (case, obj) in &cases {
        let what = format!("{kind}/{}", case.input_path);
        if case.typed
            && let Some(status) = obj.get("status")
        {
            typed(&what, status);
        }
        check(&script, &what, obj, &case.health_status, &mut failures);
    }
    assert!(
        failures.is_empty(),
        "{} of {} {kind} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    cases
}

#[test]
fn release_health() {
    let cases = run_cases("Release", assert_typed::<ReleaseStatus>);
    // A case for every phase the controller writes.
    for phase in Phase::ALL {
        assert!(
            cases
                .iter()
                .any(|(c, o)| c.typed && o["status"]["phase"] == phase.as_str()),
            "no Release case with phase {}",
            phase.as_str()
        );
    }
    for needed in ["no-status", "stale-generation", "unknown-phase"] {
        assert!(
            cases.iter().any(|(c, _)| c.input_path.contains(needed)),
            "no Release case {needed}"
        );
    }
}

/// The status a panicked reconcile leaves, made by the operator's own function: Degraded,
/// although `status.observedGeneration` is still the last round's.
#[test]
fn release_health_after_a_panicked_reconcile() {
    let script = kind_dir("Release").join("health.lua");
    let (_, mut obj) = cases("Release")
        .into_iter()
        .find(|(c, _)| c.input_path == "testdata/progressing.yaml")
        .expect("progressing case");
    let prev: ReleaseStatus = serde_json::from_value(obj["status"].clone()).unwrap();
    let generation = prev.observed_generation.unwrap() + 1;
    let status = sluice_operator::release::controller::panic_status(
        &prev,
        generation,
        "attempt to subtract with overflow",
        1_746_180_000.0,
    );
    obj["metadata"]["generation"] = generation.into();
    obj["status"] = serde_json::to_value(&status).unwrap();
    let mut failures = Vec::new();
    check(
        &script,
        "Release panic_status",
        &obj,
        &Expected {
            status: "Degraded".into(),
            message_contains: "the operator failed on this Release".into(),
        },
        &mut failures,
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn inference_set_health() {
    let cases = run_cases("InferenceSet", assert_typed::<InferenceSetStatus>);
    for needed in ["no-status", "stale-generation", "paused", "invalid-spec"] {
        assert!(
            cases.iter().any(|(c, _)| c.input_path.contains(needed)),
            "no InferenceSet case {needed}"
        );
    }
}

/// Argo CD runs gopher-lua (Lua 5.1): nothing of Lua 5.3/5.4 that 5.1 lacks.
#[test]
fn scripts_keep_to_lua_5_1() {
    for kind in ["Release", "InferenceSet"] {
        let text = std::fs::read_to_string(kind_dir(kind).join("health.lua")).unwrap();
        for line in text.lines() {
            let code = line.split("--").next().unwrap();
            for token in [
                "//",
                "goto ",
                "<const>",
                "<close>",
                "utf8.",
                "math.type",
                "math.tointeger",
                " & ",
                " | ",
                "<<",
                ">>",
                "os.",
                "io.",
            ] {
                assert!(
                    !code.contains(token),
                    "{kind}/health.lua uses {token:?}, which Argo CD's Lua lacks or forbids: {line}"
                );
            }
        }
    }
}

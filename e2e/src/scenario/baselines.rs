//! The common-practice baselines B1 and B2.
use k8s_openapi::api::apps::v1::Deployment;

use super::strategy::Strategy;

/// The common-practice baselines.
#[derive(Clone, Debug)]
pub struct Baseline {
    pub name: &'static str,
    /// `preStop: sleep` seconds (the native sleep action), if any.
    pub pre_stop_sleep: Option<i64>,
    /// The app's SIGTERM behaviour (`exit` or `graceful`).
    pub on_sigterm: &'static str,
}

/// B1: no preStop; the app exits on SIGTERM at once.
pub fn b1() -> Baseline {
    Baseline {
        name: "B1",
        pre_stop_sleep: None,
        on_sigterm: "exit",
    }
}

/// B2: the common advice: `preStop: sleep 15` and a graceful app.
pub fn b2() -> Baseline {
    Baseline {
        name: "B2",
        pre_stop_sleep: Some(15),
        on_sigterm: "graceful",
    }
}

impl Strategy for Baseline {
    fn name(&self) -> String {
        self.name.to_string()
    }

    fn description(&self) -> String {
        match self.pre_stop_sleep {
            Some(s) => format!("preStop sleep {s}s, app {} on SIGTERM", self.on_sigterm),
            None => format!("no preStop, app {} on SIGTERM", self.on_sigterm),
        }
    }

    fn shape(&self, d: &mut Deployment) {
        let pod = d
            .spec
            .as_mut()
            .and_then(|s| s.template.spec.as_mut())
            .expect("the runner builds a pod template");
        let c = &mut pod.containers[0];
        c.args
            .get_or_insert_with(Vec::new)
            .extend(["--on-sigterm".to_string(), self.on_sigterm.to_string()]);
        if let Some(secs) = self.pre_stop_sleep {
            c.lifecycle = Some(
                serde_json::from_value(
                    serde_json::json!({"preStop": {"sleep": {"seconds": secs}}}),
                )
                .expect("valid lifecycle"),
            );
        }
    }
}

//! Unit tests of the validate step and of a launch held for its user data: a spec the operator
//! cannot act on reads Ready=False InvalidSpec naming the problem, never an unhealthy agent.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::api::conditions;
use crate::api::{SandboxPhase, SandboxSpec, SandboxStatus};
use crate::ec2::{Instance, InstanceState};

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn spec(agent: serde_json::Value) -> SandboxSpec {
    serde_json::from_value(serde_json::json!({
        "environment": "staging",
        "instanceType": "t3.large",
        "launch": {"imageId": "ami-0123456789abcdef0"},
        "agent": agent,
    }))
    .unwrap()
}

fn running() -> Instance {
    Instance {
        id: "i-0123456789abcdef0".into(),
        state: InstanceState::Running,
        instance_type: Some("t3.large".into()),
        private_ip: Some("10.0.0.5".into()),
        public_ip: None,
        private_dns: None,
        public_dns: None,
        availability_zone: Some("us-east-1a".into()),
        launch_time: Some(now()),
        spot: false,
        tags: BTreeMap::new(),
    }
}

fn run(
    spec: &SandboxSpec,
    status: &SandboxStatus,
    instance: &InstanceObs,
    hold: Option<&LaunchHold>,
) -> Decision {
    decide(&Inputs {
        spec,
        generation: Some(2),
        start_request: None,
        deploy_attempt: None,
        action: None,
        status,
        instance,
        probe: &ProbeObs::NotProbed,
        agent_url: None,
        launch_rejection: None,
        launch_hold: hold,
        launch: LaunchStage::Launching,
        now: now(),
        settings: &Settings::default(),
    })
}

fn ready(d: &Decision) -> (String, String, String) {
    let c = conditions::get(&d.status.conditions, cond::READY).expect("a Ready condition");
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn problems(agent: serde_json::Value) -> String {
    match validate(&spec(agent)) {
        Ok(v) => panic!("expected an invalid spec, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn known_placeholders_and_plain_urls_are_valid() {
    for agent in [
        serde_json::json!({}),
        serde_json::json!({"urlTemplate": "http://{privateIp}:{port}"}),
        serde_json::json!({"urlTemplate": "https://{publicDns}:{port}/agent/{instanceId}"}),
        serde_json::json!({"urlTemplate": "http://{privateDns}:{port}", "port": 9000}),
        serde_json::json!({"urlTemplate": "http://{publicIp}"}),
        serde_json::json!({"url": "http://10.0.0.5:8000"}),
    ] {
        let v = validate(&spec(agent.clone())).unwrap_or_else(|e| panic!("{agent}: {e}"));
        assert_eq!(v.probe_interval.as_secs(), 30);
        assert_eq!(v.probe_timeout.as_secs(), 5);
        assert_eq!(v.idle_after, None);
    }
}

#[test]
fn an_unknown_placeholder_is_named() {
    let p = problems(serde_json::json!({"urlTemplate": "http://{privateIP}:{port}"}));
    assert!(p.contains("unknown placeholder {privateIP}"), "{p}");
    assert!(
        p.contains("{privateIp}"),
        "the message lists the known ones: {p}"
    );
    let p = problems(serde_json::json!({"urlTemplate": "http://{host}:{agentPort}"}));
    assert!(
        p.contains("unknown placeholders {host}, {agentPort}"),
        "{p}"
    );
}

#[test]
fn unmatched_braces_and_unusable_urls_are_refused() {
    let p = problems(serde_json::json!({"urlTemplate": "http://{privateIp:{port}"}));
    assert!(p.contains("unmatched {"), "{p}");
    let p = problems(serde_json::json!({"urlTemplate": "http://privateIp}:{port}"}));
    assert!(p.contains("unmatched }"), "{p}");
    let p = problems(serde_json::json!({"urlTemplate": "http://{privateIp} :{port}"}));
    assert!(p.contains("does not make a usable URL"), "{p}");
    let p = problems(serde_json::json!({"url": "http://"}));
    assert!(p.contains("agent.url"), "{p}");
    let p = problems(serde_json::json!({"url": "ftp://10.0.0.5"}));
    assert!(p.contains("http(s)"), "{p}");
}

#[test]
fn unparseable_durations_are_refused_not_defaulted() {
    let p = problems(serde_json::json!({"probeInterval": "soon"}));
    assert!(p.contains("agent.probeInterval"), "{p}");
    let mut s = spec(serde_json::json!({}));
    s.auto_stop = Some(crate::api::AutoStopSpec {
        idle_after: "1 hour".into(),
    });
    let e = validate(&s).unwrap_err();
    assert!(e.to_string().contains("autoStop.idleAfter"), "{e}");
    s.auto_stop = Some(crate::api::AutoStopSpec {
        idle_after: "1h30m".into(),
    });
    assert_eq!(validate(&s).unwrap().idle_after.unwrap().as_secs(), 5400);
}

#[test]
fn an_invalid_template_reads_invalid_spec_not_an_unhealthy_agent() {
    let s = spec(serde_json::json!({"urlTemplate": "http://{bogus}:{port}"}));
    let d = run(
        &s,
        &SandboxStatus::default(),
        &InstanceObs::Found(running()),
        None,
    );
    let (status, reason, message) = ready(&d);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(message.contains("{bogus}"), "{message}");
    assert!(!message.contains("Uri"), "{message}");
    let agent = conditions::get(&d.status.conditions, cond::AGENT_HEALTHY).unwrap();
    assert_eq!(agent.reason, "InvalidSpec");
    assert_eq!(agent.status, "Unknown");
    assert_eq!(d.status.phase, Some(SandboxPhase::Failed));
    assert_eq!(d.status.failure_reason.as_deref(), Some("InvalidSpec"));
    assert_eq!(d.status.observed_generation, Some(2));
    assert_eq!(
        d.status.instance.as_ref().map(|i| i.id.as_str()),
        Some("i-0123456789abcdef0"),
        "the instance is still reported"
    );
    assert!(d.actions.is_empty());
    assert_eq!(d.notes.len(), 1);
    assert_eq!(d.notes[0].reason, "InvalidSpec");

    // Once written, the same decision publishes no new Event.
    let again = run(&s, &d.status, &InstanceObs::Found(running()), None);
    assert!(again.notes.is_empty(), "{:?}", again.notes);

    // Fixing the spec clears the failure and the phase follows the instance again.
    let fixed = spec(serde_json::json!({"urlTemplate": "http://{privateIp}:{port}"}));
    let d = run(&fixed, &d.status, &InstanceObs::Found(running()), None);
    assert_eq!(d.status.failure_reason, None);
    assert_eq!(d.status.phase, Some(SandboxPhase::Provisioning));
    assert_eq!(ready(&d).1, "AwaitingAgent");
}

#[test]
fn an_invalid_spec_never_launches_starts_or_stops() {
    let mut s = spec(serde_json::json!({"urlTemplate": "http://{nope}"}));
    let d = run(
        &s,
        &SandboxStatus::default(),
        &InstanceObs::NoInstance,
        None,
    );
    assert_eq!(ready(&d).1, "InvalidSpec");
    assert_eq!(d.status.phase, Some(SandboxPhase::Failed));
    s.power_state = crate::api::PowerState::Stopped;
    let d = run(
        &s,
        &SandboxStatus::default(),
        &InstanceObs::Found(running()),
        None,
    );
    assert!(d.actions.is_empty(), "{:?}", d.actions);
}

#[test]
fn a_launch_held_for_its_user_data_names_the_secret_and_key() {
    let s = spec(serde_json::json!({}));
    let hold = LaunchHold::UserDataKeyMissing {
        secret: "team/boot".into(),
        key: "cloud-init".into(),
    };
    let d = run(
        &s,
        &SandboxStatus::default(),
        &InstanceObs::NoInstance,
        Some(&hold),
    );
    let (status, reason, message) = ready(&d);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "UserDataKeyMissing")
    );
    assert!(
        message.contains("team/boot") && message.contains("\"cloud-init\""),
        "{message}"
    );
    let running = conditions::get(&d.status.conditions, cond::INSTANCE_RUNNING).unwrap();
    assert_eq!(running.reason, "UserDataKeyMissing");
    assert_eq!(d.status.phase, Some(SandboxPhase::Provisioning));
    assert_eq!(d.status.observed_generation, Some(2));
    assert_eq!(d.requeue, hold_recheck(&Settings::default()));
    assert_eq!(d.notes.len(), 1);
    assert_eq!(d.notes[0].reason, "UserDataKeyMissing");
    let again = run(&s, &d.status, &InstanceObs::NoInstance, Some(&hold));
    assert!(again.notes.is_empty(), "one Event, not one per look");

    let missing = LaunchHold::UserDataSecretMissing {
        secret: "team/boot".into(),
        key: "cloud-init".into(),
    };
    let d = run(&s, &d.status, &InstanceObs::NoInstance, Some(&missing));
    let (_, reason, message) = ready(&d);
    assert_eq!(reason, "UserDataSecretMissing");
    assert!(message.contains("team/boot") && message.contains("does not exist"));

    // When the Secret and key are there, the reconciler launches: Launching.
    let d = run(&s, &d.status, &InstanceObs::NoInstance, None);
    assert_eq!(ready(&d).1, "Launching");
}

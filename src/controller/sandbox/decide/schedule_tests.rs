//! Unit tests of when to look: the probe-now decision, the freshness of the EC2 view and the
//! first status.

use std::time::Duration;

use super::*;
use crate::api::{
    ImageDeployState, ImageDeployStatus, ImageSpec, InstanceStatus, SandboxSpec, SandboxStatus,
};
use crate::ec2::InstanceState;

fn spec(tag: Option<&str>) -> SandboxSpec {
    let mut s: SandboxSpec = serde_json::from_value(serde_json::json!({
        "environment": "staging",
        "launch": {"imageId": "ami-0123456789abcdef0"},
    }))
    .unwrap();
    s.image = tag.map(|t| ImageSpec {
        repository: None,
        tag: t.into(),
    });
    s
}

fn running(tag: Option<&str>) -> SandboxStatus {
    let mut st = SandboxStatus {
        observed_generation: Some(1),
        instance: Some(InstanceStatus {
            id: "i-0123456789abcdef0".into(),
            instance_type: None,
            state: Some(InstanceState::Running),
            private_ip: None,
            public_ip: None,
            private_dns: None,
            public_dns: None,
            availability_zone: None,
            launch_time: None,
            market: None,
            launched_by_operator: true,
        }),
        ..Default::default()
    };
    if let Some(t) = tag {
        st.deploy = Some(deploy(t, ImageDeployState::Succeeded));
    }
    st
}

fn deploy(tag: &str, state: ImageDeployState) -> ImageDeployStatus {
    ImageDeployStatus {
        tag: tag.into(),
        previous_tag: None,
        state,
        id: None,
        attempt: None,
        message: None,
        started_at: None,
        finished_at: None,
        requested_at: None,
        legacy_agent: false,
    }
}

fn due(spec: &SandboxSpec, generation: i64, status: &SandboxStatus, since: Option<u64>) -> bool {
    probe_now(&Due {
        spec,
        generation: Some(generation),
        status,
        deploy_attempt: None,
        action: None,
        interval: Duration::from_secs(30),
        since_last: since.map(Duration::from_secs),
    })
}

#[test]
fn a_quiet_sandbox_is_probed_at_its_interval() {
    let s = spec(Some("v1"));
    let st = running(Some("v1"));
    assert!(!due(&s, 1, &st, Some(5)));
    assert!(due(&s, 1, &st, Some(30)));
    // Not asked since the operator started: at once.
    assert!(due(&s, 1, &st, None));
}

#[test]
fn a_new_image_tag_is_probed_at_once_not_at_the_next_interval() {
    // The generation moved (the tag was edited) and the status was not written for it yet.
    let st = running(Some("v1"));
    assert!(due(&spec(Some("v2")), 2, &st, Some(1)));
    // Even with observedGeneration caught up (the status written for the edit before the
    // agent could be asked), a tag no record or report has is probed now.
    let mut st2 = running(Some("v1"));
    st2.observed_generation = Some(2);
    assert!(due(&spec(Some("v2")), 2, &st2, Some(1)));
    // The agent already reports it: nothing new.
    st2.deploy = None;
    st2.agent = Some(crate::api::AgentStatus {
        health: crate::api::AgentHealth::Healthy,
        url: None,
        image_tag: Some("v2".into()),
        active_workers: None,
        cpu_percent: None,
        memory_percent: None,
        disk_percent: None,
        draining_since: None,
        browser_status: None,
        up_since: None,
        env_sha256: None,
        agent_version: None,
        consecutive_failures: 0,
        last_seen: None,
        message: None,
    });
    assert!(!due(&spec(Some("v2")), 2, &st2, Some(1)));
}

#[test]
fn a_deploy_or_a_state_change_under_way_is_probed_every_pass() {
    let s = spec(Some("v2"));
    let mut st = running(None);
    st.deploy = Some(deploy("v2", ImageDeployState::Deploying));
    assert!(due(&s, 1, &st, Some(0)));
    let mut st = running(Some("v2"));
    st.instance.as_mut().unwrap().state = Some(InstanceState::Pending);
    assert!(due(&s, 1, &st, Some(0)));
}

#[test]
fn a_new_deploy_attempt_is_probed_at_once() {
    let s = spec(Some("v2"));
    let mut st = running(None);
    st.deploy = Some(ImageDeployStatus {
        attempt: Some("1".into()),
        ..deploy("v2", ImageDeployState::Failed)
    });
    let q = |attempt| Due {
        spec: &s,
        generation: Some(1),
        status: &st,
        deploy_attempt: attempt,
        action: None,
        interval: Duration::from_secs(30),
        since_last: Some(Duration::from_secs(1)),
    };
    assert!(!probe_now(&q(Some("1"))));
    assert!(probe_now(&q(Some("2"))));
}

#[test]
fn the_ec2_view_is_fresh_while_the_instance_changes_state_and_older_otherwise() {
    let settings = Settings::default();
    let quiet = running(Some("v1"));
    assert_eq!(
        ec2_max_age(&quiet, &settings, false),
        settings.resync.min(Duration::from_secs(30))
    );
    assert_eq!(ec2_max_age(&quiet, &settings, true), Duration::ZERO);
    let mut pending = running(None);
    pending.instance.as_mut().unwrap().state = Some(InstanceState::Stopping);
    assert_eq!(ec2_max_age(&pending, &settings, false), settings.poll);
    // A deploy is followed through the agent: its quick passes do not wait on EC2.
    let mut deploying = running(None);
    deploying.deploy = Some(deploy("v2", ImageDeployState::Verifying));
    assert_eq!(
        ec2_max_age(&deploying, &settings, false),
        ec2_max_age(&quiet, &settings, false)
    );
}

#[test]
fn the_first_status_is_due_until_a_phase_and_ready_are_written() {
    assert!(first_status(&SandboxStatus::default()));
    let mut st = SandboxStatus {
        phase: Some(crate::api::SandboxPhase::Provisioning),
        ..Default::default()
    };
    assert!(first_status(&st));
    crate::api::conditions::set(
        &mut st.conditions,
        crate::api::conditions::Desired {
            type_: cond::READY,
            status: "False",
            reason: "PendingLaunch",
            message: "launching".into(),
        },
        Some(1),
        k8s_openapi::jiff::Timestamp::now(),
    );
    assert!(!first_status(&st));
    assert!(!first_status(&running(None)));
}

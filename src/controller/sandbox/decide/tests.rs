//! Unit tests of the Sandbox decisions: every phase transition, from plain data.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::agent::protocol::{Check, DeployInfo, DeployState, DeployStep, HealthReport};
use crate::api::conditions;
use crate::api::{
    AgentHealth, AutoStopSpec, DeletionPolicy, Environment, ImageSpec, ManagementPolicy,
    PowerState, SandboxPhase, SandboxSpec, SandboxStatus,
};
use crate::ec2::{Instance, InstanceState};

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn spec() -> SandboxSpec {
    serde_json::from_value(serde_json::json!({
        "environment": "staging",
        "instanceType": "t3.large",
        "launch": {"imageId": "ami-0123456789abcdef0"},
    }))
    .unwrap()
}

fn adopted_spec() -> SandboxSpec {
    SandboxSpec {
        launch: None,
        instance_id: Some("i-0123456789abcdef0".into()),
        ..spec()
    }
}

fn inst(state: InstanceState) -> Instance {
    Instance {
        id: "i-0123456789abcdef0".into(),
        state,
        instance_type: Some("t3.large".into()),
        private_ip: Some("10.0.0.5".into()),
        public_ip: Some("54.1.2.3".into()),
        private_dns: None,
        public_dns: None,
        availability_zone: Some("us-east-1a".into()),
        launch_time: Some(t(-100)),
        spot: false,
        tags: BTreeMap::new(),
    }
}

fn report(active: u32, tag: &str) -> HealthReport {
    HealthReport {
        status: "ok".into(),
        cpu: 12.0,
        memory_total_mb: 8000.0,
        memory_used_mb: 2000.0,
        disk_total_gb: 100.0,
        disk_used_gb: 20.0,
        active_workers: Some(active),
        uptime: 3600.0,
        image_tag: Some(tag.into()),
        agent_version: Some("0.1.0".into()),
        ..Default::default()
    }
}

struct Case {
    spec: SandboxSpec,
    status: SandboxStatus,
    instance: InstanceObs,
    probe: ProbeObs,
    start_request: Option<String>,
    deploy_attempt: Option<String>,
    action: Option<(String, String)>,
    rejection: Option<Rejection>,
    launch: LaunchStage,
    now: Timestamp,
    settings: Settings,
}

impl Case {
    fn new(instance: InstanceObs) -> Self {
        Self {
            spec: spec(),
            status: SandboxStatus::default(),
            instance,
            probe: ProbeObs::NotProbed,
            start_request: None,
            deploy_attempt: None,
            action: None,
            rejection: None,
            launch: LaunchStage::default(),
            now: t(0),
            settings: Settings::default(),
        }
    }
    fn run(&self) -> Decision {
        decide(&Inputs {
            spec: &self.spec,
            generation: Some(1),
            start_request: self.start_request.as_deref(),
            deploy_attempt: self.deploy_attempt.as_deref(),
            action: self
                .action
                .as_ref()
                .map(|(name, id)| ActionRequest { name, id }),
            status: &self.status,
            instance: &self.instance,
            probe: &self.probe,
            agent_url: Some("http://10.0.0.5:8000"),
            launch_rejection: self.rejection.as_ref(),
            launch_hold: None,
            launch: self.launch.clone(),
            now: self.now,
            settings: &self.settings,
        })
    }
    /// Runs, then carries the status forward (as the reconciler writes it) for the next step.
    fn step(&mut self) -> Decision {
        let d = self.run();
        self.status = d.status.clone();
        d
    }
}

fn cond<'a>(
    d: &'a Decision,
    t: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    conditions::get(&d.status.conditions, t)
        .unwrap_or_else(|| panic!("no {t} condition in {:?}", d.status.conditions))
}

#[test]
fn no_instance_is_provisioning() {
    let d = Case::new(InstanceObs::NoInstance).run();
    assert_eq!(d.status.phase, Some(SandboxPhase::Provisioning));
    assert_eq!(cond(&d, cond::READY).status, "False");
    assert_eq!(cond(&d, cond::READY).reason, "Launching");
    assert!(d.actions.is_empty());
}

#[test]
fn the_first_status_says_where_the_launch_stands() {
    // Pending: written before any EC2 call.
    let mut c = Case::new(InstanceObs::NoInstance);
    c.launch = LaunchStage::Pending;
    let d = c.run();
    assert_eq!(d.status.phase, Some(SandboxPhase::Provisioning));
    assert_eq!(d.status.observed_generation, Some(1));
    assert_eq!(cond(&d, cond::READY).status, "False");
    assert_eq!(cond(&d, cond::READY).reason, "PendingLaunch");
    assert_eq!(cond(&d, cond::READY).observed_generation, Some(1));
    assert!(d.actions.is_empty());

    // Held back by the operator's own pacing: said so, with its turn, and not called
    // throttling.
    c.launch = LaunchStage::Paced {
        turn_at: Some(t(95)),
        burst: 4.0,
        per_second: 1.8,
    };
    let paced = c.run();
    let ready = cond(&paced, cond::READY);
    assert_eq!(ready.reason, "LaunchPaced");
    assert!(
        ready.message.contains("client-side pacing"),
        "{}",
        ready.message
    );
    assert!(
        ready.message.contains(&t(95).to_string()),
        "{}",
        ready.message
    );
    assert!(!ready.message.contains("throttled by"), "{}", ready.message);
    assert_eq!(cond(&paced, cond::INSTANCE_RUNNING).reason, "LaunchPaced");
    // The same turn decided again a minute later writes nothing new.
    c.status = paced.status.clone();
    c.now = t(60);
    assert!(!material_change(&paced.status, &c.run().status));

    // AWS throttling is its own reason.
    c.launch = LaunchStage::Retrying {
        reason: "LaunchThrottled",
        message: "AWS throttled RunInstances".into(),
    };
    assert_eq!(cond(&c.run(), cond::READY).reason, "LaunchThrottled");

    // An adopted instance being looked up is not "launching".
    let mut a = Case::new(InstanceObs::NoInstance);
    a.spec = adopted_spec();
    a.launch = LaunchStage::Pending;
    let d = a.run();
    assert_eq!(cond(&d, cond::READY).reason, "Adopting");
    assert_eq!(d.status.phase, Some(SandboxPhase::Provisioning));
}

#[test]
fn an_instance_launched_moments_ago_that_ec2_does_not_list_yet_is_launching() {
    let id = "i-0123456789abcdef0";
    // Launched by the operator, EC2 said pending (launch time t(-100) in `inst`).
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Pending)));
    c.now = t(-95);
    c.step();
    c.status.instance.as_mut().unwrap().launched_by_operator = true;
    // EC2 (eventually consistent) does not know the id yet.
    c.instance = InstanceObs::Missing { id: id.into() };
    c.now = t(-90);
    let d = c.step();
    assert_eq!(d.status.phase, Some(SandboxPhase::Provisioning));
    assert_eq!(d.status.failure_reason, None);
    assert_eq!(cond(&d, cond::READY).reason, "Launching");
    assert!(d.actions.is_empty(), "never relaunched: {:?}", d.actions);
    // Deleting meanwhile terminates it all the same.
    assert_eq!(
        decide_delete_seen(&c.spec, &c.status, &c.instance, c.now),
        DeleteStep::Terminate(id.into())
    );
    // Long after the launch, unknown means gone: Failed, as before.
    c.now = t(-100) + crate::ec2::LAUNCH_GRACE + Duration::from_secs(1);
    let d = c.run();
    assert_eq!(d.status.phase, Some(SandboxPhase::Failed));
    assert_eq!(d.status.failure_reason.as_deref(), Some("InstanceNotFound"));
    assert_eq!(
        decide_delete_seen(&c.spec, &c.status, &c.instance, c.now),
        DeleteStep::Done
    );
    // One EC2 showed running moments after its launch was visible: its vanishing is real.
    let mut r = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    r.now = t(-95);
    r.step();
    r.instance = InstanceObs::Missing { id: id.into() };
    r.now = t(-90);
    assert_eq!(r.run().status.phase, Some(SandboxPhase::Failed));
    // An adopted instance is never taken for one launched moments ago.
    let mut a = Case::new(InstanceObs::Found(inst(InstanceState::Pending)));
    a.spec = adopted_spec();
    a.now = t(-95);
    a.step();
    a.instance = InstanceObs::Missing { id: id.into() };
    let d = a.run();
    assert_eq!(cond(&d, cond::READY).reason, "InstanceNotFound");
}

#[test]
fn launch_refused_by_aws_is_reported_with_aws_reason() {
    let mut c = Case::new(InstanceObs::NoInstance);
    c.rejection = Some(Rejection {
        code: "InvalidAMIID.NotFound".into(),
        message: "The image id does not exist".into(),
    });
    let d = c.run();
    assert_eq!(cond(&d, cond::READY).reason, "LaunchFailed");
    assert!(
        cond(&d, cond::READY)
            .message
            .contains("InvalidAMIID.NotFound")
    );
    assert!(
        cond(&d, cond::INSTANCE_RUNNING)
            .message
            .contains("The image id does not exist")
    );
}

#[test]
fn adopting_an_unknown_id_is_not_ready_and_launches_nothing() {
    let mut c = Case::new(InstanceObs::Missing {
        id: "i-0123456789abcdef0".into(),
    });
    c.spec = adopted_spec();
    let d = c.run();
    assert_eq!(cond(&d, cond::READY).reason, "InstanceNotFound");
    assert!(d.actions.is_empty());
    assert_ne!(d.status.phase, Some(SandboxPhase::Failed));
}

#[test]
fn a_launched_instance_that_vanished_is_failed_not_replaced() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.step();
    c.instance = InstanceObs::Missing {
        id: "i-0123456789abcdef0".into(),
    };
    let d = c.run();
    assert_eq!(d.status.phase, Some(SandboxPhase::Failed));
    assert_eq!(d.status.failure_reason.as_deref(), Some("InstanceNotFound"));
    assert!(d.actions.is_empty());
}

#[test]
fn pending_is_provisioning_and_polls() {
    let d = Case::new(InstanceObs::Found(inst(InstanceState::Pending))).run();
    assert_eq!(d.status.phase, Some(SandboxPhase::Provisioning));
    assert_eq!(cond(&d, cond::INSTANCE_RUNNING).reason, "Pending");
    assert_eq!(d.requeue, Settings::default().poll);
}

#[test]
fn running_with_a_healthy_agent_is_active_and_ready() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.probe = ProbeObs::Report(Box::new(report(1, "v1")));
    let d = c.run();
    assert_eq!(d.status.phase, Some(SandboxPhase::Active));
    assert_eq!(cond(&d, cond::READY).status, "True");
    assert_eq!(cond(&d, cond::AGENT_HEALTHY).status, "True");
    assert_eq!(cond(&d, cond::INSTANCE_RUNNING).status, "True");
    assert_eq!(cond(&d, cond::IMAGE_UP_TO_DATE).reason, "NoImageDeclared");
    assert!(d.status.last_started_at.is_some());
    assert_eq!(
        d.status.no_vnc_url.as_deref(),
        Some("http://54.1.2.3:6080/vnc.html")
    );
    let agent = d.status.agent.unwrap();
    assert_eq!(agent.memory_percent, Some(25));
    assert_eq!(agent.active_workers, Some(1));
}

#[test]
fn running_before_the_first_probe_is_provisioning() {
    let d = Case::new(InstanceObs::Found(inst(InstanceState::Running))).run();
    assert_eq!(d.status.phase, Some(SandboxPhase::Provisioning));
    assert_eq!(cond(&d, cond::AGENT_HEALTHY).reason, "AwaitingFirstProbe");
    assert_eq!(cond(&d, cond::READY).status, "False");
}

#[test]
fn spec_stopped_stops_a_running_instance_then_reads_ready_when_stopped() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.spec.power_state = PowerState::Stopped;
    let d = c.step();
    assert_eq!(
        d.actions,
        vec![Action::Stop {
            id: "i-0123456789abcdef0".into(),
            reason: stop_reason::REQUESTED
        }]
    );
    assert_eq!(d.status.stop_reason, Some(stop_reason::REQUESTED));
    c.instance = InstanceObs::Found(inst(InstanceState::Stopping));
    let d = c.step();
    assert!(d.actions.is_empty());
    assert_eq!(d.status.phase, Some(SandboxPhase::Stopped));
    assert_eq!(cond(&d, cond::READY).status, "False");
    c.instance = InstanceObs::Found(inst(InstanceState::Stopped));
    let d = c.step();
    assert!(d.actions.is_empty(), "no start while the spec says Stopped");
    assert_eq!(cond(&d, cond::READY).status, "True");
    assert_eq!(cond(&d, cond::READY).reason, "Stopped");
    assert!(d.status.last_stopped_at.is_some());
    assert_eq!(cond(&d, cond::AGENT_HEALTHY).status, "Unknown");
}

#[test]
fn spec_running_starts_a_stopped_instance() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Stopped)));
    c.status.stop_reason = Some(stop_reason::REQUESTED);
    let d = c.run();
    assert_eq!(
        d.actions,
        vec![Action::Start {
            id: "i-0123456789abcdef0".into(),
            why: StartWhy::Requested
        }]
    );
}

#[test]
fn an_external_stop_is_undone_with_its_own_reason() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    c.step();
    c.probe = ProbeObs::NotProbed;
    c.instance = InstanceObs::Found(inst(InstanceState::Stopped));
    let d = c.run();
    assert_eq!(
        d.actions,
        vec![Action::Start {
            id: "i-0123456789abcdef0".into(),
            why: StartWhy::RestartAfterExternalStop
        }]
    );
}

#[test]
fn an_external_terminate_is_failed_and_never_relaunched() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.step();
    c.instance = InstanceObs::Found(inst(InstanceState::Terminated));
    let d = c.step();
    assert_eq!(d.status.phase, Some(SandboxPhase::Failed));
    assert_eq!(
        d.status.failure_reason.as_deref(),
        Some("InstanceTerminated")
    );
    assert!(d.actions.is_empty());
    assert!(
        d.notes
            .iter()
            .any(|n| n.reason == "InstanceTerminated" && n.warning)
    );
    // Seen again: no second event.
    let d = c.run();
    assert!(d.notes.is_empty());
}

#[test]
fn unhealthy_only_after_failure_threshold_and_back_on_success() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    c.step();
    c.probe = ProbeObs::Failed("connection refused".into());
    for n in 1..3 {
        let d = c.step();
        assert_eq!(
            d.status.phase,
            Some(SandboxPhase::Active),
            "after {n} failures"
        );
        assert_eq!(cond(&d, cond::AGENT_HEALTHY).status, "True");
        assert_eq!(d.status.agent.as_ref().unwrap().consecutive_failures, n);
    }
    let d = c.step();
    assert_eq!(d.status.phase, Some(SandboxPhase::Unhealthy));
    assert_eq!(cond(&d, cond::AGENT_HEALTHY).status, "False");
    assert_eq!(cond(&d, cond::AGENT_HEALTHY).reason, "ProbeFailed");
    assert!(d.notes.iter().any(|n| n.reason == "AgentUnhealthy"));
    assert_eq!(cond(&d, cond::READY).status, "False");
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    let d = c.step();
    assert_eq!(d.status.phase, Some(SandboxPhase::Active));
    assert_eq!(cond(&d, cond::AGENT_HEALTHY).status, "True");
    assert!(d.notes.iter().any(|n| n.reason == "AgentRecovered"));
}

#[test]
fn no_health_verdict_while_not_running() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Stopped)));
    c.spec.power_state = PowerState::Stopped;
    c.status.stop_reason = Some(stop_reason::REQUESTED);
    let d = c.run();
    assert_ne!(d.status.phase, Some(SandboxPhase::Unhealthy));
    assert_eq!(cond(&d, cond::AGENT_HEALTHY).status, "Unknown");
    assert_eq!(cond(&d, cond::AGENT_HEALTHY).reason, "InstanceNotRunning");
}

#[test]
fn disk_at_ninety_percent_reads_degraded() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    let mut r = report(0, "v1");
    r.disk_used_gb = 93.0;
    r.checks = vec![Check::fail("disk", "93% used")];
    c.probe = ProbeObs::Report(Box::new(r));
    let d = c.run();
    assert_eq!(
        d.status.agent.as_ref().unwrap().health,
        AgentHealth::Degraded
    );
    assert_eq!(cond(&d, cond::AGENT_HEALTHY).reason, "Degraded");
    assert_eq!(d.status.phase, Some(SandboxPhase::Active));
}

#[test]
fn a_failing_check_makes_the_agent_unhealthy_and_names_the_check() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    let mut r = report(0, "v1");
    r.checks = vec![
        Check::pass("display", ":99 up"),
        Check::fail("vnc", "x11vnc is not running"),
    ];
    c.probe = ProbeObs::Report(Box::new(r));
    let d = c.run();
    assert_eq!(d.status.phase, Some(SandboxPhase::Unhealthy));
    let m = &cond(&d, cond::AGENT_HEALTHY).message;
    assert!(m.contains("vnc: x11vnc is not running"), "{m}");
}

#[test]
fn the_old_health_server_json_is_healthy() {
    let old: HealthReport = serde_json::from_value(serde_json::json!({
        "status": "ok", "cpu": 5.5, "memoryTotalMb": 7900, "memoryUsedMb": 3000, "diskTotalGb": 50,
        "diskUsedGb": 20, "adspowerStatus": "running", "activeProfiles": 1, "activeWorkers": 0, "uptime": 1000
    }))
    .unwrap();
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.probe = ProbeObs::Report(Box::new(old));
    let d = c.run();
    assert_eq!(d.status.phase, Some(SandboxPhase::Active));
    assert_eq!(
        d.status.agent.unwrap().browser_status.as_deref(),
        Some("running")
    );
}

#[test]
fn missing_token_secret_is_reported_by_name() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.probe = ProbeObs::Misconfigured {
        reason: "TokenSecretMissing".into(),
        message: "the agent token Secret ns/agent-token does not exist".into(),
    };
    let d = c.run();
    assert_eq!(cond(&d, cond::AGENT_HEALTHY).reason, "TokenSecretMissing");
    assert!(
        cond(&d, cond::AGENT_HEALTHY)
            .message
            .contains("ns/agent-token")
    );
}

#[test]
fn auto_stop_after_idle_period_and_wake_by_annotation() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.spec.auto_stop = Some(AutoStopSpec {
        idle_after: "10m".into(),
    });
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    let d = c.step();
    assert_eq!(d.status.idle_since.as_ref().map(|t| t.0), Some(t(0)));
    assert_eq!(cond(&d, cond::IDLE).status, "True");
    assert!(d.actions.is_empty());
    assert!(d.requeue <= Duration::from_secs(600));
    // An active worker resets the clock.
    c.now = t(300);
    c.probe = ProbeObs::Report(Box::new(report(2, "v1")));
    let d = c.step();
    assert_eq!(d.status.idle_since, None);
    assert_eq!(cond(&d, cond::IDLE).status, "False");
    // Idle again from 400; at 1000 it has been idle for 600 s: stop.
    c.now = t(400);
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    c.step();
    c.now = t(999);
    assert!(c.run().actions.is_empty());
    c.now = t(1000);
    let d = c.step();
    assert_eq!(
        d.actions,
        vec![Action::Stop {
            id: "i-0123456789abcdef0".into(),
            reason: stop_reason::IDLE
        }]
    );
    assert_eq!(d.status.stop_reason, Some(stop_reason::IDLE));
    assert!(d.notes.iter().any(|n| n.reason == "IdleStop"));
    // Stopped by auto-stop: stays stopped although the spec says Running.
    c.probe = ProbeObs::NotProbed;
    c.instance = InstanceObs::Found(inst(InstanceState::Stopped));
    let d = c.step();
    assert!(d.actions.is_empty());
    assert_eq!(cond(&d, cond::IDLE).reason, "IdleStopped");
    assert_eq!(cond(&d, cond::READY).status, "True");
    // A start request wakes it once.
    c.start_request = Some("2026-11-22T10:00:00Z".into());
    let d = c.step();
    assert_eq!(
        d.actions,
        vec![Action::Start {
            id: "i-0123456789abcdef0".into(),
            why: StartWhy::Woken
        }]
    );
    assert_eq!(
        d.status.last_start_request.as_deref(),
        Some("2026-11-22T10:00:00Z")
    );
    assert_eq!(d.status.stop_reason, None);
}

fn deploy_info(tag: &str, state: DeployState) -> DeployInfo {
    DeployInfo {
        id: "d-1".into(),
        tag: tag.into(),
        previous_tag: Some("v1".into()),
        state,
        step: DeployStep::HealthCheck,
        message: match state {
            DeployState::RolledBack => "health check failed; rolled back to v1".into(),
            _ => String::new(),
        },
        started_at: t(0),
        finished_at: None,
        steps: vec![],
    }
}

#[test]
fn image_deploy_drains_deploys_and_verifies() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.spec.image = Some(ImageSpec {
        repository: None,
        tag: "v2".into(),
    });
    c.probe = ProbeObs::Report(Box::new(report(1, "v1")));
    let d = c.step();
    assert_eq!(d.actions, vec![Action::Drain]);
    assert_eq!(d.status.phase, Some(SandboxPhase::Deploying));
    assert_eq!(
        d.status.deploy.as_ref().unwrap().state,
        deploy_state::DRAINING
    );
    assert_eq!(
        d.status.deploy.as_ref().unwrap().previous_tag.as_deref(),
        Some("v1")
    );
    // Still one worker: wait.
    let d = c.step();
    assert!(d.actions.is_empty());
    assert_eq!(cond(&d, cond::IMAGE_UP_TO_DATE).reason, "Draining");
    // Drained: deploy.
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    let d = c.step();
    assert_eq!(d.actions, vec![Action::Deploy { tag: "v2".into() }]);
    assert_eq!(
        d.status.deploy.as_ref().unwrap().state,
        deploy_state::DEPLOYING
    );
    // The agent reports it running, then done with the new tag.
    let mut r = report(0, "v1");
    r.deploy = Some(deploy_info("v2", DeployState::Running));
    c.probe = ProbeObs::Report(Box::new(r));
    let d = c.step();
    assert!(d.actions.is_empty());
    assert_eq!(d.status.phase, Some(SandboxPhase::Deploying));
    let mut r = report(0, "v2");
    r.deploy = Some(deploy_info("v2", DeployState::Succeeded));
    c.probe = ProbeObs::Report(Box::new(r));
    let d = c.step();
    assert_eq!(
        d.status.deploy.as_ref().unwrap().state,
        deploy_state::SUCCEEDED
    );
    assert_eq!(cond(&d, cond::IMAGE_UP_TO_DATE).status, "True");
    assert_eq!(d.status.phase, Some(SandboxPhase::Active));
    assert_eq!(cond(&d, cond::READY).status, "True");
    assert!(d.notes.iter().any(|n| n.reason == "DeploySucceeded"));
}

#[test]
fn a_rolled_back_deploy_is_recorded_and_not_retried() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.spec.image = Some(ImageSpec {
        repository: None,
        tag: "v2".into(),
    });
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    // Already idle: drain and deploy in one pass.
    let d = c.step();
    assert_eq!(
        d.actions,
        vec![Action::Drain, Action::Deploy { tag: "v2".into() }]
    );
    assert_eq!(
        c.status.deploy.as_ref().unwrap().state,
        deploy_state::DEPLOYING
    );
    let mut r = report(0, "v1");
    r.deploy = Some(deploy_info("v2", DeployState::RolledBack));
    c.probe = ProbeObs::Report(Box::new(r.clone()));
    let d = c.step();
    assert_eq!(
        d.status.deploy.as_ref().unwrap().state,
        deploy_state::ROLLED_BACK
    );
    assert_eq!(cond(&d, cond::IMAGE_UP_TO_DATE).reason, "DeployFailed");
    assert!(
        d.notes
            .iter()
            .any(|n| n.reason == "DeployFailed" && n.warning)
    );
    for _ in 0..3 {
        let d = c.step();
        assert!(d.actions.is_empty(), "a failed tag must not be retried");
        assert_eq!(d.status.phase, Some(SandboxPhase::Active));
        assert_eq!(cond(&d, cond::READY).status, "False");
    }
    // A new attempt marker (a deploy's retry) tries the same tag again, once.
    c.deploy_attempt = Some("deploy-uid/retry-1".into());
    assert_eq!(
        c.step().actions,
        vec![Action::Drain, Action::Deploy { tag: "v2".into() }]
    );
    assert_eq!(
        c.status.deploy.as_ref().unwrap().attempt.as_deref(),
        Some("deploy-uid/retry-1")
    );
    // A new tag tries again.
    c.spec.image = Some(ImageSpec {
        repository: None,
        tag: "v3".into(),
    });
    assert_eq!(
        c.run().actions,
        vec![Action::Drain, Action::Deploy { tag: "v3".into() }]
    );
}

#[test]
fn a_drain_that_never_ends_fails_the_deploy() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.spec.image = Some(ImageSpec {
        repository: None,
        tag: "v2".into(),
    });
    c.probe = ProbeObs::Report(Box::new(report(3, "v1")));
    c.step();
    c.now = t(301);
    let d = c.step();
    assert_eq!(
        d.status.deploy.as_ref().unwrap().state,
        deploy_state::FAILED
    );
    assert!(d.actions.is_empty());
}

#[test]
fn observe_only_never_acts() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Stopped)));
    c.spec = adopted_spec();
    c.spec.management_policy = ManagementPolicy::ObserveOnly;
    c.spec.image = Some(ImageSpec {
        repository: None,
        tag: "v2".into(),
    });
    assert!(c.run().actions.is_empty());
    c.instance = InstanceObs::Found(inst(InstanceState::Running));
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    let d = c.run();
    assert!(d.actions.is_empty());
    assert_eq!(cond(&d, cond::IMAGE_UP_TO_DATE).reason, "ObserveOnly");
}

#[test]
fn probe_noise_is_not_a_material_change() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    let first = c.step().status;
    let mut r = report(0, "v1");
    r.cpu = 14.0; // 12 -> 14: noise
    c.probe = ProbeObs::Report(Box::new(r));
    c.now = t(30);
    let second = c.run().status;
    assert!(
        !material_change(&first, &second),
        "a probe that found nothing new must not write status"
    );
    let mut r = report(3, "v1"); // new active workers: a change
    r.cpu = 14.0;
    c.probe = ProbeObs::Report(Box::new(r));
    assert!(material_change(&first, &c.run().status));
    let mut r = report(0, "v1");
    r.cpu = 60.0;
    c.probe = ProbeObs::Report(Box::new(r));
    assert!(
        !material_change(&first, &c.run().status),
        "load figures alone never write"
    );
    // Crossing 90% disk does: the health changes.
    let mut r = report(0, "v1");
    r.disk_used_gb = 95.0;
    c.probe = ProbeObs::Report(Box::new(r));
    assert!(material_change(&first, &c.run().status));
}

#[test]
fn delete_follows_the_policy() {
    let running = InstanceObs::Found(inst(InstanceState::Running));
    let mut s = spec();
    assert_eq!(
        decide_delete(&s, &running),
        DeleteStep::Terminate("i-0123456789abcdef0".into())
    );
    assert_eq!(
        decide_delete(&s, &InstanceObs::Found(inst(InstanceState::ShuttingDown))),
        DeleteStep::Wait
    );
    assert_eq!(
        decide_delete(&s, &InstanceObs::Found(inst(InstanceState::Terminated))),
        DeleteStep::Done
    );
    s.deletion_policy = Some(DeletionPolicy::Stop);
    assert_eq!(
        decide_delete(&s, &running),
        DeleteStep::Stop("i-0123456789abcdef0".into())
    );
    assert_eq!(
        decide_delete(&s, &InstanceObs::Found(inst(InstanceState::Stopped))),
        DeleteStep::Done
    );
    s.deletion_policy = Some(DeletionPolicy::Retain);
    assert_eq!(decide_delete(&s, &running), DeleteStep::Done);
    // Adopted instances default to Retain.
    assert_eq!(decide_delete(&adopted_spec(), &running), DeleteStep::Done);
    assert_eq!(
        decide_delete(&spec(), &InstanceObs::NoInstance),
        DeleteStep::Done
    );
}

#[test]
fn agent_url_from_template_or_explicit() {
    let mut s = spec();
    assert_eq!(
        agent_url(&s, &inst(InstanceState::Running)).as_deref(),
        Some("http://10.0.0.5:8000")
    );
    s.agent.url_template = Some("https://{publicIp}:{port}/".into());
    assert_eq!(
        agent_url(&s, &inst(InstanceState::Running)).as_deref(),
        Some("https://54.1.2.3:8000")
    );
    s.agent.url_template = Some("http://{publicDns}:{port}".into());
    assert_eq!(
        agent_url(&s, &inst(InstanceState::Running)),
        None,
        "no public DNS name"
    );
    s.agent.url = Some("http://127.0.0.1:9999".into());
    assert_eq!(
        agent_url(&s, &inst(InstanceState::Running)).as_deref(),
        Some("http://127.0.0.1:9999")
    );
    let _ = Environment::Prod;
}

#[test]
fn boot_time_is_stable_across_probes_and_moves_on_a_reboot() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    let mut r = report(0, "v1");
    r.uptime = 3_598.0;
    c.probe = ProbeObs::Report(Box::new(r));
    let first = c.step().status.agent.unwrap().up_since.unwrap();
    // The next probe's sample is a few seconds off, across a minute boundary: no change.
    c.now = t(30);
    let mut r = report(0, "v1");
    r.uptime = 3_635.0;
    c.probe = ProbeObs::Report(Box::new(r));
    let d = c.step();
    assert_eq!(
        d.status.agent.as_ref().unwrap().up_since.as_ref(),
        Some(&first)
    );
    // A reboot: uptime starts again.
    c.now = t(60);
    let mut r = report(0, "v1");
    r.uptime = 10.0;
    c.probe = ProbeObs::Report(Box::new(r));
    assert_ne!(c.step().status.agent.unwrap().up_since.unwrap(), first);
}

/// What the seeds' `health-server.js` answers: no agentVersion, imageTag or deploy.
fn legacy_report(active: u32, status: &str) -> HealthReport {
    serde_json::from_value(serde_json::json!({
        "status": status, "cpu": 15.2, "memoryTotalMb": 8192, "memoryUsedMb": 3456,
        "diskTotalGb": 40, "diskUsedGb": 12, "adspowerStatus": "running", "activeProfiles": 2,
        "activeWorkers": active, "uptime": 86400
    }))
    .unwrap()
}

fn legacy_case(tag: &str) -> Case {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.spec.image = Some(ImageSpec {
        repository: None,
        tag: tag.into(),
    });
    c
}

#[test]
fn a_legacy_agent_drains_on_active_workers_then_deploys_without_drain_call() {
    let mut c = legacy_case("v2");
    c.probe = ProbeObs::Report(Box::new(legacy_report(2, "ok")));
    let d = c.step();
    assert!(
        d.actions.is_empty(),
        "the old server has no /drain: {:?}",
        d.actions
    );
    let rec = d.status.deploy.clone().unwrap();
    assert_eq!(rec.state, deploy_state::DRAINING);
    assert!(rec.legacy_agent);
    assert_eq!(rec.previous_tag, None, "a legacy server reports no tag");
    assert_eq!(cond(&d, cond::IMAGE_UP_TO_DATE).reason, "Draining");
    c.now = t(5);
    c.probe = ProbeObs::Report(Box::new(legacy_report(0, "ok")));
    let d = c.step();
    assert_eq!(d.actions, vec![Action::Deploy { tag: "v2".into() }]);
    let rec = d.status.deploy.clone().unwrap();
    assert_eq!(rec.state, deploy_state::DEPLOYING);
    assert_eq!(rec.requested_at.map(|t| t.0), Some(t(5)));
}

#[test]
fn a_legacy_deploy_succeeds_after_the_settle_time_and_two_healthy_answers() {
    let mut c = legacy_case("v2");
    c.probe = ProbeObs::Report(Box::new(legacy_report(0, "ok")));
    let d = c.step();
    assert_eq!(d.actions, vec![Action::Deploy { tag: "v2".into() }]);
    // Healthy answers during the settle time do not count: the script is still running.
    for s in [2, 60, 179] {
        c.now = t(s);
        let d = c.step();
        assert!(d.actions.is_empty());
        assert_eq!(
            d.status.deploy.as_ref().unwrap().state,
            deploy_state::DEPLOYING,
            "at {s}s"
        );
        assert_eq!(cond(&d, cond::IMAGE_UP_TO_DATE).status, "False");
        assert_eq!(d.status.phase, Some(SandboxPhase::Deploying));
    }
    c.now = t(180);
    let d = c.step();
    assert_eq!(
        d.status.deploy.as_ref().unwrap().state,
        deploy_state::VERIFYING
    );
    assert_eq!(cond(&d, cond::IMAGE_UP_TO_DATE).reason, "Verifying");
    c.now = t(182);
    let d = c.step();
    let rec = d.status.deploy.clone().unwrap();
    assert_eq!(rec.state, deploy_state::SUCCEEDED);
    assert_eq!(rec.finished_at.map(|t| t.0), Some(t(182)));
    let image = cond(&d, cond::IMAGE_UP_TO_DATE);
    assert_eq!(image.status, "True");
    assert_eq!(image.reason, ASSUMED_BY_LEGACY_AGENT);
    assert!(
        image.message.contains("assumed to run v2, not reported"),
        "{}",
        image.message
    );
    assert_eq!(d.status.phase, Some(SandboxPhase::Active));
    assert_eq!(cond(&d, cond::READY).status, "True");
    assert_eq!(
        d.status.agent.as_ref().unwrap().image_tag,
        None,
        "nothing is written as reported that was not"
    );
    assert!(d.notes.iter().any(|n| n.reason == "DeploySucceeded"));
    // It stays assumed, with no deploy again: probed, not probed, long after the deadline.
    for (s, probe) in [
        (190, ProbeObs::Report(Box::new(legacy_report(1, "ok")))),
        (200, ProbeObs::NotProbed),
        (2000, ProbeObs::Report(Box::new(legacy_report(0, "ok")))),
    ] {
        c.now = t(s);
        c.probe = probe;
        let d = c.step();
        assert!(d.actions.is_empty(), "at {s}s: {:?}", d.actions);
        assert_eq!(
            d.status.deploy.as_ref().unwrap().state,
            deploy_state::SUCCEEDED
        );
        assert_eq!(
            cond(&d, cond::IMAGE_UP_TO_DATE).reason,
            ASSUMED_BY_LEGACY_AGENT
        );
        assert!(d.notes.is_empty(), "at {s}s: {:?}", d.notes);
    }
    // The next tag names the assumed one as the tag it replaces.
    c.spec.image = Some(ImageSpec {
        repository: None,
        tag: "v3".into(),
    });
    let d = c.step();
    assert_eq!(d.actions, vec![Action::Deploy { tag: "v3".into() }]);
    assert_eq!(
        d.status.deploy.as_ref().unwrap().previous_tag.as_deref(),
        Some("v2")
    );
}

#[test]
fn a_legacy_deploy_counts_only_consecutive_healthy_answers() {
    let mut c = legacy_case("v2");
    c.probe = ProbeObs::Report(Box::new(legacy_report(0, "ok")));
    c.step();
    c.now = t(200);
    assert_eq!(
        c.step().status.deploy.unwrap().state,
        deploy_state::VERIFYING
    );
    // A failed probe starts the count again.
    c.now = t(202);
    c.probe = ProbeObs::Failed("agent http://10.0.0.5:8000 unreachable (health)".into());
    let d = c.step();
    let rec = d.status.deploy.unwrap();
    assert_eq!(rec.state, deploy_state::DEPLOYING);
    assert!(
        rec.message
            .as_deref()
            .unwrap()
            .contains("stopped answering"),
        "{:?}",
        rec.message
    );
    c.now = t(204);
    c.probe = ProbeObs::Report(Box::new(legacy_report(0, "ok")));
    assert_eq!(
        c.step().status.deploy.unwrap().state,
        deploy_state::VERIFYING
    );
    // So does an unhealthy answer.
    c.now = t(206);
    c.probe = ProbeObs::Report(Box::new(legacy_report(0, "error")));
    let d = c.step();
    assert_eq!(
        d.status.deploy.clone().unwrap().state,
        deploy_state::DEPLOYING
    );
    assert_eq!(cond(&d, cond::IMAGE_UP_TO_DATE).status, "False");
    c.now = t(208);
    c.probe = ProbeObs::Report(Box::new(legacy_report(0, "ok")));
    c.step();
    c.now = t(210);
    assert_eq!(
        c.step().status.deploy.unwrap().state,
        deploy_state::SUCCEEDED
    );
}

#[test]
fn a_legacy_deploy_that_never_answers_again_fails_at_the_deadline_and_is_not_retried() {
    let mut c = legacy_case("v2");
    c.settings.deploy_deadline = Duration::from_secs(600);
    c.probe = ProbeObs::Report(Box::new(legacy_report(0, "ok")));
    c.step();
    c.probe = ProbeObs::Failed("agent http://10.0.0.5:8000 unreachable (health)".into());
    for s in [10, 200, 599] {
        c.now = t(s);
        let d = c.step();
        assert_eq!(
            d.status.deploy.as_ref().unwrap().state,
            deploy_state::DEPLOYING,
            "at {s}s"
        );
    }
    c.now = t(600);
    let d = c.step();
    let rec = d.status.deploy.clone().unwrap();
    assert_eq!(rec.state, deploy_state::FAILED);
    let msg = rec.message.unwrap();
    assert!(
        msg.contains("did not answer healthy again within 600s"),
        "{msg}"
    );
    assert_eq!(cond(&d, cond::IMAGE_UP_TO_DATE).reason, "DeployFailed");
    assert!(
        d.notes
            .iter()
            .any(|n| n.reason == "DeployFailed" && n.warning)
    );
    // Back and healthy: the failed tag is not deployed again by itself.
    c.now = t(700);
    c.probe = ProbeObs::Report(Box::new(legacy_report(0, "ok")));
    let d = c.step();
    assert!(d.actions.is_empty());
    assert_eq!(
        d.status.deploy.as_ref().unwrap().state,
        deploy_state::FAILED
    );
    assert_eq!(cond(&d, cond::READY).status, "False");
}

#[test]
fn a_deploy_whose_agent_stops_answering_fails_at_the_deadline() {
    // Not only legacy agents: without any report the deadline still applies.
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.spec.image = Some(ImageSpec {
        repository: None,
        tag: "v2".into(),
    });
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    c.step();
    c.probe = ProbeObs::Failed("timed out".into());
    c.now = t(899);
    assert_eq!(
        c.step().status.deploy.unwrap().state,
        deploy_state::DEPLOYING
    );
    c.now = t(900);
    let d = c.step();
    assert_eq!(d.status.deploy.clone().unwrap().state, deploy_state::FAILED);
    assert_eq!(cond(&d, cond::IMAGE_UP_TO_DATE).reason, "DeployFailed");
}

// ---- Day-2 actions by annotation. ----

fn asking(c: &mut Case, name: &str, id: &str) {
    c.action = Some((name.into(), id.into()));
}

fn last(d: &Decision) -> crate::api::LastAction {
    d.status.last_action.clone().expect("status.lastAction")
}

fn running_case(active: u32) -> Case {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.probe = ProbeObs::Report(Box::new(report(active, "v1")));
    c
}

#[test]
fn probe_now_records_the_fresh_answer_and_is_done_once() {
    let mut c = running_case(0);
    asking(&mut c, day2::PROBE, "r1");
    assert!(action_wants_probe(
        &c.status,
        Some(ActionRequest {
            name: "probe",
            id: "r1"
        })
    ));
    let d = c.step();
    let a = last(&d);
    assert_eq!(
        (a.name.as_str(), a.request_id.as_str(), a.result.as_str()),
        ("probe", "r1", day2::SUCCEEDED)
    );
    assert_eq!(a.reason, "Probed");
    assert!(a.message.as_deref().unwrap().contains("Healthy"), "{a:?}");
    assert!(a.finished_at.is_some());
    assert!(d.notes.iter().any(|n| n.reason == "ActionSucceeded"));
    assert!(request_done(
        &d.status,
        ActionRequest {
            name: "probe",
            id: "r1"
        }
    ));
    // The same request again (the annotation not removed yet): nothing new, no Event.
    assert!(!action_wants_probe(
        &c.status,
        Some(ActionRequest {
            name: "probe",
            id: "r1"
        })
    ));
    c.probe = ProbeObs::NotProbed;
    let d = c.step();
    assert_eq!(last(&d).result, day2::SUCCEEDED);
    assert!(d.notes.iter().all(|n| !n.reason.starts_with("Action")));
    // A new id is a new request.
    asking(&mut c, day2::PROBE, "r2");
    c.probe = ProbeObs::Failed("connection refused".into());
    let d = c.step();
    let a = last(&d);
    assert_eq!(
        (a.request_id.as_str(), a.result.as_str()),
        ("r2", day2::FAILED)
    );
    assert_eq!(a.reason, "ProbeFailed");
    assert!(
        d.notes
            .iter()
            .any(|n| n.reason == "ActionFailed" && n.warning)
    );
}

#[test]
fn an_unknown_action_is_rejected_naming_the_accepted_ones() {
    let mut c = running_case(0);
    asking(&mut c, "reboot", "x");
    let d = c.step();
    let a = last(&d);
    assert_eq!(
        (a.result.as_str(), a.reason.as_str()),
        (day2::REJECTED, "UnknownAction")
    );
    let m = a.message.unwrap();
    for name in crate::api::DAY2_ACTIONS {
        assert!(m.contains(name), "{m}");
    }
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    let n = d
        .notes
        .iter()
        .find(|n| n.reason == "ActionRejected")
        .unwrap();
    assert!(n.warning && n.message.contains("reboot"));
    assert!(!action_wants_probe(
        &SandboxStatus::default(),
        Some(ActionRequest {
            name: "reboot",
            id: "x"
        })
    ));
}

#[test]
fn restart_and_drain_ask_the_agent_and_the_answer_is_the_result() {
    let mut c = running_case(2);
    asking(&mut c, day2::RESTART_ADSPOWER, "r1");
    let d = c.step();
    assert!(d.actions.contains(&Action::RestartService {
        service: day2::ADSPOWER_SERVICE
    }));
    assert_eq!(last(&d).result, day2::IN_PROGRESS);
    let mut st = d.status.clone();
    let n = finish_action(
        &mut st,
        true,
        "AgentRefused",
        "adspower restarted".into(),
        t(1),
    )
    .unwrap();
    assert_eq!(n.reason, "ActionSucceeded");
    let a = st.last_action.clone().unwrap();
    assert_eq!(
        (a.result.as_str(), a.reason.as_str()),
        (day2::SUCCEEDED, "Done")
    );
    assert!(
        finish_action(&mut st, false, "AgentRefused", "again".into(), t(2)).is_none(),
        "final stays final"
    );

    let mut c = running_case(2);
    asking(&mut c, day2::DRAIN, "d1");
    let d = c.step();
    assert!(d.actions.contains(&Action::DrainNow), "{:?}", d.actions);
    let mut ok = d.status.clone();
    finish_action(&mut ok, true, "AgentRefused", "draining".into(), t(1)).unwrap();
    assert_eq!(
        ok.agent.as_ref().unwrap().draining_since,
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(1))),
        "status shows the drain at once"
    );
    // The next probe brings the agent's own word.
    let mut drained = report(2, "v1");
    drained.draining_since = Some(t(0));
    c.status = ok;
    c.action = None;
    c.probe = ProbeObs::Report(Box::new(drained));
    assert_eq!(
        c.run().status.agent.unwrap().draining_since,
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(0)))
    );
    let mut st = d.status.clone();
    let n = finish_action(&mut st, false, "AgentRefused", "HTTP 502".into(), t(1)).unwrap();
    assert!(n.warning && n.reason == "ActionFailed");
    assert_eq!(st.last_action.unwrap().reason, "AgentRefused");

    // A restart taken up but whose answer was never recorded is not done twice.
    let mut c = running_case(0);
    asking(&mut c, day2::RESTART_ADSPOWER, "r1");
    c.step();
    let d = c.step();
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::RestartService { .. })),
        "{:?}",
        d.actions
    );
    assert_eq!(
        (last(&d).result.as_str(), last(&d).reason.as_str()),
        (day2::FAILED, "Interrupted")
    );
}

#[test]
fn agent_actions_on_a_stopped_instance_fail_saying_why() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Stopped)));
    c.spec.power_state = PowerState::Stopped;
    for name in [day2::RESTART_ADSPOWER, day2::DRAIN, day2::PROBE] {
        asking(&mut c, name, name);
        let d = c.step();
        let a = last(&d);
        assert_eq!(
            (a.result.as_str(), a.reason.as_str()),
            (day2::FAILED, "InstanceNotRunning"),
            "{name}"
        );
        assert!(a.message.unwrap().contains("stopped"));
        assert!(d.actions.is_empty());
    }
}

#[test]
fn observe_only_refuses_every_action_but_probe() {
    let mut c = running_case(0);
    c.spec = SandboxSpec {
        management_policy: ManagementPolicy::ObserveOnly,
        ..adopted_spec()
    };
    for name in [
        day2::RESTART_ADSPOWER,
        day2::DRAIN,
        day2::TERMINATE,
        day2::TERMINATE_FORCE,
    ] {
        asking(&mut c, name, name);
        let d = c.step();
        let a = last(&d);
        assert_eq!(
            (a.result.as_str(), a.reason.as_str()),
            (day2::REJECTED, "ObserveOnly"),
            "{name}"
        );
        assert!(d.actions.is_empty(), "{name}: {:?}", d.actions);
    }
    asking(&mut c, day2::PROBE, "p");
    assert_eq!(last(&c.step()).result, day2::SUCCEEDED);
}

fn terminate_action(id: &str) -> Action {
    Action::TerminateInstance { id: id.into() }
}

const ID: &str = "i-0123456789abcdef0";

#[test]
fn terminate_drains_first_then_terminates_and_the_sandbox_stays_terminated() {
    let mut c = running_case(2);
    asking(&mut c, day2::TERMINATE, "t1");
    let d = c.step();
    assert!(d.actions.contains(&Action::Drain), "{:?}", d.actions);
    assert!(!d.actions.contains(&terminate_action(ID)));
    let a = last(&d);
    assert_eq!(
        (a.result.as_str(), a.reason.as_str()),
        (day2::IN_PROGRESS, "Draining")
    );
    assert!(a.message.unwrap().contains("2 active workers"));
    assert!(d.requeue <= c.settings.poll);
    assert!(action_wants_probe(
        &c.status,
        Some(ActionRequest {
            name: "terminate",
            id: "t1"
        })
    ));
    // Still busy: wait, one Event only.
    c.now = t(10);
    c.probe = ProbeObs::Report(Box::new(report(1, "v1")));
    let d = c.step();
    assert!(!d.actions.contains(&terminate_action(ID)));
    assert!(d.notes.iter().all(|n| !n.reason.starts_with("Action")));
    // Drained: EC2 is asked to terminate, and nothing else is done this pass.
    c.now = t(20);
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    let d = c.step();
    assert_eq!(d.actions, vec![terminate_action(ID)]);
    let a = last(&d);
    assert_eq!(
        (a.result.as_str(), a.reason.as_str()),
        (day2::IN_PROGRESS, "Terminating")
    );
    assert!(!request_done(
        &d.status,
        ActionRequest {
            name: "terminate",
            id: "t1"
        }
    ));
    // EC2 has not caught up yet: no second call, nothing else.
    c.now = t(21);
    let d = c.step();
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    // Shutting down: phase Terminated (not Failed: it was asked), the request succeeded.
    c.instance = InstanceObs::Found(inst(InstanceState::ShuttingDown));
    c.probe = ProbeObs::NotProbed;
    c.now = t(22);
    let d = c.step();
    assert_eq!(d.status.phase, Some(SandboxPhase::Terminated));
    assert_eq!(d.status.failure_reason, None);
    assert_eq!(cond(&d, cond::READY).reason, "Terminated");
    let a = last(&d);
    assert_eq!(
        (a.result.as_str(), a.reason.as_str()),
        (day2::SUCCEEDED, "Terminated")
    );
    assert!(
        d.notes
            .iter()
            .any(|n| n.reason == "Terminated" && !n.warning)
    );
    assert!(d.notes.iter().any(|n| n.reason == "ActionSucceeded"));
    assert!(d.actions.is_empty());
    assert!(request_done(
        &d.status,
        ActionRequest {
            name: "terminate",
            id: "t1"
        }
    ));
    // The annotation gone, EC2 says terminated, later forgets it: still Terminated, never
    // relaunched, no warning.
    c.action = None;
    for obs in [
        InstanceObs::Found(inst(InstanceState::Terminated)),
        InstanceObs::Missing { id: ID.into() },
    ] {
        c.instance = obs;
        let d = c.step();
        assert_eq!(d.status.phase, Some(SandboxPhase::Terminated));
        assert!(d.actions.is_empty() && d.notes.is_empty(), "{d:?}");
    }
    // A new terminate on it succeeds at once, asking EC2 for nothing.
    asking(&mut c, day2::TERMINATE, "t2");
    let d = c.step();
    assert_eq!(last(&d).result, day2::SUCCEEDED);
    assert!(d.actions.is_empty());
}

#[test]
fn an_instance_terminated_without_a_request_is_still_failed() {
    let mut c = running_case(0);
    c.step();
    c.instance = InstanceObs::Found(inst(InstanceState::Terminated));
    let d = c.step();
    assert_eq!(d.status.phase, Some(SandboxPhase::Failed));
    assert_eq!(
        d.status.failure_reason.as_deref(),
        Some("InstanceTerminated")
    );
}

#[test]
fn terminate_that_cannot_drain_in_time_fails_and_terminates_nothing() {
    let mut c = running_case(3);
    c.settings.drain_timeout = Duration::from_secs(60);
    asking(&mut c, day2::TERMINATE, "t1");
    c.step();
    c.now = t(61);
    let d = c.step();
    assert!(!d.actions.contains(&terminate_action(ID)));
    let a = last(&d);
    assert_eq!(
        (a.result.as_str(), a.reason.as_str()),
        (day2::FAILED, "DrainTimedOut")
    );
    assert!(a.message.unwrap().contains("terminate-force"));
    // A failed terminate leaves the sandbox as it was.
    assert_eq!(d.status.phase, Some(SandboxPhase::Active));
}

#[test]
fn terminate_force_skips_the_drain_and_a_stopped_one_needs_none() {
    let mut c = running_case(3);
    asking(&mut c, day2::TERMINATE_FORCE, "f1");
    assert!(!action_wants_probe(
        &c.status,
        Some(ActionRequest {
            name: "terminate-force",
            id: "f1"
        })
    ));
    let d = c.step();
    assert_eq!(d.actions, vec![terminate_action(ID)]);
    assert_eq!(last(&d).reason, "Terminating");

    // Stopped with spec Running (stopped outside the operator): terminated, not started.
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Stopped)));
    asking(&mut c, day2::TERMINATE, "t1");
    let d = c.step();
    assert_eq!(d.actions, vec![terminate_action(ID)]);
    assert!(last(&d).message.unwrap().contains("nothing to drain"));

    // No instance yet: nothing terminated, said so.
    let mut c = Case::new(InstanceObs::NoInstance);
    asking(&mut c, day2::TERMINATE_FORCE, "f2");
    let d = c.step();
    assert_eq!(
        (last(&d).result.as_str(), last(&d).reason.as_str()),
        (day2::FAILED, "NoInstance")
    );
}

#[test]
fn a_refused_terminate_call_fails_the_request_and_the_sandbox_is_not_terminated() {
    let mut c = running_case(0);
    asking(&mut c, day2::TERMINATE_FORCE, "f1");
    let d = c.step();
    let mut st = d.status.clone();
    let n = finish_action(
        &mut st,
        false,
        "TerminateFailed",
        "UnauthorizedOperation".into(),
        t(1),
    )
    .unwrap();
    assert!(n.warning);
    assert_eq!(st.last_action.as_ref().unwrap().reason, "TerminateFailed");
    c.status = st;
    c.action = None;
    c.instance = InstanceObs::Found(inst(InstanceState::Terminated));
    let d = c.step();
    assert_eq!(
        d.status.phase,
        Some(SandboxPhase::Failed),
        "terminated by someone else after all: not the request's doing"
    );
}

// ---- The launch as an action, and the deploy poll (issue 13). ----

#[test]
fn a_sandbox_with_nothing_to_hold_it_back_is_launched_by_the_decision() {
    let mut c = Case::new(InstanceObs::NoInstance);
    c.launch = LaunchStage::ToLaunch;
    let d = c.run();
    assert_eq!(d.actions, vec![Action::Launch]);
    assert_eq!(d.status.phase, Some(SandboxPhase::Provisioning));
    assert_eq!(cond(&d, cond::READY).reason, "PendingLaunch");
    assert_eq!(d.status.observed_generation, Some(1));
}

#[test]
fn a_refused_an_adopting_or_an_invalid_sandbox_is_not_launched() {
    let mut refused = Case::new(InstanceObs::NoInstance);
    refused.launch = LaunchStage::ToLaunch;
    refused.rejection = Some(Rejection {
        code: "InvalidAMIID.NotFound".into(),
        message: "no such AMI".into(),
    });
    let d = refused.run();
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert_eq!(cond(&d, cond::READY).reason, "LaunchFailed");

    let mut adopting = Case::new(InstanceObs::NoInstance);
    adopting.spec = adopted_spec();
    adopting.launch = LaunchStage::ToLaunch;
    let d = adopting.run();
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert_eq!(cond(&d, cond::READY).reason, "Adopting");

    let mut invalid = Case::new(InstanceObs::NoInstance);
    invalid.spec.agent.probe_interval = "every so often".into();
    invalid.launch = LaunchStage::ToLaunch;
    let d = invalid.run();
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert_eq!(cond(&d, cond::READY).reason, INVALID_SPEC);
}

#[test]
fn an_instance_launched_in_this_reconcile_is_recorded_as_launched_with_an_event() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Pending)));
    // Adopted specs default to "not launched by the operator": the launch says otherwise.
    c.spec = adopted_spec();
    c.launch = LaunchStage::Launched;
    let d = c.run();
    assert!(d.status.instance.as_ref().unwrap().launched_by_operator);
    let n = d
        .notes
        .iter()
        .find(|n| n.reason == "Launched")
        .expect("a Launched event");
    assert!(n.message.contains("i-0123456789abcdef0"), "{}", n.message);
    // Without the launch, neither.
    c.launch = LaunchStage::ToLaunch;
    let d = c.run();
    assert!(!d.status.instance.as_ref().unwrap().launched_by_operator);
    assert!(!d.notes.iter().any(|n| n.reason == "Launched"));
}

#[test]
fn a_deploy_under_way_is_polled_at_the_deploy_poll_and_draining_at_the_poll() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.settings.poll = Duration::from_secs(2);
    c.settings.deploy_poll = Duration::from_millis(300);
    c.spec.image = Some(ImageSpec {
        repository: None,
        tag: "v2".into(),
    });
    // A worker is busy: draining is looked at on the ordinary poll.
    c.probe = ProbeObs::Report(Box::new(report(1, "v1")));
    let d = c.step();
    assert_eq!(d.actions, vec![Action::Drain]);
    assert_eq!(d.requeue, Duration::from_secs(2));
    // Drained: deployed, and the agent is asked again at the short interval.
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    let d = c.step();
    assert_eq!(d.actions, vec![Action::Deploy { tag: "v2".into() }]);
    assert_eq!(d.requeue, Duration::from_millis(300));
    let mut r = report(0, "v1");
    r.deploy = Some(deploy_info("v2", DeployState::Running));
    c.probe = ProbeObs::Report(Box::new(r));
    assert_eq!(c.step().requeue, Duration::from_millis(300));
    // Done: back to the probe interval.
    let mut r = report(0, "v2");
    r.deploy = Some(deploy_info("v2", DeployState::Succeeded));
    c.probe = ProbeObs::Report(Box::new(r));
    let d = c.step();
    assert_eq!(
        d.status.deploy.as_ref().unwrap().state,
        deploy_state::SUCCEEDED
    );
    assert!(d.requeue > Duration::from_millis(300), "{:?}", d.requeue);
}

#[test]
fn an_idle_agent_deploys_a_new_tag_in_the_same_pass() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.spec.image = Some(ImageSpec {
        repository: None,
        tag: "v2".into(),
    });
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    let d = c.run();
    assert_eq!(
        d.actions,
        vec![Action::Drain, Action::Deploy { tag: "v2".into() }]
    );
    assert_eq!(d.requeue, c.settings.deploy_poll);
}

#[test]
fn the_agents_answer_to_a_deploy_is_recorded_by_the_decision() {
    let mut c = Case::new(InstanceObs::Found(inst(InstanceState::Running)));
    c.spec.image = Some(ImageSpec {
        repository: None,
        tag: "v2".into(),
    });
    c.probe = ProbeObs::Report(Box::new(report(0, "v1")));
    let d = c.run();
    assert_eq!(
        d.status.deploy.as_ref().unwrap().state,
        deploy_state::DEPLOYING
    );
    // Accepted: the agent's deploy id is kept, and an Event says so.
    let mut st = d.status.clone();
    let n =
        after_deploy(&mut st, "v2", DeployAnswer::Accepted(Some("d-7".into()))).expect("an Event");
    assert_eq!(n.reason, "Deploying");
    assert_eq!(st.deploy.as_ref().unwrap().id.as_deref(), Some("d-7"));
    assert_eq!(st.deploy.as_ref().unwrap().state, deploy_state::DEPLOYING);
    // Busy or not reached: back to Draining, asked again on a later pass.
    let mut st = d.status.clone();
    assert!(after_deploy(&mut st, "v2", DeployAnswer::Busy("d-6".into())).is_none());
    let rec = st.deploy.as_ref().unwrap();
    assert_eq!(rec.state, deploy_state::DRAINING);
    assert!(rec.message.as_deref().unwrap().contains("d-6"));
    let mut st = d.status.clone();
    assert!(after_deploy(&mut st, "v2", DeployAnswer::Failed("timed out".into())).is_none());
    let rec = st.deploy.as_ref().unwrap();
    assert_eq!(rec.state, deploy_state::DRAINING);
    assert!(rec.message.as_deref().unwrap().contains("timed out"));
}

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::*;

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn settings(replicas: i32, standby: i32) -> Settings {
    Settings {
        replicas,
        standby,
        idle_window: Duration::from_secs(60),
        drain_timeout: Duration::from_secs(300),
        force_after_drain: false,
        max_surge: 1,
        max_unavailable: 0,
        template_hash: "h1".into(),
    }
}

/// A ready, running member of the current template, idle for a long time.
fn member(name: &str, created: i64) -> Member {
    Member {
        name: name.into(),
        hash: "h1".into(),
        created: t(created),
        deleting: false,
        standby: false,
        instance_stopped: false,
        ready: true,
        active_workers: Some(0),
        idle_since: Some(t(-10_000)),
        unregistered: false,
        broken: None,
        retiring_since: None,
    }
}

fn busy(name: &str, created: i64, n: i32) -> Member {
    Member {
        active_workers: Some(n),
        idle_since: None,
        ..member(name, created)
    }
}

fn standby(name: &str, created: i64) -> Member {
    Member {
        standby: true,
        instance_stopped: true,
        ready: false,
        active_workers: None,
        idle_since: None,
        ..member(name, created)
    }
}

fn run(s: Settings, members: &[Member], now: Timestamp) -> Decision {
    let status = SandboxPoolStatus::default();
    decide(&Inputs {
        settings: Ok(s),
        status: &status,
        generation: Some(3),
        selector: "fleet.valet.dev/pool=p".into(),
        image_tag: Some("v1".into()),
        scaler: Scaler::External,
        members,
        now,
    })
}

fn creates(d: &Decision) -> (usize, usize) {
    let running = d
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Create { standby: false }))
        .count();
    let stopped = d
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Create { standby: true }))
        .count();
    (running, stopped)
}

fn named<'a>(d: &'a Decision, f: impl Fn(&'a Action) -> Option<&'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = d.actions.iter().filter_map(f).collect();
    v.sort();
    v
}

fn deleted(d: &Decision) -> Vec<&str> {
    named(d, |a: &Action| match a {
        Action::Delete { name, .. } => Some(name.as_str()),
        _ => None,
    })
}

fn retired(d: &Decision) -> Vec<&str> {
    named(d, |a: &Action| match a {
        Action::Retire { name, .. } => Some(name.as_str()),
        _ => None,
    })
}

fn started(d: &Decision) -> Vec<&str> {
    named(d, |a: &Action| match a {
        Action::Start { name } => Some(name.as_str()),
        _ => None,
    })
}

fn cond<'a>(d: &'a Decision, type_: &str) -> &'a Condition {
    conditions::get(&d.status.conditions, type_).unwrap()
}

#[test]
fn an_empty_pool_launches_its_replicas_and_its_standby() {
    let d = run(settings(3, 2), &[], t(0));
    assert_eq!(creates(&d), (3, 2));
    assert_eq!(d.status.replicas, 0);
    assert_eq!(d.status.observed_generation, Some(3));
    assert_eq!(d.status.selector.as_deref(), Some("fleet.valet.dev/pool=p"));
    assert_eq!(cond(&d, READY).status, FALSE);
    assert_eq!(cond(&d, READY).reason, "MembersNotReady");
    assert_eq!(cond(&d, PROGRESSING).reason, "ScalingOut");
    assert!(d.requeue.is_some());
}

#[test]
fn scale_out_starts_standby_members_before_launching() {
    let members = [
        member("a", 0),
        standby("s1", 1),
        standby("s2", 2),
        // A standby member of an older template is never started; it is replaced.
        Member {
            hash: "old".into(),
            ..standby("s0", -5)
        },
    ];
    let d = run(settings(4, 2), &members, t(10));
    assert_eq!(started(&d), vec!["s1", "s2"]);
    // One more running member to launch, two standby to refill.
    assert_eq!(creates(&d), (1, 2));
    assert_eq!(deleted(&d), vec!["s0"]);
}

#[test]
fn a_stable_pool_does_nothing_and_says_so() {
    let members = [member("a", 0), member("b", 1), standby("s", 2)];
    let d = run(settings(2, 1), &members, t(10));
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert_eq!(d.requeue, None);
    assert_eq!(cond(&d, READY).status, TRUE);
    assert_eq!(cond(&d, PROGRESSING).status, FALSE);
    assert_eq!(cond(&d, PROGRESSING).reason, "Stable");
    assert_eq!(
        (
            d.status.replicas,
            d.status.ready,
            d.status.idle,
            d.status.standby
        ),
        (2, 2, 2, 1)
    );
}

#[test]
fn scale_in_takes_not_ready_then_stopped_then_idle_and_never_a_busy_one() {
    let members = [
        busy("busy", 0, 2),
        member("idle-old", 1),
        member("idle-new", 2),
        Member {
            ready: false,
            ..member("starting", 3)
        },
        Member {
            instance_stopped: true,
            ready: false,
            ..member("stopped", 4)
        },
    ];
    // 5 -> 2: not ready and stopped go at once, one idle is drained; the busy one stays.
    let d = run(settings(2, 0), &members, t(10));
    assert_eq!(deleted(&d), vec!["starting", "stopped"]);
    assert_eq!(retired(&d), vec!["idle-new"]);
    // 5 -> 1: both idle ones, still never the busy one.
    let d = run(settings(1, 0), &members, t(10));
    assert_eq!(retired(&d), vec!["idle-new", "idle-old"]);
    assert!(!d.actions.iter().any(
        |a| matches!(a, Action::Retire { name, .. } | Action::Delete { name, .. } if name == "busy")
    ));
    assert_eq!(cond(&d, PROGRESSING).reason, "ScalingIn");
    // 5 -> 0: the busy one too, but drained first (Retire), never deleted outright.
    let d = run(settings(0, 0), &members, t(10));
    assert_eq!(retired(&d), vec!["busy", "idle-new", "idle-old"]);
    assert!(!deleted(&d).contains(&"busy"));
}

#[test]
fn a_member_idle_for_less_than_the_window_waits_for_it() {
    let members = [
        member("a", 0),
        Member {
            idle_since: Some(t(0)),
            ..member("b", 1)
        },
    ];
    // a is idle past the window, b only for 20 of its 60 seconds: 2 -> 1 takes a.
    let d = run(settings(1, 0), &members, t(20));
    assert_eq!(retired(&d), vec!["a"]);
    // 2 -> 0: b waits for the rest of its window, and the pool looks again then.
    let d = run(settings(0, 0), &members, t(20));
    assert_eq!(retired(&d), vec!["a"]);
    assert_eq!(d.requeue, Some(Duration::from_secs(2)));
    assert!(
        cond(&d, PROGRESSING)
            .message
            .contains("idle for less than the idle window")
    );
    let d = run(settings(0, 0), &members, t(61));
    assert_eq!(retired(&d), vec!["a", "b"]);
}

#[test]
fn a_retiring_member_goes_once_drained_and_a_busy_one_waits_or_is_forced() {
    let retiring = |name: &str, active: i32| Member {
        retiring_since: Some(t(0)),
        active_workers: Some(active),
        ..member(name, 0)
    };
    let members = [
        member("keep", 0),
        retiring("done", 0),
        retiring("working", 1),
    ];
    let d = run(settings(1, 0), &members, t(10));
    assert_eq!(deleted(&d), vec!["done"]);
    assert_eq!(cond(&d, PROGRESSING).reason, "Draining");
    assert_eq!(d.status.retiring, 2);
    assert_eq!(d.status.replicas, 1);
    // Past the drain timeout: Wait keeps it and says so ...
    let d = run(
        settings(1, 0),
        &members[..1]
            .iter()
            .chain([&members[2]])
            .cloned()
            .collect::<Vec<_>>(),
        t(301),
    );
    assert!(deleted(&d).is_empty());
    assert_eq!(cond(&d, PROGRESSING).reason, "WaitingForDrain");
    // ... Force deletes it.
    let s = Settings {
        force_after_drain: true,
        ..settings(1, 0)
    };
    let d = run(s, &[members[0].clone(), members[2].clone()], t(301));
    assert_eq!(deleted(&d), vec!["working"]);
}

#[test]
fn unregistered_and_failed_members_are_replaced() {
    let members = [
        member("a", 0),
        Member {
            unregistered: true,
            ready: false,
            ..member("never", 1)
        },
        Member {
            broken: Some("phase Failed".into()),
            ready: false,
            ..member("dead", 2)
        },
    ];
    let d = run(settings(3, 0), &members, t(10));
    assert_eq!(deleted(&d), vec!["dead", "never"]);
    // Two replacements launched in the same look.
    assert_eq!(creates(&d), (2, 0));
    assert_eq!(cond(&d, PROGRESSING).reason, "ReplacingMembers");
    assert!(d.actions.iter().any(|a| matches!(
        a,
        Action::Delete {
            reason: "MemberUnregistered",
            ..
        }
    )));
}

#[test]
fn a_template_change_replaces_one_at_a_time_within_max_unavailable() {
    let old = |name: &str, c: i64| Member {
        hash: "h0".into(),
        ..member(name, c)
    };
    // maxSurge 1, maxUnavailable 0: first a surge member ...
    let members = vec![old("a", 0), old("b", 1), old("c", 2)];
    let d = run(settings(3, 0), &members, t(10));
    assert_eq!(creates(&d), (1, 0));
    assert!(retired(&d).is_empty());
    assert_eq!(d.status.updated, 0);
    // ... not yet ready: nothing is taken out of service.
    let mut members = members;
    members.push(Member {
        ready: false,
        ..member("n1", 20)
    });
    let d = run(settings(3, 0), &members, t(21));
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert_eq!(cond(&d, PROGRESSING).reason, "Replacing");
    // Ready: exactly one old member is drained (newest old first).
    members[3].ready = true;
    let d = run(settings(3, 0), &members, t(30));
    assert_eq!(retired(&d), vec!["c"]);
    assert_eq!(creates(&d), (0, 0));
    // maxUnavailable 2, maxSurge 0: two at once, never more.
    let s = Settings {
        max_surge: 0,
        max_unavailable: 2,
        ..settings(3, 0)
    };
    let d = run(s, &[old("a", 0), old("b", 1), old("c", 2)], t(30));
    assert_eq!(retired(&d).len(), 2);
    // An old member that is not serving is replaced at once, whatever the budget.
    let d = run(
        settings(2, 0),
        &[
            Member {
                ready: false,
                ..old("x", 0)
            },
            member("y", 1),
            member("z", 2),
        ],
        t(30),
    );
    assert_eq!(deleted(&d), vec!["x"]);
}

#[test]
fn an_invalid_spec_is_a_condition_not_an_action() {
    let status = SandboxPoolStatus::default();
    let d = decide(&Inputs {
        settings: Err(Invalid("scaleDown.idleWindow: bad".into())),
        status: &status,
        generation: Some(1),
        selector: "fleet.valet.dev/pool=p".into(),
        image_tag: None,
        scaler: Scaler::External,
        members: &[],
        now: t(0),
    });
    assert!(d.actions.is_empty());
    assert_eq!(cond(&d, READY).reason, "InvalidSpec");
}

#[test]
fn the_template_hash_follows_launch_settings_only() {
    let spec: SandboxSpec = serde_json::from_value(serde_json::json!({
        "environment": "staging", "instanceType": "t3.large", "launch": {"imageId": "ami-12345678"},
    }))
    .unwrap();
    let mut tagged = spec.clone();
    tagged.image = Some(crate::api::ImageSpec {
        repository: None,
        tag: "v2".into(),
    });
    tagged.capacity = 4;
    assert_eq!(template_hash(&spec), template_hash(&tagged));
    let mut other_ami = spec.clone();
    other_ami.launch.as_mut().unwrap().image_id = "ami-87654321".into();
    assert_ne!(template_hash(&spec), template_hash(&other_ami));
    let mut other_type = spec.clone();
    other_type.instance_type = Some("t3.xlarge".into());
    assert_ne!(template_hash(&spec), template_hash(&other_type));
    assert_eq!(template_hash(&spec).len(), 10);
}

#[test]
fn autoscale_goes_up_at_once_and_down_after_the_window() {
    let a = AutoscaleSettings {
        min: 1,
        max: 5,
        target: 0.5,
        window: Duration::from_secs(60),
        capacity: 2,
    };
    // 3 busy sessions at 1 per member (2 x 0.5): 3 members, at once.
    let up = autoscale(&a, 1, 3, None, t(0));
    assert_eq!((up.replicas, up.recommended, up.lower_since), (3, 3, None));
    // Bounded by max.
    assert_eq!(autoscale(&a, 1, 40, None, t(0)).replicas, 5);
    // Load gone: the recommendation drops, the size waits for the window.
    let wait = autoscale(&a, 3, 0, None, t(100));
    assert_eq!((wait.replicas, wait.recommended), (3, 1));
    assert_eq!(wait.lower_since, Some(t(100)));
    let still = autoscale(&a, 3, 0, wait.lower_since, t(159));
    assert_eq!(still.replicas, 3);
    let down = autoscale(&a, 3, 0, still.lower_since, t(160));
    assert_eq!((down.replicas, down.lower_since), (1, None));
    // A recommendation back at the size forgets the wait.
    let back = autoscale(&a, 3, 3, Some(t(100)), t(150));
    assert_eq!((back.replicas, back.lower_since), (3, None));
    // A size outside the bounds is brought inside them.
    assert_eq!(autoscale(&a, 9, 0, None, t(0)).replicas, 5);
    let _ = SignedDuration::ZERO;
}

#[test]
fn only_the_newest_succeeded_deploy_of_the_members_moves_the_template_tag() {
    let d = |name: &str, tag: &str, ok: bool, at: i64, sel: bool| DeployObs {
        name: name.into(),
        tag: tag.into(),
        succeeded: ok,
        finished_at: Some(t(at)),
        selects_members: sel,
    };
    let deploys = [
        d("v2", "v2", true, 10, true),
        // Failed or rolled back: never taken.
        d("v3", "v3", false, 20, true),
        // Another fleet's.
        d("other", "v9", true, 30, false),
    ];
    assert_eq!(
        template_tag(&deploys, None).map(|d| d.tag.as_str()),
        Some("v2")
    );
    // Taken already: nothing to do (a person may have set another tag since).
    assert_eq!(template_tag(&deploys, Some("v2")), None);
    assert_eq!(template_tag(&deploys[1..], None), None);
}

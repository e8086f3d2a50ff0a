//! The EC2 layer (`sandbox_operator::ec2`) against the wrapped moto endpoint: idempotent
//! launches, batched describes and power calls, throttling and faults, the periodic refresh
//! and its changes stream. Each test starts its own endpoint, so call counts are its own.
//! Deadlines are generous and nothing asserts on timings.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{InstanceType, ResourceType, Tag, TagSpecification};
use futures::StreamExt;
use sandbox_operator::ec2::{
    Ec2, Ec2Error, Ec2Settings, InstanceState, LaunchRequest, MANAGED_BY_VALUE, RateLimit,
    RateLimits, TAG_ENVIRONMENT, TAG_MANAGED_BY, TAG_NAME, TAG_NAMESPACE, TAG_UID,
};
use sandbox_operator::testenv::ec2::{
    Ec2Defaults, Ec2Endpoint, Ec2EndpointOptions, Fault, ThrottleConfig, bucket,
};

const PATIENCE: Duration = Duration::from_secs(90);
/// Long enough that no periodic refresh runs during a test that counts calls.
const NO_REFRESH: Duration = Duration::from_secs(3600);

async fn endpoint() -> Ec2Endpoint {
    Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .expect("start the EC2 endpoint (did `hack/install-tools.sh venv` run?)")
}

fn settings(refresh: Duration) -> Ec2Settings {
    Ec2Settings {
        refresh_interval: refresh,
        ..Default::default()
    }
}

async fn layer(ep: &Ec2Endpoint, settings: Ec2Settings) -> Ec2 {
    Ec2::new(ep.client().await, settings)
}

fn tags(uid: &str, name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TAG_MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
        (TAG_UID.to_owned(), uid.to_owned()),
        (TAG_NAMESPACE.to_owned(), "ec2-layer".to_owned()),
        (TAG_NAME.to_owned(), name.to_owned()),
        (TAG_ENVIRONMENT.to_owned(), "dev".to_owned()),
    ])
}

fn request(d: &Ec2Defaults, uid: &str) -> LaunchRequest {
    LaunchRequest {
        client_token: format!("sandbox-{uid}"),
        image_id: d.ami.clone(),
        instance_type: "t3.micro".to_owned(),
        subnet_id: Some(d.subnet.clone()),
        security_group_ids: vec![d.security_group.clone()],
        tags: tags(uid, &format!("sbx-{uid}")),
        ..Default::default()
    }
}

/// Launches `n` instances in one RunInstances straight through the SDK (not the layer),
/// tagged as the operator's own when `managed`.
async fn launch_direct(ep: &Ec2Endpoint, n: i32, managed: bool) -> Vec<String> {
    let d = ep.defaults().await.unwrap();
    let mut call = ep
        .client()
        .await
        .run_instances()
        .image_id(&d.ami)
        .subnet_id(&d.subnet)
        .instance_type(InstanceType::T3Micro)
        .min_count(n)
        .max_count(n);
    if managed {
        call = call.tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(
                    Tag::builder()
                        .key(TAG_MANAGED_BY)
                        .value(MANAGED_BY_VALUE)
                        .build(),
                )
                .build(),
        );
    }
    let out = call.send().await.expect("RunInstances");
    out.instances()
        .iter()
        .map(|i| i.instance_id().unwrap().to_owned())
        .collect()
}

async fn described(ep: &Ec2Endpoint) -> u64 {
    ep.calls().await.unwrap().accepted("DescribeInstances")
}

/// The ids of a list of instances.
fn ids(list: Vec<sandbox_operator::ec2::Instance>) -> HashSet<String> {
    list.into_iter().map(|i| i.id).collect()
}

/// The DescribeInstances calls the endpoint logged (arrival, ids named, bucket), for failure
/// messages.
async fn describe_log(ep: &Ec2Endpoint) -> Vec<(f64, usize, String)> {
    ep.call_log(0.0)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.action == "DescribeInstances")
        .map(|c| (c.t, c.n, c.bucket))
        .collect()
}

/// Describes until `id` reads `want`.
async fn wait_state(ec2: &Ec2, id: &str, want: InstanceState) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = ec2.describe(id, Duration::ZERO).await;
        if let Ok(Some(i)) = &got
            && i.state == want
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reached {want}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn launch_is_idempotent_findable_and_tagged() {
    let ep = endpoint().await;
    let d = ep.defaults().await.unwrap();
    let ec2 = layer(&ep, settings(NO_REFRESH)).await;

    let mut req = request(&d, "uid-1");
    req.root_volume_size_gib = Some(30);
    let first = ec2.launch(&req).await.expect("launch");
    let again = ec2.launch(&req).await.expect("repeated launch");
    assert_eq!(first.id, again.id, "one ClientToken, one instance");
    assert_eq!(first.state, InstanceState::Pending);
    assert_eq!(first.tags.get(TAG_UID).map(String::as_str), Some("uid-1"));
    assert!(!first.spot);
    let counts = ep.calls().await.unwrap();
    assert_eq!(counts.accepted("RunInstances"), 2, "{counts:?}");
    assert_eq!(
        counts.accepted("DescribeImages"),
        1,
        "the AMI's root device is looked up once: {counts:?}"
    );

    // Exactly one instance exists, and it carries every tag.
    let all = ec2.list_managed().await.expect("list_managed");
    assert_eq!(
        all.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        vec![first.id.as_str()]
    );
    let found = ec2
        .find_by_uid("uid-1")
        .await
        .expect("find_by_uid")
        .expect("the launched instance");
    assert_eq!(found.id, first.id);
    for (k, v) in &req.tags {
        assert_eq!(found.tags.get(k), Some(v), "tag {k}");
    }
    assert_eq!(found.instance_type.as_deref(), Some("t3.micro"));
    assert!(found.private_ip.is_some(), "{found:?}");
    assert!(found.launch_time.is_some());
    assert_eq!(ec2.find_by_uid("uid-unknown").await.unwrap(), None);

    // A spot launch, a second sandbox; an untagged instance is not listed as managed.
    let mut spot = request(&d, "uid-2");
    spot.spot = true;
    let spot = ec2.launch(&spot).await.expect("spot launch");
    assert!(spot.spot, "{spot:?}");
    launch_direct(&ep, 1, false).await;
    let mut listed: Vec<String> = ec2
        .list_managed()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    listed.sort();
    let mut want = vec![first.id.clone(), spot.id.clone()];
    want.sort();
    assert_eq!(listed, want);

    // Concurrent lookups of several UIDs share one call; terminated instances do not count.
    let before = described(&ep).await;
    let (a, b, c) = tokio::join!(
        ec2.find_by_uid("uid-1"),
        ec2.find_by_uid("uid-2"),
        ec2.find_by_uid("uid-3")
    );
    assert_eq!(a.unwrap().map(|i| i.id), Some(first.id.clone()));
    assert_eq!(b.unwrap().map(|i| i.id), Some(spot.id.clone()));
    assert_eq!(c.unwrap(), None);
    assert_eq!(described(&ep).await - before, 1);
    ec2.terminate(&spot.id).await.expect("terminate");
    wait_state(&ec2, &spot.id, InstanceState::Terminated).await;
    assert_eq!(ec2.find_by_uid("uid-2").await.unwrap(), None);

    // The layer's counters saw what the endpoint saw.
    let ours = ec2.call_counts();
    let theirs = ep.calls().await.unwrap();
    for action in ["DescribeImages", "DescribeInstances", "TerminateInstances"] {
        assert_eq!(
            ours.get(action).copied().unwrap_or(0),
            theirs.accepted(action),
            "{action}: {ours:?} vs {theirs:?}"
        );
    }
    // One RunInstances went straight through the SDK.
    assert_eq!(ours["RunInstances"] + 1, theirs.accepted("RunInstances"));
}

#[tokio::test]
async fn concurrent_describes_share_one_call() {
    let ep = endpoint().await;
    let ids = launch_direct(&ep, 50, true).await;
    let ec2 = layer(&ep, settings(NO_REFRESH)).await;

    let before = described(&ep).await;
    let results =
        futures::future::join_all(ids.iter().map(|id| ec2.describe(id, Duration::ZERO))).await;
    for (id, result) in ids.iter().zip(&results) {
        let instance = result.as_ref().expect("describe").as_ref().expect("known");
        assert_eq!(&instance.id, id);
        assert_eq!(instance.state, InstanceState::Running);
    }
    let calls = described(&ep).await - before;
    assert!(calls <= 2, "50 describes took {calls} DescribeInstances");
    assert_eq!(ec2.tracked(), 50);

    // Recent enough observations come from the shared view, without a call.
    let before = described(&ep).await;
    for id in &ids {
        assert!(
            ec2.describe(id, Duration::from_secs(3600))
                .await
                .unwrap()
                .is_some()
        );
    }
    assert_eq!(described(&ep).await, before);
}

#[tokio::test]
async fn unknown_ids_do_not_fail_their_batch() {
    let ep = endpoint().await;
    let known = launch_direct(&ep, 1, false).await.remove(0);
    let ec2 = layer(&ep, settings(NO_REFRESH)).await;
    let unknown = "i-0123456789abcdef0";

    let (a, b) = tokio::join!(
        ec2.describe(&known, Duration::ZERO),
        ec2.describe(unknown, Duration::ZERO)
    );
    assert_eq!(a.unwrap().map(|i| i.id), Some(known.clone()));
    assert_eq!(b.unwrap(), None);

    // A malformed id is refused as such, without a call.
    let before = ep.calls().await.unwrap().total_accepted();
    match ec2.describe("i-bogus", Duration::ZERO).await {
        Err(Ec2Error::Rejected { code, .. }) => assert_eq!(code, "InvalidInstanceID.Malformed"),
        other => panic!("{other:?}"),
    }
    assert_eq!(ep.calls().await.unwrap().total_accepted(), before);

    // Above 200 ids a batch goes by InstanceIds, where one unknown id fails the whole call:
    // the layer drops the ids EC2 names and asks again.
    let many = launch_direct(&ep, 230, false).await;
    let unknowns = ["i-0000000000000000a", "i-0000000000000000b"];
    let before = described(&ep).await;
    let all: Vec<&str> = many.iter().map(String::as_str).chain(unknowns).collect();
    let results =
        futures::future::join_all(all.iter().map(|id| ec2.describe(id, Duration::ZERO))).await;
    for (id, result) in all.iter().zip(results) {
        let got = result.expect("describe");
        if unknowns.contains(id) {
            assert_eq!(got, None, "{id}");
        } else {
            assert_eq!(got.map(|i| i.id).as_deref(), Some(*id));
        }
    }
    let calls = described(&ep).await - before;
    assert!(calls <= 3, "232 describes took {calls} DescribeInstances");
}

#[tokio::test]
async fn power_calls_are_merged_and_one_bad_id_fails_alone() {
    let ep = endpoint().await;
    let ids = launch_direct(&ep, 20, true).await;
    let ec2 = layer(&ep, settings(NO_REFRESH)).await;
    let count = |action: &'static str| {
        let ep = &ep;
        async move { ep.calls().await.unwrap().accepted(action) }
    };

    // 20 stops, merged.
    let results = futures::future::join_all(ids.iter().map(|id| ec2.stop(id))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let stops = count("StopInstances").await;
    assert!((1..=2).contains(&stops), "20 stops took {stops} calls");
    for id in &ids {
        wait_state(&ec2, id, InstanceState::Stopped).await;
    }

    // 20 starts, merged.
    let results = futures::future::join_all(ids.iter().map(|id| ec2.start(id))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let starts = count("StartInstances").await;
    assert!((1..=2).contains(&starts), "20 starts took {starts} calls");
    for id in &ids {
        wait_state(&ec2, id, InstanceState::Running).await;
    }

    // One instance terminated behind the layer's back, and one id EC2 never knew, in a batch
    // of stops: they fail alone, the others stop.
    let dead = ids[0].clone();
    ep.client()
        .await
        .terminate_instances()
        .instance_ids(&dead)
        .send()
        .await
        .unwrap();
    wait_state(&ec2, &dead, InstanceState::Terminated).await;
    let unknown = "i-0123456789abcdef0".to_owned();
    let batch: Vec<String> = ids[..10].iter().cloned().chain([unknown.clone()]).collect();
    let before = count("StopInstances").await;
    let results = futures::future::join_all(batch.iter().map(|id| ec2.stop(id))).await;
    for (id, result) in batch.iter().zip(&results) {
        if *id == dead {
            match result {
                Err(e @ Ec2Error::IncorrectState { instance_id, .. }) => {
                    assert_eq!(instance_id, &dead);
                    assert!(e.is_transient());
                }
                other => panic!("stop of a terminated instance: {other:?}"),
            }
        } else if *id == unknown {
            match result {
                Err(Ec2Error::Rejected { code, .. }) => {
                    assert_eq!(code, "InvalidInstanceID.NotFound")
                }
                other => panic!("stop of an unknown instance: {other:?}"),
            }
        } else {
            assert!(result.is_ok(), "{id}: {result:?}");
        }
    }
    let stops = count("StopInstances").await - before;
    assert!(stops <= 4, "a batch with two bad ids took {stops} calls");
    for id in &ids[1..10] {
        wait_state(&ec2, id, InstanceState::Stopped).await;
    }

    // Terminate everything, the terminated and the unknown one included: all succeed, merged.
    let before = count("TerminateInstances").await;
    let all: Vec<String> = ids.iter().cloned().chain([unknown]).collect();
    let results = futures::future::join_all(all.iter().map(|id| ec2.terminate(id))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let terminates = count("TerminateInstances").await - before;
    assert!(terminates <= 3, "21 terminations took {terminates} calls");
    for id in &ids {
        wait_state(&ec2, id, InstanceState::Terminated).await;
    }
}

/// Describes `id` until it succeeds, as a controller requeueing transient errors would;
/// panics on anything that is not transient.
async fn describe_until_ok(ec2: &Ec2, id: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match ec2.describe(id, Duration::ZERO).await {
            Ok(Some(_)) => return,
            Ok(None) => panic!("{id} unknown"),
            Err(e) => {
                assert!(
                    e.is_transient() && !matches!(e, Ec2Error::Rejected { .. }),
                    "a throttled describe surfaced as {e:?}"
                );
                assert!(Instant::now() < deadline, "{id}: still failing: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[tokio::test]
async fn throttling_is_retried_and_paced() {
    let ep = endpoint().await;
    let ids = launch_direct(&ep, 10, true).await;
    // The endpoint's filtered-describe bucket is tiny.
    ep.set_throttle(ThrottleConfig::enabled().bucket(bucket::DESCRIBE, 1.0, 2.0))
        .await
        .unwrap();

    // A client-side bucket far above the endpoint's: AWS throttles, the layer retries.
    let greedy = layer(
        &ep,
        Ec2Settings {
            refresh_interval: NO_REFRESH,
            batch_window: Duration::from_millis(1),
            buckets: RateLimits {
                describe: RateLimit::new(1000.0, 1000.0),
                ..RateLimits::default()
            },
            ..Default::default()
        },
    )
    .await;
    // Each task describes its instance several times in a row: batches follow each other.
    let tasks = ids.iter().map(|id| {
        let ec2 = greedy.clone();
        let id = id.clone();
        tokio::spawn(async move {
            for _ in 0..6 {
                describe_until_ok(&ec2, &id).await;
            }
        })
    });
    for task in futures::future::join_all(tasks).await {
        task.expect("describe task");
    }
    let counts = ep.calls().await.unwrap();
    assert!(
        counts.throttled("DescribeInstances") >= 1,
        "the endpoint never throttled: {counts:?}"
    );
    // Throttled attempts are counted too.
    let ours = greedy.call_counts()["DescribeInstances"];
    assert_eq!(
        ours,
        counts.accepted("DescribeInstances") + counts.throttled("DescribeInstances"),
        "{counts:?}"
    );
    drop(greedy);

    // A client-side bucket under the endpoint's: calls are paced, and all succeed.
    ep.set_throttle(ThrottleConfig::enabled().bucket(bucket::DESCRIBE, 1.0, 2.0))
        .await
        .unwrap();
    let paced = layer(
        &ep,
        Ec2Settings {
            refresh_interval: NO_REFRESH,
            batch_window: Duration::from_millis(1),
            buckets: RateLimits {
                describe: RateLimit::new(1.0, 1.5),
                ..RateLimits::default()
            },
            ..Default::default()
        },
    )
    .await;
    let tasks = ids.iter().map(|id| {
        let ec2 = paced.clone();
        let id = id.clone();
        tokio::spawn(async move {
            for _ in 0..3 {
                describe_until_ok(&ec2, &id).await;
            }
        })
    });
    for task in futures::future::join_all(tasks).await {
        task.expect("describe task");
    }
    ep.set_throttle(ThrottleConfig::disabled()).await.unwrap();
}

#[tokio::test]
async fn faults_are_retried_or_surfaced() {
    let ep = endpoint().await;
    let d = ep.defaults().await.unwrap();
    let id = launch_direct(&ep, 1, true).await.remove(0);
    let ec2 = layer(&ep, settings(NO_REFRESH)).await;

    // Transient faults, three times each: the calls succeed after retries.
    ep.inject_fault(
        Fault::new("DescribeInstances", "RequestLimitExceeded")
            .status(503)
            .times(3),
    )
    .await
    .unwrap();
    let got = ec2.describe(&id, Duration::ZERO).await.expect("retried");
    assert_eq!(got.map(|i| i.id), Some(id.clone()));
    let counts = ep.calls().await.unwrap();
    assert_eq!(counts.faulted("DescribeInstances"), 3);
    assert_eq!(ec2.call_counts()["DescribeInstances"], 4);

    ep.inject_fault(
        Fault::new("StopInstances", "InternalError")
            .status(500)
            .times(3),
    )
    .await
    .unwrap();
    ec2.stop(&id)
        .await
        .expect("stop retried through InternalError");
    wait_state(&ec2, &id, InstanceState::Stopped).await;

    // A fault that does not go away: transient, surfaced after the retries.
    ep.inject_fault(
        Fault::new("DescribeInstances", "Unavailable")
            .status(503)
            .until_cleared(),
    )
    .await
    .unwrap();
    let err = ec2
        .describe(&id, Duration::ZERO)
        .await
        .expect_err("endpoint down");
    assert!(matches!(err, Ec2Error::Unavailable { .. }), "{err:?}");
    assert!(err.is_transient());
    assert_eq!(err.reason(), "EC2Unavailable");
    ep.clear_faults().await.unwrap();

    // A refusal is not retried, and carries AWS's code.
    let before = ep.calls().await.unwrap();
    ep.inject_fault(
        Fault::new("RunInstances", "InvalidAMIID.NotFound")
            .message("The image id '[ami-00000000]' does not exist"),
    )
    .await
    .unwrap();
    let err = ec2
        .launch(&request(&d, "uid-bad-ami"))
        .await
        .expect_err("unknown AMI");
    match &err {
        Ec2Error::Rejected {
            action,
            code,
            message,
            ..
        } => {
            assert_eq!(*action, "RunInstances");
            assert_eq!(code, "InvalidAMIID.NotFound");
            assert!(message.contains("ami-00000000"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_transient());
    assert_eq!(err.reason(), "InvalidAMIIDNotFound");
    let after = ep.calls().await.unwrap();
    assert_eq!(
        after.faulted("RunInstances") - before.faulted("RunInstances"),
        1,
        "no retry of a refusal"
    );
    assert_eq!(
        after.accepted("RunInstances"),
        before.accepted("RunInstances")
    );
}

#[tokio::test]
async fn a_saturated_bucket_answers_throttled_without_calling() {
    let ep = endpoint().await;
    let d = ep.defaults().await.unwrap();
    let ec2 = layer(
        &ep,
        Ec2Settings {
            refresh_interval: NO_REFRESH,
            buckets: RateLimits {
                run: RateLimit::new(1.0, 0.001),
                max_wait: Duration::from_secs(1),
                ..RateLimits::default()
            },
            ..Default::default()
        },
    )
    .await;
    ec2.launch(&request(&d, "uid-a"))
        .await
        .expect("first launch");
    let err = ec2
        .launch(&request(&d, "uid-b"))
        .await
        .expect_err("the bucket is empty for a long while");
    // The operator's own pacing held the call back: that is pacing, not AWS throttling
    // (issue 12; this assertion read `Ec2Error::Throttled` before the two were told apart).
    assert!(
        matches!(
            err,
            Ec2Error::Paced {
                action: "RunInstances",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert_eq!(ep.calls().await.unwrap().accepted("RunInstances"), 1);
    // Nothing reached AWS, nothing was throttled there; the layer counts it as pacing.
    assert!(ep.calls().await.unwrap().throttled.is_empty());
    assert_eq!(ec2.call_counts().get("RunInstances"), Some(&1));
    assert!(
        ec2.paced_counts()
            .get("RunInstances/refused")
            .is_some_and(|n| *n >= 1),
        "{:?}",
        ec2.paced_counts()
    );
}

#[tokio::test]
async fn refresh_reports_changes_made_behind_the_layers_back() {
    let ep = endpoint().await;
    let d = ep.defaults().await.unwrap();
    let ec2 = layer(&ep, settings(Duration::from_millis(500))).await;
    let mut changes = ec2.changes();
    let mut other_subscriber = ec2.changes();

    let instance = ec2.launch(&request(&d, "uid-r")).await.expect("launch");
    wait_state(&ec2, &instance.id, InstanceState::Running).await;

    ep.client()
        .await
        .stop_instances()
        .instance_ids(&instance.id)
        .send()
        .await
        .unwrap();
    // The stream may first yield earlier changes (pending to running): wait for the one that
    // shows the stop.
    let stopped = tokio::time::timeout(PATIENCE, async {
        while let Some(id) = changes.next().await {
            if id != instance.id {
                continue;
            }
            let cached = ec2
                .describe(&id, Duration::from_secs(3600))
                .await
                .unwrap()
                .unwrap();
            if matches!(
                cached.state,
                InstanceState::Stopping | InstanceState::Stopped
            ) {
                return cached;
            }
        }
        panic!("the changes stream ended");
    })
    .await
    .expect("the stop was reported");
    assert_eq!(stopped.id, instance.id);
    // Every subscriber sees it.
    tokio::time::timeout(PATIENCE, async {
        while let Some(id) = other_subscriber.next().await {
            if id == instance.id {
                return;
            }
        }
    })
    .await
    .expect("the second subscriber saw it too");

    // Untracked: no longer refreshed, no longer reported.
    ec2.untrack(&instance.id);
    assert_eq!(ec2.tracked(), 0);

    // The stream ends with the layer.
    drop(ec2);
    let end =
        tokio::time::timeout(PATIENCE, async { while changes.next().await.is_some() {} }).await;
    assert!(end.is_ok(), "the changes stream outlived the layer");
}

#[tokio::test]
async fn a_refresh_costs_one_call_per_thousand_instances() {
    let ep = endpoint().await;
    let managed = launch_direct(&ep, 300, true).await;
    let adopted = launch_direct(&ep, 5, false).await;
    let ec2 = layer(&ep, settings(NO_REFRESH)).await;
    let all: Vec<&String> = managed.iter().chain(&adopted).collect();
    let results =
        futures::future::join_all(all.iter().map(|id| ec2.describe(id, Duration::ZERO))).await;
    assert!(results.iter().all(|r| matches!(r, Ok(Some(_)))));
    assert_eq!(ec2.tracked(), 305);

    // The operator's 300 and the 5 adopted ones through one page of the region (by the tag's
    // page and by id it would take two).
    let before = described(&ep).await;
    ec2.refresh_now().await;
    assert_eq!(described(&ep).await - before, 1);

    // The orphan sweep's listing sees the operator's own, not the adopted ones.
    let seen: HashSet<String> = ec2
        .list_managed()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(seen, managed.iter().cloned().collect::<HashSet<_>>());
}

#[tokio::test]
async fn the_orphan_sweeps_listing_rides_on_the_periodic_refresh() {
    let ep = endpoint().await;
    let managed = launch_direct(&ep, 5, true).await;
    let untracked = launch_direct(&ep, 2, true).await;
    let ec2 = layer(&ep, settings(Duration::from_secs(2))).await;
    for id in &managed {
        describe_until_ok(&ec2, id).await;
    }
    let want: HashSet<String> = managed.iter().chain(&untracked).cloned().collect();
    // The first answer comes right after a refresh; from there, the next listing costs only the
    // next refresh's one call (the sweep's own listing would make it two).
    let first = ec2.list_managed_at_next_refresh().await.unwrap();
    assert_eq!(
        first.into_iter().map(|i| i.id).collect::<HashSet<_>>(),
        want
    );
    let before = described(&ep).await;
    let second = ec2.list_managed_at_next_refresh().await.unwrap();
    assert_eq!(described(&ep).await - before, 1);
    assert_eq!(
        second.into_iter().map(|i| i.id).collect::<HashSet<_>>(),
        want
    );

    // Without a refresh due soon, the listing is made at once.
    let idle = layer(&ep, settings(NO_REFRESH)).await;
    let before = described(&ep).await;
    let now = idle.list_managed_at_next_refresh().await.unwrap();
    assert_eq!(described(&ep).await - before, 1);
    assert_eq!(now.len(), want.len());
}

#[tokio::test]
async fn the_sweeps_listing_on_an_adopted_fleet_costs_one_call_per_refresh() {
    let ep = endpoint().await;
    // Adopted by id: no managed-by tag, so the tag's listing does not show them.
    let adopted = launch_direct(&ep, 20, false).await;
    let orphans = launch_direct(&ep, 3, true).await;
    let ec2 = layer(&ep, settings(Duration::from_secs(3))).await;
    for id in &adopted {
        describe_until_ok(&ec2, id).await;
    }
    let want: HashSet<String> = orphans.iter().cloned().collect();
    // Stopped behind the layer's back: the refresh that lists the managed instances sees it
    // too, in the same one call (the tag's listing and a call by id would make two).
    ep.client()
        .await
        .stop_instances()
        .instance_ids(&adopted[0])
        .send()
        .await
        .expect("StopInstances");
    // The first answer comes right after a refresh; from there, the next one is counted.
    assert_eq!(ids(ec2.list_managed_at_next_refresh().await.unwrap()), want);
    let before = described(&ep).await;
    assert_eq!(ids(ec2.list_managed_at_next_refresh().await.unwrap()), want);
    assert_eq!(
        described(&ep).await - before,
        1,
        "{:?}",
        describe_log(&ep).await
    );
    let seen = ec2
        .describe(&adopted[0], Duration::from_secs(600))
        .await
        .unwrap()
        .expect("known");
    assert!(
        matches!(seen.state, InstanceState::Stopping | InstanceState::Stopped),
        "the refresh's observation: {:?}",
        seen.state
    );
    assert_eq!(
        described(&ep).await - before,
        1,
        "answered from the refresh"
    );
}

#[tokio::test]
async fn a_region_of_more_than_a_page_is_listed_by_tag_and_id_after_one_try() {
    let ep = endpoint().await;
    // Other parties' instances first (EC2 lists in launch order), in six reservations: with
    // pages of five (the endpoint pages by reservation) the region takes two pages, and the
    // adopted instances are on the second.
    for _ in 0..6 {
        launch_direct(&ep, 1, false).await;
    }
    let adopted = launch_direct(&ep, 5, false).await;
    let orphans = launch_direct(&ep, 2, true).await;
    let ec2 = layer(
        &ep,
        Ec2Settings {
            page_size: 5,
            ..settings(Duration::from_secs(5))
        },
    )
    .await;
    for id in &adopted {
        describe_until_ok(&ec2, id).await;
    }
    let want: HashSet<String> = orphans.iter().cloned().collect();
    // The first refresh tries one page of the region, finds more, and finishes by the tag
    // and by id (three calls, once) ...
    let before = described(&ep).await;
    assert_eq!(ids(ec2.list_managed_at_next_refresh().await.unwrap()), want);
    assert_eq!(
        described(&ep).await - before,
        3,
        "{:?}",
        describe_log(&ep).await
    );
    // ... the next ones go by the tag and by id from the start.
    let before = described(&ep).await;
    assert_eq!(ids(ec2.list_managed_at_next_refresh().await.unwrap()), want);
    assert_eq!(
        described(&ep).await - before,
        2,
        "{:?}",
        describe_log(&ep).await
    );
}

#[tokio::test]
async fn instances_ec2_does_not_show_yet_neither_fail_their_batch_nor_vanish() {
    let ep = endpoint().await;
    let d = ep.defaults().await.unwrap();
    // 230 instances EC2 shows, then EC2's eventual consistency for the next launches.
    let visible = launch_direct(&ep, 230, false).await;
    let window = Duration::from_secs(60);
    ep.set_consistency(window).await.unwrap();
    let ec2 = layer(&ep, settings(NO_REFRESH)).await;
    let before = Instant::now();
    let ours = ec2.launch(&request(&d, "uid-new")).await.expect("launch");
    // Launched behind the layer's back: EC2 does not know it yet, nor does the layer.
    let foreign = launch_direct(&ep, 1, false).await.remove(0);
    let hidden = ep.consistency().await.unwrap().hidden;
    assert!(
        hidden.contains(&ours.id) && hidden.contains(&foreign),
        "{hidden:?}"
    );

    // One batch of 232 ids goes by InstanceIds, where the new ids fail the whole call: the
    // others are answered all the same.
    let all: Vec<String> = visible
        .iter()
        .cloned()
        .chain([ours.id.clone(), foreign.clone()])
        .collect();
    let results =
        futures::future::join_all(all.iter().map(|id| ec2.describe(id, Duration::ZERO))).await;
    assert!(
        before.elapsed() < window,
        "the machine is too slow for this test"
    );
    for (id, result) in all.iter().zip(results) {
        let got = result.unwrap_or_else(|e| panic!("{id}: {e}"));
        if *id == foreign {
            assert_eq!(got, None, "unknown to EC2 and to the layer");
        } else if *id == ours.id {
            // Launched moments ago by this layer: as RunInstances described it, not gone.
            let got = got.expect("an instance this layer launched is never reported unknown");
            assert_eq!(got.state, InstanceState::Pending);
        } else {
            assert_eq!(got.map(|i| i.id).as_deref(), Some(id.as_str()));
        }
    }
    let named = ep
        .call_log(0.0)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "DescribeInstances")
        .count();
    // The failed call, then the others again: not one call per id.
    assert!(
        (2..=3).contains(&named),
        "{named} DescribeInstances for one batch"
    );

    // A filtered describe (200 ids or fewer) leaves it out; the layer still answers it.
    let got = ec2.describe(&ours.id, Duration::ZERO).await.unwrap();
    assert_eq!(got.map(|i| i.state), Some(InstanceState::Pending));
    // The look-up by UID tag (before a launch) finds it although EC2 does not list it by its
    // tags yet: it would never be launched twice.
    let found = ec2.find_by_uid("uid-new").await.unwrap();
    assert_eq!(found.map(|i| i.id), Some(ours.id.clone()));
    // It can be terminated meanwhile.
    ec2.terminate(&ours.id).await.expect("terminate");
    assert!(
        ep.call_log(0.0)
            .await
            .unwrap()
            .iter()
            .any(|e| e.action == "TerminateInstances" && e.ids.contains(&ours.id))
    );
    assert_eq!(ep.calls().await.unwrap().accepted("CreateTags"), 0);
}

/// A burst of launches of one AMI (each with a root volume size, so each needs the AMI's root
/// device name) shares one DescribeImages; a failed lookup answers the launches that waited on
/// it and is not kept, so the next launch asks again.
#[tokio::test]
async fn concurrent_launches_of_one_ami_share_one_image_lookup() {
    const BURST: usize = 100;
    let ep = endpoint().await;
    let d = ep.defaults().await.unwrap();
    let unpaced = |refresh| Ec2Settings {
        buckets: RateLimits {
            run: RateLimit::UNLIMITED,
            ..RateLimits::default()
        },
        ..settings(refresh)
    };
    // The lookup stays in flight while the whole burst arrives.
    ep.set_latency("DescribeImages", Duration::from_millis(500))
        .await
        .unwrap();
    let ec2 = layer(&ep, unpaced(NO_REFRESH)).await;
    let launches = (0..BURST).map(|k| {
        let mut req = request(&d, &format!("uid-burst-{k}"));
        req.root_volume_size_gib = Some(30);
        let ec2 = ec2.clone();
        async move { ec2.launch(&req).await }
    });
    let results = futures::future::join_all(launches).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let ids: HashSet<_> = results.into_iter().map(|r| r.unwrap().id).collect();
    assert_eq!(ids.len(), BURST, "one instance per launch");
    let counts = ep.calls().await.unwrap();
    assert_eq!(counts.accepted("RunInstances"), BURST as u64, "{counts:?}");
    assert_eq!(
        counts.accepted("DescribeImages"),
        1,
        "{BURST} concurrent launches of one AMI: {counts:?}"
    );

    // A fresh layer (nothing known of the AMI) whose lookup is refused: the launches waiting
    // on it all get the refusal from that one call ...
    ep.reset_calls().await.unwrap();
    let fresh = layer(&ep, unpaced(NO_REFRESH)).await;
    ep.inject_fault(
        Fault::new("DescribeImages", "InvalidAMIID.Unavailable")
            .message("The image is not available right now"),
    )
    .await
    .unwrap();
    let launches = (0..10).map(|k| {
        let mut req = request(&d, &format!("uid-refused-{k}"));
        req.root_volume_size_gib = Some(30);
        let fresh = fresh.clone();
        async move { fresh.launch(&req).await }
    });
    for result in futures::future::join_all(launches).await {
        match result {
            Err(Ec2Error::Rejected { action, code, .. }) => {
                assert_eq!(action, "DescribeImages");
                assert_eq!(code, "InvalidAMIID.Unavailable");
            }
            other => panic!("the refused lookup should answer every waiter: {other:?}"),
        }
    }
    let counts = ep.calls().await.unwrap();
    assert_eq!(counts.faulted("DescribeImages"), 1, "{counts:?}");
    assert_eq!(counts.accepted("DescribeImages"), 0, "{counts:?}");
    assert_eq!(counts.accepted("RunInstances"), 0, "{counts:?}");
    // ... and the refusal is not kept: the next launch looks the AMI up again and goes.
    let mut req = request(&d, "uid-after-refusal");
    req.root_volume_size_gib = Some(30);
    fresh
        .launch(&req)
        .await
        .expect("launch after a refused lookup");
    let counts = ep.calls().await.unwrap();
    assert_eq!(counts.accepted("DescribeImages"), 1, "{counts:?}");
    assert_eq!(counts.accepted("RunInstances"), 1, "{counts:?}");
}

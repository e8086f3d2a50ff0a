//! The wrapped moto EC2 endpoint, exercised through aws-sdk-ec2: ClientToken idempotency,
//! transitional states, throttling, injected faults and call counts. Each test starts its own
//! endpoint, so tests can run in parallel without seeing each other's calls or settings.

use std::time::{Duration, Instant};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{InstanceStateName, InstanceType};
use sandbox_operator::testenv::ec2::{
    Delays, Ec2Endpoint, Ec2EndpointOptions, Fault, ThrottleConfig, bucket,
};

/// How long a test waits for a state before giving up; far above the configured windows, for
/// slow shared machines.
const PATIENCE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

async fn endpoint(opts: Ec2EndpointOptions) -> Ec2Endpoint {
    let started = Instant::now();
    let ep = Ec2Endpoint::start(opts)
        .await
        .expect("start the EC2 endpoint (did `hack/install-tools.sh venv` run?)");
    eprintln!(
        "EC2 endpoint ready at {} in {:?}",
        ep.url(),
        started.elapsed()
    );
    ep
}

/// Launches one instance with the endpoint's default AMI and subnet.
async fn launch(ec2: &Client, ep: &Ec2Endpoint) -> (String, InstanceStateName) {
    let d = ep.defaults().await.expect("defaults");
    let out = ec2
        .run_instances()
        .image_id(&d.ami)
        .subnet_id(&d.subnet)
        .security_group_ids(&d.security_group)
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("RunInstances");
    let instance = &out.instances()[0];
    let state = instance
        .state()
        .and_then(|s| s.name())
        .cloned()
        .expect("state");
    (instance.instance_id().expect("id").to_owned(), state)
}

async fn state_of(ec2: &Client, id: &str) -> InstanceStateName {
    let out = ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .expect("DescribeInstances");
    out.reservations()[0].instances()[0]
        .state()
        .and_then(|s| s.name())
        .cloned()
        .expect("state")
}

/// Polls DescribeInstances until `id` reads `want`; returns the states seen on the way (in
/// order, without repeats) and when `want` was first seen.
async fn wait_for(
    ec2: &Client,
    id: &str,
    want: InstanceStateName,
) -> (Vec<InstanceStateName>, Instant) {
    let deadline = Instant::now() + PATIENCE;
    let mut seen: Vec<InstanceStateName> = Vec::new();
    loop {
        let state = state_of(ec2, id).await;
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if state == want {
            return (seen, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reached {want:?}; states seen: {seen:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Checks that `id` reads `during` while a `window` begun at `started` (taken before the call
/// that began it) lasts, and `after` once it is over, never earlier. Only reads that surely fell
/// inside the window are held to `during`, so a slow machine makes this weaker, never flaky.
async fn check_window(
    ec2: &Client,
    id: &str,
    started: Instant,
    window: Duration,
    during: InstanceStateName,
    after: InstanceStateName,
) {
    let first = state_of(ec2, id).await;
    if started.elapsed() < window {
        assert_eq!(first, during, "{id} inside its {window:?} window");
    }
    let (seen, reached) = wait_for(ec2, id, after.clone()).await;
    assert!(
        seen.iter().all(|s| *s == during || *s == after),
        "{id}: unexpected states {seen:?}"
    );
    assert!(
        reached - started >= window,
        "{id} read {after:?} after {:?}, inside its {window:?} window",
        reached - started
    );
}

#[tokio::test]
async fn run_instances_is_idempotent_by_client_token() {
    let ep = endpoint(Ec2EndpointOptions::default()).await;
    let ec2 = ep.client().await;
    let d = ep.defaults().await.unwrap();
    assert_eq!(d.region, "us-east-1");
    assert!(d.ami.starts_with("ami-"), "{d:?}");

    let run = || {
        ec2.run_instances()
            .image_id(&d.ami)
            .subnet_id(&d.subnet)
            .min_count(1)
            .max_count(1)
            .client_token("sandbox-a-generation-1")
            .send()
    };
    let first = run().await.expect("first RunInstances");
    let second = run().await.expect("repeated RunInstances");
    let id = first.instances()[0].instance_id().unwrap();
    assert_eq!(second.instances().len(), 1);
    assert_eq!(second.instances()[0].instance_id(), Some(id));
    assert_eq!(first.reservation_id(), second.reservation_id());

    let all: Vec<String> = ec2
        .describe_instances()
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    assert_eq!(all, vec![id.to_owned()], "one instance for one ClientToken");

    // The same token with other parameters is refused, as on AWS.
    let err = ec2
        .run_instances()
        .image_id("ami-12345678")
        .min_count(1)
        .max_count(1)
        .client_token("sandbox-a-generation-1")
        .send()
        .await
        .expect_err("same token, other parameters");
    assert_eq!(err.code(), Some("IdempotentParameterMismatch"), "{err:?}");

    // Another token launches another instance; so does no token (the SDK makes one up).
    ec2.run_instances()
        .image_id(&d.ami)
        .min_count(1)
        .max_count(1)
        .client_token("sandbox-b-generation-1")
        .send()
        .await
        .unwrap();
    launch(&ec2, &ep).await;
    assert_eq!(ep.calls().await.unwrap().accepted("RunInstances"), 5);
    let count: usize = ec2
        .describe_instances()
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .map(|r| r.instances().len())
        .sum();
    assert_eq!(count, 3);
}

#[tokio::test]
async fn instances_are_pending_then_running() {
    let window = Duration::from_secs(3);
    let ep = endpoint(Ec2EndpointOptions {
        pending: window,
        ..Default::default()
    })
    .await;
    let ec2 = ep.client().await;

    let before = Instant::now();
    let (id, launched_as) = launch(&ec2, &ep).await;
    assert_eq!(launched_as, InstanceStateName::Pending);

    // DescribeInstanceStatus lists a pending instance only with IncludeAllInstances, as AWS.
    let status = ec2
        .describe_instance_status()
        .instance_ids(&id)
        .include_all_instances(true)
        .send()
        .await
        .unwrap();
    let seen_status = status.instance_statuses()[0]
        .instance_state()
        .and_then(|s| s.name())
        .cloned();
    let status_in_window = before.elapsed() < window;
    if status_in_window {
        assert_eq!(seen_status, Some(InstanceStateName::Pending));
    }
    check_window(
        &ec2,
        &id,
        before,
        window,
        InstanceStateName::Pending,
        InstanceStateName::Running,
    )
    .await;

    let status = ec2
        .describe_instance_status()
        .instance_ids(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        status.instance_statuses()[0]
            .instance_state()
            .and_then(|s| s.name()),
        Some(&InstanceStateName::Running)
    );

    // Stopped then started again: pending once more.
    ep.set_delays(Delays {
        stopping: Some(Duration::ZERO),
        ..Default::default()
    })
    .await
    .unwrap();
    ec2.stop_instances().instance_ids(&id).send().await.unwrap();
    wait_for(&ec2, &id, InstanceStateName::Stopped).await;
    let before = Instant::now();
    let started = ec2
        .start_instances()
        .instance_ids(&id)
        .send()
        .await
        .unwrap();
    let change = &started.starting_instances()[0];
    assert_eq!(
        change.current_state().and_then(|s| s.name()),
        Some(&InstanceStateName::Pending)
    );
    assert_eq!(
        change.previous_state().and_then(|s| s.name()),
        Some(&InstanceStateName::Stopped)
    );
    check_window(
        &ec2,
        &id,
        before,
        window,
        InstanceStateName::Pending,
        InstanceStateName::Running,
    )
    .await;
}

#[tokio::test]
async fn instances_are_stopping_then_stopped() {
    let window = Duration::from_secs(3);
    let ep = endpoint(Ec2EndpointOptions {
        stopping: window,
        ..Default::default()
    })
    .await;
    let ec2 = ep.client().await;
    let (id, launched_as) = launch(&ec2, &ep).await;
    // RunInstances answers `pending`, as on AWS; with no pending window it is running at once.
    assert_eq!(launched_as, InstanceStateName::Pending);
    assert_eq!(state_of(&ec2, &id).await, InstanceStateName::Running);

    let before = Instant::now();
    let out = ec2.stop_instances().instance_ids(&id).send().await.unwrap();
    let change = &out.stopping_instances()[0];
    assert_eq!(
        change.current_state().and_then(|s| s.name()),
        Some(&InstanceStateName::Stopping)
    );
    assert_eq!(
        change.previous_state().and_then(|s| s.name()),
        Some(&InstanceStateName::Running)
    );
    check_window(
        &ec2,
        &id,
        before,
        window,
        InstanceStateName::Stopping,
        InstanceStateName::Stopped,
    )
    .await;

    // Stopping a stopped instance changes nothing.
    let out = ec2.stop_instances().instance_ids(&id).send().await.unwrap();
    assert_eq!(
        out.stopping_instances()[0]
            .current_state()
            .and_then(|s| s.name()),
        Some(&InstanceStateName::Stopped)
    );
}

#[tokio::test]
async fn instances_are_shutting_down_then_terminated() {
    let window = Duration::from_secs(3);
    let ep = endpoint(Ec2EndpointOptions {
        shutting_down: window,
        ..Default::default()
    })
    .await;
    let ec2 = ep.client().await;
    let (id, _) = launch(&ec2, &ep).await;

    let before = Instant::now();
    let out = ec2
        .terminate_instances()
        .instance_ids(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        out.terminating_instances()[0]
            .current_state()
            .and_then(|s| s.name()),
        Some(&InstanceStateName::ShuttingDown)
    );
    // Filters see the transitional state too.
    let filtered = ec2
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("instance-state-name")
                .values("shutting-down")
                .build(),
        )
        .send()
        .await
        .unwrap();
    if before.elapsed() < window {
        assert_eq!(filtered.reservations().len(), 1, "{filtered:?}");
    }
    check_window(
        &ec2,
        &id,
        before,
        window,
        InstanceStateName::ShuttingDown,
        InstanceStateName::Terminated,
    )
    .await;

    // Terminating again is a no-op that reports terminated.
    let out = ec2
        .terminate_instances()
        .instance_ids(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        out.terminating_instances()[0]
            .current_state()
            .and_then(|s| s.name()),
        Some(&InstanceStateName::Terminated)
    );
}

#[tokio::test]
async fn start_while_stopping_is_refused() {
    // Long enough that the instance is surely still stopping when StartInstances arrives.
    let ep = endpoint(Ec2EndpointOptions {
        stopping: Duration::from_secs(600),
        ..Default::default()
    })
    .await;
    let ec2 = ep.client_without_retries().await;
    let (id, _) = launch(&ec2, &ep).await;
    ec2.stop_instances().instance_ids(&id).send().await.unwrap();
    assert_eq!(state_of(&ec2, &id).await, InstanceStateName::Stopping);

    let err = ec2
        .start_instances()
        .instance_ids(&id)
        .send()
        .await
        .expect_err("StartInstances on a stopping instance");
    assert_eq!(err.code(), Some("IncorrectInstanceState"), "{err:?}");
    assert!(
        err.message().unwrap_or_default().contains(&id),
        "{:?}",
        err.message()
    );
    assert_eq!(state_of(&ec2, &id).await, InstanceStateName::Stopping);

    // A terminated instance cannot be started either.
    ec2.terminate_instances()
        .instance_ids(&id)
        .send()
        .await
        .unwrap();
    wait_for(&ec2, &id, InstanceStateName::Terminated).await;
    let err = ec2
        .start_instances()
        .instance_ids(&id)
        .send()
        .await
        .expect_err("StartInstances on a terminated instance");
    assert_eq!(err.code(), Some("IncorrectInstanceState"), "{err:?}");
}

#[tokio::test]
async fn throttling_answers_request_limit_exceeded_and_recovers() {
    let ep = endpoint(Ec2EndpointOptions::default()).await;
    let ec2 = ep.client_without_retries().await;
    // Throttling is off by default.
    for _ in 0..20 {
        ec2.describe_instances().send().await.expect("unthrottled");
    }

    ep.set_throttle(ThrottleConfig::enabled().bucket(bucket::DESCRIBE_UNFILTERED, 3.0, 2.0))
        .await
        .unwrap();
    let mut ok = 0;
    let mut throttled = None;
    for _ in 0..100 {
        match ec2.describe_instances().send().await {
            Ok(_) => ok += 1,
            Err(err) => {
                throttled = Some(err);
                break;
            }
        }
    }
    let err = throttled.expect("a drained bucket throttles");
    assert!(
        ok >= 3,
        "the bucket held 3 tokens, yet only {ok} calls passed"
    );
    assert_eq!(err.code(), Some("RequestLimitExceeded"), "{err:?}");
    assert_eq!(err.message(), Some("Request limit exceeded."));
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(503));

    // Filtered calls draw from the (full) `describe` bucket meanwhile.
    ec2.describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("instance-state-name")
                .values("running")
                .build(),
        )
        .send()
        .await
        .expect("filtered DescribeInstances uses another bucket");

    // Refill: 2 tokens/s, so a second is plenty; retry a while for slow machines.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        match ec2.describe_instances().send().await {
            Ok(_) => break,
            Err(err) => {
                assert_eq!(err.code(), Some("RequestLimitExceeded"), "{err:?}");
                assert!(Instant::now() < deadline, "never recovered");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let counts = ep.calls().await.unwrap();
    assert!(counts.throttled("DescribeInstances") >= 1, "{counts:?}");

    // With the SDK's standard retries, a throttled call is retried and succeeds in the end.
    ep.set_throttle(ThrottleConfig::enabled().bucket(bucket::DESCRIBE_UNFILTERED, 1.0, 20.0))
        .await
        .unwrap();
    let retrying = ep.client().await;
    for _ in 0..5 {
        retrying
            .describe_instances()
            .send()
            .await
            .expect("retried through throttling");
    }

    ep.set_throttle(ThrottleConfig::disabled()).await.unwrap();
    for _ in 0..20 {
        ec2.describe_instances()
            .send()
            .await
            .expect("throttling off again");
    }
}

#[tokio::test]
async fn injected_fault_fails_exactly_n_times() {
    let ep = endpoint(Ec2EndpointOptions::default()).await;
    let ec2 = ep.client_without_retries().await;
    let d = ep.defaults().await.unwrap();
    ep.inject_fault(
        Fault::new("RunInstances", "InsufficientInstanceCapacity")
            .status(500)
            .message("We currently do not have sufficient t3.micro capacity.")
            .times(2),
    )
    .await
    .unwrap();

    let run = || {
        ec2.run_instances()
            .image_id(&d.ami)
            .min_count(1)
            .max_count(1)
            .send()
    };
    for attempt in 1..=2 {
        let err = run().await.expect_err("faulted RunInstances");
        assert_eq!(
            err.code(),
            Some("InsufficientInstanceCapacity"),
            "attempt {attempt}: {err:?}"
        );
        assert_eq!(
            err.message(),
            Some("We currently do not have sufficient t3.micro capacity.")
        );
        assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(500));
    }
    run().await.expect("third RunInstances succeeds");
    // Other actions were never affected.
    ec2.describe_instances().send().await.unwrap();

    let counts = ep.calls().await.unwrap();
    assert_eq!(counts.faulted("RunInstances"), 2);
    assert_eq!(counts.accepted("RunInstances"), 1);

    // A fault until cleared, plus added latency.
    ep.inject_fault(
        Fault::new("DescribeInstances", "Unavailable")
            .status(503)
            .until_cleared(),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        let err = ec2
            .describe_instances()
            .send()
            .await
            .expect_err("until cleared");
        assert_eq!(err.code(), Some("Unavailable"));
    }
    ep.clear_faults().await.unwrap();
    ep.set_latency("DescribeInstances", Duration::from_millis(300))
        .await
        .unwrap();
    let before = Instant::now();
    ec2.describe_instances().send().await.unwrap();
    assert!(before.elapsed() >= Duration::from_millis(300));
    ep.clear_faults().await.unwrap();
}

#[tokio::test]
async fn call_counts_count_per_action_and_reset() {
    let ep = endpoint(Ec2EndpointOptions::default()).await;
    let ec2 = ep.client_without_retries().await;
    assert_eq!(ep.calls().await.unwrap().total_accepted(), 0);

    let (id, _) = launch(&ec2, &ep).await;
    for _ in 0..3 {
        ec2.describe_instances()
            .instance_ids(&id)
            .send()
            .await
            .unwrap();
    }
    ec2.terminate_instances()
        .instance_ids(&id)
        .send()
        .await
        .unwrap();
    let counts = ep.calls().await.unwrap();
    assert_eq!(counts.accepted("RunInstances"), 1, "{counts:?}");
    assert_eq!(counts.accepted("DescribeInstances"), 3, "{counts:?}");
    assert_eq!(counts.accepted("TerminateInstances"), 1, "{counts:?}");
    assert_eq!(counts.total_accepted(), 5, "{counts:?}");
    assert!(counts.throttled.is_empty() && counts.faulted.is_empty());

    // A call moto refuses is still an accepted call.
    let err = ec2
        .describe_instances()
        .instance_ids("i-0123456789abcdef0")
        .send()
        .await
        .expect_err("unknown instance");
    assert_eq!(err.code(), Some("InvalidInstanceID.NotFound"));
    assert_eq!(ep.calls().await.unwrap().accepted("DescribeInstances"), 4);

    ep.reset_calls().await.unwrap();
    assert_eq!(ep.calls().await.unwrap(), Default::default());
    ec2.describe_instances().send().await.unwrap();
    let counts = ep.calls().await.unwrap();
    assert_eq!(counts.accepted("DescribeInstances"), 1);
    assert_eq!(counts.total_accepted(), 1);
}

#[tokio::test]
async fn response_delay_holds_the_answer_after_ec2_acted() {
    use sandbox_operator::testenv::ec2::{Ec2Endpoint, Ec2EndpointOptions};
    let ep = Ec2Endpoint::start(Ec2EndpointOptions::default())
        .await
        .unwrap();
    let defaults = ep.defaults().await.unwrap();
    ep.set_response_delay("RunInstances", std::time::Duration::from_secs(3))
        .await
        .unwrap();
    let client = ep.client_without_retries().await;
    // Give up long before the answer comes: the instance exists all the same.
    let call = client
        .run_instances()
        .image_id(&defaults.ami)
        .min_count(1)
        .max_count(1)
        .send();
    let timed_out = tokio::time::timeout(std::time::Duration::from_millis(1500), call)
        .await
        .is_err();
    assert!(timed_out, "the answer should be held back");
    let out = client.describe_instances().send().await.unwrap();
    let n: usize = out.reservations().iter().map(|r| r.instances().len()).sum();
    assert_eq!(
        n, 1,
        "the instance must exist although its caller never heard back"
    );
}

/// The ids of every instance a DescribeInstances answer lists.
fn listed(
    out: &aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput,
) -> Vec<String> {
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn eventual_consistency_hides_new_instances_for_a_while() {
    use aws_sdk_ec2::types::{Filter, Tag};
    let window = Duration::from_secs(8);
    let ep = endpoint(Ec2EndpointOptions::default().with_consistency(window)).await;
    let ec2 = ep.client_without_retries().await;
    assert_eq!(ep.consistency().await.unwrap().seconds, 8.0);

    // An instance launched with the mode off is visible at once.
    ep.set_consistency(Duration::ZERO).await.unwrap();
    let (old, _) = launch(&ec2, &ep).await;
    assert!(ep.consistency().await.unwrap().hidden.is_empty());
    ep.set_consistency(window).await.unwrap();

    let before = Instant::now();
    // RunInstances itself answers the new instance, as on AWS.
    let (new, state) = launch(&ec2, &ep).await;
    assert_eq!(state, InstanceStateName::Pending);
    // Only reads that surely fell inside the window are held to it (a slow machine makes this
    // weaker, never flaky); the first ones are checked to have been inside it, though.
    let inside = |what: &str, strict: bool| {
        let inside = before.elapsed() < window;
        assert!(
            inside || !strict,
            "{what} came {:?} after the launch, beyond the {window:?} window: the machine is too slow for this test",
            before.elapsed()
        );
        inside
    };

    // By id, even with a visible one beside it: the whole call fails, naming the new id only.
    let by_ids = ec2
        .describe_instances()
        .instance_ids(&old)
        .instance_ids(&new)
        .send()
        .await;
    if inside("DescribeInstances by id", true) {
        let err = by_ids.expect_err("a new id fails the whole call");
        assert_eq!(err.code(), Some("InvalidInstanceID.NotFound"), "{err:?}");
        let message = err.message().unwrap_or_default().to_owned();
        assert!(
            message.contains(&new) && !message.contains(&old),
            "{message}"
        );
        assert!(ep.consistency().await.unwrap().hidden.contains(&new));
    }
    // The visible one alone answers.
    let alone = ec2
        .describe_instances()
        .instance_ids(&old)
        .send()
        .await
        .unwrap();
    assert_eq!(listed(&alone), vec![old.clone()]);

    // Without ids, filtered or not: left out.
    let all = ec2.describe_instances().send().await.unwrap();
    let filtered = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("instance-id")
                .values(&old)
                .values(&new)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let by_state = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .build(),
        )
        .send()
        .await
        .unwrap();
    if inside("the filtered DescribeInstances", false) {
        for out in [&all, &filtered, &by_state] {
            assert_eq!(listed(out), vec![old.clone()], "{out:?}");
        }
    }

    // CreateTags on it is refused; on the visible one it works.
    let tag = Tag::builder().key("team").value("a").build();
    let refused = ec2
        .create_tags()
        .resources(&new)
        .tags(tag.clone())
        .send()
        .await;
    if inside("CreateTags", false) {
        let err = refused.expect_err("CreateTags on an instance EC2 does not show yet");
        assert_eq!(err.code(), Some("InvalidInstanceID.NotFound"), "{err:?}");
        assert!(err.message().unwrap_or_default().contains(&new));
    }
    ec2.create_tags()
        .resources(&old)
        .tags(tag.clone())
        .send()
        .await
        .expect("CreateTags on a visible instance");

    // Once the window is over, everything sees it, never earlier.
    let deadline = Instant::now() + PATIENCE;
    let seen_after = loop {
        let r = ec2.describe_instances().instance_ids(&new).send().await;
        if r.is_ok() {
            break before.elapsed();
        }
        assert!(Instant::now() < deadline, "{new} never became visible");
        tokio::time::sleep(POLL).await;
    };
    assert!(
        seen_after >= window,
        "{new} visible after {seen_after:?}, inside its {window:?} window"
    );
    let all = ec2.describe_instances().send().await.unwrap();
    let mut ids = listed(&all);
    ids.sort();
    let mut want = vec![old.clone(), new.clone()];
    want.sort();
    assert_eq!(ids, want);
    ec2.create_tags()
        .resources(&new)
        .tags(tag)
        .send()
        .await
        .expect("CreateTags once visible");
    assert!(ep.consistency().await.unwrap().hidden.is_empty());
    // The refusals were EC2's answers: counted as accepted calls, not faults.
    let counts = ep.calls().await.unwrap();
    assert!(counts.faulted.is_empty(), "{counts:?}");
    assert!(counts.accepted("CreateTags") >= 2, "{counts:?}");

    // Off again: the next launch is visible at once.
    ep.set_consistency(Duration::ZERO).await.unwrap();
    let (third, _) = launch(&ec2, &ep).await;
    ec2.describe_instances()
        .instance_ids(&third)
        .send()
        .await
        .expect("visible at once with the mode off");
}

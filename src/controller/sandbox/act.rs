//! The edge that acts: one reconcile of a live Sandbox (observe, decide, carry out, record),
//! the launch with its pacing and user data, the agent calls, the status write and the day-2
//! request's annotations.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use tracing::{info, warn};

use super::decide::{
    self, Action, ActionRequest, Decision, DeployAnswer, Due, Inputs, InstanceObs, LaunchHold,
    LaunchStage, Note, ProbeObs, Rejection, StartWhy,
};
use super::observe::{self, Probed};
use super::record::{self, ledger_ec2, ledger_status, update_gauges};
use super::{CONTROLLER, Context, Error, MANAGER, key};
use crate::agent::client::{AgentClient, AgentError};
use crate::api::sandbox_events as events;
use crate::api::{
    ACTION_ANNOTATION, ACTION_ID_ANNOTATION, START_REQUESTED_ANNOTATION, Sandbox, SandboxSpec,
    SandboxStatus,
};
use crate::ec2::{self, Ec2Error, InstanceState, LaunchRequest};

/// A launch whose turn in the client-side pacing is this close goes ahead (sleeping until the
/// turn); one further off requeues for it, saying so in its status.
const LAUNCH_HOLD: Duration = Duration::from_secs(2);

/// Up to 5 s, fixed per UID: spreads the requeues of Sandboxes refused together.
fn spread(uid: &str) -> Duration {
    Duration::from_millis(u64::from(uid.bytes().map(u32::from).sum::<u32>()) * 37 % 5000)
}

/// The launch stage for a RunInstances that did not go through for a passing reason. The
/// message stays the same from one attempt to the next (no request ids), so retries cause no
/// status writes.
fn retrying(e: &Ec2Error) -> LaunchStage {
    let (reason, message) = match e {
        Ec2Error::Throttled { .. } => (
            "LaunchThrottled",
            "AWS throttled RunInstances (RequestLimitExceeded: the account's request rate limit) after the operator's retries; trying again shortly".to_string(),
        ),
        Ec2Error::Rejected { code, .. } => (
            "InsufficientCapacity",
            format!("EC2 cannot launch this instance right now ({code}); trying again shortly"),
        ),
        _ => (
            "LaunchRetrying",
            format!(
                "RunInstances did not go through ({}); trying again shortly",
                e.reason()
            ),
        ),
    };
    LaunchStage::Retrying { reason, message }
}

/// What a launch came to.
enum Launch {
    /// RunInstances answered with this instance.
    Instance(String),
    /// Held back before any EC2 call: its user data is missing or too large.
    Held(LaunchHold),
}

/// How the launch path ended.
enum LaunchEnd {
    /// An instance to go on with: launched now (`true`) or found by its UID tag (`false`).
    Instance(String, bool),
    /// The launch is held back for its user data (decided with the hold).
    Held(LaunchHold),
    /// EC2 refused the launch for this generation (remembered; decided with the refusal).
    Refused,
    /// The reconcile ends here: the status was written, come back then.
    Requeue(Requeue),
}

fn client_token(uid: &str) -> String {
    // ClientToken allows 64 ASCII characters; a UID is 36.
    format!("sandbox-{uid}")
}

/// One reconcile of a Sandbox that is not being deleted.
pub(super) async fn apply(obj: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let object = key(obj.as_ref());
    let ns = obj.namespace().unwrap_or_default();
    let uid = obj.uid().ok_or_else(|| Error::Malformed {
        object: object.clone(),
    })?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let status = observe::fresh_status(&obj, &ctx, &uid);
    let spec = &obj.spec;
    let generation = obj.metadata.generation;
    let settings = &ctx.settings.decide;

    // ---- A day-2 action without a request id gets one first, so it is done once. ----
    let annotations = obj.annotations();
    let action = annotations
        .get(ACTION_ANNOTATION)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty());
    let action_id = annotations
        .get(ACTION_ID_ANNOTATION)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty());
    if let (Some(name), None) = (action, action_id) {
        let id = Timestamp::now().to_string();
        assign_action_id(&api, &obj, name, &id).await?;
        return Ok(Requeue::requeue(Duration::from_millis(50)));
    }
    let request = match (action, action_id) {
        (Some(name), Some(id)) => Some(ActionRequest { name, id }),
        _ => None,
    };
    let start_request = annotations
        .get(START_REQUESTED_ANNOTATION)
        .map(String::as_str);
    let deploy_attempt = annotations
        .get(crate::api::DEPLOY_ATTEMPT_ANNOTATION)
        .map(String::as_str);
    let rejection = current_rejection(&ctx, &uid, generation);

    let mut pass = Pass {
        ctx: &ctx,
        api: &api,
        obj: &obj,
        uid: &uid,
        status,
        start_request,
        deploy_attempt,
        request,
    };

    // ---- Which instance? Without one, decide says whether to launch. ----
    let mut instance_id = spec
        .instance_id
        .clone()
        .or_else(|| pass.status.instance.as_ref().map(|i| i.id.clone()));
    let mut launched_now = false;
    let mut launch_hold = None;
    if instance_id.is_none() {
        let d = pass.decide(
            &InstanceObs::NoInstance,
            &ProbeObs::NotProbed,
            None,
            rejection.as_ref(),
            None,
            LaunchStage::ToLaunch,
        );
        if d.actions.contains(&Action::Launch) {
            match pass.launch().await? {
                LaunchEnd::Instance(id, launched) => {
                    instance_id = Some(id);
                    launched_now = launched;
                }
                LaunchEnd::Held(hold) => launch_hold = Some(hold),
                LaunchEnd::Refused => {}
                LaunchEnd::Requeue(r) => return Ok(r),
            }
        }
    } else if spec.instance_id.is_some() && decide::first_status(&pass.status) {
        // Adopting: the first status before the EC2 view is asked (it may wait).
        pass.write_stage(LaunchStage::Launching).await?;
    }
    let rejection = current_rejection(&ctx, &uid, generation);

    // ---- Observe: the instance, then the agent when it runs and a probe is due. ----
    let observed = match &instance_id {
        None => InstanceObs::NoInstance,
        Some(id) => {
            let age = decide::ec2_max_age(&pass.status, settings, launched_now);
            observe::instance(&ctx, &obj, id, age).await?
        }
    };
    let valid = decide::validate(spec).ok();
    let mut agent_url = None;
    let mut probed = Probed {
        probe: ProbeObs::NotProbed,
        client: None,
    };
    if let InstanceObs::Found(inst) = &observed
        && inst.state == InstanceState::Running
        && let Some(valid) = &valid
    {
        agent_url = decide::agent_url(spec, inst);
        let due = decide::probe_now(&Due {
            spec,
            generation,
            status: &pass.status,
            deploy_attempt,
            action: request,
            interval: valid.probe_interval,
            since_last: observe::since_last_probe(&ctx, &uid),
        });
        if due {
            probed =
                observe::probe(&ctx, &obj, &uid, agent_url.as_deref(), valid.probe_timeout).await;
            record::record_probe(&ctx, &obj, &probed.probe);
        }
    }

    // ---- Decide. ----
    let stage = if launched_now {
        LaunchStage::Launched
    } else {
        LaunchStage::ToLaunch
    };
    let mut decision = pass.decide(
        &observed,
        &probed.probe,
        agent_url.as_deref(),
        rejection.as_ref(),
        launch_hold.as_ref(),
        stage,
    );

    // ---- Carry out the actions. ----
    let ec2_error = carry_out(&ctx, &obj, &probed.client, &mut decision).await;

    // ---- Record. ----
    let status = pass.status;
    for note in &decision.notes {
        ctx.publish(&obj, note).await;
    }
    ledger_status(&ctx, &obj, &status, &decision.status);
    if let Some(ledger) = &ctx.ledger {
        let mut row_obj = (*obj).clone();
        row_obj.status = Some(decision.status.clone());
        // Unchanged rows are not written again (the writer keeps the latest per Sandbox).
        ledger.upsert_sandbox(crate::ledger::SandboxRow::from_sandbox(&row_obj));
    }
    if launched_now || decide::material_change(&status, &decision.status) {
        let rv = write_status(&api, &obj, &decision.status, &ctx).await?;
        ctx.written
            .remember(&uid, rv.as_deref(), decision.status.clone());
    }
    update_gauges(&ctx, &obj, &decision.status);
    // ---- The day-2 request, once its result is in status. ----
    if let Some(req) = request
        && decide::request_done(&decision.status, req)
    {
        clear_action(&api, &obj, req).await?;
    }
    if let Some(e) = ec2_error {
        return Err(e);
    }
    if rejection.is_some() && instance_id.is_none() {
        // Refused by EC2: wait for the spec to change instead of retrying in a storm.
        return Ok(Requeue::await_change());
    }
    Ok(Requeue::requeue(decision.requeue))
}

/// Carries out the actions decide returned, in order, folding what came of each into the
/// decision (its Event, the day-2 request's result, the deploy's id) as decide's helpers say.
/// An EC2 failure is returned once the rest are done, so the status is written first.
async fn carry_out(
    ctx: &Context,
    obj: &Sandbox,
    agent_client: &Option<AgentClient>,
    decision: &mut Decision,
) -> Option<Error> {
    let object = key(obj);
    let mut ec2_error = None;
    for action in &decision.actions {
        match action {
            // Carried out before the instance was observed (see `launch`).
            Action::Launch => {}
            Action::Start { id, why } => match ctx
                .ec2
                .start(id)
                .await
                .inspect(|()| ledger_ec2(ctx, obj, "StartInstances", Some(id), Ok(())))
                .inspect_err(|e| ledger_ec2(ctx, obj, "StartInstances", Some(id), Err(e)))
            {
                Ok(()) => {
                    let (reason, message) = match why {
                        StartWhy::Requested => (
                            events::STARTING,
                            format!("starting instance {id}: the spec says Running"),
                        ),
                        StartWhy::Woken => (
                            events::WAKING,
                            format!("starting instance {id}: a newer {START_REQUESTED_ANNOTATION}"),
                        ),
                        StartWhy::RestartAfterExternalStop => (
                            events::RESTARTING_AFTER_EXTERNAL_STOP,
                            format!(
                                "instance {id} was stopped outside the operator; starting it again because the spec says Running"
                            ),
                        ),
                    };
                    decision.notes.push(Note {
                        warning: *why == StartWhy::RestartAfterExternalStop,
                        reason,
                        message,
                    });
                }
                Err(source) => {
                    ec2_error = Some(Error::Starting {
                        object: object.clone(),
                        source,
                    })
                }
            },
            Action::Stop { id, reason } => match ctx
                .ec2
                .stop(id)
                .await
                .inspect(|()| ledger_ec2(ctx, obj, "StopInstances", Some(id), Ok(())))
                .inspect_err(|e| ledger_ec2(ctx, obj, "StopInstances", Some(id), Err(e)))
            {
                Ok(()) => decision.notes.push(Note {
                    warning: false,
                    reason: events::STOPPING,
                    message: format!("stopping instance {id} ({reason})"),
                }),
                Err(source) => {
                    ec2_error = Some(Error::Stopping {
                        object: object.clone(),
                        source,
                    })
                }
            },
            Action::RestartService { service } => {
                let (ok, message) = match agent_client {
                    Some(c) => match c.restart(service).await {
                        Ok(r) if r.success => (
                            true,
                            format!("the agent restarted {service}: {}", r.message),
                        ),
                        Ok(r) => (
                            false,
                            format!("the agent could not restart {service}: {}", r.message),
                        ),
                        Err(e) => (false, format!("restarting {service}: {e}")),
                    },
                    None => (
                        false,
                        "the agent could not be reached this time: ask again".into(),
                    ),
                };
                if let Some(n) = decide::finish_action(
                    &mut decision.status,
                    ok,
                    "AgentRefused",
                    message,
                    Timestamp::now(),
                ) {
                    decision.notes.push(n);
                }
            }
            Action::DrainNow => {
                let (ok, message) = match agent_client {
                    Some(c) => match c
                        .drain_with(&crate::agent::protocol::DrainRequest {
                            wait: Some(false),
                            timeout_seconds: None,
                        })
                        .await
                    {
                        Ok(r) => (
                            true,
                            format!(
                                "the worker was asked to drain and takes no new work ({} active workers, deploy-safe: {})",
                                r.active_workers
                                    .map(|n| n.to_string())
                                    .unwrap_or_else(|| "unknown".into()),
                                r.deploy_safe
                            ),
                        ),
                        Err(e) => (false, format!("asking the agent to drain: {e}")),
                    },
                    None => (
                        false,
                        "the agent could not be reached this time: ask again".into(),
                    ),
                };
                if let Some(n) = decide::finish_action(
                    &mut decision.status,
                    ok,
                    "AgentRefused",
                    message,
                    Timestamp::now(),
                ) {
                    decision.notes.push(n);
                }
            }
            Action::TerminateInstance { id } => match ctx
                .ec2
                .terminate(id)
                .await
                .inspect(|()| ledger_ec2(ctx, obj, "TerminateInstances", Some(id), Ok(())))
                .inspect_err(|e| ledger_ec2(ctx, obj, "TerminateInstances", Some(id), Err(e)))
            {
                Ok(()) => decision.notes.push(Note {
                    warning: false,
                    reason: events::TERMINATING,
                    message: format!("terminating instance {id}, as a terminate request asked"),
                }),
                Err(e) => {
                    if let Some(n) = decide::finish_action(
                        &mut decision.status,
                        false,
                        "TerminateFailed",
                        format!("EC2 did not terminate instance {id}: {e}"),
                        Timestamp::now(),
                    ) {
                        decision.notes.push(n);
                    }
                }
            },
            Action::Drain => {
                if let Some(c) = agent_client
                    && let Err(e) = c
                        .drain_with(&crate::agent::protocol::DrainRequest {
                            wait: Some(false),
                            timeout_seconds: None,
                        })
                        .await
                {
                    warn!(sandbox = %object, error = %e, "asking the agent to drain failed; waiting for active workers anyway");
                }
            }
            Action::Deploy { tag } => {
                let result = match agent_client {
                    // The old health server answers 200 with `success: false` when it refuses.
                    Some(c) => c.deploy(tag).await.and_then(|a| {
                        if a.success {
                            Ok(a.deploy_id)
                        } else {
                            Err(AgentError::Rejected {
                                url: c.base_url().to_string(),
                                op: "deploy",
                                status: 200,
                                message: a.message,
                            })
                        }
                    }),
                    None => Err(AgentError::Transport {
                        url: String::new(),
                        op: "deploy",
                        message: "no agent client".into(),
                    }),
                };
                let answer = match result {
                    Ok(id) => DeployAnswer::Accepted(id),
                    Err(e) => match e.running_deploy_id() {
                        Some(running) => DeployAnswer::Busy(running.to_string()),
                        None => DeployAnswer::Failed(e.to_string()),
                    },
                };
                if let Some(n) = decide::after_deploy(&mut decision.status, tag, answer) {
                    decision.notes.push(n);
                }
            }
        }
    }
    ec2_error
}

/// The launch refusal remembered for this Sandbox, forgotten once the spec changed.
fn current_rejection(ctx: &Context, uid: &str, generation: Option<i64>) -> Option<Rejection> {
    let mut r = ctx.rejections.lock().expect("rejections");
    match r.get(uid) {
        Some((g, _)) if *g != generation => {
            r.remove(uid);
            None
        }
        Some((_, rej)) => Some(rej.clone()),
        None => None,
    }
}

/// One reconcile's view of the Sandbox: what it asks of decide, and the status as last
/// written (kept current by the writes made before the calls that may wait).
struct Pass<'a> {
    ctx: &'a Context,
    api: &'a Api<Sandbox>,
    obj: &'a Sandbox,
    uid: &'a str,
    /// The status as last written (kept up to date by the writes made here).
    status: SandboxStatus,
    start_request: Option<&'a str>,
    deploy_attempt: Option<&'a str>,
    request: Option<ActionRequest<'a>>,
}

impl Pass<'_> {
    /// [`decide::decide`] on this Sandbox, with what was observed.
    fn decide(
        &self,
        instance: &InstanceObs,
        probe: &ProbeObs,
        agent_url: Option<&str>,
        rejection: Option<&Rejection>,
        hold: Option<&LaunchHold>,
        launch: LaunchStage,
    ) -> Decision {
        decide::decide(&Inputs {
            spec: &self.obj.spec,
            generation: self.obj.metadata.generation,
            start_request: self.start_request,
            deploy_attempt: self.deploy_attempt,
            action: self.request,
            status: &self.status,
            instance,
            probe,
            agent_url,
            launch_rejection: rejection,
            launch_hold: hold,
            launch,
            now: Timestamp::now(),
            settings: &self.ctx.settings.decide,
        })
    }

    /// Writes the status decide gives while there is no instance and the launch is at `stage`.
    async fn write_stage(&mut self, stage: LaunchStage) -> Result<(), Error> {
        let d = self.decide(
            &InstanceObs::NoInstance,
            &ProbeObs::NotProbed,
            None,
            None,
            None,
            stage,
        );
        self.write_decided(d).await.map(drop)
    }

    /// The RunInstances pacing as a launch stage.
    fn paced(&self, turn_at: Option<Timestamp>) -> LaunchStage {
        let run = self.ctx.ec2.rate_limits().run;
        LaunchStage::Paced {
            turn_at,
            burst: run.capacity,
            per_second: run.refill_per_second,
        }
    }

    /// Carries out [`Action::Launch`]: this launch's turn in the client-side pacing of
    /// RunInstances (taken at once, without waiting), the first status if it is still to be
    /// written, a look for an instance launched earlier for this Sandbox (a crash between
    /// RunInstances and the status write), then RunInstances. Where it stops short (paced,
    /// retrying), the status decide gives for that stage is written before the reconcile ends.
    async fn launch(&mut self) -> Result<LaunchEnd, Error> {
        let ctx = self.ctx;
        let uid = self.uid;
        let object = key(self.obj);
        let first = decide::first_status(&self.status);
        match ctx.ec2.launch_turn(&client_token(uid)) {
            Ok(turn) if turn.wait > LAUNCH_HOLD => {
                self.write_stage(self.paced(Some(turn.at))).await?;
                return Ok(LaunchEnd::Requeue(Requeue::requeue(turn.wait)));
            }
            Ok(_) => {
                if first {
                    self.write_stage(LaunchStage::Pending).await?;
                }
            }
            Err(Ec2Error::Paced { wait, .. }) => {
                self.write_stage(self.paced(None)).await?;
                return Ok(LaunchEnd::Requeue(Requeue::requeue(wait + spread(uid))));
            }
            Err(source) => return Err(Error::TakingLaunchTurn { object, source }),
        }
        let found = ctx
            .ec2
            .find_by_uid(uid)
            .await
            .map_err(|source| Error::FindingByUid {
                object: object.clone(),
                source,
            })?;
        if let Some(inst) = found {
            info!(sandbox = %object, instance = %inst.id, "found the instance launched earlier by UID tag");
            return Ok(LaunchEnd::Instance(inst.id, false));
        }
        match run_instance(self.obj, uid, ctx).await {
            Ok(Launch::Instance(id)) => {
                ledger_ec2(ctx, self.obj, "RunInstances", Some(&id), Ok(()));
                Ok(LaunchEnd::Instance(id, true))
            }
            Ok(Launch::Held(hold)) => Ok(LaunchEnd::Held(hold)),
            Err(Error::Launching {
                source: source @ Ec2Error::Rejected { .. },
                ..
            }) if !source.is_transient() => {
                let Ec2Error::Rejected { code, message, .. } = source else {
                    unreachable!("matched Rejected")
                };
                ctx.publish(
                    self.obj,
                    &Note {
                        warning: true,
                        reason: events::LAUNCH_FAILED,
                        message: format!("EC2 refused RunInstances: {code}: {message}"),
                    },
                )
                .await;
                ctx.rejections.lock().expect("rejections").insert(
                    uid.to_string(),
                    (self.obj.metadata.generation, Rejection { code, message }),
                );
                Ok(LaunchEnd::Refused)
            }
            Err(Error::Launching {
                source: Ec2Error::Paced { wait, .. },
                ..
            }) => {
                // The turn lapsed and the bucket is busy: back in line.
                self.write_stage(self.paced(None)).await?;
                Ok(LaunchEnd::Requeue(Requeue::requeue(
                    wait.min(Duration::from_secs(60)) + spread(uid),
                )))
            }
            Err(Error::Launching { object, source }) if source.is_transient() => {
                // Say so, then requeue with backoff (error_policy).
                self.write_stage(retrying(&source)).await?;
                Err(Error::Launching { object, source })
            }
            Err(e) => Err(e),
        }
    }

    /// Decides the status for a Sandbox with no instance at `stage` (or held, or refused), and
    /// writes it when it changed materially.
    async fn write_decided(&mut self, d: Decision) -> Result<Decision, Error> {
        if decide::material_change(&self.status, &d.status) {
            let rv = write_status(self.api, self.obj, &d.status, self.ctx).await?;
            self.ctx
                .written
                .remember(self.uid, rv.as_deref(), d.status.clone());
        }
        self.status = d.status.clone();
        Ok(d)
    }
}
/// `/metadata/annotations/<key>` as a JSON Pointer.
fn annotation_path(key: &str) -> String {
    format!(
        "/metadata/annotations/{}",
        key.replace('~', "~0").replace('/', "~1")
    )
}

/// Adds a request id to a day-2 action asked without one, provided the action is still the one
/// read (a JSON Patch `test`), so a request is done once.
pub(super) async fn assign_action_id(
    api: &Api<Sandbox>,
    obj: &Sandbox,
    name: &str,
    id: &str,
) -> Result<(), Error> {
    let ops = serde_json::json!([
        {"op": "test", "path": annotation_path(ACTION_ANNOTATION), "value": obj.annotations().get(ACTION_ANNOTATION)},
        {"op": "add", "path": annotation_path(ACTION_ID_ANNOTATION), "value": id},
    ]);
    patch_annotations(api, obj, ops, |object, source| Error::AssigningRequestId {
        object,
        source,
    })
    .await?;
    info!(sandbox = %key(obj), action = name, id, "day-2 action: request id assigned");
    Ok(())
}

/// Removes a day-2 request whose result is in status, provided the annotations still hold that
/// very request (a newer one written meanwhile stays).
pub(super) async fn clear_action(
    api: &Api<Sandbox>,
    obj: &Sandbox,
    req: ActionRequest<'_>,
) -> Result<(), Error> {
    let a = obj.annotations();
    let ops = serde_json::json!([
        {"op": "test", "path": annotation_path(ACTION_ANNOTATION), "value": a.get(ACTION_ANNOTATION)},
        {"op": "test", "path": annotation_path(ACTION_ID_ANNOTATION), "value": a.get(ACTION_ID_ANNOTATION)},
        {"op": "remove", "path": annotation_path(ACTION_ANNOTATION)},
        {"op": "remove", "path": annotation_path(ACTION_ID_ANNOTATION)},
    ]);
    patch_annotations(api, obj, ops, |object, source| Error::ClearingRequest {
        object,
        source,
    })
    .await?;
    tracing::debug!(sandbox = %key(obj), action = req.name, id = req.id, "day-2 action: request removed");
    Ok(())
}

async fn patch_annotations(
    api: &Api<Sandbox>,
    obj: &Sandbox,
    ops: serde_json::Value,
    failed: fn(String, kube::Error) -> Error,
) -> Result<(), Error> {
    let patch: json_patch::Patch = serde_json::from_value(ops).expect("a JSON Patch");
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // The annotations changed meanwhile (a `test` failed: 422), or the object is gone: the
        // next reconcile sees the new state.
        Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 || s.is_not_found() => Ok(()),
        Err(source) => Err(failed(key(obj), source)),
    }
}

/// Reads the user data the spec names and calls RunInstances; a missing or oversized user data
/// holds the launch back instead (the instance is never launched without it).
async fn run_instance(obj: &Sandbox, uid: &str, ctx: &Context) -> Result<Launch, Error> {
    let object = key(obj);
    let spec: &SandboxSpec = &obj.spec;
    let l = spec
        .launch
        .as_ref()
        .expect("launch is set when instanceId is not (CEL rule)");
    let ns = obj.namespace().unwrap_or_default();
    let user_data = match (&l.user_data_secret_ref, &spec.agent.bootstrap) {
        // agent.bootstrap: the token minted (or read) and the user data rendered with it.
        (None, Some(b)) => match super::bootstrap::launch_user_data(&ctx.client, obj, b).await {
            Ok(u) => Some(u),
            Err(Error::LaunchHeld { hold, .. }) => return Ok(Launch::Held(hold)),
            Err(e) => return Err(e),
        },
        (Some(r), _) => {
            // Never launched without the user data the spec names: a missing Secret or key
            // holds the launch (Ready=False with a reason naming both) until it appears.
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            let secret = format!("{ns}/{}", r.name);
            let held = |hold| Ok(Launch::Held(hold));
            let s = secrets
                .get_opt(&r.name)
                .await
                .map_err(|source| Error::ReadingUserData {
                    object: object.clone(),
                    source,
                })?;
            let Some(s) = s else {
                return held(LaunchHold::UserDataSecretMissing {
                    secret,
                    key: r.key.clone(),
                });
            };
            let Some(value) = s.data.and_then(|mut d| d.remove(&r.key)) else {
                return held(LaunchHold::UserDataKeyMissing {
                    secret,
                    key: r.key.clone(),
                });
            };
            if value.0.len() > decide::MAX_USER_DATA_BYTES {
                return held(LaunchHold::UserDataTooLarge {
                    secret,
                    key: r.key.clone(),
                    bytes: value.0.len(),
                });
            }
            use base64::Engine as _;
            Some(base64::engine::general_purpose::STANDARD.encode(value.0))
        }
        (None, None) => None,
    };
    let req = launch_request(obj, uid, user_data);
    let inst = ctx
        .ec2
        .launch(&req)
        .await
        .map_err(|source| Error::Launching {
            object: object.clone(),
            source,
        })?;
    info!(sandbox = %object, instance = %inst.id, "launched");
    Ok(Launch::Instance(inst.id))
}

/// The one RunInstances request of a Sandbox: everything the launch sends, in one struct.
fn launch_request(obj: &Sandbox, uid: &str, user_data: Option<String>) -> LaunchRequest {
    let spec: &SandboxSpec = &obj.spec;
    let l = spec
        .launch
        .as_ref()
        .expect("launch is set when instanceId is not (CEL rule)");
    let ns = obj.namespace().unwrap_or_default();
    let mut tags: BTreeMap<String, String> = l.tags.clone();
    tags.insert(ec2::TAG_MANAGED_BY.into(), "sandbox-operator".into());
    tags.insert(ec2::TAG_UID.into(), uid.into());
    tags.insert(ec2::TAG_NAMESPACE.into(), ns.clone());
    tags.insert(ec2::TAG_NAME.into(), obj.name_any());
    tags.insert(ec2::TAG_ENVIRONMENT.into(), spec.environment.to_string());
    tags.entry("Name".into())
        .or_insert_with(|| format!("{ns}/{}", obj.name_any()));
    LaunchRequest {
        client_token: client_token(uid),
        image_id: l.image_id.clone(),
        instance_type: spec.instance_type.clone().unwrap_or_default(),
        subnet_id: l.subnet_id.clone(),
        security_group_ids: l.security_group_ids.clone(),
        key_name: l.key_name.clone(),
        iam_instance_profile: l.iam_instance_profile.clone(),
        root_volume_size_gib: l.root_volume_size_gib,
        spot: l.market == crate::api::Market::Spot,
        user_data_base64: user_data,
        tags,
    }
}
/// Writes the status (server-side apply, so fields this controller no longer sets are removed)
/// and returns the resourceVersion the write produced.
pub(super) async fn write_status(
    api: &Api<Sandbox>,
    obj: &Sandbox,
    st: &SandboxStatus,
    ctx: &Context,
) -> Result<Option<String>, Error> {
    let patch = serde_json::json!({ "apiVersion": "fleet.valet.dev/v1alpha1", "kind": "Sandbox", "status": st });
    let out = api
        .patch_status(
            &obj.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::WritingStatus {
            object: key(obj),
            source,
        })?;
    ctx.metrics
        .status_writes
        .get_or_create(&crate::metrics::ControllerLabels {
            controller: CONTROLLER.into(),
        })
        .inc();
    Ok(out.metadata.resource_version)
}

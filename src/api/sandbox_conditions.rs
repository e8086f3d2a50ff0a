//! The Sandbox's status conditions: their types and the reasons the Sandbox controller gives
//! them, shared by every controller that reads a Sandbox's conditions (the SandboxDeploy
//! controller reads Ready; pools read AgentRegistered, in [`super::conditions`]).

/// The summary: the sandbox is as declared.
pub const READY: &str = "Ready";
/// EC2 reports the instance running.
pub const INSTANCE_RUNNING: &str = "InstanceRunning";
/// The agent answers its probes and reports itself healthy.
pub const AGENT_HEALTHY: &str = "AgentHealthy";
/// The agent runs the declared image tag.
pub const IMAGE_UP_TO_DATE: &str = "ImageUpToDate";
/// Auto-stop: the agent reports no active workers.
pub const IDLE: &str = "Idle";

/// The reasons of the Sandbox's conditions (CamelCase, as the API conventions ask).
pub mod reason {
    /// Nothing asked of EC2 yet: the launch is about to be made.
    pub const PENDING_LAUNCH: &str = "PendingLaunch";
    /// The operator's own pacing of RunInstances holds the launch back.
    pub const LAUNCH_PACED: &str = "LaunchPaced";
    /// RunInstances is under way, or EC2 does not list the new instance yet.
    pub const LAUNCHING: &str = "Launching";
    /// The instance named by `spec.instanceId` is being looked up.
    pub const ADOPTING: &str = "Adopting";
    /// EC2 refused the launch; an edit of the spec tries again.
    pub const LAUNCH_FAILED: &str = "LaunchFailed";
    /// EC2 does not know the instance.
    pub const INSTANCE_NOT_FOUND: &str = "InstanceNotFound";
    /// The instance was terminated outside the operator.
    pub const INSTANCE_TERMINATED: &str = "InstanceTerminated";
    /// The instance does not run (so the agent is not probed).
    pub const INSTANCE_NOT_RUNNING: &str = "InstanceNotRunning";
    /// The instance is pending, or the agent is awaited before a deploy.
    pub const PENDING: &str = "Pending";
    /// EC2 reports a state this operator does not know.
    pub const UNKNOWN_STATE: &str = "UnknownState";
    /// The instance is stopping.
    pub const STOPPING: &str = "Stopping";
    /// The instance is stopped, as declared.
    pub const STOPPED: &str = "Stopped";
    /// The instance runs.
    pub const RUNNING: &str = "Running";
    /// Waiting for the agent's first answer.
    pub const AWAITING_FIRST_PROBE: &str = "AwaitingFirstProbe";
    /// The agent failed as many probes in a row as the threshold allows.
    pub const PROBE_FAILED: &str = "ProbeFailed";
    /// A probe failed, fewer times than the threshold.
    pub const PROBING: &str = "Probing";
    /// One of the agent's checks fails.
    pub const CHECKS_FAILING: &str = "ChecksFailing";
    /// The agent reports itself unhealthy.
    pub const AGENT_REPORTS_UNHEALTHY: &str = "AgentReportsUnhealthy";
    /// Disk or memory at 90% or more.
    pub const DEGRADED: &str = "Degraded";
    /// The agent answers and reports healthy.
    pub const HEALTHY: &str = "Healthy";
    /// Healthy, with warnings from its checks.
    pub const HEALTHY_WITH_WARNINGS: &str = "HealthyWithWarnings";
    /// `spec.image` is not set.
    pub const NO_IMAGE_DECLARED: &str = "NoImageDeclared";
    /// The agent runs the declared tag.
    pub const UP_TO_DATE: &str = "UpToDate";
    /// An image deploy is under way.
    pub const DEPLOYING: &str = "Deploying";
    /// Waiting for active workers to finish before a deploy.
    pub const DRAINING: &str = "Draining";
    /// The new tag runs; waiting for a healthy report.
    pub const VERIFYING: &str = "Verifying";
    /// The deploy failed (or was rolled back) and is not retried.
    pub const DEPLOY_FAILED: &str = "DeployFailed";
    /// ObserveOnly never deploys.
    pub const OBSERVE_ONLY: &str = "ObserveOnly";
    /// Ready=False: the image is not the declared one.
    pub const IMAGE_NOT_UP_TO_DATE: &str = "ImageNotUpToDate";
    /// Ready=False: the agent has not answered healthy yet.
    pub const AWAITING_AGENT: &str = "AwaitingAgent";
    /// Ready=False: the agent is unhealthy.
    pub const AGENT_UNHEALTHY: &str = "AgentUnhealthy";
    /// Ready=True: running, agent healthy, image up to date.
    pub const ACTIVE: &str = "Active";
    /// Auto-stop stopped the instance.
    pub const IDLE_STOPPED: &str = "IdleStopped";
    /// Idle=True: no active workers; auto-stop counts down.
    pub const NO_ACTIVE_WORKERS: &str = "NoActiveWorkers";
    /// Idle=False: the agent reports active workers.
    pub const ACTIVE_WORKERS: &str = "ActiveWorkers";
    /// Idle=False: the instance is not running.
    pub const NOT_RUNNING: &str = "NotRunning";
    /// The spec cannot be acted on; the message says what to fix.
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

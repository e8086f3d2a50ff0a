//! The reasons of the Events the Sandbox controller publishes about a Sandbox (CamelCase).
//! Those that also name a condition's reason are in [`super::sandbox_conditions`] (for
//! example `DeployFailed`, `InstanceTerminated`) and [`super::conditions`]
//! (`RegistrationTimedOut`); the ones here are told only by Events. Users and tests match on
//! these values: they do not change.

/// RunInstances answered: the operator launched the instance.
pub const LAUNCHED: &str = "Launched";
/// EC2 refused RunInstances for this generation (Warning; the Ready reason too).
pub const LAUNCH_FAILED: &str = super::sandbox_conditions::reason::LAUNCH_FAILED;
/// StartInstances was called: the spec says Running.
pub const STARTING: &str = "Starting";
/// StartInstances was called: the start annotation carries a newer time.
pub const WAKING: &str = "Waking";
/// StartInstances was called for an instance stopped outside the operator (Warning).
pub const RESTARTING_AFTER_EXTERNAL_STOP: &str = "RestartingAfterExternalStop";
/// StopInstances was called (the spec, auto-stop, or deletion policy Stop).
pub const STOPPING: &str = "Stopping";
/// TerminateInstances was called (a terminate request, or deletion policy Terminate).
pub const TERMINATING: &str = "Terminating";
/// On deletion, an instance left behind lost the operator's ownership tags.
pub const RELEASED: &str = "Released";
/// Auto-stop decided to stop the idle instance.
pub const IDLE_STOP: &str = "IdleStop";
/// The agent was asked to deploy the declared image tag.
pub const DEPLOY_STARTED: &str = "DeployStarted";
/// The agent runs the declared tag and reports healthy.
pub const DEPLOY_SUCCEEDED: &str = "DeploySucceeded";
/// The agent answers healthy again after being unhealthy.
pub const AGENT_RECOVERED: &str = "AgentRecovered";
/// A day-2 action was taken on (its result is in progress).
pub const ACTION_STARTED: &str = "ActionStarted";
/// A day-2 action succeeded.
pub const ACTION_SUCCEEDED: &str = "ActionSucceeded";
/// A day-2 action failed (Warning).
pub const ACTION_FAILED: &str = "ActionFailed";
/// A day-2 action was refused: unknown, or not possible in this state (Warning).
pub const ACTION_REJECTED: &str = "ActionRejected";

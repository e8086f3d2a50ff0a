//! Errors of the EC2 layer, and the pure classification of AWS answers behind them.
//!
//! Two questions are kept apart:
//! - *Retry inside the layer?* Throttling (`RequestLimitExceeded` and its kin), 5xx answers,
//!   timeouts and connection errors are retried here with backoff ([`Class::retry_here`]).
//! - *Transient for the controller?* ([`Ec2Error::is_transient`]) Everything retried here, plus
//!   answers that will change by themselves: an instance in the wrong state, a capacity
//!   shortage, an id that EC2 has not made visible yet. Anything else is AWS refusing the
//!   request as asked (`InvalidAMIID.NotFound`, `UnauthorizedOperation`, ...), which waits for
//!   a spec edit.
//!
//! Two kinds of "too many requests" are kept apart as well: [`Ec2Error::Throttled`] is AWS
//! answering `RequestLimitExceeded` (the account's bucket is empty), [`Ec2Error::Paced`] is the
//! operator's own client-side pacing holding a call back before anything was sent. Logs,
//! metrics and conditions name them differently.

use std::time::Duration;

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::RequestId;

/// An EC2 call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Ec2Error {
    /// AWS answered `RequestLimitExceeded` (or another throttling code) to every attempt the
    /// layer made: the account's request bucket is empty. Transient.
    #[error(
        "EC2 {action} was throttled by AWS (RequestLimitExceeded: the account's request rate limit); will retry"
    )]
    Throttled {
        /// The EC2 action (`"DescribeInstances"`).
        action: &'static str,
    },
    /// The operator's own client-side pacing (its token bucket for this kind of call) would
    /// have held the call longer than allowed, so it was not sent: AWS throttled nothing.
    /// Transient: try again after `wait`.
    #[error(
        "EC2 {action} is held back by the operator's client-side pacing for about {}s (not sent; AWS throttled nothing); will retry",
        wait.as_secs().max(1)
    )]
    Paced {
        /// The EC2 action.
        action: &'static str,
        /// How long the bucket would have made the call wait.
        wait: Duration,
    },
    /// 5xx answers, timeouts, connection errors, unreadable answers: transient.
    #[error("EC2 {action} is unavailable: {message}")]
    Unavailable {
        /// The EC2 action.
        action: &'static str,
        /// What went wrong (AWS's code and message when there was an answer).
        message: String,
    },
    /// AWS refused the request (4xx), e.g. `InvalidAMIID.NotFound`: not transient, except for
    /// capacity shortages (see [`Ec2Error::is_transient`]).
    #[error(
        "EC2 {action} was refused: {code}: {message}{}",
        request_id_suffix(request_id)
    )]
    Rejected {
        /// The EC2 action.
        action: &'static str,
        /// AWS's error code (`"InvalidAMIID.NotFound"`).
        code: String,
        /// AWS's error message.
        message: String,
        /// AWS's request id, when the answer carried one.
        request_id: Option<String>,
    },
    /// The instance is not in a state that allows the action (`IncorrectInstanceState`), or
    /// not visible yet right after its launch: transient for the controller (the state will
    /// settle).
    #[error("EC2 {action} on instance {instance_id}: {message}")]
    IncorrectState {
        /// The EC2 action.
        action: &'static str,
        /// The instance concerned.
        instance_id: String,
        /// AWS's message.
        message: String,
    },
}

fn request_id_suffix(request_id: &Option<String>) -> String {
    match request_id {
        Some(id) => format!(" (request id {id})"),
        None => String::new(),
    }
}

impl Ec2Error {
    /// Whether the controller should requeue and try again (with backoff) rather than wait
    /// for a spec edit.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Throttled { .. }
            | Self::Paced { .. }
            | Self::Unavailable { .. }
            | Self::IncorrectState { .. } => true,
            Self::Rejected { code, .. } => is_transient_rejection(code),
        }
    }

    /// A reason for a status condition (`^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$`): AWS's
    /// code without its dots for refusals (`InvalidAMIIDNotFound`), else `EC2Throttled` (AWS),
    /// `ClientPaced` (the operator's own pacing), `EC2Unavailable` or `IncorrectInstanceState`.
    pub fn reason(&self) -> String {
        match self {
            Self::Throttled { .. } => "EC2Throttled".to_owned(),
            Self::Paced { .. } => "ClientPaced".to_owned(),
            Self::Unavailable { .. } => "EC2Unavailable".to_owned(),
            Self::IncorrectState { .. } => "IncorrectInstanceState".to_owned(),
            Self::Rejected { code, .. } => {
                let reason = condition_reason(code);
                if reason.is_empty() {
                    "EC2Rejected".to_owned()
                } else {
                    reason
                }
            }
        }
    }

    /// The EC2 action that failed.
    pub fn action(&self) -> &'static str {
        match self {
            Self::Throttled { action }
            | Self::Paced { action, .. }
            | Self::Unavailable { action, .. }
            | Self::Rejected { action, .. }
            | Self::IncorrectState { action, .. } => action,
        }
    }

    /// AWS's error code, when AWS answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Rejected { code, .. } => Some(code),
            Self::IncorrectState { .. } => Some("IncorrectInstanceState"),
            Self::Throttled { .. } => Some("RequestLimitExceeded"),
            Self::Paced { .. } | Self::Unavailable { .. } => None,
        }
    }

    /// The instance ids that AWS's message names (e.g. the unknown ones of an
    /// `InvalidInstanceID.NotFound`).
    pub(crate) fn instance_ids(&self) -> Vec<String> {
        match self {
            Self::Rejected { message, .. } => parse_instance_ids(message),
            Self::IncorrectState {
                instance_id,
                message,
                ..
            } => {
                let mut ids = parse_instance_ids(message);
                if ids.is_empty() && !instance_id.is_empty() {
                    ids.push(instance_id.clone());
                }
                ids
            }
            _ => Vec::new(),
        }
    }
}

/// Refusals that resolve by themselves: capacity comes back, prices move.
fn is_transient_rejection(code: &str) -> bool {
    matches!(
        code,
        "InsufficientInstanceCapacity"
            | "InsufficientHostCapacity"
            | "InsufficientReservedInstanceCapacity"
            | "InsufficientCapacity"
            | "InsufficientCapacityOnHost"
            | "SpotMaxPriceTooLow"
            | "IncorrectSpotRequestState"
    )
}

/// Keeps the characters a Kubernetes condition reason allows (letters, digits, `_`), so
/// `InvalidAMIID.NotFound` reads `InvalidAMIIDNotFound`.
pub fn condition_reason(code: &str) -> String {
    let kept: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    kept.trim_start_matches(|c: char| !c.is_ascii_alphabetic())
        .to_owned()
}

/// How the layer treats one failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Throttled by AWS: retry with backoff, and slow the client-side bucket down.
    Throttled,
    /// Server-side or network trouble: retry with backoff.
    Unavailable,
    /// An instance's state does not allow the action.
    IncorrectState,
    /// Refused as asked.
    Rejected,
}

impl Class {
    /// Whether the layer retries the attempt itself.
    pub fn retry_here(self) -> bool {
        matches!(self, Self::Throttled | Self::Unavailable)
    }
}

/// Classifies an AWS error answer from its code and HTTP status.
pub fn classify(code: Option<&str>, http_status: Option<u16>) -> Class {
    let code = code.unwrap_or("");
    if is_throttling_code(code) {
        return Class::Throttled;
    }
    if matches!(code, "IncorrectInstanceState" | "IncorrectState") {
        return Class::IncorrectState;
    }
    if is_transient_rejection(code) {
        // A 5xx on AWS, but retrying at once does not bring capacity back: the controller
        // requeues with its own, longer backoff.
        return Class::Rejected;
    }
    if matches!(
        code,
        "InternalError"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "Unavailable"
            | "RequestTimeout"
            | "RequestTimeoutException"
            | "RequestExpired"
    ) {
        return Class::Unavailable;
    }
    match http_status {
        Some(s) if s >= 500 => Class::Unavailable,
        Some(_) if !code.is_empty() => Class::Rejected,
        // An answer without a code, or no status: treat it as trouble on the way.
        _ if code.is_empty() => Class::Unavailable,
        _ => Class::Rejected,
    }
}

/// The throttling codes the AWS SDKs recognise, `RequestLimitExceeded` being EC2's.
pub fn is_throttling_code(code: &str) -> bool {
    matches!(
        code,
        "RequestLimitExceeded"
            | "Throttling"
            | "ThrottlingException"
            | "ThrottledException"
            | "RequestThrottledException"
            | "TooManyRequestsException"
            | "RequestThrottled"
            | "SlowDown"
            | "BandwidthLimitExceeded"
            | "EC2ThrottledException"
            | "PriorRequestNotComplete"
    )
}

/// Whether `s` is a well-formed instance id: `i-` and 8 or 17 lower-case hex digits.
pub fn is_instance_id(s: &str) -> bool {
    s.strip_prefix("i-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The instance ids an AWS message names, in order, without repeats: e.g. from
/// `The instance IDs 'i-0123456789abcdef0, i-0fedcba9876543210' do not exist` or
/// `The instance 'i-0123456789abcdef0' is not in a state from which it can be stopped.`
pub fn parse_instance_ids(message: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let bytes = message.as_bytes();
    let mut i = 0;
    while i + 2 <= bytes.len() {
        let starts_word = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        if starts_word && bytes[i] == b'i' && bytes.get(i + 1) == Some(&b'-') {
            let mut end = i + 2;
            while end < bytes.len() && bytes[end].is_ascii_alphanumeric() {
                end += 1;
            }
            let candidate = &message[i..end];
            if is_instance_id(candidate) && !out.iter().any(|x| x == candidate) {
                out.push(candidate.to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// The parts of a failed SDK call that classification needs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    pub class: Class,
    pub code: Option<String>,
    pub message: String,
    pub request_id: Option<String>,
}

impl Failure {
    /// Reads a failed SDK call.
    pub(crate) fn from_sdk<E>(err: &SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let request_id = err
            .request_id()
            .or_else(|| err.meta().request_id())
            .map(str::to_owned);
        match err {
            SdkError::ServiceError(service) => {
                let code = service.err().code().map(str::to_owned);
                let message = service.err().message().unwrap_or_default().to_owned();
                let status = Some(service.raw().status().as_u16());
                Self {
                    class: classify(code.as_deref(), status),
                    code,
                    message,
                    request_id,
                }
            }
            SdkError::TimeoutError(_) => Self {
                class: Class::Unavailable,
                code: None,
                message: "the request timed out".to_owned(),
                request_id,
            },
            SdkError::DispatchFailure(dispatch) => {
                let message = format!(
                    "the request could not be sent: {}",
                    aws_sdk_ec2::error::DisplayErrorContext(err)
                );
                let class = if dispatch.is_user() {
                    Class::Rejected
                } else {
                    Class::Unavailable
                };
                Self {
                    class,
                    code: (class == Class::Rejected).then(|| "ClientError".to_owned()),
                    message,
                    request_id,
                }
            }
            SdkError::ResponseError(_) => Self {
                class: Class::Unavailable,
                code: None,
                message: format!(
                    "the answer could not be read: {}",
                    aws_sdk_ec2::error::DisplayErrorContext(err)
                ),
                request_id,
            },
            // Construction failures and any future variants: a problem on this side.
            _ => Self {
                class: Class::Rejected,
                code: Some("ClientError".to_owned()),
                message: format!(
                    "the request could not be built: {}",
                    aws_sdk_ec2::error::DisplayErrorContext(err)
                ),
                request_id,
            },
        }
    }

    /// The error the caller sees once the layer gives up on this failure. `instance` names
    /// the instance of a one-instance request, for `IncorrectState`.
    pub(crate) fn into_error(self, action: &'static str, instance: Option<&str>) -> Ec2Error {
        match self.class {
            Class::Throttled => Ec2Error::Throttled { action },
            Class::Unavailable => Ec2Error::Unavailable {
                action,
                message: match self.code {
                    Some(code) => format!("{code}: {}", self.message),
                    None => self.message,
                },
            },
            Class::IncorrectState => Ec2Error::IncorrectState {
                action,
                instance_id: parse_instance_ids(&self.message)
                    .into_iter()
                    .next()
                    .or_else(|| instance.map(str::to_owned))
                    .unwrap_or_default(),
                message: self.message,
            },
            Class::Rejected => Ec2Error::Rejected {
                action,
                code: self.code.unwrap_or_else(|| "Unknown".to_owned()),
                message: self.message,
                request_id: self.request_id,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_server_trouble_are_retried_here() {
        assert_eq!(
            classify(Some("RequestLimitExceeded"), Some(503)),
            Class::Throttled
        );
        assert_eq!(classify(Some("Throttling"), Some(400)), Class::Throttled);
        assert_eq!(
            classify(Some("InternalError"), Some(500)),
            Class::Unavailable
        );
        assert_eq!(classify(Some("Unavailable"), Some(503)), Class::Unavailable);
        assert_eq!(classify(Some("Whatever"), Some(502)), Class::Unavailable);
        assert_eq!(classify(None, None), Class::Unavailable);
        assert!(Class::Throttled.retry_here() && Class::Unavailable.retry_here());
        assert!(!Class::Rejected.retry_here() && !Class::IncorrectState.retry_here());
    }

    #[test]
    fn refusals_are_not_retried_here() {
        assert_eq!(
            classify(Some("InvalidAMIID.NotFound"), Some(400)),
            Class::Rejected
        );
        assert_eq!(
            classify(Some("InvalidInstanceID.NotFound"), Some(400)),
            Class::Rejected
        );
        assert_eq!(
            classify(Some("IncorrectInstanceState"), Some(400)),
            Class::IncorrectState
        );
        // A 500 on AWS, but not worth an immediate retry.
        assert_eq!(
            classify(Some("InsufficientInstanceCapacity"), Some(500)),
            Class::Rejected
        );
    }

    #[test]
    fn transience_for_the_controller() {
        let rejected = |code: &str| Ec2Error::Rejected {
            action: "RunInstances",
            code: code.to_owned(),
            message: String::new(),
            request_id: None,
        };
        assert!(!rejected("InvalidAMIID.NotFound").is_transient());
        assert!(!rejected("UnauthorizedOperation").is_transient());
        assert!(rejected("InsufficientInstanceCapacity").is_transient());
        assert!(
            Ec2Error::Throttled {
                action: "RunInstances"
            }
            .is_transient()
        );
        assert!(
            Ec2Error::IncorrectState {
                action: "StartInstances",
                instance_id: "i-12345678".into(),
                message: String::new()
            }
            .is_transient()
        );
    }

    #[test]
    fn reasons_fit_condition_reasons() {
        let rejected = Ec2Error::Rejected {
            action: "RunInstances",
            code: "InvalidAMIID.NotFound".to_owned(),
            message: "The image id '[ami-1]' does not exist".to_owned(),
            request_id: Some("r-1".to_owned()),
        };
        assert_eq!(rejected.reason(), "InvalidAMIIDNotFound");
        assert!(rejected.to_string().contains("InvalidAMIID.NotFound"));
        assert!(rejected.to_string().contains("request id r-1"));
        assert_eq!(
            Ec2Error::Throttled {
                action: "RunInstances"
            }
            .reason(),
            "EC2Throttled"
        );
        assert_eq!(condition_reason("..9Odd-Code.X"), "OddCodeX");
        let odd = Ec2Error::Rejected {
            action: "RunInstances",
            code: "...".to_owned(),
            message: String::new(),
            request_id: None,
        };
        assert_eq!(odd.reason(), "EC2Rejected");
    }

    #[test]
    fn instance_ids_are_recognised() {
        assert!(is_instance_id("i-0123456789abcdef0"));
        assert!(is_instance_id("i-12345678"));
        assert!(!is_instance_id("i-0123456789ABCDEF0"));
        assert!(!is_instance_id("i-123"));
        assert!(!is_instance_id("ami-12345678"));
        assert!(!is_instance_id("i-1234567g"));
    }

    #[test]
    fn ids_are_parsed_out_of_messages() {
        assert_eq!(
            parse_instance_ids("The instance ID 'i-0123456789abcdef0' does not exist"),
            vec!["i-0123456789abcdef0"]
        );
        assert_eq!(
            parse_instance_ids(
                "The instance IDs 'i-0123456789abcdef0, i-0fedcba9876543210' do not exist"
            ),
            vec!["i-0123456789abcdef0", "i-0fedcba9876543210"]
        );
        assert_eq!(
            parse_instance_ids(
                "The instance 'i-12345678' is not in a state from which it can be stopped."
            ),
            vec!["i-12345678"]
        );
        // Repeats once; partial matches and other resource ids are ignored.
        assert_eq!(
            parse_instance_ids("i-12345678,i-12345678 ami-12345678 xi-12345678 i-1234"),
            vec!["i-12345678"]
        );
        assert!(parse_instance_ids("Invalid id: \"bogus\"").is_empty());
    }

    #[test]
    fn failures_become_errors() {
        let failure = Failure {
            class: Class::IncorrectState,
            code: Some("IncorrectInstanceState".into()),
            message: "The instance 'i-12345678' is not in a state from which it can be started."
                .into(),
            request_id: None,
        };
        match failure.into_error("StartInstances", Some("i-87654321")) {
            Ec2Error::IncorrectState { instance_id, .. } => assert_eq!(instance_id, "i-12345678"),
            other => panic!("{other:?}"),
        }
        let failure = Failure {
            class: Class::Unavailable,
            code: Some("InternalError".into()),
            message: "boom".into(),
            request_id: None,
        };
        assert_eq!(
            failure.into_error("DescribeInstances", None),
            Ec2Error::Unavailable {
                action: "DescribeInstances",
                message: "InternalError: boom".into()
            }
        );
    }
}

//! Between the SDK's types and the layer's: instances in, launch requests and filters out.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceLifecycleType, InstanceMarketOptionsRequest,
    InstanceStateName, InstanceType, MarketType, ResourceType, SpotInstanceType, SpotMarketOptions,
    Tag, TagSpecification,
};

use super::{Instance, InstanceState, LaunchRequest};

/// An instance as the layer reports it, and the spot request behind it if any.
pub fn instance(sdk: &aws_sdk_ec2::types::Instance) -> Option<(Instance, Option<String>)> {
    let id = sdk.instance_id().filter(|s| !s.is_empty())?.to_owned();
    let state = sdk
        .state()
        .map(|s| {
            s.name()
                .and_then(state_from_name)
                .or_else(|| s.code().and_then(state_from_code))
                .unwrap_or(InstanceState::Pending)
        })
        .unwrap_or(InstanceState::Pending);
    let tags: BTreeMap<String, String> = sdk
        .tags()
        .iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_owned(),
                t.value().unwrap_or_default().to_owned(),
            ))
        })
        .collect();
    let spot = matches!(sdk.instance_lifecycle(), Some(InstanceLifecycleType::Spot));
    let instance = Instance {
        id,
        state,
        instance_type: sdk.instance_type().map(|t| t.as_str().to_owned()),
        private_ip: non_empty(sdk.private_ip_address()),
        public_ip: non_empty(sdk.public_ip_address()),
        private_dns: non_empty(sdk.private_dns_name()),
        public_dns: non_empty(sdk.public_dns_name()),
        availability_zone: non_empty(sdk.placement().and_then(|p| p.availability_zone())),
        launch_time: sdk.launch_time().and_then(|t| {
            jiff::Timestamp::new(t.secs(), i32::try_from(t.subsec_nanos()).unwrap_or(0)).ok()
        }),
        spot,
        tags,
    };
    Some((instance, non_empty(sdk.spot_instance_request_id())))
}

fn non_empty(s: Option<&str>) -> Option<String> {
    s.filter(|s| !s.is_empty()).map(str::to_owned)
}

/// The layer's state for EC2's state name.
pub fn state_from_name(name: &InstanceStateName) -> Option<InstanceState> {
    Some(match name {
        InstanceStateName::Pending => InstanceState::Pending,
        InstanceStateName::Running => InstanceState::Running,
        InstanceStateName::Stopping => InstanceState::Stopping,
        InstanceStateName::Stopped => InstanceState::Stopped,
        InstanceStateName::ShuttingDown => InstanceState::ShuttingDown,
        InstanceStateName::Terminated => InstanceState::Terminated,
        other => InstanceState::parse(other.as_str())?,
    })
}

/// The layer's state for EC2's state code (the low byte is the state, the high byte is
/// internal).
pub fn state_from_code(code: i32) -> Option<InstanceState> {
    Some(match code & 0xff {
        0 => InstanceState::Pending,
        16 => InstanceState::Running,
        32 => InstanceState::ShuttingDown,
        48 => InstanceState::Terminated,
        64 => InstanceState::Stopping,
        80 => InstanceState::Stopped,
        _ => return None,
    })
}

/// The state an instance-state-change entry (Start/Stop/Terminate answers) reports.
pub fn state_change(
    change: &aws_sdk_ec2::types::InstanceStateChange,
) -> Option<(String, InstanceState)> {
    let id = change.instance_id()?.to_owned();
    let state = change.current_state().and_then(|s| {
        s.name()
            .and_then(state_from_name)
            .or_else(|| s.code().and_then(state_from_code))
    })?;
    Some((id, state))
}

/// A filter with its values.
pub fn filter(name: &str, values: impl IntoIterator<Item = impl Into<String>>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(Into::into).collect()))
        .build()
}

/// The states a "live" instance is in (what the pre-launch lookup looks for).
pub const LIVE_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

/// Fills a RunInstances request from a [`LaunchRequest`].
pub fn run_instances(
    mut call: aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder,
    req: &LaunchRequest,
    root_device: Option<&str>,
) -> aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder {
    call = call
        .client_token(&req.client_token)
        .image_id(&req.image_id)
        .instance_type(InstanceType::from(req.instance_type.as_str()))
        .min_count(1)
        .max_count(1)
        .set_subnet_id(req.subnet_id.clone())
        .set_key_name(req.key_name.clone())
        .set_user_data(req.user_data_base64.clone());
    if !req.security_group_ids.is_empty() {
        call = call.set_security_group_ids(Some(req.security_group_ids.clone()));
    }
    if let Some(profile) = &req.iam_instance_profile {
        call = call.iam_instance_profile(instance_profile(profile));
    }
    if let (Some(size), Some(device)) = (req.root_volume_size_gib, root_device) {
        call = call.block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(device)
                .ebs(EbsBlockDevice::builder().volume_size(size).build())
                .build(),
        );
    }
    if req.spot {
        call = call.instance_market_options(spot_options());
    }
    if !req.tags.is_empty() {
        let tags: Vec<Tag> = req
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        for resource in [ResourceType::Instance, ResourceType::Volume] {
            call = call.tag_specifications(
                TagSpecification::builder()
                    .resource_type(resource)
                    .set_tags(Some(tags.clone()))
                    .build(),
            );
        }
    }
    call
}

/// An instance profile by ARN (`arn:...`) or by name.
pub fn instance_profile(profile: &str) -> IamInstanceProfileSpecification {
    let builder = IamInstanceProfileSpecification::builder();
    if profile.starts_with("arn:") {
        builder.arn(profile).build()
    } else {
        builder.name(profile).build()
    }
}

/// Spot that can be stopped and started like on-demand: a persistent request whose
/// interruptions stop the instance (a one-time request's instance cannot be stopped). Its
/// request must be cancelled before the instance is terminated, or EC2 launches a replacement;
/// `Ec2::terminate` does that.
pub fn spot_options() -> InstanceMarketOptionsRequest {
    InstanceMarketOptionsRequest::builder()
        .market_type(MarketType::Spot)
        .spot_options(
            SpotMarketOptions::builder()
                .spot_instance_type(SpotInstanceType::Persistent)
                .instance_interruption_behavior(InstanceInterruptionBehavior::Stop)
                .build(),
        )
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::primitives::DateTime;
    use aws_sdk_ec2::types::{InstanceState as SdkState, Placement};

    #[test]
    fn sdk_instances_convert() {
        let sdk = aws_sdk_ec2::types::Instance::builder()
            .instance_id("i-0123456789abcdef0")
            .state(
                SdkState::builder()
                    .name(InstanceStateName::Stopping)
                    .code(64)
                    .build(),
            )
            .instance_type(InstanceType::T3Micro)
            .private_ip_address("10.0.0.5")
            .public_dns_name("")
            .placement(Placement::builder().availability_zone("us-east-1a").build())
            .launch_time(DateTime::from_secs(1_700_000_000))
            .instance_lifecycle(InstanceLifecycleType::Spot)
            .spot_instance_request_id("sir-123")
            .tags(Tag::builder().key("a").value("b").build())
            .build();
        let (i, request) = instance(&sdk).unwrap();
        assert_eq!(i.id, "i-0123456789abcdef0");
        assert_eq!(i.state, InstanceState::Stopping);
        assert_eq!(i.instance_type.as_deref(), Some("t3.micro"));
        assert_eq!(i.private_ip.as_deref(), Some("10.0.0.5"));
        assert_eq!(i.public_dns, None, "empty strings read as absent");
        assert_eq!(i.availability_zone.as_deref(), Some("us-east-1a"));
        assert_eq!(
            i.launch_time,
            Some(jiff::Timestamp::from_second(1_700_000_000).unwrap())
        );
        assert!(i.spot);
        assert_eq!(i.tags.get("a").map(String::as_str), Some("b"));
        assert_eq!(request.as_deref(), Some("sir-123"));
        assert!(instance(&aws_sdk_ec2::types::Instance::builder().build()).is_none());
    }

    #[test]
    fn state_codes_use_the_low_byte() {
        assert_eq!(state_from_code(16), Some(InstanceState::Running));
        assert_eq!(state_from_code(256 + 80), Some(InstanceState::Stopped));
        assert_eq!(state_from_code(7), None);
        assert_eq!(
            state_from_name(&InstanceStateName::ShuttingDown),
            Some(InstanceState::ShuttingDown)
        );
    }

    #[test]
    fn instance_profiles_by_arn_or_name() {
        let arn = instance_profile("arn:aws:iam::123456789012:instance-profile/sandbox");
        assert!(arn.arn().is_some() && arn.name().is_none());
        let name = instance_profile("sandbox");
        assert_eq!(name.name(), Some("sandbox"));
        assert!(name.arn().is_none());
    }
}

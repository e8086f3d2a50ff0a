#!/usr/bin/env python3
"""The test EC2 endpoint: moto's EC2 backend (server mode) behind a thin WSGI layer.

It adds what the operator must cope with on real EC2 and moto lacks. Everything listens on
127.0.0.1 only; region us-east-1 (moto takes the region from the request's SigV4 scope).

Usage
-----
    python ec2_endpoint.py --port 0 [--pending-seconds F] [--stopping-seconds F]
                           [--shutting-down-seconds F] [--consistency-seconds F] [--throttle]
                           [--exit-on-stdin-eof] [--verbose]

Once ready it prints exactly one line, ``LISTENING <port>``, on stdout (``--port 0`` picks a
free port) and nothing else there; diagnostics go to stderr. It runs until SIGTERM/SIGINT, or,
with ``--exit-on-stdin-eof``, until its stdin is closed (so it never outlives the process that
started it with a pipe on its stdin).

What the layer adds
-------------------
1. ClientToken idempotency on RunInstances (moto 5.2.5 stores the token but ignores it): a
   repeated RunInstances with the same ClientToken and the same parameters answers the original
   reservation (instances in their current state) instead of launching new ones; the same token
   with different parameters fails with ``IdempotentParameterMismatch``, as on AWS.
2. Transitional states that last a configurable time. After RunInstances and StartInstances an
   instance reads ``pending`` (0) for ``pending_seconds``, after StopInstances ``stopping`` (64)
   for ``stopping_seconds``, after TerminateInstances ``shutting-down`` (32) for
   ``shutting_down_seconds``; then ``running`` (16), ``stopped`` (80) or ``terminated`` (48).
   This holds in DescribeInstances, DescribeInstanceStatus (where, as on AWS, only ``running``
   instances are listed unless IncludeAllInstances is set) and filters on instance-state-name.
   Start/Stop/Terminate answer ``CurrentState`` = the transitional state for instances they
   move (even with a zero delay, as AWS always does), and the unchanged state for instances
   already there (e.g. StartInstances on a running instance); RunInstances always answers
   ``pending`` (moto's own rule, also AWS's). State rules, as on AWS, checked for every instance before any is changed:
   StartInstances needs ``stopped`` (no-op on ``pending``/``running``), StopInstances needs
   ``running`` (no-op on ``stopping``/``stopped``); otherwise ``IncorrectInstanceState``
   ("The instance 'i-…' is not in a state from which it can be started/stopped."). Terminating
   a ``shutting-down`` or ``terminated`` instance is a no-op. Delays default to 0 (instant:
   Describe* shows the final state at once).
3. AWS-like request throttling (off unless ``--throttle`` or the control API enables it):
   token buckets, each request takes one token from its request bucket (and, for the four
   instance-lifecycle actions, one token per instance from a resource bucket); a request that
   finds any of its buckets short is refused with HTTP 503 and the EC2 error
   ``RequestLimitExceeded`` (tokens are only taken when all buckets have enough). Buckets refill
   continuously at ``refill_per_second`` up to ``capacity``. Bucket names and defaults, from
   the Amazon EC2 developer guide, "Request throttling for the Amazon EC2 API" (tables "Request
   token bucket sizes and refill rates" and "Resource token bucket sizes and refill rates"):

       bucket                         capacity  refill/s  takes
       describe                           100       20    Describe*/List*/Search*/Get* not below
       describe_unfiltered                 50       10    DescribeInstances, DescribeInstanceStatus,
                                                          DescribeNetworkInterfaces,
                                                          DescribeSecurityGroups, DescribeSnapshots,
                                                          DescribeSpotInstanceRequests,
                                                          DescribeVolumes sent with no Filter.N,
                                                          MaxResults nor NextToken
       mutating                            50        5    every other action (StopInstances too)
       resource_intensive                  50        5    AuthorizeSecurityGroupIngress,
                                                          RevokeSecurityGroupIngress,
                                                          CreateKeyPair, RequestSpotInstances,
                                                          CancelSpotInstanceRequests, VPC peering
       run_instances                        5        2    RunInstances
       start_instances                      5        2    StartInstances
       terminate_instances                100        5    TerminateInstances
       create_tags                        100       10    CreateTags
       delete_tags                        100       10    DeleteTags
       run_instances_resources           1000        2    RunInstances, MaxCount tokens
       start_instances_resources         1000        2    StartInstances, one per instance id
       stop_instances_resources          1000       20    StopInstances, one per instance id
       terminate_instances_resources     1000       20    TerminateInstances, one per instance id

4. Fault injection: an action fails its next N calls with a given error code, HTTP status and
   message (EC2 XML error body); optionally a per-action added latency.
5. Call counts per action: ``calls`` (accepted: passed throttling and faults and were handed to
   moto, whatever moto answered), ``throttled`` and ``faulted``.
6. A call log: the last 100,000 EC2 requests, each with its arrival time (wall clock, Unix
   seconds), action, outcome (``accepted``, ``throttled``, ``faulted``), the request bucket it
   drew from, the instance ids it named (``InstanceId.N``), how long the layer took to answer
   it (``ms``, waiting for moto's lock included) and how long moto itself took (``moto_ms``,
   0 when the call never reached moto). The bench reads it to time a spec change to its EC2 call and
   to see how long moto takes.
7. Eventual consistency (off unless ``--consistency-seconds`` or the control API sets a time):
   as AWS documents for EC2, an instance is not visible everywhere at once after RunInstances.
   For ``consistency_seconds`` after its launch, an instance is unknown by id: a
   DescribeInstances naming it (``InstanceId.N``) fails as a whole with
   ``InvalidInstanceID.NotFound`` ("The instance ID 'i-…' does not exist" / "The instance IDs
   'i-…, i-…' do not exist", naming every id not visible yet), whatever else it names; a
   DescribeInstances without ids (filtered or not) leaves it out of the answer; and CreateTags
   on it fails with ``InvalidInstanceID.NotFound``. Other actions (Start/Stop/Terminate, the
   RunInstances answer itself and a ClientToken repeat of it) see it at once. The time applies
   to instances launched after it is set.

Control API (JSON over HTTP on the same port; never reaches moto)
-----------------------------------------------------------------
    GET    /_endpoint/health        -> {"ok": true, "moto": "5.2.5"}
    GET    /_endpoint/defaults      -> {"ami", "subnet", "security_group", "vpc", "region"}:
                                       a Linux x86_64 AMI among moto's built-in images (moto
                                       does not validate ImageId, so any id launches), the
                                       default VPC's us-east-1a subnet and its default group
    GET    /_endpoint/calls         -> {"calls": {"RunInstances": 3, ...}, "throttled": {...},
                                        "faulted": {...}}
    POST   /_endpoint/calls/reset   -> zeroes all three and empties the call log
    GET    /_endpoint/calls/log[?since=T] -> {"entries": [{"t": 1700000000.123, "action": "StopInstances",
                                        "outcome": "accepted", "bucket": "mutating", "ids": ["i-..."],
                                        "n": 1, "ms": 3.1, "moto_ms": 2.5}, ...]}   oldest first; only entries
                                       with t >= T; Describe* entries carry only n, no ids
    POST   /_endpoint/faults        <- {"action": "RunInstances", "code": "InsufficientInstanceCapacity",
                                        "status": 500, "message": "...", "count": 2}
                                       status defaults to 400, message to a generic text, count to
                                       1 (-1 = until cleared); action "*" matches every action.
                                       {"action": "DescribeInstances", "latency_ms": 250} sets an
                                       added latency (0 removes it); both may come in one body.
    GET    /_endpoint/faults        -> {"faults": [...], "latency_ms": {...}}
    DELETE /_endpoint/faults        -> removes every fault and latency
    PUT    /_endpoint/throttle      <- {"enabled": true, "buckets": {"describe": {"capacity": 100,
                                        "refill_per_second": 20}, ...}}   (each key optional;
                                       a bucket named here, and every bucket when throttling is
                                       switched on, starts full)
    GET    /_endpoint/throttle      -> {"enabled": ..., "buckets": {name: {"capacity",
                                        "refill_per_second", "tokens"}}}
    PUT    /_endpoint/delays        <- {"pending_seconds": 2, "stopping_seconds": 2,
                                        "shutting_down_seconds": 2}   (each key optional; applies
                                       to transitions that start afterwards)
    GET    /_endpoint/delays        -> the same three numbers
    PUT    /_endpoint/consistency   <- {"seconds": 5}   (0 = off; applies to later launches)
    GET    /_endpoint/consistency   -> {"seconds": 5, "hidden": ["i-…", ...]}   the instances not
                                       visible yet

Errors of the control API answer 4xx with {"error": "..."}.

Thread safety: werkzeug serves each connection in its own thread; the control state has its own
lock, and every request handed to moto runs under one lock (moto's backends are not written for
concurrent mutation; moto is fast enough that this costs little).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from io import BytesIO
from typing import Any
from urllib.parse import parse_qsl

# Moto reads its settings at import time. AMI validation must stay off so RunInstances accepts
# any ImageId the tests use (bool("false") is True in moto's parser, so drop the variable).
os.environ.pop("MOTO_ENABLE_AMI_VALIDATION", None)

import moto  # noqa: E402
from moto.core import DEFAULT_ACCOUNT_ID  # noqa: E402
from moto.core.responses import ActionResult  # noqa: E402
from moto.ec2.exceptions import (  # noqa: E402
    EC2ClientError,
    InvalidParameterCombination,
    OperationDisableApiStopNotPermitted,
    OperationNotPermitted4,
)
from moto.ec2.models import ec2_backends  # noqa: E402
from moto.ec2.models.instances import Instance, InstanceBackend, InstanceState  # noqa: E402
from moto.ec2.responses.instances import InstanceResponse  # noqa: E402
from moto.moto_server.werkzeug_app import create_backend_app  # noqa: E402
from werkzeug.serving import WSGIRequestHandler, make_server  # noqa: E402

REGION = "us-east-1"

# --------------------------------------------------------------------------------------------
# Transitional states
# --------------------------------------------------------------------------------------------


class Delays:
    """How long each transitional state lasts, in seconds (0 = instant)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending_seconds = 0.0
        self.stopping_seconds = 0.0
        self.shutting_down_seconds = 0.0

    def as_dict(self) -> dict[str, float]:
        with self.lock:
            return {
                "pending_seconds": self.pending_seconds,
                "stopping_seconds": self.stopping_seconds,
                "shutting_down_seconds": self.shutting_down_seconds,
            }

    def update(self, values: dict[str, Any]) -> None:
        parsed = {}
        for key in ("pending_seconds", "stopping_seconds", "shutting_down_seconds"):
            if key in values:
                value = values[key]
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{key} must be a number >= 0")
                parsed[key] = float(value)
        unknown = set(values) - {"pending_seconds", "stopping_seconds", "shutting_down_seconds"}
        if unknown:
            raise ValueError(f"unknown keys: {sorted(unknown)}")
        with self.lock:
            for key, value in parsed.items():
                setattr(self, key, value)


DELAYS = Delays()
# Guards the transition overlay and the state checks of Start/Stop/Terminate.
STATE_LOCK = threading.RLock()

# moto keeps an instance's state in `Instance._state` (an InstanceState it sometimes mutates in
# place). We turn that attribute into a property: the stored value is the real (final) state,
# which moto sets at once; while a transition is under way the getter answers the transitional
# state instead, and once its deadline has passed it drops the transition.


def _state_get(self: Instance) -> InstanceState:
    transition = self.__dict__.get("_sbx_transition")
    if transition is not None:
        state, until = transition
        if time.monotonic() < until:
            return state
        self.__dict__["_sbx_transition"] = None
    return self.__dict__["_sbx_real_state"]


def _state_set(self: Instance, value: InstanceState) -> None:
    self.__dict__["_sbx_real_state"] = value


Instance._state = property(_state_get, _state_set)  # type: ignore[assignment]


def _begin_transition(instance: Instance, name: str, code: int, seconds: float) -> None:
    if seconds > 0:
        instance.__dict__["_sbx_transition"] = (InstanceState(name, code), time.monotonic() + seconds)
    else:
        instance.__dict__["_sbx_transition"] = None


def _call_on_real_state(instance: Instance, method: Any) -> None:
    """Runs a moto Instance method that mutates `_state` in place, on the real state."""
    instance.__dict__["_sbx_transition"] = None
    method(instance)


def _state_dict(state: InstanceState) -> dict[str, Any]:
    return {"Code": state.code, "Name": state.name}


class IncorrectInstanceState(EC2ClientError):
    def __init__(self, instance_id: str, verb: str) -> None:
        super().__init__(
            "IncorrectInstanceState",
            f"The instance '{instance_id}' is not in a state from which it can be {verb}.",
        )


class IdempotentParameterMismatch(EC2ClientError):
    def __init__(self) -> None:
        super().__init__(
            "IdempotentParameterMismatch",
            "Arguments on this idempotent request are inconsistent with arguments used in "
            "previous request(s).",
        )


_orig_backend_run_instances = InstanceBackend.run_instances
_orig_instance_start = Instance.start
_orig_instance_stop = Instance.stop
_orig_instance_terminate = Instance.terminate
_orig_instance_reboot = Instance.reboot
_orig_response_run_instances = InstanceResponse.run_instances


def _backend_run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
    reservation = _orig_backend_run_instances(self, *args, **kwargs)
    seconds = DELAYS.as_dict()["pending_seconds"]
    with STATE_LOCK:
        for instance in reservation.instances:
            _begin_transition(instance, "pending", 0, seconds)
    CONSISTENCY.launched([instance.id for instance in reservation.instances])
    return reservation


def _instance_reboot(self: Instance) -> None:
    with STATE_LOCK:
        if self._state.name == "running":
            _call_on_real_state(self, _orig_instance_reboot)


def _start_instances(backend: Any, instance_ids: list[str]) -> list[dict[str, Any]]:
    seconds = DELAYS.as_dict()["pending_seconds"]
    with STATE_LOCK:
        instances = backend.get_multi_instances_by_id(instance_ids)
        for instance in instances:
            if instance._state.name not in ("stopped", "pending", "running"):
                raise IncorrectInstanceState(instance.id, "started")
        out = []
        for instance in instances:
            previous = copy.copy(instance._state)
            if previous.name == "stopped":
                _call_on_real_state(instance, _orig_instance_start)
                _begin_transition(instance, "pending", 0, seconds)
                current = InstanceState("pending", 0)
            else:
                current = previous
            out.append(
                {
                    "InstanceId": instance.id,
                    "CurrentState": _state_dict(current),
                    "PreviousState": _state_dict(previous),
                }
            )
        return out


def _stop_instances(backend: Any, instance_ids: list[str]) -> list[dict[str, Any]]:
    seconds = DELAYS.as_dict()["stopping_seconds"]
    with STATE_LOCK:
        instances = backend.get_multi_instances_by_id(instance_ids)
        for instance in instances:
            if instance._state.name not in ("running", "stopping", "stopped"):
                raise IncorrectInstanceState(instance.id, "stopped")
            if instance.disable_api_stop is True:
                raise OperationDisableApiStopNotPermitted(instance.id)
        out = []
        for instance in instances:
            previous = copy.copy(instance._state)
            if previous.name == "running":
                _call_on_real_state(instance, _orig_instance_stop)
                _begin_transition(instance, "stopping", 64, seconds)
                current = InstanceState("stopping", 64)
            else:
                current = previous
            out.append(
                {
                    "InstanceId": instance.id,
                    "CurrentState": _state_dict(current),
                    "PreviousState": _state_dict(previous),
                }
            )
        return out


def _terminate_instances(backend: Any, instance_ids: list[str]) -> list[dict[str, Any]]:
    seconds = DELAYS.as_dict()["shutting_down_seconds"]
    if not instance_ids:
        raise InvalidParameterCombination("No instances specified")
    with STATE_LOCK:
        instances = backend.get_multi_instances_by_id(instance_ids)
        for instance in instances:
            if instance.disable_api_termination is True:
                raise OperationNotPermitted4(instance.id)
        out = []
        for instance in instances:
            previous = copy.copy(instance._state)
            if previous.name not in ("shutting-down", "terminated"):
                _call_on_real_state(instance, _orig_instance_terminate)
                _begin_transition(instance, "shutting-down", 32, seconds)
                current = InstanceState("shutting-down", 32)
            else:
                current = previous
            out.append(
                {
                    "InstanceId": instance.id,
                    "CurrentState": _state_dict(current),
                    "PreviousState": _state_dict(previous),
                }
            )
        return out


def _response_start_instances(self: InstanceResponse) -> ActionResult:
    instance_ids = self._get_param("InstanceIds", [])
    self.error_on_dryrun()
    return ActionResult({"StartingInstances": _start_instances(self.ec2_backend, instance_ids)})


def _response_stop_instances(self: InstanceResponse) -> ActionResult:
    instance_ids = self._get_param("InstanceIds", [])
    self.error_on_dryrun()
    return ActionResult({"StoppingInstances": _stop_instances(self.ec2_backend, instance_ids)})


def _response_terminate_instances(self: InstanceResponse) -> ActionResult:
    instance_ids = self._get_param("InstanceIds", [])
    self.error_on_dryrun()
    result = _terminate_instances(self.ec2_backend, instance_ids)
    # As moto's own handler does: let autoscaling and ELBv2 know.
    from moto.autoscaling import autoscaling_backends
    from moto.elbv2 import elbv2_backends

    autoscaling_backends[self.current_account][self.region].notify_terminate_instances(instance_ids)
    elbv2_backends[self.current_account][self.region].notify_terminate_instances(instance_ids)
    return ActionResult({"TerminatingInstances": result})


# --------------------------------------------------------------------------------------------
# Eventual consistency
# --------------------------------------------------------------------------------------------


class Consistency:
    """Which new instances EC2 does not show yet, and for how long after a launch."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seconds = 0.0
        # instance id -> monotonic time from which it is visible
        self.visible_at: dict[str, float] = {}

    def configure(self, body: dict[str, Any]) -> None:
        unknown = set(body) - {"seconds"}
        if unknown:
            raise ValueError(f"unknown keys: {sorted(unknown)}")
        value = body.get("seconds")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError("seconds must be a number >= 0")
        with self.lock:
            self.seconds = float(value)

    def launched(self, instance_ids: list[str]) -> None:
        with self.lock:
            if self.seconds > 0:
                until = time.monotonic() + self.seconds
                for instance_id in instance_ids:
                    self.visible_at[instance_id] = until

    def hidden(self) -> set[str]:
        """The ids not visible yet (forgetting those whose time has come)."""
        now = time.monotonic()
        with self.lock:
            for instance_id in [i for i, t in self.visible_at.items() if t <= now]:
                del self.visible_at[instance_id]
            return set(self.visible_at)

    def as_dict(self) -> dict[str, Any]:
        hidden = sorted(self.hidden())
        with self.lock:
            return {"seconds": self.seconds, "hidden": hidden}


CONSISTENCY = Consistency()


def not_found_message(instance_ids: list[str]) -> str:
    """AWS's wording of InvalidInstanceID.NotFound."""
    if len(instance_ids) > 1:
        return f"The instance IDs '{', '.join(instance_ids)}' do not exist"
    return f"The instance ID '{instance_ids[0]}' does not exist"


def hidden_named(action: str, params: dict[str, str]) -> list[str]:
    """The ids a call names that EC2 does not show yet, if the call is one they fail."""
    if action == "DescribeInstances":
        prefix = "InstanceId."
    elif action == "CreateTags":
        prefix = "ResourceId."
    else:
        return []
    named = [v for k, v in sorted(params.items(), key=lambda kv: _param_index(kv[0])) if k.startswith(prefix)]
    if not named:
        return []
    hidden = CONSISTENCY.hidden()
    out: list[str] = []
    for instance_id in named:
        if instance_id in hidden and instance_id not in out:
            out.append(instance_id)
    return out


def _param_index(key: str) -> tuple[str, int]:
    head, _, tail = key.rpartition(".")
    try:
        return (head, int(tail))
    except ValueError:
        return (key, 0)


_orig_backend_describe_instances = InstanceBackend.describe_instances


def _backend_describe_instances(self: Any, filters: Any = None) -> Any:
    """DescribeInstances without ids: instances not visible yet are left out."""
    reservations = _orig_backend_describe_instances(self, filters)
    hidden = CONSISTENCY.hidden()
    if not hidden:
        return reservations
    out = []
    for reservation in reservations:
        visible = [i for i in reservation.instances if i.id not in hidden]
        if len(visible) != len(reservation.instances):
            # `reservations` holds shallow copies: reassigning the list leaves moto's own alone.
            reservation.instances = visible
        if visible:
            out.append(reservation)
    return out


InstanceBackend.describe_instances = _backend_describe_instances  # type: ignore[method-assign]

# --------------------------------------------------------------------------------------------
# ClientToken idempotency
# --------------------------------------------------------------------------------------------

IDEMPOTENCY_LOCK = threading.Lock()
# (account, region, client token) -> (parameter fingerprint, reservation)
IDEMPOTENCY: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_NOT_FINGERPRINTED = {"Action", "Version", "ClientToken", "DryRun"}


def _response_run_instances(self: InstanceResponse) -> ActionResult:
    token = self._get_param("ClientToken")
    if not token:
        return _orig_response_run_instances(self)
    fingerprint = tuple(
        sorted(
            (key, tuple(values) if isinstance(values, list) else (values,))
            for key, values in self.querystring.items()
            if key not in _NOT_FINGERPRINTED
        )
    )
    key = (self.current_account, self.region, token)
    # Held across the launch so two concurrent calls with one token launch once.
    with IDEMPOTENCY_LOCK:
        known = IDEMPOTENCY.get(key)
        if known is not None:
            if known[0] != fingerprint:
                raise IdempotentParameterMismatch()
            self.error_on_dryrun()
            return ActionResult(known[1])
        result = _orig_response_run_instances(self)
        IDEMPOTENCY[key] = (fingerprint, result.result)
        return result


InstanceBackend.run_instances = _backend_run_instances  # type: ignore[method-assign]
Instance.reboot = _instance_reboot  # type: ignore[method-assign]
InstanceResponse.run_instances = _response_run_instances  # type: ignore[method-assign]
InstanceResponse.start_instances = _response_start_instances  # type: ignore[method-assign]
InstanceResponse.stop_instances = _response_stop_instances  # type: ignore[method-assign]
InstanceResponse.terminate_instances = _response_terminate_instances  # type: ignore[method-assign]

# --------------------------------------------------------------------------------------------
# Throttling
# --------------------------------------------------------------------------------------------

# (capacity, refill per second); see the module docstring for the source.
DEFAULT_BUCKETS: dict[str, tuple[float, float]] = {
    "describe": (100, 20),
    "describe_unfiltered": (50, 10),
    "mutating": (50, 5),
    "resource_intensive": (50, 5),
    "run_instances": (5, 2),
    "start_instances": (5, 2),
    "terminate_instances": (100, 5),
    "create_tags": (100, 10),
    "delete_tags": (100, 10),
    "run_instances_resources": (1000, 2),
    "start_instances_resources": (1000, 2),
    "stop_instances_resources": (1000, 20),
    "terminate_instances_resources": (1000, 20),
}
ACTION_BUCKETS = {
    "RunInstances": "run_instances",
    "StartInstances": "start_instances",
    "TerminateInstances": "terminate_instances",
    "CreateTags": "create_tags",
    "DeleteTags": "delete_tags",
}
RESOURCE_BUCKETS = {
    "RunInstances": "run_instances_resources",
    "StartInstances": "start_instances_resources",
    "StopInstances": "stop_instances_resources",
    "TerminateInstances": "terminate_instances_resources",
}
UNFILTERED_SUBSET = {
    "DescribeInstances",
    "DescribeInstanceStatus",
    "DescribeNetworkInterfaces",
    "DescribeSecurityGroups",
    "DescribeSnapshots",
    "DescribeSpotInstanceRequests",
    "DescribeVolumes",
}
RESOURCE_INTENSIVE = {
    "AcceptVpcPeeringConnection",
    "AuthorizeSecurityGroupIngress",
    "CancelSpotInstanceRequests",
    "CreateKeyPair",
    "CreateVpcPeeringConnection",
    "DeleteVpcPeeringConnection",
    "RejectVpcPeeringConnection",
    "RevokeSecurityGroupIngress",
    "RequestSpotInstances",
}
NON_MUTATING_PREFIXES = ("Describe", "List", "Search", "Get")


def request_bucket(action: str, params: dict[str, str]) -> str:
    """The request-token bucket an EC2 action draws from."""
    if action in ACTION_BUCKETS:
        return ACTION_BUCKETS[action]
    if action in RESOURCE_INTENSIVE:
        return "resource_intensive"
    if action.startswith(NON_MUTATING_PREFIXES):
        if action in UNFILTERED_SUBSET and not any(
            key.startswith("Filter.") or key in ("MaxResults", "NextToken") for key in params
        ):
            return "describe_unfiltered"
        return "describe"
    return "mutating"


def resource_cost(action: str, params: dict[str, str]) -> int:
    """Resource tokens an instance-lifecycle action takes: one per instance it affects."""
    if action == "RunInstances":
        for key in ("MaxCount", "MinCount"):
            try:
                return max(1, int(params[key]))
            except (KeyError, ValueError):
                continue
        return 1
    return max(1, sum(1 for key in params if key.startswith("InstanceId.")))


class Bucket:
    def __init__(self, capacity: float, refill_per_second: float) -> None:
        self.capacity = float(capacity)
        self.refill_per_second = float(refill_per_second)
        self.tokens = float(capacity)
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.refill_per_second)
        self.stamp = now

    def reset(self) -> None:
        self.tokens = self.capacity
        self.stamp = time.monotonic()


class Throttle:
    def __init__(self, enabled: bool) -> None:
        self.lock = threading.Lock()
        self.enabled = enabled
        self.buckets = {name: Bucket(c, r) for name, (c, r) in DEFAULT_BUCKETS.items()}

    def try_acquire(self, action: str, params: dict[str, str]) -> bool:
        """Takes the tokens a request needs; False (taking none) when a bucket is short."""
        needs = [(request_bucket(action, params), 1)]
        if action in RESOURCE_BUCKETS:
            needs.append((RESOURCE_BUCKETS[action], resource_cost(action, params)))
        with self.lock:
            if not self.enabled:
                return True
            now = time.monotonic()
            for name, n in needs:
                self.buckets[name].refill(now)
            if any(self.buckets[name].tokens < n for name, n in needs):
                return False
            for name, n in needs:
                self.buckets[name].tokens -= n
            return True

    def configure(self, body: dict[str, Any]) -> None:
        unknown = set(body) - {"enabled", "buckets"}
        if unknown:
            raise ValueError(f"unknown keys: {sorted(unknown)}")
        enabled = body.get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            raise ValueError("enabled must be a boolean")
        buckets = body.get("buckets") or {}
        if not isinstance(buckets, dict):
            raise ValueError("buckets must be an object")
        parsed = {}
        for name, spec in buckets.items():
            if name not in DEFAULT_BUCKETS:
                raise ValueError(f"unknown bucket {name!r}; known: {sorted(DEFAULT_BUCKETS)}")
            if not isinstance(spec, dict) or set(spec) - {"capacity", "refill_per_second"}:
                raise ValueError(f"bucket {name!r}: expected {{capacity, refill_per_second}}")
            for key in ("capacity", "refill_per_second"):
                value = spec.get(key)
                if value is not None and (
                    not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0
                ):
                    raise ValueError(f"bucket {name!r}: {key} must be a number >= 0")
            parsed[name] = spec
        with self.lock:
            if enabled is not None:
                if enabled and not self.enabled:
                    for bucket in self.buckets.values():
                        bucket.reset()
                self.enabled = enabled
            for name, spec in parsed.items():
                bucket = self.buckets[name]
                if spec.get("capacity") is not None:
                    bucket.capacity = float(spec["capacity"])
                if spec.get("refill_per_second") is not None:
                    bucket.refill_per_second = float(spec["refill_per_second"])
                bucket.reset()

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            now = time.monotonic()
            for bucket in self.buckets.values():
                bucket.refill(now)
            return {
                "enabled": self.enabled,
                "buckets": {
                    name: {
                        "capacity": b.capacity,
                        "refill_per_second": b.refill_per_second,
                        "tokens": b.tokens,
                    }
                    for name, b in self.buckets.items()
                },
            }


# --------------------------------------------------------------------------------------------
# Faults, latency, call counts
# --------------------------------------------------------------------------------------------


class Faults:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.faults: list[dict[str, Any]] = []
        self.latency_ms: dict[str, float] = {}
        # Added after the backend has acted, before the answer leaves: the window in which a
        # client that is killed has changed EC2 without knowing it.
        self.response_delay_ms: dict[str, float] = {}

    def add(self, body: dict[str, Any]) -> None:
        unknown = set(body) - {
            "action", "code", "status", "message", "count", "latency_ms", "response_delay_ms"
        }
        if unknown:
            raise ValueError(f"unknown keys: {sorted(unknown)}")
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise ValueError("action (an EC2 action name or \"*\") is required")
        code = body.get("code")
        latency = body.get("latency_ms")
        response_delay = body.get("response_delay_ms")
        if code is None and latency is None and response_delay is None:
            raise ValueError("give code (a fault), latency_ms and/or response_delay_ms")
        if response_delay is not None and (
            not isinstance(response_delay, (int, float))
            or isinstance(response_delay, bool)
            or response_delay < 0
        ):
            raise ValueError("response_delay_ms must be a number >= 0")
        fault = None
        if code is not None:
            if not isinstance(code, str) or not code:
                raise ValueError("code must be a non-empty string")
            status = body.get("status", 400)
            if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
                raise ValueError("status must be an HTTP error status (400-599)")
            count = body.get("count", 1)
            if not isinstance(count, int) or isinstance(count, bool) or count == 0 or count < -1:
                raise ValueError("count must be a positive integer, or -1 for until cleared")
            message = body.get("message")
            if message is None:
                message = f"Injected fault {code} on {action}."
            if not isinstance(message, str):
                raise ValueError("message must be a string")
            fault = {
                "action": action,
                "code": code,
                "status": status,
                "message": message,
                "count": count,
            }
        if latency is not None and (
            not isinstance(latency, (int, float)) or isinstance(latency, bool) or latency < 0
        ):
            raise ValueError("latency_ms must be a number >= 0")
        with self.lock:
            if fault is not None:
                self.faults.append(fault)
            if latency is not None:
                if latency > 0:
                    self.latency_ms[action] = float(latency)
                else:
                    self.latency_ms.pop(action, None)
            if response_delay is not None:
                if response_delay > 0:
                    self.response_delay_ms[action] = float(response_delay)
                else:
                    self.response_delay_ms.pop(action, None)

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
            self.latency_ms.clear()
            self.response_delay_ms.clear()

    def response_delay_for(self, action: str) -> float:
        with self.lock:
            return self.response_delay_ms.get(action, self.response_delay_ms.get("*", 0.0))

    def latency_for(self, action: str) -> float:
        with self.lock:
            return self.latency_ms.get(action, self.latency_ms.get("*", 0.0))

    def take(self, action: str) -> dict[str, Any] | None:
        """The fault this call must fail with, if any (counting it down)."""
        with self.lock:
            for fault in self.faults:
                if fault["action"] in (action, "*"):
                    if fault["count"] > 0:
                        fault["count"] -= 1
                        if fault["count"] == 0:
                            self.faults.remove(fault)
                    return dict(fault)
            return None

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "faults": [dict(f) for f in self.faults],
                "latency_ms": dict(self.latency_ms),
                "response_delay_ms": dict(self.response_delay_ms),
            }


CALL_LOG_SIZE = 100_000


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.calls: dict[str, int] = {}
        self.throttled: dict[str, int] = {}
        self.faulted: dict[str, int] = {}
        self.log: deque[dict[str, Any]] = deque(maxlen=CALL_LOG_SIZE)

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.log.append(entry)

    def log_since(self, since: float) -> dict[str, Any]:
        with self.lock:
            return {"entries": [dict(e) for e in self.log if e["t"] >= since]}

    def bump(self, table: str, action: str) -> None:
        with self.lock:
            counts = getattr(self, table)
            counts[action] = counts.get(action, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "calls": dict(self.calls),
                "throttled": dict(self.throttled),
                "faulted": dict(self.faulted),
            }

    def clear(self) -> None:
        with self.lock:
            self.reset()


# --------------------------------------------------------------------------------------------
# The WSGI application
# --------------------------------------------------------------------------------------------


def ec2_error_body(code: str, message: str) -> bytes:
    from xml.sax.saxutils import escape

    return (
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
        f"<Response><Errors><Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"</Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
    ).encode()


def status_line(status: int) -> str:
    from http import HTTPStatus

    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Error"


class EndpointApp:
    def __init__(self, throttle: bool) -> None:
        self.moto_app = create_backend_app("ec2")
        self.moto_lock = threading.Lock()
        self.throttle = Throttle(throttle)
        self.faults = Faults()
        self.counts = Counts()

    # ---- helpers

    @staticmethod
    def respond(start_response: Any, status: int, body: bytes, content_type: str) -> list[bytes]:
        start_response(
            status_line(status),
            [("Content-Type", content_type), ("Content-Length", str(len(body)))],
        )
        return [body]

    def json(self, start_response: Any, status: int, value: Any) -> list[bytes]:
        return self.respond(start_response, status, json.dumps(value).encode(), "application/json")

    def ec2_error(self, start_response: Any, status: int, code: str, message: str) -> list[bytes]:
        return self.respond(start_response, status, ec2_error_body(code, message), "text/xml")

    @staticmethod
    def read_body(environ: dict[str, Any]) -> bytes:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        stream = environ["wsgi.input"]
        if length > 0:
            return stream.read(length)
        if environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked" or environ.get(
            "wsgi.input_terminated"
        ):
            return stream.read()
        return b""

    # ---- entry point

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/_endpoint" or path.startswith("/_endpoint/"):
            return self.control(environ, start_response, path)

        body = self.read_body(environ)
        params = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        if environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
            params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        action = params.get("Action", "")
        arrived = time.time()
        started = time.monotonic()

        def log(outcome: str, moto_ms: float = 0.0) -> None:
            if action:
                ids = [v for k, v in params.items() if k.startswith("InstanceId.")]
                self.counts.record(
                    {
                        "t": arrived,
                        "action": action,
                        "outcome": outcome,
                        "bucket": request_bucket(action, params),
                        # Describe calls may name 1,000 ids: only their number is kept.
                        "ids": [] if action.startswith("Describe") else ids,
                        "n": len(ids),
                        "ms": (time.monotonic() - started) * 1000.0,
                        "moto_ms": moto_ms,
                    }
                )

        if action:
            if not self.throttle.try_acquire(action, params):
                self.counts.bump("throttled", action)
                log("throttled")
                return self.ec2_error(
                    start_response, 503, "RequestLimitExceeded", "Request limit exceeded."
                )
            latency = self.faults.latency_for(action)
            if latency > 0:
                time.sleep(latency / 1000.0)
            fault = self.faults.take(action)
            if fault is not None:
                self.counts.bump("faulted", action)
                log("faulted")
                return self.ec2_error(
                    start_response, fault["status"], fault["code"], fault["message"]
                )
            self.counts.bump("calls", action)
            # EC2's own answer for ids it does not show yet (an accepted call, as on AWS).
            unseen = hidden_named(action, params)
            if unseen:
                log("accepted")
                return self.ec2_error(
                    start_response, 400, "InvalidInstanceID.NotFound", not_found_message(unseen)
                )

        environ["wsgi.input"] = BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        with self.moto_lock:
            in_moto = time.monotonic()
            chunks = list(self.moto_app(environ, start_response))
            moto_ms = (time.monotonic() - in_moto) * 1000.0
        delay = self.faults.response_delay_for(action)
        if delay > 0:
            time.sleep(delay / 1000.0)
        log("accepted", moto_ms)
        return chunks

    # ---- control API

    def control(self, environ: dict[str, Any], start_response: Any, path: str) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        route = path[len("/_endpoint") :].rstrip("/") or "/"
        try:
            raw = self.read_body(environ)
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as err:
            return self.json(start_response, 400, {"error": f"bad JSON body: {err}"})

        query = dict(parse_qsl(environ.get("QUERY_STRING", "")))
        try:
            since = float(query.get("since", "0"))
        except ValueError:
            return self.json(start_response, 400, {"error": "since must be a number"})
        routes = {
            ("GET", "/health"): lambda: {"ok": True, "moto": moto.__version__},
            ("GET", "/defaults"): defaults,
            ("GET", "/calls"): self.counts.as_dict,
            ("POST", "/calls/reset"): lambda: (self.counts.clear(), self.counts.as_dict())[1],
            ("GET", "/calls/log"): lambda: self.counts.log_since(since),
            ("POST", "/faults"): lambda: (self.faults.add(body), self.faults.as_dict())[1],
            ("GET", "/faults"): self.faults.as_dict,
            ("DELETE", "/faults"): lambda: (self.faults.clear(), self.faults.as_dict())[1],
            ("PUT", "/throttle"): lambda: (self.throttle.configure(body), self.throttle.as_dict())[1],
            ("GET", "/throttle"): self.throttle.as_dict,
            ("PUT", "/delays"): lambda: (DELAYS.update(body), DELAYS.as_dict())[1],
            ("GET", "/delays"): DELAYS.as_dict,
            ("PUT", "/consistency"): lambda: (
                CONSISTENCY.configure(body),
                CONSISTENCY.as_dict(),
            )[1],
            ("GET", "/consistency"): CONSISTENCY.as_dict,
        }
        handler = routes.get((method, route))
        if handler is None:
            if any(r == route for (_, r) in routes):
                return self.json(start_response, 405, {"error": f"{method} not allowed on {path}"})
            return self.json(start_response, 404, {"error": f"no such control path {path}"})
        try:
            return self.json(start_response, 200, handler())
        except ValueError as err:
            return self.json(start_response, 400, {"error": str(err)})


_DEFAULTS: dict[str, str] = {}
_DEFAULTS_LOCK = threading.Lock()


def defaults() -> dict[str, str]:
    """Ids the tests can launch with: an AMI, the default subnet and security group."""
    with _DEFAULTS_LOCK:
        if not _DEFAULTS:
            backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
            images = backend.describe_images()
            linux = [i for i in images if i.platform is None and i.architecture == "x86_64"]
            ami = (linux or images)[0].id
            vpc = next(v for v in backend.describe_vpcs() if v.is_default)
            subnets = sorted(
                (s for s in backend.describe_subnets() if s.vpc_id == vpc.id),
                key=lambda s: s.availability_zone,
            )
            group = next(
                g
                for g in backend.describe_security_groups()
                if g.vpc_id == vpc.id and g.name == "default"
            )
            _DEFAULTS.update(
                ami=ami, subnet=subnets[0].id, security_group=group.id, vpc=vpc.id, region=REGION
            )
        return dict(_DEFAULTS)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


class QuietHandler(WSGIRequestHandler):
    verbose = False

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if self.verbose:
            super().log_request(code, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = a free one)")
    parser.add_argument("--pending-seconds", type=float, default=0.0)
    parser.add_argument("--stopping-seconds", type=float, default=0.0)
    parser.add_argument("--shutting-down-seconds", type=float, default=0.0)
    parser.add_argument(
        "--consistency-seconds",
        type=float,
        default=0.0,
        help="how long a new instance stays unknown to DescribeInstances and CreateTags",
    )
    parser.add_argument("--throttle", action="store_true", help="start with throttling on")
    parser.add_argument(
        "--exit-on-stdin-eof", action="store_true", help="exit when stdin is closed"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = parser.parse_args()

    DELAYS.update(
        {
            "pending_seconds": args.pending_seconds,
            "stopping_seconds": args.stopping_seconds,
            "shutting_down_seconds": args.shutting_down_seconds,
        }
    )
    CONSISTENCY.configure({"seconds": args.consistency_seconds})
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    if args.exit_on_stdin_eof:

        def watch_stdin() -> None:
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            finally:
                os._exit(0)

        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()

    app = EndpointApp(throttle=args.throttle)
    defaults()  # builds moto's us-east-1 backend (default VPC, AMIs) before the first request
    QuietHandler.verbose = args.verbose
    server = make_server("127.0.0.1", args.port, app, threaded=True, request_handler=QuietHandler)
    print(f"LISTENING {server.server_port}", flush=True)
    # Nothing else may go to stdout: the parent may stop reading it.
    sys.stdout = sys.stderr
    server.serve_forever()


if __name__ == "__main__":
    main()

"""Names on the wire: the subjects RelayBatches are published on and the rules names follow.

Shared by the relay (which publishes) and the router side (which subscribes), so both agree on
where a worker's batches are without either importing the other.
"""

from __future__ import annotations

import re
from typing import NamedTuple

NAME_RULE = re.compile(r"^[a-z0-9-_]+$")  # Dynamo's rule for namespaces and components
BUCKET_RULE = re.compile(r"^[A-Za-z0-9_-]+$")  # NATS KV bucket names
SNAPSHOT_BUCKET = "KV_SNAPSHOTS"
SUBJECT_PREFIX = "kv"  # the default of --subject-prefix
PREFIX_RULE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")  # subject tokens, no wildcards
STREAM_SUBJECTS = f"{SUBJECT_PREFIX}.>"


def stream_subjects(prefix: str = SUBJECT_PREFIX) -> str:
    """What the relay's stream takes: every subject under the prefix."""
    return f"{prefix}.>"


class Worker(NamedTuple):
    """One worker as subjects name it."""

    namespace: str
    component: str
    instance_id: int
    prefix: str = SUBJECT_PREFIX

    def subject(self, dp_rank: int) -> str:
        """The subject one of its DP ranks publishes on."""
        return f"{self.prefix}.{self.namespace}.{self.component}.{self.instance_id}.{dp_rank}"


def worker_subjects(namespace: str, component: str, instance_id: int | None = None,
                    prefix: str = SUBJECT_PREFIX) -> str:
    """What a router subscribes to: every worker of a component, or every DP rank of one."""
    tail = ">" if instance_id is None else f"{instance_id}.*"
    return f"{prefix}.{namespace}.{component}.{tail}"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: `*` one token, `>` one or more trailing tokens."""
    p_tokens, s_tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(p_tokens):
        if token == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (token != "*" and token != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)

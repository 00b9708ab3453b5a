"""Records of the dev server's tables and their Consul JSON shapes.

Field names and JSON shapes follow hashicorp/consul agent/structs/structs.go (DirEntry,
Session, Node, NodeService, HealthCheck).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]

SERF_CHECK_ID = "serfHealth"
SERF_CHECK_NAME = "Serf Health Status"
SERF_ALIVE_OUTPUT = "Agent alive and reachable"
SERF_DEAD_OUTPUT = "Agent not live or unreachable"
NODE_MAINT_CHECK_ID = "_node_maintenance"
SERVICE_MAINT_PREFIX = "_service_maintenance:"
DEFAULT_MAINT_REASON = (
    "Maintenance mode is enabled for this node, but no reason was provided. "
    "This is a default message."
)
DEFAULT_SERVICE_MAINT_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. "
    "This is a default message."
)
PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
DATACENTER = "dc1"


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes
    flags: int
    session: str
    lock_index: int
    create_index: int
    modify_index: int

    def same_content(self, other: KVEntry) -> bool:
        """DirEntry.Equal: an identical write does not bump ModifyIndex."""
        return (
            self.value == other.value
            and self.flags == other.flags
            and self.session == other.session
            and self.lock_index == other.lock_index
        )

    def to_json(self, with_value: bool = True) -> Json:
        out: Json = {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": (base64.b64encode(self.value).decode() if self.value else None)
            if with_value
            else None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.session:
            out["Session"] = self.session
        return out

    def to_state(self) -> Json:
        return {
            "key": self.key,
            "value": base64.b64encode(self.value).decode(),
            "flags": self.flags,
            "session": self.session,
            "lock_index": self.lock_index,
            "create_index": self.create_index,
            "modify_index": self.modify_index,
        }

    @classmethod
    def from_state(cls, raw: Json) -> KVEntry:
        return cls(
            key=raw["key"],
            value=base64.b64decode(raw["value"]),
            flags=raw["flags"],
            session=raw["session"],
            lock_index=raw["lock_index"],
            create_index=raw["create_index"],
            modify_index=raw["modify_index"],
        )


@dataclass
class Session:
    id: str
    name: str
    node: str
    lock_delay: float  # seconds
    behavior: str
    ttl: str  # as given ("" = none)
    ttl_seconds: float
    node_checks: list[str]
    service_checks: list[str]
    checks: list[str]  # deprecated field, kept as Consul keeps it
    create_index: int
    modify_index: int
    deadline: float = 0.0  # clock time of TTL expiry (0 = no TTL); not persisted

    def check_ids(self) -> list[str]:
        """Session.CheckIDs(): every check the session depends on (all on its node)."""
        out: list[str] = []
        for cid in [*self.checks, *self.node_checks, *self.service_checks]:
            if cid not in out:
                out.append(cid)
        return out

    def to_json(self) -> Json:
        out: Json = {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": round(self.lock_delay * 1e9),
            "Behavior": self.behavior,
            "TTL": self.ttl,
            "NodeChecks": list(self.node_checks),
            "ServiceChecks": [{"ID": c, "Namespace": ""} for c in self.service_checks]
            or None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.checks:
            out["Checks"] = list(self.checks)
        return out

    def to_state(self) -> Json:
        raw = dict(self.__dict__)
        raw.pop("deadline")
        return raw

    @classmethod
    def from_state(cls, raw: Json) -> Session:
        return cls(**raw)


@dataclass
class Node:
    name: str
    id: str
    address: str
    create_index: int
    modify_index: int

    def to_json(self) -> Json:
        return {
            "ID": self.id,
            "Node": self.name,
            "Address": self.address,
            "Datacenter": DATACENTER,
            "TaggedAddresses": {"lan": self.address, "wan": self.address},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class Service:
    node: str
    id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    enable_tag_override: bool
    create_index: int
    modify_index: int

    def same_content(self, other: Service) -> bool:
        return (self.name, self.tags, self.address, self.port, self.meta,
                self.enable_tag_override) == (other.name, other.tags, other.address,
                                              other.port, other.meta,
                                              other.enable_tag_override)

    def to_json(self, with_indexes: bool = True) -> Json:
        out: Json = {
            "ID": self.id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Address": self.address,
            "Meta": dict(self.meta),
            "Port": self.port,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": self.enable_tag_override,
            "Datacenter": DATACENTER,
        }
        if with_indexes:
            out["CreateIndex"] = self.create_index
            out["ModifyIndex"] = self.modify_index
        return out


@dataclass
class Check:
    node: str
    id: str
    name: str
    status: str
    notes: str
    output: str
    service_id: str
    service_name: str
    service_tags: list[str]
    type: str
    ttl: float  # seconds, 0 = not a TTL check
    deregister_after: float  # DeregisterCriticalServiceAfter in seconds, 0 = never
    create_index: int
    modify_index: int
    last_output: str = ""  # what CheckTTL remembers for its "TTL expired" message
    ttl_deadline: float = 0.0  # clock time; not persisted
    reap_deadline: float = 0.0  # clock time; not persisted
    definition: Json = field(default_factory=dict)

    def to_json(self) -> Json:
        return {
            "Node": self.node,
            "CheckID": self.id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.type,
            "Definition": dict(self.definition),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    def to_state(self) -> Json:
        raw = dict(self.__dict__)
        raw.pop("ttl_deadline")
        raw.pop("reap_deadline")
        return raw

    @classmethod
    def from_state(cls, raw: Json) -> Check:
        return cls(**raw)

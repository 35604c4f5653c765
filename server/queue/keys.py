"""Every Redis key the service uses, built in one place so prefixes and TTLs stay consistent."""

from __future__ import annotations

from dataclasses import dataclass

from server.queue.messages import TaskKind

GROUP = "workers"


@dataclass(frozen=True)
class Keys:
    prefix: str

    def stream(self, kind: TaskKind) -> str:
        return f"{self.prefix}:stream:{kind.value}"

    def reply(self, reply_to: str) -> str:
        """List the results of one request's tasks are pushed to (the API BLPOPs it); `reply_to` is the task's."""
        return f"{self.prefix}:reply:{reply_to}"

    def pending(self, reply_to: str) -> str:
        """Marks a request whose tasks Redis holds, from admission until its gather ends (or its tasks' TTL)."""
        return f"{self.prefix}:pending:{reply_to}"

    def value(self, key: str) -> str:
        return f"{self.prefix}:sf:value:{key}"

    def lock(self, key: str) -> str:
        return f"{self.prefix}:sf:lock:{key}"

    def waiters(self, key: str) -> str:
        return f"{self.prefix}:sf:waiters:{key}"

    def waiter(self, token: str) -> str:
        return f"{self.prefix}:sf:waiter:{token}"

    def workers(self) -> str:
        """Hash of live workers: id -> {expires_at, info}."""
        return f"{self.prefix}:workers"

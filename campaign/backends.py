"""Where a launch's tasks run: Ray actors (``--backend ray``, the default) or this process
(``--backend local``: notebooks, debugging, small machines). Both take the scheduler's calls
(:class:`campaign.scheduler.Call`) and report :class:`campaign.scheduler.Completion` s; the
task graphs, caching, retries and records are the scheduler's, the same for both."""

from __future__ import annotations

import collections
import math
import os
import time
import traceback
from typing import Any

from campaign.plan import Plan
from campaign.scheduler import Call, Completion

READY_TIMEOUT_S = 300.0


def _threads(plan: Plan, role: str) -> int:
    return max(1, math.ceil(float(plan.resources[role]["cpus"])))


class LocalBackend:
    """Every task in this process, one at a time, in the scheduler's order. A worker of each
    role is simulated by its thread count (``resources.<role>.cpus``, as a Ray actor of the
    role would have) and a memo that lives for the launch; energies that a Ray launch sends
    to the energy-evaluator pool are computed here. Nothing ends this process on purpose:
    ``inject_failure: trainer_process_exit`` fails its job with the reason."""

    def __init__(self, plan: Plan, marks: dict[str, float] | None = None) -> None:
        self.plan = plan
        self.marks = marks if marks is not None else {}
        self.pending: collections.deque[Call] = collections.deque()
        self.memo: dict[str, Any] = {}

    def start(self) -> None:
        now = time.time()
        for mark in ("actors_requested", "first_actor_ready", "all_actors_ready"):
            self.marks.setdefault(mark, now)

    def can_take(self, role: str) -> bool:
        return not self.pending  # one task at a time

    def submit(self, call: Call) -> str:
        self.pending.append(call)
        return "local"

    def busy(self) -> bool:
        return bool(self.pending)

    def keep(self, value: Any) -> Any:
        return value

    def fetch(self, stored: Any) -> Any:
        return stored

    def wait(self, timeout: float, queued_roles: set[str]) -> list[Completion]:
        if not self.pending:
            return []
        call = self.pending.popleft()
        return [self._run(call)]

    def _run(self, call: Call) -> Completion:
        import torch

        from actors.progress import ProgressFile
        from boltzgen.pipeline.graph import TaskContext, call_task
        from boltzgen.pipeline.job import energy_function

        threads = _threads(self.plan, call.role)
        ctx = TaskContext(threads=threads, memo=self.memo,
                          progress=ProgressFile(call.progress_file) if call.progress_file
                          else None)
        if call.energy_pool:
            ctx.energy = energy_function(TaskContext(threads=_threads(
                self.plan, "energy_evaluator"), memo=self.memo), call.args["job"])
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        start = time.time()
        try:
            value = call_task(ctx, call.function, {**call.args, **call.inputs})
        except Exception as exc:
            return Completion(call, "error", message=f"{type(exc).__name__}: {exc}",
                              trace=traceback.format_exc())
        finally:
            torch.set_num_threads(previous)
        return Completion(call, "ok", value=value, timing={
            "start": start, "end": time.time(), "node": "local", "pid": os.getpid()})


class RayBackend:
    """Actors of each role (``resources``), started once per launch, each probed with
    ``ready`` until it answers; a call goes to an idle actor of its role.

    Failures of the machinery (an actor's process or node died, an object was lost) come back
    as ``lost`` completions for the scheduler to retry; the actor is probed until Ray has
    restarted it (``actor_restarts``) or, gone for good, replaced (as often as the role's
    actors times ``actor_restarts`` in all). Idle actors on the node of an actor that died
    answer ``ready`` again before they get work. Results are fetched into the driver and kept
    in its object store, so that losing a node loses no result.
    """

    def __init__(self, plan: Plan, marks: dict[str, float] | None = None) -> None:
        import ray

        self.ray = ray
        self.plan = plan
        self.marks = marks if marks is not None else {}
        self.fault = plan.spec.fault_tolerance
        self.pools: dict[str, list[Any]] = {}
        self.idle: dict[str, collections.deque[Any]] = {}
        self.in_flight: dict[Any, tuple[Call, Any, Any]] = {}
        self.pending_ready: dict[Any, tuple[str, Any]] = {}
        self.actor_nodes: dict[Any, str] = {}
        self.replacements: collections.Counter[str] = collections.Counter()
        self._initial_actors = 0
        self._actors_started = math.inf
        self.system_errors = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                              ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)

    # -- actors --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every role's actors (once; the launcher may call this as soon as Ray is up)."""
        if self.pools:
            return
        self._actors_started = self.marks["actors_requested"] = time.time()
        for role, res in self.plan.resources.items():
            self.pools[role] = []
            self.idle[role] = collections.deque()
            for _ in range(int(res["count"])):
                self._add_actor(role)
        self._initial_actors = len(self.pending_ready)

    def _add_actor(self, role: str) -> None:
        from actors import make_actor

        res = self.plan.resources[role]
        actor = make_actor(role, res["cpus"], res["gpus"],
                           max_restarts=self.fault.actor_restarts)
        self.pools[role].append(actor)
        self._probe(role, actor)

    def _probe(self, role: str, actor: Any) -> None:
        """Take ``actor`` out of service until it answers ``ready`` (again)."""
        self.pending_ready[actor.ready.remote()] = (role, actor)

    def _retire_actor(self, role: str, actor: Any) -> None:
        """An actor that is gone for good: replace it while the role's budget lasts."""
        if actor in self.pools[role]:
            self.pools[role].remove(actor)
        self.ray.kill(actor, no_restart=True)
        budget = int(self.plan.resources[role]["count"]) * self.fault.actor_restarts
        if self.replacements[role] < budget:
            self.replacements[role] += 1
            self._add_actor(role)

    def _actor_ready(self, ref: Any) -> None:
        role, actor = self.pending_ready.pop(ref)
        try:
            where = self.ray.get(ref)
        except self.ray.exceptions.RayError:
            self._retire_actor(role, actor)
            return
        self.actor_nodes[actor] = where["node"]
        self.idle[role].append(actor)
        self.marks.setdefault("first_actor_ready", time.time())
        if len(self.actor_nodes) == self._initial_actors:
            self.marks.setdefault("all_actors_ready", time.time())

    def _suspect_node(self, node: str | None) -> None:
        """An actor died: its node may be gone. Idle actors on that node answer ``ready``
        before they get work again, so that retried tasks go to actors that are alive."""
        if not node:
            return
        for role, idle in self.idle.items():
            for actor in [a for a in idle if self.actor_nodes.get(a) == node]:
                idle.remove(actor)
                self._probe(role, actor)

    def _check_roles_alive(self, queued_roles: set[str]) -> None:
        """A role with queued work but no live actor would stall its jobs forever."""
        for role in queued_roles:
            if not self.pools.get(role):
                raise RuntimeError(f"resources.{role}: no actor of this role could be started")
        if time.time() - self._actors_started > READY_TIMEOUT_S:
            busy_roles = {call.role for call, _, _ in self.in_flight.values()}
            for role in queued_roles:
                if not self.idle[role] and role not in busy_roles:
                    raise RuntimeError(
                        f"resources.{role}: no actor of this role became ready within "
                        f"{READY_TIMEOUT_S:.0f} s; the cluster may lack the CPUs/GPUs asked for")

    # -- calls ---------------------------------------------------------------------------------
    def can_take(self, role: str) -> bool:
        return bool(self.idle.get(role))

    def busy(self) -> bool:
        return bool(self.in_flight or self.pending_ready)

    def keep(self, value: Any) -> Any:
        """Into the driver's object store: a lost worker node does not take it along."""
        return self.ray.put(value)

    def fetch(self, stored: Any) -> Any:
        return self.ray.get(stored) if isinstance(stored, self.ray.ObjectRef) else stored

    def submit(self, call: Call) -> str:
        actor = self.idle[call.role].popleft()
        # A task run again after a failure gets the actors alive now, not those of before.
        evaluators = list(self.pools["energy_evaluator"]) if call.energy_pool else None
        value_ref, timing_ref = actor.run_task.options(num_returns=2).remote(
            call.function, call.args, call.inputs, evaluators,
            call.progress_file)
        self.in_flight[timing_ref] = (call, actor, value_ref)
        return self.actor_nodes.get(actor, "")

    def wait(self, timeout: float, queued_roles: set[str]) -> list[Completion]:
        ray = self.ray
        waiting = list(self.in_flight) + list(self.pending_ready)
        if not waiting:
            raise RuntimeError("no actor is ready and no task is running; check resources")
        ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
        done: list[Completion] = []
        for ref in ready:
            if ref in self.pending_ready:
                self._actor_ready(ref)
                continue
            call, actor, value_ref = self.in_flight.pop(ref)
            done.append(self._completion(call, actor, ref, value_ref))
        self._check_roles_alive(queued_roles)
        return done

    def _completion(self, call: Call, actor: Any, timing_ref: Any, value_ref: Any
                    ) -> Completion:
        ray = self.ray
        try:
            timing = ray.get(timing_ref)
        except self.system_errors as exc:
            self._probe(call.role, actor)  # back in service once Ray has restarted it
            self._suspect_node(self.actor_nodes.get(actor))
            return Completion(call, "lost", message=f"{_role_name(call.role)} actor died: "
                              f"{type(exc).__name__}", trace=traceback.format_exc())
        except ray.exceptions.RayTaskError as exc:
            self.idle[call.role].append(actor)
            cause = exc.cause if exc.cause is not None else exc
            if isinstance(cause, self.system_errors):  # e.g. a trainer's evaluator died
                return Completion(call, "lost", message=f"{_role_name(call.role)} task lost a "
                                  f"peer: {type(cause).__name__}: {cause}", trace=str(exc))
            return Completion(call, "error", message=f"{type(cause).__name__}: {cause}",
                              trace=str(exc))
        self.idle[call.role].append(actor)
        try:
            value = ray.get(value_ref)
        except self.system_errors as exc:  # the result was lost with its node
            return Completion(call, "lost", message=f"result of {call.function} lost: "
                              f"{type(exc).__name__}", trace=traceback.format_exc())
        return Completion(call, "ok", value=value, timing=timing)


def _role_name(role: str) -> str:
    return {"energy_evaluator": "energy evaluator"}.get(role, role)


BACKENDS = {"ray": RayBackend, "local": LocalBackend}

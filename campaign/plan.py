"""Expand a spec's grid into jobs with content-hash ids.

A job id is the first 16 hex digits of the SHA-256 of the job's canonical resolved configuration
(:class:`campaign.spec.JobConfig` dumped to JSON with sorted keys). It is the same on every run
and machine, and changes when any setting that can change a result changes. The campaign name,
resources and tracking settings are not part of it: moving a spec from a laptop to a cluster
keeps the ids, so finished jobs are not redone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from boltzgen.flows import FLOWS, build_flow
from boltzgen.settings import FlowSettings, SystemSettings, registry
from boltzgen.systems import SYSTEMS, System, make_system
from campaign.errors import SpecError
from campaign.spec import (
    JOB_SECTIONS,
    CampaignSpec,
    JobConfig,
    spec_error_from_validation,
)


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)


def content_hash(data: Any, length: int = 16) -> str:
    return _text_hash(canonical_json(data), length)


def _text_hash(text: str, length: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


@dataclass(frozen=True)
class Job:
    job_id: str
    config: JobConfig
    grid_values: dict[str, Any]
    molecules: int | None = None  # the system's molecule count, for a molecular system

    @property
    def config_dict(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    @property
    def params(self) -> dict[str, Any]:
        """The flattened resolved configuration (what MLflow records as params), plus
        ``target_temperature_k``, ``base_temperature_k`` (a thermodynamic base) and
        ``molecules`` (a molecular system) under names that say what they are."""
        params = flatten(self.config_dict)
        params["target_temperature_k"] = self.config.temperature
        if self.config.base.temperature is not None:
            params["base_temperature_k"] = self.config.base.temperature
        if self.molecules is not None:
            params["molecules"] = self.molecules
        return params

    @property
    def label(self) -> str:
        shown = " ".join(f"{k}={short_value(v)}" for k, v in self.grid_values.items())
        return f"{self.config.system.kind} {shown}".strip()


@dataclass
class Plan:
    spec: CampaignSpec
    jobs: list[Job]
    spec_hash: str
    resources: dict[str, dict[str, float]] = field(default_factory=dict)

    def job_resources(self, job: Job) -> dict[str, dict[str, Any]]:
        """What one job asks Ray for, per stage: the actor role, its CPUs and GPUs per actor,
        and the OpenMM platform where the stage runs OpenMM (a GPU platform only on actors
        that hold a GPU; checked when the plan is made)."""
        openmm = openmm_roles(job.config)
        asks: dict[str, dict[str, Any]] = {}
        for stage, role in (("reference", "reference"), ("train", "trainer"), ("sample", "sampler"),
                            ("energy", "energy_evaluator"), ("estimate", "sampler")):
            res = self.resources[role]
            asks[stage] = {"role": role, "cpus": res["cpus"], "gpus": res["gpus"],
                           "openmm_platform": job.config.energy.platform if role in openmm
                           else None}
        return asks

    def as_records(self) -> list[dict[str, Any]]:
        return [
            {
                "job_id": job.job_id,
                "params": job.params,
                "grid": job.grid_values,
                "resources": self.resources,
                "asks": self.job_resources(job),
            }
            for job in self.jobs
        ]


@dataclass(frozen=True)
class GridBlock:
    """One block of the grid: its label in messages (``grid``, ``grid[1]``), its mapping and
    its axes (path -> values; a fixed value is an axis of one value)."""

    label: str
    block: dict[str, Any]
    axes: dict[str, list[Any]]

    @property
    def size(self) -> int:
        """Its grid points: the product of its axis lengths."""
        return math.prod(len(values) for values in self.axes.values())


def grid_blocks(spec: CampaignSpec) -> list[GridBlock]:
    """The grid's blocks with their axes checked (paths into the job settings, no empty axis);
    nothing is expanded, so this is instant for any grid."""
    many_blocks = isinstance(spec.grid, list)
    blocks = spec.grid if isinstance(spec.grid, list) else [spec.grid]
    checked: list[GridBlock] = []
    for block_index, block in enumerate(blocks):
        label = f"grid[{block_index}]" if many_blocks else "grid"
        if not isinstance(block, dict):
            raise SpecError(label, block, "a grid block is a mapping of axis -> values")
        checked.append(GridBlock(label=label, block=block, axes=_axes(block, label)))
    return checked


def count_jobs(spec: CampaignSpec) -> int:
    """Grid points of the spec: each block's product of axis lengths, summed over the blocks.
    An upper bound on the jobs (a point two blocks share is one job), known before expanding."""
    return sum(block.size for block in grid_blocks(spec))


def make_plan(spec: CampaignSpec, *, cache: bool = True) -> Plan:
    """Expand the grid, validate every job, hash it; raise SpecError on the first bad value.

    The grid is counted first and refused beyond ``spec.max_jobs``, so a grid of 10^7 points
    is answered at once instead of being expanded. Each distinct section value of a block is
    validated and encoded once and each distinct system and flow built once
    (:class:`BlockJobs`, :class:`ScienceChecks`); ``cache=False`` resolves, validates, encodes
    and checks every job on its own, as planning did before the caches: the same plan, tens of
    times slower (the baseline of bench/bench_plan.py). Top-level settings that the grid replaces
    in every job are checked too (:func:`_check_top_level`).
    """
    blocks = grid_blocks(spec)
    count = sum(block.size for block in blocks)
    if count > spec.max_jobs:
        raise SpecError("grid", detail=(
            f"{count} jobs (each block's product of axis lengths, summed) is not allowed; at "
            f"most max_jobs = {spec.max_jobs}: shrink the grid, split the campaign, or raise "
            "the top-level max_jobs"))
    checks = ScienceChecks(cache=cache)
    defaults = spec.model_dump(mode="python", include=set(JOB_SECTIONS), exclude_none=True)
    defaults["seed"] = spec.seed
    many_blocks = isinstance(spec.grid, list)
    jobs: list[Job] = []
    seen: set[str] = set()
    # Paths some block varies: a block that fixes one of them still shows its value, so that
    # compare's column for that path is filled for every job.
    varied_somewhere = {name for block in blocks for name in block.axes
                        if isinstance(block.block[name], list)}
    for block in blocks:
        is_axis = {name: isinstance(block.block[name], list) for name in block.axes}
        expanded = BlockJobs(block, defaults, checks) if cache else _plain_jobs(
            block, defaults, checks)
        for overrides, config, canonical, system in expanded:
            job_id = _text_hash(canonical)
            if job_id in seen:
                continue  # two blocks can name the same job; it runs once
            seen.add(job_id)
            # What tells the jobs apart: the axes of the block and, where blocks differ in a
            # component (a flow, a base), in a registered choice (the objective) or fix a
            # path another block varies, the fixed value (the system has its own column).
            varying = {k: v for k, v in overrides.items() if is_axis[k] or (
                many_blocks and k != "system" and (
                    k in varied_somewhere or k in CHOICE_PATHS
                    or (isinstance(v, dict) and "kind" in v)))}
            jobs.append(Job(job_id=job_id, config=config, grid_values=varying,
                            molecules=system.molecule_count))
    _check_top_level(spec, blocks, checks)
    resources = spec.resources.model_dump(mode="json")
    _check_gpu_platforms(jobs, resources)
    spec_hash = content_hash(
        {"jobs": [job.job_id for job in jobs], "name": spec.name, "resources": resources}
    )
    return Plan(spec=spec, jobs=jobs, spec_hash=spec_hash, resources=resources)


CHOICE_PATHS = frozenset({"base.kind", "reference.sampler", "training.objective",
                          "training.coupling", "energy.backend", "flow.kind"})
"""Paths whose value names a registered class: a block that fixes one shows it in compare."""

PlannedJob = tuple[dict[str, Any], JobConfig, str, System]
"""A job of a block: its grid values (path -> value), its configuration, the canonical JSON
of that configuration (what its id hashes) and its system."""

_MISSING = object()
_MODEL_SECTIONS = tuple(name for name, info in JobConfig.model_fields.items()
                        if isinstance(info.annotation, type)
                        and issubclass(info.annotation, BaseModel))
_SCALAR_SECTIONS = tuple(name for name in JobConfig.model_fields
                         if name not in _MODEL_SECTIONS and name != "seed")
# Each field's JSON key with its colon, in the order canonical JSON (sorted keys) writes them.
_KEYS_IN_ORDER = tuple((name, json.dumps(name) + ":") for name in sorted(JobConfig.model_fields))


def _plain_jobs(block: GridBlock, defaults: dict[str, Any],
                checks: ScienceChecks) -> Iterator[PlannedJob]:
    """The block's jobs in grid order, each resolved, validated and encoded on its own."""
    names = list(block.axes)
    for combo in itertools.product(*block.axes.values()):
        overrides = dict(zip(names, combo, strict=True))
        config, dump, system = _resolve(defaults, overrides, block.label, checks)
        yield overrides, config, canonical_json(dump), system


class BlockJobs:
    """The jobs of one grid block in grid order, assembled from their sections.

    A job's section (``system``, ``training``, ``temperature``...) depends only on the block's
    axes into that section, and a grid crosses a few values of each: so each distinct section
    value is resolved, validated by its model, dumped and encoded to canonical JSON once, and a
    job is its sections' models checked together by :class:`JobConfig` (which takes validated
    models as they are) and its sections' JSON joined in key order, which is exactly the
    canonical JSON of its whole configuration. Validating, dumping and encoding a job whole
    costs about 30 µs, as much again as all the rest of planning it.

    A job with any complaint is resolved again whole by :func:`_resolve`, which raises it
    exactly as planning always has (the first bad job in grid order, its field and value).
    """

    def __init__(self, block: GridBlock, defaults: dict[str, Any],
                 checks: ScienceChecks) -> None:
        self.block = block
        self.defaults = defaults
        self.checks = checks
        self.names = list(block.axes)
        self.values = list(block.axes.values())
        self.paths = [name.split(".") for name in self.names]
        heads = [path[0] for path in self.paths]
        self.axes_of = {section: tuple(i for i, head in enumerate(heads) if head == section)
                        for section in (*_MODEL_SECTIONS, *_SCALAR_SECTIONS)}
        self.fixed = {section: self._section(section, ()) for section, axes
                      in self.axes_of.items() if not axes}
        self._variants: dict[tuple[str, tuple[int, ...]], Any] = {}
        self.verified = False

    def __iter__(self) -> Iterator[PlannedJob]:
        varied = [(section, axes) for section, axes in self.axes_of.items() if axes]
        for choice in itertools.product(*(range(len(values)) for values in self.values)):
            overrides = {name: self.values[i][k]
                         for i, (name, k) in enumerate(zip(self.names, choice, strict=True))}
            sections = dict(self.fixed)
            for section, axes in varied:
                key = (section, tuple(choice[i] for i in axes))
                if key not in self._variants:
                    self._variants[key] = self._section(section, key[1])
                sections[section] = self._variants[key]
            planned = self._assemble(sections)
            if planned is None:  # some complaint: resolve the job whole, which raises it
                config, dump, system = _resolve(self.defaults, overrides, self.block.label,
                                                self.checks)
                planned = (config, canonical_json(dump), system)
            yield overrides, *planned

    def _section(self, section: str, choice: tuple[int, ...]) -> Any:
        """A section's value for one choice of its axes' values: (model, its canonical JSON)
        for a model section, the raw value for a scalar one; None where it is not valid on
        its own, _MISSING where nothing sets it."""
        holder = {section: self.defaults[section]} if section in self.defaults else {}
        try:
            for i, k in zip(self.axes_of[section], choice, strict=True):
                _set_path(holder, self.paths[i], self.values[i][k], self.names[i])
        except SpecError:
            return None
        raw = holder.get(section, _MISSING)
        if section not in _MODEL_SECTIONS or raw is _MISSING:
            return raw
        try:
            model = JobConfig.model_fields[section].annotation.model_validate(raw)
        except ValidationError:
            return None
        return model, canonical_json(model.model_dump(mode="json"))

    def _assemble(self, sections: dict[str, Any]) -> tuple[JobConfig, str, System] | None:
        """A job from its sections' values; None where any of them or the job has a complaint."""
        data: dict[str, Any] = {"seed": self.defaults["seed"]}
        encoded: dict[str, str] = {}
        for section, value in sections.items():
            if value is None or (value is _MISSING and section in _MODEL_SECTIONS):
                return None
            if section in _MODEL_SECTIONS:
                data[section], encoded[section] = value
            elif value is not _MISSING:
                data[section] = value
        if "temperature" not in data:
            return None
        try:
            config = JobConfig.model_validate(data)
            system = self.checks.check(config, encoded["system"], encoded["flow"])
        except (ValidationError, SpecError):
            return None
        for section in ("seed", *_SCALAR_SECTIONS):
            encoded[section] = canonical_json(getattr(config, section))
        canonical = "{" + ",".join(key + encoded[name] for name, key in _KEYS_IN_ORDER) + "}"
        if not self.verified:  # the first job of the block, also encoded whole: they must agree
            whole = canonical_json(config.model_dump(mode="json"))
            if whole != canonical:
                raise RuntimeError(f"{self.block.label}: a job's sections encode to {canonical}"
                                   f", the whole job to {whole}; its id would change")
            self.verified = True
        return config, canonical, system


GPU_PLATFORMS = ("CUDA", "OpenCL")


def openmm_roles(config: JobConfig) -> set[str]:
    """The actor roles that run OpenMM for a job: the EnergyEvaluators (also for training,
    which sends its energies to them) with an energy backend that uses OpenMM, the trainers
    and EnergyEvaluators with the torch backend of a system whose potential is OpenMM (ice),
    and the reference-sampler actors when the reference sampler runs OpenMM (MD)."""
    backend = registry("energy_backend").get(config.energy.backend)
    sampler = registry("reference_sampler").get(config.reference.sampler)
    roles = {"energy_evaluator"} if backend.uses_openmm else set()
    if not backend.uses_openmm and SYSTEMS[config.system.kind].potential_runs_openmm:
        roles |= {"trainer", "energy_evaluator"}
    return roles | ({"reference"} if sampler.uses_openmm else set())


def _check_gpu_platforms(jobs: list[Job], resources: dict[str, dict[str, Any]]) -> None:
    """OpenMM on a GPU platform runs in the reference actors (MD) and the EnergyEvaluators: they
    must hold a GPU (Ray >= 2.60 shows GPUs to actors that asked for none, so nothing else
    would stop them from sharing a GPU nobody reserved)."""
    for job in jobs:
        config = job.config
        if config.energy.platform not in GPU_PLATFORMS:
            continue
        for role in sorted(openmm_roles(config)):
            if float(resources[role]["gpus"]) <= 0:
                raise SpecError(
                    f"resources.{role}.gpus", resources[role]["gpus"],
                    f"energy.platform {config.energy.platform!r} (job {job.job_id}) runs "
                    f"OpenMM on a GPU in this role's actors; give them a GPU share (> 0) or "
                    "use platform CPU")


def _axes(block: dict[str, Any], label: str) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {}
    for path, values in block.items():
        head = str(path).split(".", 1)[0]
        if head not in JOB_SECTIONS:
            allowed = ", ".join(JOB_SECTIONS)
            raise SpecError(
                f"{label}.{path}", path, f"a grid axis is a path into the job settings: {allowed}"
            )
        if isinstance(values, list):
            if not values:
                raise SpecError(f"{label}.{path}", values, "a grid axis needs at least one value")
            axes[path] = values
        else:
            axes[path] = [values]
    return axes


def _resolve(defaults: dict[str, Any], overrides: dict[str, Any], label: str,
             checks: ScienceChecks) -> tuple[JobConfig, dict[str, Any], System]:
    """One job: the defaults with the grid's values at their paths, validated by the models
    and the science. Returns the config, its JSON dump (what the id hashes) and its system.

    Nothing is deep-copied: the job's mapping is a shallow copy of the defaults, every mapping
    on an override's path is copied before it is written (:func:`_set_path`), and validation
    reads the values without changing them (the models are frozen).
    """
    data = dict(defaults)
    for path, value in overrides.items():
        _set_path(data, path.split("."), value, f"{label}.{path}")

    def where(field_path: str) -> str:
        # Name the grid axis when the bad value came from the grid, else the spec's own field.
        for path in overrides:
            if field_path == path or field_path.startswith(path + "."):
                return f"{label}.{path}{field_path[len(path):]}"
        return field_path

    if "temperature" not in data:
        raise SpecError("temperature", detail="required: set a target temperature at the top "
                        "level or as a grid axis")
    try:
        config = JobConfig.model_validate(data)
    except ValidationError as exc:
        err = spec_error_from_validation(exc, prefix="")
        raise err.at(where(err.field)) from None
    dump = config.model_dump(mode="json")
    try:
        system = checks.check(config, canonical_json(dump["system"]),
                              canonical_json(dump["flow"]))
    except SpecError as err:
        raise err.at(where(err.field)) from None
    return config, dump, system


def _set_path(data: dict[str, Any], keys: list[str], value: Any, label: str) -> None:
    """Put ``value`` at ``keys`` in ``data``, copying each mapping on the way (it may be shared
    with the defaults, the grid or other jobs) instead of changing it."""
    node = data
    for key in keys[:-1]:
        child = node.get(key, {})
        if not isinstance(child, dict):
            raise SpecError(label, child, f"'{key}' is not a mapping, so it has no sub-keys")
        child = dict(child)
        node[key] = child
        node = child
    node[keys[-1]] = value


class ScienceChecks:
    """The science package's checks of jobs, each run once per distinct combination of the
    settings it reads.

    Building a system and a torch flow module costs about a millisecond, twenty times the rest
    of planning a job, and a grid crosses few systems and flows with many temperatures and
    training settings. So a built system is kept by the canonical JSON of the job's ``system``
    and a flow that built by that of (``system``, ``flow``); the rules between sections
    (:func:`rule_complaints`) cost microseconds and run for every job. A complaint is not kept:
    the first one ends the plan. ``cache=False`` builds both for every job (the benchmark's
    baseline).
    """

    def __init__(self, cache: bool = True) -> None:
        self.cache = cache
        self.systems: dict[str, System] = {}  # system JSON -> system, in the order first seen
        self._flows: set[tuple[str, str]] = set()  # (system JSON, flow JSON) that built

    def system(self, settings: SystemSettings, key: str) -> System:
        """The system of ``settings`` (``key``: their canonical JSON), built by the science."""
        if self.cache and key in self.systems:
            return self.systems[key]
        try:
            system = make_system(settings.model_dump())
        except (ValueError, TypeError) as exc:
            raise _science_error(exc, "system") from None
        self.systems.setdefault(key, system)
        return system

    def flow(self, system: System, system_key: str, settings: FlowSettings, key: str) -> None:
        """Build the flow of ``settings`` (``key``: their canonical JSON) for ``system``."""
        if self.cache and (system_key, key) in self._flows:
            return
        try:
            build_flow(system.layout(), settings.model_dump())
        except (ValueError, TypeError) as exc:
            raise _science_error(exc, "flow") from None
        self._flows.add((system_key, key))

    def check(self, config: JobConfig, system_key: str, flow_key: str) -> System:
        """Let the science check one job (the keys: the canonical JSON of its ``system`` and
        ``flow``); raise its first complaint."""
        system = self.system(config.system, system_key)
        self.flow(system, system_key, config.flow, flow_key)
        complaint = next(rule_complaints(config, system), None)
        if complaint is not None:
            raise complaint
        return system


def rule_complaints(config: JobConfig, system: System, *,
                    temperature_known: bool = True) -> Iterator[SpecError]:
    """The science's complaints about how a job's sections go with its system
    (:meth:`boltzgen.settings.JobSettings.complaints`: each registered base, reference
    sampler, energy backend and objective checks its own), in the order a job is refused by
    them (the first one)."""
    for complaint in config.complaints(system, temperature_known=temperature_known):
        yield SpecError.of(complaint)


def _check_top_level(spec: CampaignSpec, blocks: list[GridBlock], checks: ScienceChecks) -> None:
    """Check the top level's job settings that the grid replaces in every job.

    A top-level value that some job uses is checked by that job, with the values it is really
    combined with. One that every job replaces (``system`` when each grid block names its own)
    would be checked by nothing, so the top level is checked as a job of its own: its system by
    :func:`make_system`, its flow by :func:`build_flow` for its system (or, where that system's
    coordinates do not suit the flow's kind, for the first job's system that does), and the
    rules between sections. A complaint refuses the spec only when it names such a never-used
    value: the top level may be incomplete (no target temperature, a base temperature the grid
    gives) or hold values that are valid only with what the grid adds, and what it leaves out
    (a section at its defaults) is no setting of the spec.
    """
    written = flatten(spec.model_dump(mode="json", include=set(JOB_SECTIONS), exclude_unset=True))
    unused = [path for path in written
              if all(any(path == axis or path.startswith(axis + ".") for axis in block.axes)
                     for block in blocks)]
    if not unused:
        return

    def counts(err: SpecError) -> bool:
        return any(err.field == path or path.startswith(err.field + ".")
                   or err.field.startswith(path + ".") for path in unused)

    data = spec.model_dump(mode="python", include=set(JOB_SECTIONS), exclude_none=True)
    data["seed"] = spec.seed
    temperature_known = "temperature" in data
    data.setdefault("temperature", 1.0)  # a stand-in: the rule comparing with it is skipped
    config = JobConfig.model_validate(data)
    dump = config.model_dump(mode="json")
    system_key = canonical_json(dump["system"])
    system: System | None = None
    try:
        system = checks.system(config.system, system_key)
    except SpecError as err:
        if counts(err):
            raise
    if any(path == "flow" or path.startswith("flow.") for path in unused):
        kind = config.flow.kind
        candidates = ([(system_key, system)] if system is not None else [])
        candidates += [item for item in checks.systems.items() if item[0] != system_key]

        def suits(candidate: System) -> bool:
            return kind not in FLOWS or FLOWS[kind].accepts_layout(candidate.layout())

        chosen = next((c for c in candidates if suits(c[1])), candidates[0] if candidates
                      else None)
        if chosen is not None:
            try:
                checks.flow(chosen[1], chosen[0], config.flow, canonical_json(dump["flow"]))
            except SpecError as err:
                if counts(err):
                    raise
    if system is not None:
        for err in rule_complaints(config, system, temperature_known=temperature_known):
            if counts(err):
                raise err


def _science_error(exc: Exception, section: str) -> SpecError:
    """Science errors read '<field>: <message>'; keep that field, else name the section."""
    text = str(exc)
    field, sep, rest = text.partition(": ")
    if sep and field.startswith(section) and " " not in field:
        return SpecError(field, detail=rest)
    return SpecError(section, detail=text)


def short_value(value: Any) -> str:
    """A mapping shows its kind and its categorical (string) settings: rigid_body/double_mobius."""
    if isinstance(value, dict):
        choices = [str(v) for k, v in value.items() if k != "kind" and isinstance(v, str)]
        return "/".join([str(value.get("kind", "{...}")), *choices])
    return str(value)

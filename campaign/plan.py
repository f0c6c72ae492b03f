"""Expand a spec's grid into jobs with content-hash ids.

A job id is the first 16 hex digits of the SHA-256 of the job's canonical resolved configuration
(:class:`campaign.spec.JobConfig` dumped to JSON with sorted keys). It is the same on every run
and machine, and changes when any setting that can change a result changes. The campaign name,
resources and tracking settings are not part of it: moving a spec from a laptop to a cluster
keeps the ids, so finished jobs are not redone.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from boltzgen.flows import build_flow
from boltzgen.md import MDProtocol, held_out_blocks
from boltzgen.systems import make_system
from campaign.errors import SpecError
from campaign.spec import (
    JOB_SECTIONS,
    CampaignSpec,
    JobConfig,
    MDSettings,
    spec_error_from_validation,
)


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)


def content_hash(data: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:length]


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
        for stage, role in (("reference", "mcmc"), ("train", "trainer"), ("sample", "sampler"),
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


def make_plan(spec: CampaignSpec) -> Plan:
    """Expand the grid, validate every job, hash it; raise SpecError on the first bad value."""
    defaults = spec.model_dump(mode="python", include=set(JOB_SECTIONS), exclude_none=True)
    defaults["seed"] = spec.seed
    blocks = spec.grid if isinstance(spec.grid, list) else [spec.grid]
    many_blocks = isinstance(spec.grid, list)
    jobs: list[Job] = []
    seen: set[str] = set()
    molecules: dict[str, int | None] = {}  # system JSON -> molecule count
    for block_index, block in enumerate(blocks):
        label = f"grid[{block_index}]" if many_blocks else "grid"
        if not isinstance(block, dict):
            raise SpecError(label, block, "a grid block is a mapping of axis -> values")
        axes = _axes(block, label)
        names = list(axes)
        for combo in itertools.product(*(axes[name] for name in names)):
            overrides = dict(zip(names, combo, strict=True))
            config = _resolve(defaults, overrides, label)
            job_id = content_hash(config.model_dump(mode="json"))
            if job_id in seen:
                continue  # two blocks can name the same job; it runs once
            seen.add(job_id)
            # What tells the jobs apart: the axes of the block and, where blocks differ in a
            # component (a flow, a base), that component's fixed value.
            varying = {k: v for k, v in overrides.items() if isinstance(block[k], list) or (
                many_blocks and k != "system" and isinstance(v, dict) and "kind" in v)}
            system_key = json.dumps(config.system.model_dump(mode="json"), sort_keys=True)
            if system_key not in molecules:
                molecules[system_key] = make_system(config.system.model_dump()).molecule_count
            jobs.append(Job(job_id=job_id, config=config, grid_values=varying,
                            molecules=molecules[system_key]))
    resources = spec.resources.model_dump(mode="json")
    _check_gpu_platforms(jobs, resources)
    spec_hash = content_hash(
        {"jobs": [job.job_id for job in jobs], "name": spec.name, "resources": resources}
    )
    return Plan(spec=spec, jobs=jobs, spec_hash=spec_hash, resources=resources)


GPU_PLATFORMS = ("CUDA", "OpenCL")


def openmm_roles(config: JobConfig) -> set[str]:
    """The actor roles that run OpenMM for a job: the EnergyEvaluators (also for training,
    which sends its energies to them) with the OpenMM backend, and the MCMC actors when the
    reference is MD."""
    roles = {"energy_evaluator"} if config.energy.backend == "openmm" else set()
    return roles | ({"mcmc"} if config.reference.sampler == "md" else set())


def _check_gpu_platforms(jobs: list[Job], resources: dict[str, dict[str, Any]]) -> None:
    """OpenMM on a GPU platform runs in the MCMC actors (MD) and the EnergyEvaluators: they
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


def _resolve(defaults: dict[str, Any], overrides: dict[str, Any], label: str) -> JobConfig:
    data = copy.deepcopy(defaults)
    for path, value in overrides.items():
        _set_path(data, path.split("."), copy.deepcopy(value), f"{label}.{path}")

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
    try:
        _check_science(config)
    except SpecError as err:
        raise err.at(where(err.field)) from None
    return config


def _set_path(data: dict[str, Any], keys: list[str], value: Any, label: str) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SpecError(label, child, f"'{key}' is not a mapping, so it has no sub-keys")
        node = child
    node[keys[-1]] = value


def _check_science(config: JobConfig) -> None:
    """Let the science package check the system and flow parameters it owns."""
    try:
        system = make_system(config.system.model_dump())
    except (ValueError, TypeError) as exc:
        raise _science_error(exc, "system") from None
    try:
        build_flow(system.dim, config.flow.model_dump(), layout=system.rigid_layout())
    except (ValueError, TypeError) as exc:
        raise _science_error(exc, "flow") from None
    rigid = system.rigid_layout() is not None
    if rigid and config.base.kind == "normal":
        raise SpecError("base.kind", config.base.kind, f"system '{system.kind}' has rigid-body "
                        "coordinates (torus × S³); use 'uniform' or 'thermodynamic'")
    if not rigid and config.base.kind == "uniform":
        raise SpecError("base.kind", "uniform", f"system '{system.kind}' has Euclidean "
                        "coordinates; use 'normal' or 'thermodynamic'")
    if config.reference.sampler == "exact" and not system.supports_exact_sampling():
        raise SpecError("reference.sampler", "exact", f"system '{system.kind}' has no exact "
                        "sampler; use 'mcmc'")
    if rigid and config.reference.sampler == "mcmc":
        raise SpecError("reference.sampler", "mcmc", "MCMC on rigid-body coordinates is not "
                        "implemented; use 'exact' or 'md'")
    if config.reference.sampler == "md":
        _check_md(config, system)
    elif config.reference.holdout_blocks is not None:
        raise SpecError("reference.holdout_blocks", config.reference.holdout_blocks,
                        "interleaved held-out blocks split MD runs; leave it out for "
                        f"sampler '{config.reference.sampler}'")
    if config.energy.backend == "openmm" and not system.supports_openmm():
        raise SpecError("energy.backend", "openmm", f"system '{system.kind}' has no OpenMM "
                        "form; use torch")
    base = config.base
    if base.kind == "thermodynamic" and base.temperature is None:
        raise SpecError("base.temperature", detail="required: a thermodynamic base needs a "
                        "temperature > 0")
    if base.kind in ("normal", "uniform") and base.temperature is not None:
        raise SpecError("base.temperature", base.temperature,
                        f"a {base.kind} base has no temperature")
    if base.kind == "thermodynamic" and base.temperature == config.temperature:
        raise SpecError("base.temperature", base.temperature,
                        "it equals the target temperature (ΔF = 0); choose another")
    if config.flow.model_dump().get("thermal_scaling") and base.kind != "thermodynamic":
        raise SpecError("flow.thermal_scaling", True, "it scales displacements by "
                        "sqrt(T / T_base); it needs base.kind 'thermodynamic'")
    if (config.training.warm_start_steps is not None
            and config.training.objective != "reverse_kl"):
        raise SpecError("training.warm_start_steps", config.training.warm_start_steps,
                        "a maximum-likelihood warm start precedes reverse_kl training; "
                        "leave it out for maximum_likelihood")
    if config.training.symmetry_augmentation and not system.supports_symmetry_images():
        raise SpecError("training.symmetry_augmentation", True, f"system '{system.kind}' has "
                        "no known symmetry operations; allowed only for crystals (ice_xi)")
    if base.kind == "thermodynamic" and config.reference.ladder_size < 2:
        raise SpecError("reference.ladder_size", config.reference.ladder_size,
                        "an MBAR ladder between the base and target temperatures needs >= 2")


def _check_md(config: JobConfig, system: Any) -> None:
    """MD needs an OpenMM system with a starting structure, a temperature ladder between a
    thermodynamic base and the target, and a protocol with at least one frame."""
    if not (system.supports_openmm() and hasattr(system, "ideal_coordinates")):
        raise SpecError("reference.sampler", "md", f"system '{system.kind}' has no OpenMM "
                        "form with a starting structure; use 'mcmc' or 'exact'")
    if config.base.kind != "thermodynamic":
        raise SpecError("base.kind", config.base.kind, "reference.sampler 'md' estimates ΔF "
                        "between temperatures; use 'thermodynamic' with a base temperature")
    md = config.reference.md or MDSettings()
    try:  # the protocol checks its own consistency (at least one frame, one step per frame)
        MDProtocol(temperature=config.temperature, **md.model_dump())
    except ValueError as exc:
        field, _, detail = str(exc).partition(": ")
        raise SpecError(f"reference.md.{field}", detail=detail) from None
    if config.reference.holdout_blocks is not None:
        try:
            held_out_blocks(config.reference.holdout_blocks, config.reference.holdout_fraction)
        except ValueError as exc:
            raise SpecError("reference.holdout_blocks", config.reference.holdout_blocks,
                            str(exc).partition(": ")[2]) from None


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

"""Typed models of a campaign spec (YAML) and their validation.

The job sections (system, base, reference, flow, training, sampling, energy) are the science's
typed settings (:mod:`boltzgen.settings`); this module composes them with the campaign-only
sections (grid, resources, fault tolerance, tracking, work directory, max_jobs).

A spec holds the default job settings at its top level (``system``, ``temperature``, ``base``,
``reference``, ``flow``, ``training``, ``sampling``), a ``grid`` whose axes override those settings,
and campaign-wide settings that do not change any result (``resources``, ``tracking``,
``max_jobs``: the most grid points a plan may have).

Grid semantics: ``grid`` is a mapping of axes, or a list of such mappings (blocks). An axis is a
dotted path into the job settings (``temperature``, ``training.objective``, ``system``). A list
value is an axis whose values are crossed with the other axes of its block; any other value
(a scalar or a mapping) is fixed for that block. A value replaces what stands at its path. The
jobs are the union over the blocks of each block's Cartesian product.

Every failure raises :class:`campaign.errors.SpecError` with one line naming the field, the value
and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from boltzgen.settings import (
    JobSections,
    JobSettings,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Strict,
)
from campaign.errors import SpecError

SAFE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
# Users' campaigns reach 10^4-10^5 jobs; a grid beyond that is more likely a typo (one axis too
# many) than a campaign, and a plan of 10^5 jobs takes seconds.
DEFAULT_MAX_JOBS = 100_000


class RoleResources(Strict):
    """Ray resources of one actor role: ``count`` actors each holding ``cpus`` and ``gpus``."""

    count: PositiveInt = 1
    cpus: PositiveFloat = 1.0
    gpus: NonNegativeFloat = 0.0


class Resources(Strict):
    """Actor roles: ``reference`` runs the reference sampler (MD runs, replica-exchange MCMC,
    exact sampling) and the reference ΔF."""

    reference: RoleResources = RoleResources(count=1, cpus=0.25)
    trainer: RoleResources = RoleResources(count=2, cpus=0.5)
    sampler: RoleResources = RoleResources(count=1, cpus=0.25)
    energy_evaluator: RoleResources = RoleResources(count=2, cpus=0.25)

    @model_validator(mode="before")
    @classmethod
    def _old_role_name(cls, data: Any) -> Any:
        """``mcmc``, the reference role's old name, still reads as ``reference`` (specs written
        before the rename keep working); a spec that gives both is ambiguous and refused."""
        if not isinstance(data, dict) or "mcmc" not in data:
            return data
        if "reference" in data:
            raise SpecError("resources.mcmc", data["mcmc"], "mcmc is the old name of "
                            "resources.reference, which this spec also gives; keep only "
                            "resources.reference")
        return {("reference" if key == "mcmc" else key): value for key, value in data.items()}


class FaultTolerance(Strict):
    """How a campaign survives dead actors, lost nodes and a lost driver. Not part of a job's
    id: these settings change how a result is reached, never the result."""

    checkpoint_every: NonNegativeInt = Field(
        default=50, description="trainers save their whole state every this many optimizer "
        "steps and continue from it after a restart or relaunch (0: never)")
    actor_restarts: NonNegativeInt = Field(
        default=3, description="times Ray restarts each dead actor (its max_restarts); a "
        "role's actors that are gone for good are replaced as often, in all")
    job_retries: NonNegativeInt = Field(
        default=2, description="times a job's task is run again after its actor or node died; "
        "beyond that the job is FAILED with the cause")


class Tracking(Strict):
    experiment: str | None = None
    uri: str | None = None
    artifact_location: str | None = None


class CampaignSpec(JobSections):
    """A spec: the job sections' defaults (:class:`boltzgen.settings.JobSections`), the seed
    and target temperature (which a grid may give instead), the grid, and the campaign-only
    sections."""

    name: str
    seed: NonNegativeInt = 0
    temperature: PositiveFloat | None = None
    grid: dict[str, Any] | list[dict[str, Any]] = Field(default_factory=dict)
    max_jobs: PositiveInt = Field(
        default=DEFAULT_MAX_JOBS, description="the most grid points a plan may have, counted "
        "before the grid is expanded (each block's product of axis lengths, summed over the "
        "blocks): a grid far beyond it would take minutes to plan and more to run. Not part of "
        "any job's id")
    resources: Resources = Resources()
    fault_tolerance: FaultTolerance = FaultTolerance()
    tracking: Tracking = Tracking()
    work_dir: str | None = Field(
        default=None, description="cached MD and other files shared by jobs and launches; "
        "default campaign-work/<name> under the launch directory (a shared file system on a "
        "cluster)")

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    def work_path(self) -> Path:
        """The work directory, absolute (relative paths are taken from the current one)."""
        return Path(self.work_dir or f"campaign-work/{self.name}").resolve()


JobConfig = JobSettings
"""The resolved settings of one job: the science's :class:`boltzgen.settings.JobSettings`."""

JOB_SECTIONS = tuple(name for name in JobConfig.model_fields if name != "seed")


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """Read YAML with the safe loader; refuse anything that is not a non-empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("spec", str(path), "give the path of an existing YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError("spec", str(path), f"the file must be readable UTF-8 ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        found = re.search(r"tag '([^']*)'", str(getattr(exc, "problem", "")))
        tag = found.group(1) if found else "?"
        raise SpecError(
            "spec", tag, "only plain YAML (mappings, lists, scalars) is accepted; "
            "tags that construct objects are refused"
        ) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise SpecError("spec", str(path), f"the file must be valid YAML{line}") from None
    if data is None:
        raise SpecError("spec", str(path), "the file is empty; a spec is a YAML mapping")
    if not isinstance(data, dict):
        raise SpecError(
            "spec", type(data).__name__, "the top level of a spec must be a YAML mapping"
        )
    return data


def parse_spec(data: dict[str, Any]) -> CampaignSpec:
    """Validate the top level of a spec mapping against the models; the science checks its job
    settings in the plan (:func:`campaign.plan.make_plan`), per job and at the top level."""
    try:
        spec = CampaignSpec.model_validate(data)
    except ValidationError as exc:
        raise spec_error_from_validation(exc, prefix="") from None
    if not SAFE_NAME.match(spec.name):
        raise SpecError(
            "name", spec.name, "a name starts with a letter and has only letters, digits, _ "
            "and - (at most 64 characters)"
        )
    if spec.tracking.experiment is not None and not spec.tracking.experiment.strip():
        raise SpecError("tracking.experiment", spec.tracking.experiment, "give a non-empty name")
    return spec


def load_spec(path: str | Path) -> CampaignSpec:
    return parse_spec(read_spec_file(path))


def spec_error_from_validation(exc: ValidationError, prefix: str) -> SpecError:
    """Turn pydantic's first error into one line: field, value, what is allowed."""
    error = exc.errors(include_url=False)[0]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, SpecError):  # a validator that already wrote the whole line
        return cause
    field = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-"))
    field = f"{prefix}{field}" if field else prefix.rstrip(".") or "spec"
    error_type = error["type"]  # pydantic's error type, not a science choice
    if error_type == "extra_forbidden":
        allowed = _allowed_keys(error["loc"])
        return SpecError(field, detail=f"unknown key; allowed here: {allowed}")
    if error_type == "missing":
        return SpecError(field, detail="this field is required")
    message = error["msg"].removeprefix("Value error, ")
    return SpecError(field, error.get("input"), message)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _allowed_keys(loc: tuple[Any, ...]) -> str:
    """The keys the model at ``loc[:-1]`` accepts (for an unknown-key message)."""
    model: Any = CampaignSpec
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return "see the README's spec format"
        model = fields[part].annotation
        if not _is_model(model):  # a union or container: look for a model inside
            model = next((a for a in getattr(model, "__args__", ()) if _is_model(a)), None)
            if model is None:
                return "see the README's spec format"
    return ", ".join(getattr(model, "model_fields", {})) or "none"

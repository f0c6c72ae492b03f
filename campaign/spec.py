"""Typed models of a campaign spec (YAML) and their validation.

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

import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_serializer,
    model_validator,
)

from boltzgen.md import MDProtocol
from campaign.errors import SpecError

SAFE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
# Users' campaigns reach 10^4-10^5 jobs; a grid beyond that is more likely a typo (one axis too
# many) than a campaign, and a plan of 10^5 jobs takes seconds.
DEFAULT_MAX_JOBS = 100_000


def _finite_positive(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a finite number > 0")
    return value


def _finite_non_negative(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite number >= 0")
    return value


def _fraction(value: float) -> float:
    if not math.isfinite(value) or not 0 < value < 1:
        raise ValueError("must be a number strictly between 0 and 1")
    return value


# Ints are strict: 2.5, "3" and true are refused rather than coerced.
PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
Number = StrictFloat | StrictInt
PositiveFloat = Annotated[Number, AfterValidator(_finite_positive)]
NonNegativeFloat = Annotated[Number, AfterValidator(_finite_non_negative)]
Fraction = Annotated[Number, AfterValidator(_fraction)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Optional fields added after jobs existed: left out of the dump while None, so that adding
    # them did not change the ids (hashes of the dump) of jobs that do not use them.
    _left_out_when_unset: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for name in self._left_out_when_unset:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class SystemSettings(BaseModel):
    """``kind`` plus the system's own keyword parameters (checked by the science registry)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str


class BaseSettings(Strict):
    """State A of the free-energy difference ΔF = f_target − f_A.

    ``normal``: a normalized Gaussian N(0, scale²) in flow coordinates (f_A = 0 exactly), so
    ``delta_f`` is the absolute reduced free energy −ln Z of the target.
    ``thermodynamic``: the same system at ``temperature``; ``delta_f`` is f(T) − f(T_A).
    ``uniform``: for rigid-body systems, the normalized uniform distribution on their
    coordinates (box × Haar), f_A = 0, so ``delta_f`` is the absolute −ln Z (normalized measure).
    """

    kind: Literal["normal", "thermodynamic", "uniform"] = "normal"
    scale: PositiveFloat = 1.0
    temperature: PositiveFloat | None = None


class MDSettings(Strict):
    """OpenMM NVT MD per ladder temperature: LangevinMiddle with ``timestep_fs`` and
    ``friction_per_ps``, minimisation, ``equilibration_ps``, then ``production_ps`` with a frame
    every ``frame_interval_ps``."""

    equilibration_ps: NonNegativeFloat = MDProtocol.equilibration_ps
    production_ps: PositiveFloat = MDProtocol.production_ps
    frame_interval_ps: PositiveFloat = MDProtocol.frame_interval_ps
    timestep_fs: PositiveFloat = MDProtocol.timestep_fs
    friction_per_ps: PositiveFloat = MDProtocol.friction_per_ps


class ReferenceSettings(Strict):
    """Reference data and ΔF: replica-exchange MCMC (and the MBAR ladder), or exact sampling.

    ``sampler: exact`` uses the system's own exact sampler (e.g. rejection sampling) for
    ``n_exact_samples`` independent samples; the MCMC settings are then unused.
    ``sampler: md`` runs OpenMM Langevin MD (protocol ``md``, defaults if left out) at each of
    the ``ladder_size`` temperatures geomspace(T, T_base, K), cached in the campaign's work
    directory, and MBAR over them gives the reference ΔF.
    """

    _left_out_when_unset = ("md", "holdout_blocks")

    sampler: Literal["mcmc", "exact", "md"] = "mcmc"
    n_exact_samples: PositiveInt = 20000
    md: MDSettings | None = None
    ladder_size: PositiveInt = 4
    hot_temperature_factor: PositiveFloat = 4.0
    n_chains: PositiveInt = 32
    n_steps: PositiveInt = 3000
    burn_in: NonNegativeInt = 1000
    thin: PositiveInt = 5
    step_size: PositiveFloat = 0.3
    exchange_every: PositiveInt = 10
    n_bootstraps: NonNegativeInt = 50
    mbar_max_samples_per_state: PositiveInt = 2000
    holdout_fraction: Fraction = 0.5
    holdout_blocks: PositiveInt | None = Field(
        default=None, description="md only: cut each run into this many blocks and hold out "
        "every block i with floor((i+1) h) > floor(i h), h = holdout_fraction (interleaved); "
        "unset or 1: the last h of the run")


class FlowSettings(BaseModel):
    """``kind`` plus the flow's keyword parameters (checked by the science registry)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = "affine_coupling"


class TrainingSettings(Strict):
    objective: Literal["maximum_likelihood", "reverse_kl"] = "maximum_likelihood"
    steps: PositiveInt = 500
    batch_size: PositiveInt = 256
    learning_rate: PositiveFloat = 1e-3
    final_learning_rate: PositiveFloat | None = None
    warm_start_steps: PositiveInt | None = Field(
        default=None, description="reverse_kl only: this many maximum-likelihood steps on the "
        "reference's target samples first (its own cosine schedule), then ``steps`` of reverse KL")
    symmetry_augmentation: bool | None = Field(
        default=None, description="train on every MD training frame moved by each space-group "
        "operation of the crystal (ice_xi: 8), as well as on the frame itself")
    _left_out_when_unset = ("warm_start_steps", "symmetry_augmentation")


class SamplingSettings(Strict):
    n_samples: PositiveInt = 10000
    energy_batch_size: PositiveInt = 5000


class EnergySettings(Strict):
    """How the energy evaluators compute U: the system's torch potential or its OpenMM form."""

    backend: Literal["torch", "openmm"] = "torch"
    platform: Literal["CPU", "Reference", "CUDA", "OpenCL"] = "CPU"


FailureToInject = Literal["reference", "train", "sample", "energy", "estimate",
                          "trainer_process_exit"]
"""Stages that can raise on purpose, and the trainer process that can exit on purpose."""


class JobConfig(Strict):
    """The resolved settings of one job; its canonical JSON is hashed into the job id."""

    seed: NonNegativeInt
    system: SystemSettings
    temperature: PositiveFloat
    base: BaseSettings = BaseSettings()
    reference: ReferenceSettings = ReferenceSettings()
    flow: FlowSettings = FlowSettings()
    training: TrainingSettings = TrainingSettings()
    sampling: SamplingSettings = SamplingSettings()
    energy: EnergySettings = EnergySettings()
    inject_failure: FailureToInject | None = Field(
        default=None, description="raise on purpose in this stage, or (trainer_process_exit) "
        "end the trainer's process at the start of training as a kill would (tests failure "
        "handling)"
    )


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


class CampaignSpec(Strict):
    name: str
    seed: NonNegativeInt = 0
    system: SystemSettings
    temperature: PositiveFloat | None = None
    base: BaseSettings = BaseSettings()
    reference: ReferenceSettings = ReferenceSettings()
    flow: FlowSettings = FlowSettings()
    training: TrainingSettings = TrainingSettings()
    sampling: SamplingSettings = SamplingSettings()
    energy: EnergySettings = EnergySettings()
    inject_failure: FailureToInject | None = None
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
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(error["loc"])
        return SpecError(field, detail=f"unknown key; allowed here: {allowed}")
    if kind == "missing":
        return SpecError(field, detail="this field is required")
    message = error["msg"].removeprefix("Value error, ")
    return SpecError(field, error.get("input"), message)


def _allowed_keys(loc: tuple[Any, ...]) -> str:
    """The keys the model at ``loc[:-1]`` accepts (for an unknown-key message)."""
    model: Any = CampaignSpec
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return "see the README's spec format"
        model = fields[part].annotation
        if not hasattr(model, "model_fields"):  # a union or container: look for a model inside
            model = next((a for a in getattr(model, "__args__", ()) if hasattr(a, "model_fields")),
                         None)
            if model is None:
                return "see the README's spec format"
    return ", ".join(getattr(model, "model_fields", {})) or "none"

"""Typed settings of a job, owned by the science: what a spec's job sections may hold.

A job's resolved settings (:class:`JobSettings`) are the sections ``system``, ``temperature``,
``base``, ``reference``, ``flow``, ``training``, ``sampling``, ``energy`` (and the test hook
``inject_failure``) with the seed. The campaign composes them with its own sections (grid,
resources, fault tolerance, tracking) in ``campaign/spec.py`` and hashes their canonical JSON
into the job id, so a field's name, default and place in the dump are part of every stored
job's id: a new optional field is left out of the dump while unset.

Choices by name (``base.kind``, ``reference.sampler``, ``training.objective``,
``energy.backend``, like ``system.kind`` and ``flow.kind``) are checked against the science's
registries (:mod:`boltzgen.registry`) when the settings are validated, so a class registered
later (a notebook's, a test's) is accepted with no change here. Each registered class also
checks how its choice goes with the job's system and other sections (its ``complaints``); the
rules that belong to no single choice are :func:`cross_section_complaints`. Every complaint is a
:class:`SettingError`: one line naming the field, the value and what is allowed.

This module imports no torch: the classes behind the names are imported when a name is
checked, so an MD task that receives settings does not load the flows' stack.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterator, Mapping
from functools import cache, cached_property
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    model_serializer,
)

from boltzgen.md import MDProtocol

if TYPE_CHECKING:
    from boltzgen.systems.base import System

_NO_VALUE = object()


class SettingError(ValueError):
    """A setting that is not allowed: ``<field>: <value> is not allowed; <allowed>``, or
    ``<field>: <detail>`` when the explanation is written out whole."""

    def __init__(self, field: str, value: object = _NO_VALUE, allowed: str = "", *,
                 detail: str = "") -> None:
        self.field = field
        self.detail = detail or (
            f"{_show(value)} is not allowed; {allowed}" if value is not _NO_VALUE else allowed)
        super().__init__(f"{field}: {self.detail}")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- number types -------------------------------------------------------------------------------

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


# -- choices by name ----------------------------------------------------------------------------

REGISTRIES: dict[str, str] = {
    "base": "boltzgen.bases:BASES",
    "reference_sampler": "boltzgen.pipeline.samplers:REFERENCE_SAMPLERS",
    "objective": "boltzgen.objectives:OBJECTIVES",
    "energy_backend": "boltzgen.pipeline.energy_backends:ENERGY_BACKENDS",
    "flow": "boltzgen.flows:FLOWS",
    "coupling": "boltzgen.flow_matching:COUPLINGS",
}
"""Axis -> ``module:REGISTRY`` of the classes a name chooses (imported on first use)."""


@cache  # looked up for every job a plan validates; the registry objects never change
def registry(axis: str) -> Any:
    """The :class:`boltzgen.registry.Registry` of ``axis`` (a key of :data:`REGISTRIES`)."""
    module, _, name = REGISTRIES[axis].partition(":")
    return getattr(importlib.import_module(module), name)


def _registered(axis: str) -> Any:
    def known(name: str) -> str:
        choices = registry(axis)
        if name not in choices:
            raise ValueError(f"is not a known {choices.what}; choose one of "
                             f"{', '.join(choices.names())}")
        return name

    return Annotated[str, AfterValidator(known)]


# -- the sections -------------------------------------------------------------------------------

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
    """``kind`` plus the system's own keyword parameters (checked by the system registry,
    :func:`boltzgen.systems.make_system`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str


class BaseSettings(Strict):
    """State A of the free-energy difference ΔF = f_target − f_A (``kind``: a registered base,
    :data:`boltzgen.bases.BASES`).

    ``normal``: a normalized Gaussian N(0, scale²) in flow coordinates (f_A = 0 exactly), so
    ``delta_f`` is the absolute reduced free energy −ln Z of the target.
    ``thermodynamic``: the same system at ``temperature``; ``delta_f`` is f(T) − f(T_A).
    ``uniform``: for rigid-body systems, the normalized uniform distribution on their
    coordinates (box × Haar), f_A = 0, so ``delta_f`` is the absolute −ln Z (normalized measure).
    ``scale`` is read by the normal base only; it stays in every base's dump because job ids
    hash it.
    """

    kind: _registered("base") = "normal"  # type: ignore[valid-type]
    scale: PositiveFloat = 1.0
    temperature: PositiveFloat | None = None


class MDSettings(Strict):
    """OpenMM NVT MD per ladder temperature: LangevinMiddle with ``timestep_fs`` and
    ``friction_per_ps``, minimisation, ``equilibration_ps``, then ``production_ps`` with a frame
    every ``frame_interval_ps`` (defaults: :class:`boltzgen.md.MDProtocol`).

    ``replica_temperatures`` (K, ascending, the first = the job's temperature): replica
    exchange over this ladder, neighbours swapped by the Metropolis rule every
    ``exchange_interval_ps``; the frames are those at the target temperature. Only for a
    reference of the target alone (a base that is not another temperature)."""

    _left_out_when_unset = ("replica_temperatures", "exchange_interval_ps")

    equilibration_ps: NonNegativeFloat = MDProtocol.equilibration_ps
    production_ps: PositiveFloat = MDProtocol.production_ps
    frame_interval_ps: PositiveFloat = MDProtocol.frame_interval_ps
    timestep_fs: PositiveFloat = MDProtocol.timestep_fs
    friction_per_ps: PositiveFloat = MDProtocol.friction_per_ps
    replica_temperatures: list[PositiveFloat] | None = None
    exchange_interval_ps: PositiveFloat | None = None

    def protocol_fields(self) -> dict[str, Any]:
        """The :class:`boltzgen.md.MDProtocol` keyword arguments these settings give (floats;
        the ladder as a tuple; unset options left to the protocol's defaults)."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            out[name] = tuple(float(t) for t in value) if isinstance(value, list) else float(
                value)
        return out


class ReferenceSettings(Strict):
    """Reference data and ΔF (``sampler``: a registered reference sampler,
    :data:`boltzgen.pipeline.samplers.REFERENCE_SAMPLERS`).

    ``mcmc``: replica-exchange MCMC over ``ladder_size`` temperatures (and the MBAR ladder).
    ``exact``: the system's own exact sampler (e.g. rejection sampling) for
    ``n_exact_samples`` independent samples; the MCMC settings are then unused.
    ``md``: OpenMM Langevin MD (protocol ``md``, defaults if left out) at each of the
    ``ladder_size`` temperatures geomspace(T, T_base, K), cached in the campaign's work
    directory, and MBAR over them gives the reference ΔF.
    ``none``: no samples of the target (a data-free job, trained by reverse KL from a base
    it draws from); the reference ΔF is the system's exact one where it knows f(T).
    """

    _left_out_when_unset = ("md", "holdout_blocks", "max_holdout_samples")

    sampler: _registered("reference_sampler") = "mcmc"  # type: ignore[valid-type]
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
    max_holdout_samples: PositiveInt | None = Field(
        default=None, description="mcmc and exact only: keep at most this many of the "
        "held-out samples (NLL, LBAR and the distribution metrics use them; each is mapped "
        "through the flow's inverse); unset: all")
    holdout_blocks: PositiveInt | None = Field(
        default=None, description="md only: cut each run into this many blocks and hold out "
        "every block i with floor((i+1) h) > floor(i h), h = holdout_fraction (interleaved); "
        "unset or 1: the last h of the run")

    @property
    def md_protocol(self) -> MDSettings:
        """The MD protocol's settings (the defaults where the spec gives none)."""
        return self.md or MDSettings()


class FlowSettings(BaseModel):
    """``kind`` plus the flow's keyword parameters (checked by the flow registry,
    :func:`boltzgen.flows.build_flow`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = "affine_coupling"

    def parameters(self) -> dict[str, Any]:
        """The flow's keyword parameters (everything but ``kind``)."""
        return dict(self.model_extra or {})


def _unit_interval(value: float) -> float:
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError("must be a number in (0, 1]")
    return value


class TemperingSettings(Strict):
    """The adaptive tempering schedule of objective ``adaptive_tempering``
    (:mod:`boltzgen.tempering`; Stupp & Koutsourelakis 2025)."""

    beta0: Annotated[Number, AfterValidator(_unit_interval)] = Field(
        default=1e-2, description="first inverse temperature, in (0, 1] (paper: 1e-2 double "
        "well, 1e-3 Gaussian mixture, 1e-4 alanine dipeptide)")
    delta: PositiveFloat = Field(
        default=0.15, description="largest accepted increase of the importance-weighted KL "
        "estimate at the next beta, nats (paper: 0.1-0.2)")
    shrink: Fraction = Field(default=0.6, description="factor a rejected step of beta is "
                             "multiplied by, in (0, 1)")
    steps_per_level: PositiveInt = Field(default=200, description="optimizer steps at each "
                                         "beta before the next step is chosen")
    final_steps: PositiveInt = Field(default=400, description="steps of reverse KL at beta = 1 "
                                     "once the schedule has reached it (cosine learning rate)")
    check_samples: PositiveInt = Field(default=2048, description="model samples of the KL "
                                       "estimate that chooses each step (energy evaluations)")
    min_step: PositiveFloat = Field(default=1e-6, description="a step of beta shrunk below "
                                    "this fails the job (the schedule cannot advance)")


class TrainingSettings(Strict):
    """How the flow is fitted (``objective``: a registered objective,
    :data:`boltzgen.objectives.OBJECTIVES`)."""

    objective: _registered("objective") = "maximum_likelihood"  # type: ignore[valid-type]
    steps: PositiveInt = 500
    batch_size: PositiveInt = 256
    learning_rate: PositiveFloat = 1e-3
    final_learning_rate: PositiveFloat | None = None
    warm_start_steps: PositiveInt | None = Field(
        default=None, description="reverse_kl only: this many maximum-likelihood steps on the "
        "reference's target samples first (its own cosine schedule), then ``steps`` of reverse KL")
    symmetry_augmentation: bool | None = Field(
        default=None, description="train on every MD training frame moved by each of the "
        "system's symmetry operations as well as on the frame itself (ice_xi: the crystal's "
        "space group, 8; a peptide: cyclic relabellings of each methyl's or NH3+'s three "
        "hydrogens, 3^k)")
    coupling: _registered("coupling") | None = Field(  # type: ignore[valid-type]
        default=None, description="flow_matching only: how prior and data samples are paired "
        "(independent, ot, equivariant_ot; default independent)")
    sigma_min: NonNegativeFloat | None = Field(
        default=None, description="flow_matching only: the width of the Gaussian around the "
        "straight path, x_t = (1 - t) x0 + t x1 + sigma_min eps (default 0)")
    energy_cap_kt: PositiveFloat | None = Field(
        default=None, description="objectives that train on the energy (reverse_kl, "
        "adaptive_tempering) only: a reduced energy u above this cap c (kT) enters the training "
        "loss as c + ln(1 + u - c) (the regularization of Noe et al. 2019), so that the rare "
        "sample whose atoms overlap (u ~ 1e9 kT) neither dominates the loss nor the tempering's "
        "KL estimates; the evaluation always uses the true energy")
    tempering: TemperingSettings | None = Field(
        default=None, description="adaptive_tempering only: the schedule of beta (defaults "
        "as in TemperingSettings)")
    forward_kl_weight: PositiveFloat | None = Field(
        default=None, description="reverse_kl and adaptive_tempering (at every beta) "
        "only: add this weight times the forward KL estimated from the model's own samples "
        "by self-normalized importance weights (boltzgen.objectives.reverse_kl_loss): "
        "still data-free; it moves probability between modes that reverse KL alone reaches "
        "only through the samples between them")
    _left_out_when_unset = ("warm_start_steps", "symmetry_augmentation", "coupling",
                            "sigma_min", "tempering", "energy_cap_kt", "forward_kl_weight")


class SamplingSettings(Strict):
    n_samples: PositiveInt = 10000
    energy_batch_size: PositiveInt = 5000


class EnergySettings(Strict):
    """How the energy evaluators compute U (``backend``: a registered energy backend,
    :data:`boltzgen.pipeline.energy_backends.ENERGY_BACKENDS`): the system's torch potential or its
    OpenMM form on ``platform``."""

    backend: _registered("energy_backend") = "torch"  # type: ignore[valid-type]
    platform: Literal["CPU", "Reference", "CUDA", "OpenCL"] = "CPU"


FailureToInject = Literal["reference", "train", "sample", "energy", "estimate",
                          "trainer_process_exit"]
"""Stages that can raise on purpose, and the trainer process that can exit on purpose."""


class JobSections(Strict):
    """The sections a job's settings share with a spec's top level (where the grid's values
    replace them); their defaults are stated here once."""

    system: SystemSettings
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


class JobSettings(JobSections):
    """The resolved settings of one job; its canonical JSON is hashed into the job id."""

    seed: NonNegativeInt
    temperature: PositiveFloat

    @classmethod
    def of(cls, settings: JobSettings | Mapping[str, Any]) -> JobSettings:
        """``settings`` as they are, or validated from a mapping (a plan's JSON, a notebook's
        dict)."""
        return settings if isinstance(settings, JobSettings) else cls.model_validate(settings)

    @cached_property
    def dump(self) -> dict[str, Any]:
        """The canonical JSON form (what the job id hashes; seeds and content keys too)."""
        return self.model_dump(mode="json")

    def canonical_json(self) -> str:
        return json.dumps(self.dump, sort_keys=True, separators=(",", ":"), allow_nan=True)

    def complaints(self, system: System, *, temperature_known: bool = True
                   ) -> Iterator[SettingError]:
        """How this job's sections do not go together with its system, in the order a job is
        refused by them (the first one): the base's, the reference sampler's, the energy
        backend's and the objective's own checks, then the rules across sections.
        ``temperature_known=False`` (a spec's top level without a target temperature) skips the
        rules that compare with the target temperature."""
        yield from registry("base").get(self.base.kind).complaints(
            self, system, temperature_known=temperature_known)
        yield from registry("reference_sampler").get(self.reference.sampler).complaints(
            self, system)
        yield from registry("energy_backend").get(self.energy.backend).complaints(self, system)
        yield from registry("objective").get(self.training.objective).complaints(self, system)
        yield from cross_section_complaints(self, system)


def cross_section_complaints(job: JobSettings, system: System) -> Iterator[SettingError]:
    """Rules that tie two sections together and belong to neither's registered class."""
    base = registry("base").get(job.base.kind)
    if job.flow.parameters().get("thermal_scaling") and not base.temperature_ladder:
        yield SettingError("flow.thermal_scaling", True, "it scales displacements by "
                           "sqrt(T / T_base); it needs base.kind 'thermodynamic'")
    flows = registry("flow")
    if job.flow.kind in flows and flows[job.flow.kind].owns_prior:
        # Its prior lives on a latent space of its own (e.g. 3n − 6 internal coordinates):
        # A is that normalized prior, so the base must be one the flow samples directly.
        if not base.samples_directly:
            yield SettingError("base.kind", job.base.kind, f"flow '{job.flow.kind}' has a "
                               "prior of its own, which is the base; use 'normal'")
        elif job.base.scale != 1.0:
            yield SettingError("base.scale", job.base.scale, f"flow '{job.flow.kind}' has a "
                               "normalized prior of its own, which is the base; leave it at 1")
    objective = registry("objective").get(job.training.objective)
    for name in ("coupling", "sigma_min"):
        value = getattr(job.training, name)
        if value is not None and not objective.uses_coupling:
            yield SettingError(f"training.{name}", value, "it pairs prior and data samples "
                               "for flow matching; leave it out for objective "
                               f"'{job.training.objective}'")
    if job.training.energy_cap_kt is not None and not any(
            registry("objective").get(name).trains_on_energy
            for name, _ in objective.phases(job.training)):
        yield SettingError("training.energy_cap_kt", job.training.energy_cap_kt, "it caps the "
                           "energies of reverse-KL training; leave it out for objective "
                           f"'{job.training.objective}'")
    if job.training.forward_kl_weight is not None and not any(
            registry("objective").get(name).reads_forward_kl_weight
            for name, _ in objective.phases(job.training)):
        yield SettingError("training.forward_kl_weight", job.training.forward_kl_weight,
                           "it weights the reweighted forward KL of reverse-KL training; leave "
                           f"it out for objective '{job.training.objective}'")
    if job.training.tempering is not None and not objective.uses_tempering:
        yield SettingError("training.tempering", "set", "it is the schedule of objective "
                           f"'adaptive_tempering'; leave it out for '{job.training.objective}'")
    if job.training.symmetry_augmentation and not system.supports_symmetry_images():
        yield SettingError("training.symmetry_augmentation", True, f"system '{system.kind}' "
                           "has no known symmetry operations; allowed for systems "
                           "that have them (ice_xi, peptide)")

"""Reference samplers, registered in :data:`REFERENCE_SAMPLERS` under the spec's
``reference.sampler``: where a job's reference data (samples of the target, and of a
thermodynamic base) and its reference ΔF come from.

A reference sampler class has
``complaints(job, system)`` (how it goes with the job's system and sections),
``md_runs(job, problem)`` (the shared MD runs it needs first, as (content key, temperature K),
declared as tasks of the job's graph) and
``run(job, problem, work_dir, threads) -> ReferenceData``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

from boltzgen.md import MDProtocol, held_out_blocks
from boltzgen.registry import Registry
from boltzgen.settings import JobSettings, MDSettings, SettingError

if TYPE_CHECKING:
    from boltzgen.pipeline.problem import Problem
    from boltzgen.pipeline.reference import ReferenceData
    from boltzgen.systems.base import System


class ReferenceSampler:
    """What every reference sampler offers (subclasses override ``run``)."""

    name: ClassVar[str]
    uses_openmm: ClassVar[bool] = False  # where it runs, OpenMM needs the platform's devices

    @classmethod
    def complaints(cls, job: JobSettings, system: System) -> Iterator[SettingError]:
        if job.reference.holdout_blocks is not None:
            yield SettingError("reference.holdout_blocks", job.reference.holdout_blocks,
                               "interleaved held-out blocks split MD runs; leave it out for "
                               f"sampler '{cls.name}'")

    @classmethod
    def md_runs(cls, job: JobSettings, problem: Problem) -> list[tuple[str, float]]:
        return []

    @classmethod
    def run(cls, job: JobSettings, problem: Problem, work_dir: str | None, threads: int
            ) -> ReferenceData:
        raise NotImplementedError


REFERENCE_SAMPLERS: Registry[ReferenceSampler] = Registry(
    "reference sampler", field="reference.sampler")


@REFERENCE_SAMPLERS.register("mcmc")
class ReplicaExchangeMCMC(ReferenceSampler):
    """Replica-exchange Metropolis MCMC over the temperature ladder; ΔF exact where the
    system knows f(T), else MBAR over the ladder (:func:`reference.mcmc_reference`)."""

    @classmethod
    def complaints(cls, job: JobSettings, system: System) -> Iterator[SettingError]:
        if system.rigid_layout() is not None:
            yield SettingError("reference.sampler", "mcmc", "MCMC on rigid-body coordinates "
                               "is not implemented; use 'exact' or 'md'")
        yield from super().complaints(job, system)

    @classmethod
    def run(cls, job: JobSettings, problem: Problem, work_dir: str | None, threads: int
            ) -> ReferenceData:
        from boltzgen.pipeline.reference import mcmc_reference

        return mcmc_reference(job, problem)


@REFERENCE_SAMPLERS.register("exact")
class ExactSampler(ReferenceSampler):
    """The system's own exact sampler and exact f (:func:`reference.exact_reference`)."""

    @classmethod
    def complaints(cls, job: JobSettings, system: System) -> Iterator[SettingError]:
        if not system.supports_exact_sampling():
            yield SettingError("reference.sampler", "exact", f"system '{system.kind}' has no "
                               "exact sampler; use 'mcmc'")
        yield from super().complaints(job, system)

    @classmethod
    def run(cls, job: JobSettings, problem: Problem, work_dir: str | None, threads: int
            ) -> ReferenceData:
        from boltzgen.pipeline.reference import exact_reference

        return exact_reference(job, problem)


@REFERENCE_SAMPLERS.register("md")
class MolecularDynamics(ReferenceSampler):
    """OpenMM Langevin MD, cached in the work directory and shared by every job that needs a
    run. With a thermodynamic base: one run at every ladder temperature between the base and
    the target, MBAR ΔF (:func:`reference.md_reference`). With a base that is not another
    temperature (a flow's normalized prior): one run of the target, plain or by replica
    exchange (``reference.md.replica_temperatures``), whose frames are the training and
    held-out data; no reference for −ln Z, but the free energy between the system's metastable
    states where it defines them (:func:`reference.md_target_reference`)."""

    uses_openmm = True

    @classmethod
    def complaints(cls, job: JobSettings, system: System) -> Iterator[SettingError]:
        from boltzgen.bases import BASES

        if not system.supports_md():
            yield SettingError("reference.sampler", "md", f"system '{system.kind}' has no "
                               "OpenMM form with a starting structure; use 'mcmc' or 'exact'")
        md = job.reference.md or MDSettings()
        if BASES.get(job.base.kind).temperature_ladder and md.replica_temperatures:
            yield SettingError("reference.md.replica_temperatures", md.replica_temperatures,
                               "replica exchange samples the target alone; with base "
                               "'thermodynamic' the ladder's temperatures are separate runs "
                               "(leave it out, or use a normal base)")
        try:  # the protocol checks its own consistency (at least one frame, one step per frame)
            MDProtocol(temperature=job.temperature, **md.protocol_fields())
        except ValueError as exc:
            field, _, detail = str(exc).partition(": ")
            yield SettingError(f"reference.md.{field}", detail=detail)
        if job.reference.max_holdout_samples is not None:
            yield SettingError("reference.max_holdout_samples", job.reference.max_holdout_samples,
                               "MD frames are held out in time blocks; leave it out for "
                               "sampler 'md'")
        if job.reference.holdout_blocks is not None:
            try:
                held_out_blocks(job.reference.holdout_blocks, job.reference.holdout_fraction)
            except ValueError as exc:
                yield SettingError("reference.holdout_blocks", job.reference.holdout_blocks,
                                   str(exc).partition(": ")[2])

    @classmethod
    def md_runs(cls, job: JobSettings, problem: Problem) -> list[tuple[str, float]]:
        from boltzgen.md import cache_key
        from boltzgen.pipeline.reference import md_protocol

        temperatures = (problem.ladder(job.reference) if problem.base.temperature_ladder
                        else [problem.temperature])
        return [(cache_key(problem.system, md_protocol(job, t)), float(t))
                for t in temperatures]

    @classmethod
    def run(cls, job: JobSettings, problem: Problem, work_dir: str | None, threads: int
            ) -> ReferenceData:
        from boltzgen.pipeline.reference import md_reference, md_target_reference

        if work_dir is None:
            raise ValueError("work_dir: None is not allowed for reference.sampler 'md'; MD "
                             "frames are cached in the campaign's work directory")
        if problem.base.temperature_ladder:
            return md_reference(job, problem, work_dir, threads)
        return md_target_reference(job, problem, work_dir, threads)


@REFERENCE_SAMPLERS.register("none")
class NoReference(ReferenceSampler):
    """No samples of the target for training: a data-free job, trained from the energy alone
    (reverse KL, adaptive tempering, from a base it can draw from). ΔF is still checked against
    the system's exact f(T) where it knows one, and where the system has an exact sampler its
    held-out samples serve the evaluation only (:func:`reference.data_free_reference`);
    otherwise the estimates that need target samples (NLL, LBAR, backward ESS) are left
    out."""

    @classmethod
    def complaints(cls, job: JobSettings, system: System) -> Iterator[SettingError]:
        from boltzgen.bases import BASES
        from boltzgen.objectives import OBJECTIVES

        if not BASES.get(job.base.kind).samples_directly:
            yield SettingError("reference.sampler", "none", f"a data-free job draws its "
                               f"training batches from the base; base '{job.base.kind}' is "
                               "sampled by the reference (use 'normal' or 'uniform')")
        objective = OBJECTIVES.get(job.training.objective)
        if objective.needs_target_data(job.training):
            yield SettingError("reference.sampler", "none", "it gives no samples of the "
                               f"target, and training.objective '{job.training.objective}'"
                               + (" with warm_start_steps" if job.training.warm_start_steps
                                  else "") + " trains on them; use an objective that needs "
                               "only the energy (reverse_kl without warm_start_steps, "
                               "adaptive_tempering)")
        yield from super().complaints(job, system)

    @classmethod
    def run(cls, job: JobSettings, problem: Problem, work_dir: str | None, threads: int
            ) -> ReferenceData:
        from boltzgen.pipeline.reference import data_free_reference

        return data_free_reference(job, problem)

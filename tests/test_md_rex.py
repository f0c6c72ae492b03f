"""Replica exchange over a temperature ladder as an MD protocol option (boltzgen.md), on
non-periodic systems: alanine dipeptide in implicit solvent (openmmtools) and a toy of
independent particles in a quartic well whose mean energy is known exactly."""

from __future__ import annotations

import math
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import pytest
from openmm import unit

from boltzgen._pymbar import pymbar
from boltzgen.md import MDProtocol, _Walkers, cache_key, cached_md, run_md
from boltzgen.units import KB_KJ_PER_MOL_K


class AlanineDipeptide:
    """The system interface boltzgen.md relies on, for openmmtools' alanine dipeptide in OBC
    implicit solvent (HBond constraints); flow coordinates = flattened Cartesian nm."""

    kind = "test_alanine_dipeptide_implicit"

    def __init__(self) -> None:
        from openmmtools.testsystems import AlanineDipeptideImplicit

        test_system = AlanineDipeptideImplicit()
        self._system, self._topology = test_system.system, test_system.topology
        self._positions = test_system.positions.value_in_unit(unit.nanometer)

    def parameters(self) -> dict[str, str]:
        return {"solvent": "obc"}

    def openmm_system(self) -> openmm.System:
        return self._system

    def ideal_coordinates(self) -> np.ndarray:
        return np.asarray(self._positions, dtype=np.float64).reshape(-1)

    def openmm_positions(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x).reshape(len(x), -1, 3)

    def from_cartesian(self, xyz: np.ndarray) -> np.ndarray:
        return np.asarray(xyz).reshape(len(xyz), -1)

    def mdtraj_topology(self) -> mdtraj.Topology:
        return mdtraj.Topology.from_openmm(self._topology)


class QuarticWells(AlanineDipeptide):
    """n particles of mass 12 amu, each in U = a (x⁴ + y⁴ + z⁴) (a in kJ/mol/nm⁴), no
    interactions. U is homogeneous of degree 4 in 3n coordinates, so under Boltzmann at T,
    U ~ Gamma(3n/4, k_B T): <U> = (3n/4) k_B T and Var U = (3n/4) (k_B T)²."""

    kind = "test_quartic_wells"

    def __init__(self, n: int = 64, a: float = 6000.0) -> None:
        self.n, self.a = n, a

    def parameters(self) -> dict[str, float]:
        return {"n": self.n, "a": self.a}

    def openmm_system(self) -> openmm.System:
        system = openmm.System()
        force = openmm.CustomExternalForce(f"{self.a}*(x^4 + y^4 + z^4)")
        for i in range(self.n):
            system.addParticle(12.0)
            force.addParticle(i, [])
        system.addForce(force)
        return system

    def ideal_coordinates(self) -> np.ndarray:
        return np.zeros(3 * self.n)

    def mdtraj_topology(self) -> mdtraj.Topology:
        topology = mdtraj.Topology()
        residue = topology.add_residue("QW", topology.add_chain())
        for _ in range(self.n):
            topology.add_atom("C", mdtraj.element.carbon, residue)
        return topology


class Recorded:
    """A system with only what the cache key reads."""

    kind = "fake_peptide"

    def parameters(self) -> dict[str, object]:
        return {"residues": "AA", "solvent": "obc2", "cutoff": 1.2}


LADDER = (300.0, 315.0, 331.0, 348.0)
REX = MDProtocol(temperature=300.0, equilibration_ps=0.5, production_ps=4.0,
                 frame_interval_ps=0.1, timestep_fs=2.0, seed=7, replica_temperatures=LADDER,
                 exchange_interval_ps=0.05)


@pytest.fixture(scope="module")
def alanine() -> AlanineDipeptide:
    return AlanineDipeptide()


@pytest.fixture(scope="module")
def rex_run(alanine: AlanineDipeptide, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, object]:
    cache = tmp_path_factory.mktemp("md_cache")
    return cache, cached_md(alanine, REX, cache)


def test_plain_md_keeps_its_cache_key() -> None:
    """Keys recorded with the code before replica exchange existed: a protocol without a
    ladder hashes exactly what it hashed then, whatever its (unread) exchange interval."""
    system = Recorded()
    assert cache_key(system, MDProtocol(temperature=300.0)) == "b834af5b0d6b83b7"
    old = dict(temperature=310.5, equilibration_ps=2.0, production_ps=5.0,
               frame_interval_ps=0.25, timestep_fs=2.0, friction_per_ps=5.0, seed=11)
    assert cache_key(system, MDProtocol(**old)) == "ad42b56eb33b108c"
    assert cache_key(system, MDProtocol(**old, exchange_interval_ps=0.5)) == "ad42b56eb33b108c"
    ladder = MDProtocol(**old, replica_temperatures=(310.5, 330.0))
    keys = {cache_key(system, ladder), "ad42b56eb33b108c",
            cache_key(system, MDProtocol(**old, replica_temperatures=(310.5, 330.0),
                                         exchange_interval_ps=0.5)),
            cache_key(system, MDProtocol(**old, replica_temperatures=(310.5, 340.0)))}
    assert len(keys) == 4


def test_plain_md_gives_the_numbers_it_gave_before() -> None:
    """U of the first frames of a short plain run: the plain path (no ladder) must stay the
    same trajectory. On OpenMM's Reference platform (double precision, scalar code), whose
    trajectory does not depend on the processor's vector instructions; the CPU platform's does
    (400 steps amplified its last-bit differences to 0.44 kJ/mol on another machine)."""
    protocol = MDProtocol(temperature=300.0, equilibration_ps=0.5, production_ps=0.3,
                          frame_interval_ps=0.1, timestep_fs=2.0, seed=5)
    frames = run_md(AlanineDipeptide(), protocol, platform="Reference")
    assert frames.replica_exchange is None
    np.testing.assert_allclose(frames.potential_kj_per_mol,
                               [-119.90800311, -135.78842273, -116.83372059], rtol=1e-6)
    np.testing.assert_allclose(frames.time_ps, [0.1, 0.2, 0.3])


def test_replica_exchange_frames_and_statistics(rex_run: tuple[Path, object],
                                                alanine: AlanineDipeptide) -> None:
    _, run = rex_run
    stats = run.replica_exchange
    assert run.flow_coordinates.shape == (REX.n_frames, 66) and REX.n_frames == 40
    np.testing.assert_allclose(run.time_ps, 0.1 * np.arange(1, 41))
    np.testing.assert_array_equal(stats.temperatures, LADDER)
    # 80 exchange attempts, alternating pairs (0, 2) and (1,): 40 attempts per pair.
    np.testing.assert_array_equal(stats.attempts, [40, 40, 40])
    assert np.all((stats.acceptance >= 0.0) & (stats.acceptance <= 1.0))
    assert np.all(stats.acceptance > 0.0)  # a 5 % spacing on 22 atoms overlaps well
    assert stats.target_walker.shape == (40,) and set(stats.target_walker) <= {0, 1, 2, 3}
    # The walker at T_0 changes only by an accepted swap of pair (0, 1).
    assert np.count_nonzero(np.diff(stats.target_walker)) <= stats.accepted[0]
    assert stats.round_trips.shape == (4,) and np.all(stats.round_trips >= 0)
    # Each frame's U is the energy of its own (target-rung) configuration.
    context = openmm.Context(alanine.openmm_system(), openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("CPU"))
    for i in (0, 17, 39):
        context.setPositions(alanine.openmm_positions(run.flow_coordinates[i:i + 1])[0])
        energy = context.getState(getEnergy=True).getPotentialEnergy()
        assert energy.value_in_unit(unit.kilojoule_per_mole) == pytest.approx(
            run.potential_kj_per_mol[i], abs=1e-3)


def test_replica_exchange_cache_round_trip(rex_run: tuple[Path, object],
                                           alanine: AlanineDipeptide) -> None:
    cache, first = rex_run
    assert not first.reused
    second = cached_md(alanine, REX, cache)
    assert second.reused and second.path == first.path
    np.testing.assert_array_equal(second.flow_coordinates, first.flow_coordinates)
    np.testing.assert_array_equal(second.potential_kj_per_mol, first.potential_kj_per_mol)
    for name in ("temperatures", "target_walker", "attempts", "accepted", "round_trips"):
        np.testing.assert_array_equal(getattr(second.replica_exchange, name),
                                      getattr(first.replica_exchange, name))
    trajectory = mdtraj.load(f"{first.path}/frames.dcd", top=f"{first.path}/topology.pdb")
    assert trajectory.n_frames == 40 and trajectory.n_atoms == 22
    assert trajectory.unitcell_lengths is None  # no box: no unit cell in the DCD
    np.testing.assert_allclose(trajectory.xyz.reshape(40, -1), first.flow_coordinates,
                               atol=1e-5)
    # The same protocol without the ladder is another cache entry.
    plain = MDProtocol(temperature=300.0, equilibration_ps=0.5, production_ps=4.0,
                       frame_interval_ps=0.1, timestep_fs=2.0, seed=7)
    assert cache_key(alanine, plain) != Path(first.path).name


def test_mean_energy_at_the_target_rung_agrees_with_plain_md() -> None:
    """<U> at T_0 by replica exchange, by plain MD and exactly ((3n/4) k_B T, QuarticWells).

    Each run's mean has the standard error s sqrt(g / F) with g pymbar's statistical
    inefficiency of U over its F frames. Tolerance: 4 combined standard errors for
    REX − plain, 4 standard errors for each against the exact value (a Gaussian leaves that
    band with probability 6e-5; the 4 rather than 3 absorbs the ~20 % error of g from 500
    frames). Over eight seeds of 100 ps, REX's z against the exact value had mean 0.13 and
    spread 1.19."""
    system = QuarticWells()
    common = dict(temperature=300.0, equilibration_ps=5.0, production_ps=50.0,
                  frame_interval_ps=0.1, timestep_fs=2.0, seed=2)
    rex = run_md(system, MDProtocol(**common, replica_temperatures=(300.0, 330.0, 363.0),
                                    exchange_interval_ps=0.1))
    plain = run_md(system, MDProtocol(**common))
    exact = 0.75 * system.n * KB_KJ_PER_MOL_K * 300.0
    timeseries = pymbar().timeseries
    means, errors = [], []
    for u in (rex.potential_kj_per_mol, plain.potential_kj_per_mol):
        g = timeseries.statistical_inefficiency(u)
        means.append(u.mean())
        errors.append(u.std(ddof=1) * math.sqrt(g / len(u)))
        assert abs(u.mean() - exact) < 4.0 * errors[-1], (u.mean(), exact, errors[-1])
    assert abs(means[0] - means[1]) < 4.0 * math.hypot(*errors), (means, errors)
    assert np.all(rex.replica_exchange.acceptance > 0.3)


def test_a_rung_that_blows_up_fails_the_run_and_leaves_no_cache_entry(tmp_path: Path) -> None:
    """At 3e6 K a 10 fs step throws particles out of the quartic wells; the 300 K rung is
    stable. The error names the hot rung and the time, and nothing is cached."""
    protocol = MDProtocol(temperature=300.0, equilibration_ps=1.0, production_ps=2.0,
                          frame_interval_ps=0.1, timestep_fs=10.0, seed=1,
                          replica_temperatures=(300.0, 3e6), exchange_interval_ps=0.1)
    with pytest.raises(RuntimeError, match=r"MD at 3e\+06 K blew up after [0-9.]+ ps"):
        cached_md(QuarticWells(), protocol, tmp_path)
    assert [p.name for p in (tmp_path / "md").iterdir() if not p.name.endswith(".lock")] == []


def test_round_trips_are_counted_bottom_top_bottom() -> None:
    walkers = _Walkers(3)
    # Walker 0 climbs 0 -> 1 -> 2 and comes back down; walker 2 goes down and back up.
    for pair in (0, 1, None, 1, 0):
        if pair is not None:
            walkers.swap(pair)
        walkers.sweep_done()
    np.testing.assert_array_equal(walkers.at, [0, 1, 2])
    np.testing.assert_array_equal(walkers.round_trips, [1, 0, 0])


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"replica_temperatures": (310.0, 320.0)},
     ["replica_temperatures: (310.0, 320.0) is not allowed", "lowest rung", "300.0 K"]),
    ({"replica_temperatures": (300.0, 290.0)},
     ["replica_temperatures: (300.0, 290.0) is not allowed", "strictly ascending"]),
    ({"replica_temperatures": (300.0,)},
     ["replica_temperatures: (300.0,) is not allowed", "at least two rungs"]),
    ({"replica_temperatures": (300.0, -5.0)}, ["replica_temperatures[1]: -5.0", "> 0"]),
    ({"production_ps": 0.05, "frame_interval_ps": 0.1},
     ["production_ps: 0.05 is not allowed", "one frame interval (0.1 ps)"]),
    ({"exchange_interval_ps": 0.0}, ["exchange_interval_ps: 0.0 is not allowed", "> 0"]),
    ({"replica_temperatures": (300.0, 330.0), "exchange_interval_ps": 0.0015},
     ["exchange_interval_ps: 0.0015 is not allowed", "whole number of time steps (1.0 fs)"]),
    ({"replica_temperatures": (300.0, 330.0), "exchange_interval_ps": 0.3},
     ["exchange_interval_ps: 0.3 is not allowed with frame_interval_ps 0.5",
      "shorter of the two must divide the longer"]),
])
def test_bad_protocols_are_refused(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        MDProtocol(temperature=300.0, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_exchange_and_frame_intervals_may_nest_either_way() -> None:
    """Exchanges every 1 ps with a frame every 0.5 ps (the defaults) and exchanges every 0.1
    ps with a frame every 0.5 ps are both accepted; without a ladder the exchange interval is
    not read, so a time step that does not divide it is no error."""
    MDProtocol(temperature=300.0, replica_temperatures=(300.0, 320.0))
    MDProtocol(temperature=300.0, replica_temperatures=(300.0, 320.0), exchange_interval_ps=0.1)
    MDProtocol(temperature=300.0, timestep_fs=3.0, frame_interval_ps=0.3)

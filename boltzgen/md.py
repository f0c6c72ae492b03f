"""Molecular dynamics with OpenMM, cached on disk by a hash of the system and the protocol.

Protocol (docs/architecture.md, Ice XI and rigid bodies): LangevinMiddleIntegrator (time step,
friction), energy minimisation
from the ideal crystal, equilibration, then production with a frame every
``frame_interval_ps``. Each frame stores the positions, the box and the potential energy U
(kJ/mol, float64 from OpenMM's state).

Cache layout, ``<cache_dir>/md/<key>/``: ``frames.dcd`` and ``topology.pdb`` (what mdtraj and
VMD read; float32 positions), ``frames.npz`` (float64: ``potential_kj_per_mol``, ``time_ps``,
``flow_coordinates`` of every frame) and ``protocol.json``. Everything is written under a
temporary name in the same directory and renamed into place last, so a cache entry is either
complete or absent; a file lock makes concurrent jobs wait for one run instead of repeating it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from boltzgen._checks import check_float, check_int


@dataclass(frozen=True)
class MDProtocol:
    """One NVT run: temperature (K), time step (fs), friction (1/ps), lengths (ps), seed."""

    temperature: float
    equilibration_ps: float = 10.0
    production_ps: float = 100.0
    frame_interval_ps: float = 0.5
    timestep_fs: float = 1.0
    friction_per_ps: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_float("temperature", self.temperature, positive=True)
        check_float("equilibration_ps", self.equilibration_ps, nonnegative=True)
        check_float("production_ps", self.production_ps, positive=True)
        check_float("frame_interval_ps", self.frame_interval_ps, positive=True)
        check_float("timestep_fs", self.timestep_fs, positive=True)
        check_float("friction_per_ps", self.friction_per_ps, positive=True)
        check_int("seed", self.seed, minimum=0)
        if self.production_ps < self.frame_interval_ps:
            raise ValueError(f"production_ps: {self.production_ps!r} is shorter than one frame "
                             f"interval ({self.frame_interval_ps!r} ps)")
        if self.frame_interval_ps * 1000.0 < self.timestep_fs:
            raise ValueError(f"frame_interval_ps: {self.frame_interval_ps!r} is shorter than "
                             f"one time step ({self.timestep_fs!r} fs)")

    @property
    def steps_per_frame(self) -> int:
        return max(1, round(self.frame_interval_ps * 1000.0 / self.timestep_fs))

    @property
    def n_frames(self) -> int:
        # The tolerance keeps 20 ps / 0.1 ps at 200 frames despite binary rounding.
        return int(math.floor(self.production_ps / self.frame_interval_ps + 1e-9))

    @property
    def equilibration_steps(self) -> int:
        return round(self.equilibration_ps * 1000.0 / self.timestep_fs)


@dataclass
class MDTrajectory:
    """Production frames of one run: flow coordinates (F, dim), U (F,) kJ/mol, times (ps)."""

    flow_coordinates: np.ndarray
    potential_kj_per_mol: np.ndarray
    time_ps: np.ndarray
    protocol: MDProtocol
    path: str
    seconds: float  # wall-clock seconds of the run that produced the entry (0 if unknown)
    reused: bool  # True when the entry was already in the cache


def held_out_blocks(blocks: int, holdout_fraction: float) -> list[bool]:
    """Which of ``blocks`` contiguous blocks of a run are held out: block i when
    floor((i + 1) h) > floor(i h), h = ``holdout_fraction`` (about h · blocks of them, spread
    evenly through the run and ending with a held-out block). ValueError naming
    ``holdout_blocks`` when that leaves no training block or no held-out block."""
    held_out = [math.floor((i + 1) * holdout_fraction) > math.floor(i * holdout_fraction)
                for i in range(blocks)]
    if all(held_out) or not any(held_out):
        raise ValueError(f"holdout_blocks: {blocks} blocks with holdout_fraction "
                         f"{holdout_fraction:g} leave no training block or no held-out block; "
                         "use more blocks")
    return held_out


def cache_key(system: Any, protocol: MDProtocol) -> str:
    """sha256 of the system's kind and parameters and the protocol (16 hex digits)."""
    text = json.dumps({"system": system.kind, "parameters": system.parameters(),
                       "protocol": asdict(protocol)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_md(system: Any, protocol: MDProtocol, cache_dir: str | os.PathLike, threads: int = 1,
              platform: str = "CPU") -> MDTrajectory:
    """The trajectory of ``protocol`` for ``system``: from the cache, else run and store it."""
    root = Path(cache_dir) / "md"
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(system, protocol)
    entry = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second job waits here for the first one's run
        if (entry / "frames.npz").is_file():
            return _load(entry, protocol, reused=True)
        start = time.perf_counter()
        xyz, potentials, times = run_md(system, protocol, threads, platform)
        seconds = time.perf_counter() - start
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            _write(system, staging, xyz, potentials, times, protocol, seconds)
            os.replace(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return _load(entry, protocol, reused=False)


def run_md(system: Any, protocol: MDProtocol, threads: int = 1, platform: str = "CPU"
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise, equilibrate and produce: positions (F, n, 3) nm, U (F,) kJ/mol, t (F,) ps.

    RuntimeError (naming the temperature and the time) if the potential energy stops being
    finite: a blown-up run never reaches the cache.
    """
    import openmm
    from openmm import unit

    omm_system = system.openmm_system()
    integrator = openmm.LangevinMiddleIntegrator(
        protocol.temperature * unit.kelvin, protocol.friction_per_ps / unit.picosecond,
        protocol.timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(protocol.seed + 1)  # OpenMM: 0 means "pick at random"
    properties = {"Threads": str(threads)} if platform == "CPU" else {}
    context = openmm.Context(omm_system, integrator, openmm.Platform.getPlatformByName(platform),
                             properties)
    context.setPositions(system.openmm_positions(system.ideal_coordinates()[None])[0])
    context.computeVirtualSites()
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 2000)
    context.setVelocitiesToTemperature(protocol.temperature * unit.kelvin, protocol.seed + 1)

    def check(step: int) -> float:
        energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole)
        if not math.isfinite(energy):
            raise RuntimeError(f"MD at {protocol.temperature:g} K blew up: the potential "
                               f"energy is {energy} after {step * protocol.timestep_fs:g} fs")
        return energy

    def advance(n: int, step: int) -> None:
        try:
            integrator.step(n)
        except openmm.OpenMMException as error:  # e.g. "Particle coordinate is NaN"
            raise RuntimeError(f"MD at {protocol.temperature:g} K blew up within "
                               f"{(step + n) * protocol.timestep_fs:g} fs: {error}") from None

    done = 0
    chunk = max(1, min(protocol.equilibration_steps, 10_000))
    while done < protocol.equilibration_steps:
        n = min(chunk, protocol.equilibration_steps - done)
        advance(n, done)
        done += n
        check(done)
    frames, energies, times = [], [], []
    for i in range(protocol.n_frames):
        advance(protocol.steps_per_frame, done + i * protocol.steps_per_frame)
        state = context.getState(getPositions=True, getEnergy=True)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        if not math.isfinite(energy):
            check(done + (i + 1) * protocol.steps_per_frame)
        frames.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        energies.append(energy)
        times.append((i + 1) * protocol.steps_per_frame * protocol.timestep_fs / 1000.0)
    return np.array(frames), np.array(energies), np.array(times)


def _write(system: Any, directory: Path, xyz: np.ndarray, potentials: np.ndarray,
           times: np.ndarray, protocol: MDProtocol, seconds: float) -> None:
    import mdtraj

    topology = system.mdtraj_topology()
    edges = np.array(system.box.edges)
    trajectory = mdtraj.Trajectory(xyz, topology, time=times,
                                   unitcell_lengths=np.tile(edges, (len(xyz), 1)),
                                   unitcell_angles=np.full((len(xyz), 3), 90.0))
    trajectory.save_dcd(str(directory / "frames.dcd"))
    trajectory[0].save_pdb(str(directory / "topology.pdb"))
    np.savez(directory / "frames.npz", potential_kj_per_mol=potentials, time_ps=times,
             flow_coordinates=system.from_cartesian(xyz))
    (directory / "protocol.json").write_text(json.dumps(
        {"protocol": asdict(protocol), "system": system.kind, "parameters": system.parameters(),
         "seconds": seconds}, indent=2, sort_keys=True))


def _load(entry: Path, protocol: MDProtocol, reused: bool) -> MDTrajectory:
    with np.load(entry / "frames.npz") as data:
        arrays = {k: data[k] for k in data.files}
    seconds = json.loads((entry / "protocol.json").read_text()).get("seconds", 0.0)
    return MDTrajectory(arrays["flow_coordinates"], arrays["potential_kj_per_mol"],
                        arrays["time_ps"], protocol, str(entry), float(seconds), reused)

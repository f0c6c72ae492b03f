"""Molecular dynamics with OpenMM, cached on disk by a hash of the system and the protocol.

Protocol (docs/architecture.md, Ice XI and rigid bodies): LangevinMiddleIntegrator (time step,
friction), energy minimisation from the system's starting structure, equilibration, then
production with a frame every ``frame_interval_ps``. Each frame stores the positions, the box
(periodic systems) and the potential energy U (kJ/mol, float64 from OpenMM's state).

Replica exchange (``MDProtocol.replica_temperatures``, a ladder T_0 < T_1 < ... < T_{K-1} with
T_0 the target temperature): one Context per rung, each with its own Langevin integrator at
T_k, all stepped in turn in this process. Every ``exchange_interval_ps`` neighbouring rungs
(k, k+1) swap configurations, even pairs and odd pairs in alternate attempts, with probability
min(1, exp((β_k − β_{k+1}) (U_k − U_{k+1}))), β = 1 / (k_B T) in mol/kJ; a swap exchanges
positions and velocities, the velocities rescaled by sqrt(T_new / T_old). The production
frames are those of the target rung T_0.

What a system offers this module (duck-typed; ice, and a peptide in implicit solvent):

- ``kind`` (str) and ``parameters()`` (a JSON-able dict): what the cache key hashes;
- ``openmm_system()``: the ``openmm.System``;
- ``ideal_coordinates()``: the starting structure in flow coordinates (dim,);
- ``openmm_positions(x)``: flow coordinates (B, dim) -> Cartesian positions (B, n, 3) nm;
- ``from_cartesian(xyz)``: positions (F, n, 3) nm -> flow coordinates (F, dim);
- ``mdtraj_topology()``: the ``mdtraj.Topology`` of the n particles;
- optionally ``box`` with ``edges`` (3,) nm: a periodic system's orthorhombic cell, written as
  the DCD's unit cell; a system without ``box`` (a molecule in implicit solvent) gets none.

Cache layout, ``<cache_dir>/md/<key>/``: ``frames.dcd`` and ``topology.pdb`` (what mdtraj and
VMD read; float32 positions), ``frames.npz`` (float64: ``potential_kj_per_mol``, ``time_ps``,
``flow_coordinates`` of every frame; with replica exchange also ``replica_temperatures_k``
(K,), ``target_walker`` (F,), ``exchange_attempts`` and ``exchange_accepted`` (K − 1,) and
``round_trips`` (K,), see :class:`ReplicaExchangeStats`) and ``protocol.json``. Everything is
written under a temporary name in the same directory and renamed into place last, so a cache
entry is either complete or absent; a file lock makes concurrent jobs wait for one run instead
of repeating it.
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
from boltzgen.units import KB_KJ_PER_MOL_K


@dataclass(frozen=True)
class MDProtocol:
    """One NVT run: temperature (K), time step (fs), friction (1/ps), lengths (ps), seed.

    ``replica_temperatures`` (K, strictly ascending, at least two rungs, the first equal to
    ``temperature``): run replica exchange over this ladder instead of plain MD; empty (the
    default): plain MD at ``temperature``. ``exchange_interval_ps``: time between exchange
    attempts (read only with a ladder). With a ladder, the frame interval and the exchange
    interval must each be a whole number of time steps and the shorter one must divide the
    longer one (exchanges every 1 ps with a frame every 0.5 ps, or exchanges every 0.1 ps with
    a frame every 0.5 ps). ``equilibration_ps`` is spent by every rung on its own, from the one
    minimised structure, before the first exchange.
    """

    temperature: float
    equilibration_ps: float = 10.0
    production_ps: float = 100.0
    frame_interval_ps: float = 0.5
    timestep_fs: float = 1.0
    friction_per_ps: float = 1.0
    seed: int = 0
    replica_temperatures: tuple[float, ...] = ()
    exchange_interval_ps: float = 1.0

    def __post_init__(self) -> None:
        check_float("temperature", self.temperature, positive=True)
        check_float("equilibration_ps", self.equilibration_ps, nonnegative=True)
        check_float("production_ps", self.production_ps, positive=True)
        check_float("frame_interval_ps", self.frame_interval_ps, positive=True)
        check_float("timestep_fs", self.timestep_fs, positive=True)
        check_float("friction_per_ps", self.friction_per_ps, positive=True)
        check_int("seed", self.seed, minimum=0)
        check_float("exchange_interval_ps", self.exchange_interval_ps, positive=True)
        if self.production_ps < self.frame_interval_ps:
            raise ValueError(f"production_ps: {self.production_ps!r} is not allowed; must be "
                             f"at least one frame interval ({self.frame_interval_ps!r} ps)")
        if self.frame_interval_ps * 1000.0 < self.timestep_fs:
            raise ValueError(f"frame_interval_ps: {self.frame_interval_ps!r} is not allowed; "
                             f"must be at least one time step ({self.timestep_fs!r} fs)")
        ladder = tuple(check_float(f"replica_temperatures[{k}]", t, positive=True)
                       for k, t in enumerate(self.replica_temperatures))
        object.__setattr__(self, "replica_temperatures", ladder)
        if ladder:
            self._check_ladder(ladder)

    def _check_ladder(self, ladder: tuple[float, ...]) -> None:
        if len(ladder) < 2:
            raise ValueError(f"replica_temperatures: {ladder!r} is not allowed; a ladder needs "
                             "at least two rungs (leave it empty for plain MD)")
        if any(b <= a for a, b in zip(ladder, ladder[1:], strict=False)):
            raise ValueError(f"replica_temperatures: {ladder!r} is not allowed; the rungs must "
                             "be strictly ascending (K)")
        if not math.isclose(ladder[0], self.temperature, rel_tol=0.0, abs_tol=1e-6):
            raise ValueError(f"replica_temperatures: {ladder!r} is not allowed; the lowest rung "
                             f"must be the target temperature ({self.temperature!r} K)")
        for name, value in (("frame_interval_ps", self.frame_interval_ps),
                            ("exchange_interval_ps", self.exchange_interval_ps)):
            steps = value * 1000.0 / self.timestep_fs
            if abs(steps - round(steps)) > 1e-6 * steps:
                raise ValueError(f"{name}: {value!r} is not allowed with replica_temperatures; "
                                 f"must be a whole number of time steps ({self.timestep_fs!r} "
                                 "fs)")
        short, long = sorted((self.steps_per_frame, self.steps_per_exchange))
        if long % short:
            raise ValueError(f"exchange_interval_ps: {self.exchange_interval_ps!r} is not "
                             f"allowed with frame_interval_ps {self.frame_interval_ps!r}; the "
                             "shorter of the two must divide the longer")

    @property
    def steps_per_frame(self) -> int:
        return max(1, round(self.frame_interval_ps * 1000.0 / self.timestep_fs))

    @property
    def steps_per_exchange(self) -> int:
        return max(1, round(self.exchange_interval_ps * 1000.0 / self.timestep_fs))

    @property
    def n_frames(self) -> int:
        # The tolerance keeps 20 ps / 0.1 ps at 200 frames despite binary rounding.
        return int(math.floor(self.production_ps / self.frame_interval_ps + 1e-9))

    @property
    def equilibration_steps(self) -> int:
        return round(self.equilibration_ps * 1000.0 / self.timestep_fs)


@dataclass
class ReplicaExchangeStats:
    """What a replica-exchange run did besides its frames.

    ``temperatures`` (K,) the ladder (K); ``target_walker`` (F,) for each production frame the
    replica (walker, numbered by the rung it started production at) that was at the target
    temperature T_0; ``attempts`` and ``accepted`` (K − 1,) exchange attempts and accepted
    swaps between rungs k and k + 1; ``round_trips`` (K,) per walker, the completed trips
    T_0 -> T_{K-1} -> T_0 (walker 0 starts at T_0; the others count from their first visit of
    T_0).
    """

    temperatures: np.ndarray
    target_walker: np.ndarray
    attempts: np.ndarray
    accepted: np.ndarray
    round_trips: np.ndarray

    @property
    def acceptance(self) -> np.ndarray:
        """Accepted fraction of the attempts per neighbour pair, (K − 1,); NaN without one."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.attempts > 0, self.accepted / np.maximum(self.attempts, 1),
                            np.nan)

    def arrays(self) -> dict[str, np.ndarray]:
        """The entries of ``frames.npz`` that hold these statistics."""
        return {"replica_temperatures_k": self.temperatures, "target_walker": self.target_walker,
                "exchange_attempts": self.attempts, "exchange_accepted": self.accepted,
                "round_trips": self.round_trips}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ReplicaExchangeStats | None:
        if "replica_temperatures_k" not in arrays:
            return None
        return cls(arrays["replica_temperatures_k"], arrays["target_walker"],
                   arrays["exchange_attempts"], arrays["exchange_accepted"],
                   arrays["round_trips"])


@dataclass
class MDFrames:
    """What :func:`run_md` returns: positions (F, n, 3) nm, U (F,) kJ/mol, times (F,) ps (from
    the start of production), and the exchange statistics of a replica-exchange run."""

    positions: np.ndarray
    potential_kj_per_mol: np.ndarray
    time_ps: np.ndarray
    replica_exchange: ReplicaExchangeStats | None = None


@dataclass
class MDTrajectory:
    """Production frames of one run: flow coordinates (F, dim), U (F,) kJ/mol, times (ps);
    ``replica_exchange``: the exchange statistics when the protocol has a ladder."""

    flow_coordinates: np.ndarray
    potential_kj_per_mol: np.ndarray
    time_ps: np.ndarray
    protocol: MDProtocol
    path: str
    seconds: float  # wall-clock seconds of the run that produced the entry (0 if unknown)
    reused: bool  # True when the entry was already in the cache
    replica_exchange: ReplicaExchangeStats | None = None


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
    """sha256 of the system's kind and parameters and the protocol (16 hex digits). The
    replica-exchange fields count only when the protocol has a ladder, so that a plain-MD
    protocol keeps the key it had before they existed (and its cache entry)."""
    fields = asdict(protocol)
    if not protocol.replica_temperatures:
        del fields["replica_temperatures"], fields["exchange_interval_ps"]
    text = json.dumps({"system": system.kind, "parameters": system.parameters(),
                       "protocol": fields}, sort_keys=True)
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
        frames = run_md(system, protocol, threads, platform)
        seconds = time.perf_counter() - start
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            _write(system, staging, frames, protocol, seconds)
            os.replace(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return _load(entry, protocol, reused=False)


class _Rung:
    """One OpenMM Context with its LangevinMiddleIntegrator at ``temperature`` (K). Stepping
    and energies raise RuntimeError naming the temperature and the time (ps since the end of
    the minimisation) when the run blows up: an OpenMM exception (e.g. "Particle coordinate is
    NaN") or a non-finite potential energy."""

    def __init__(self, omm_system: Any, protocol: MDProtocol, temperature: float, seed: int,
                 threads: int, platform: str) -> None:
        import openmm
        from openmm import unit

        self.temperature, self.seed, self.timestep_fs = temperature, seed, protocol.timestep_fs
        self.integrator = openmm.LangevinMiddleIntegrator(
            temperature * unit.kelvin, protocol.friction_per_ps / unit.picosecond,
            protocol.timestep_fs * unit.femtosecond)
        self.integrator.setRandomNumberSeed(seed)  # OpenMM: 0 means "pick at random"
        properties = {"Threads": str(threads)} if platform == "CPU" else {}
        self.context = openmm.Context(omm_system, self.integrator,
                                      openmm.Platform.getPlatformByName(platform), properties)
        self.steps = 0

    def _where(self, steps: int) -> str:
        return f"MD at {self.temperature:g} K blew up after {steps * self.timestep_fs / 1000:g} ps"

    def start(self, positions: Any, minimise: bool) -> None:
        """Set the positions (nm), minimise if asked, and draw velocities at the temperature."""
        import openmm
        from openmm import unit

        self.context.setPositions(positions)
        self.context.computeVirtualSites()
        if minimise:
            openmm.LocalEnergyMinimizer.minimize(self.context, 1.0, 2000)
        self.context.setVelocitiesToTemperature(self.temperature * unit.kelvin, self.seed)

    def step(self, n: int) -> None:
        import openmm

        try:
            self.integrator.step(n)
        except openmm.OpenMMException as error:
            raise RuntimeError(f"{self._where(self.steps + n)} at the latest: {error}") from None
        self.steps += n

    def state(self, **what: bool) -> tuple[Any, float]:
        """OpenMM's state with ``what`` and the energy, and U (kJ/mol), checked finite."""
        from openmm import unit

        state = self.context.getState(getEnergy=True, **what)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        if not math.isfinite(energy):
            raise RuntimeError(f"{self._where(self.steps)}: the potential energy is {energy}")
        return state, energy

    def equilibrate(self, steps: int) -> None:
        chunk = max(1, min(steps, 10_000))
        for done in range(0, steps, chunk):
            self.step(min(chunk, steps - done))
            self.state()


def run_md(system: Any, protocol: MDProtocol, threads: int = 1, platform: str = "CPU"
           ) -> MDFrames:
    """Minimise, equilibrate and produce: positions (F, n, 3) nm, U (F,) kJ/mol, t (F,) ps, by
    plain MD or, when the protocol has a ladder, by replica exchange (module docstring).

    RuntimeError (naming the rung's temperature and the time) if the potential energy of any
    rung stops being finite or OpenMM gives up: a blown-up run never reaches the cache.
    """
    start = system.openmm_positions(system.ideal_coordinates()[None])[0]
    if protocol.replica_temperatures:
        return _replica_exchange(system.openmm_system(), start, protocol, threads, platform)
    from openmm import unit

    rung = _Rung(system.openmm_system(), protocol, protocol.temperature, protocol.seed + 1,
                 threads, platform)
    rung.start(start, minimise=True)
    rung.equilibrate(protocol.equilibration_steps)
    frames, energies, times = [], [], []
    for i in range(protocol.n_frames):
        rung.step(protocol.steps_per_frame)
        state, energy = rung.state(getPositions=True)
        frames.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        energies.append(energy)
        times.append((i + 1) * protocol.steps_per_frame * protocol.timestep_fs / 1000.0)
    return MDFrames(np.array(frames), np.array(energies), np.array(times))


def _replica_exchange(omm_system: Any, start: Any, protocol: MDProtocol, threads: int,
                      platform: str) -> MDFrames:
    """Replica exchange over ``protocol.replica_temperatures`` (module docstring). Seeds: the
    protocol's seed spawns one numpy SeedSequence per rung (its integrator's and velocities'
    seed) and one for the acceptance draws, so that a protocol gives the same run each time."""
    from openmm import unit

    ladder = np.array(protocol.replica_temperatures)
    n_rungs = len(ladder)
    streams = np.random.SeedSequence(protocol.seed).spawn(n_rungs + 1)
    rungs = [_Rung(omm_system, protocol, float(t), _openmm_seed(streams[k]), threads, platform)
             for k, t in enumerate(ladder)]
    rungs[0].start(start, minimise=True)
    minimised = rungs[0].context.getState(getPositions=True).getPositions(asNumpy=True)
    for k, rung in enumerate(rungs):
        if k:
            rung.start(minimised, minimise=False)
        rung.equilibrate(protocol.equilibration_steps)
    beta = 1.0 / (KB_KJ_PER_MOL_K * ladder)
    draws = np.random.default_rng(streams[n_rungs])
    walkers = _Walkers(n_rungs)
    attempts = np.zeros(n_rungs - 1, dtype=np.int64)
    accepted = np.zeros(n_rungs - 1, dtype=np.int64)
    tick = min(protocol.steps_per_frame, protocol.steps_per_exchange)
    frames, energies, times, target_walker = [], [], [], []
    for step in range(tick, protocol.n_frames * protocol.steps_per_frame + 1, tick):
        for rung in rungs:
            rung.step(tick)
        u = np.array([rung.state()[1] for rung in rungs])
        if step % protocol.steps_per_exchange == 0:
            for k in range(walkers.sweeps % 2, n_rungs - 1, 2):  # even pairs, then odd ones
                attempts[k] += 1
                log_p = (beta[k] - beta[k + 1]) * (u[k] - u[k + 1])
                if draws.random() < math.exp(min(0.0, log_p)):
                    _swap(rungs[k], rungs[k + 1])
                    u[[k, k + 1]] = u[[k + 1, k]]
                    accepted[k] += 1
                    walkers.swap(k)
            walkers.sweep_done()
        if step % protocol.steps_per_frame == 0:
            state, energy = rungs[0].state(getPositions=True)
            frames.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
            energies.append(energy)
            times.append(step * protocol.timestep_fs / 1000.0)
            target_walker.append(walkers.at[0])
    stats = ReplicaExchangeStats(ladder, np.array(target_walker, dtype=np.int64), attempts,
                                 accepted, walkers.round_trips)
    return MDFrames(np.array(frames), np.array(energies), np.array(times), stats)


def _openmm_seed(stream: np.random.SeedSequence) -> int:
    """A seed in 1 .. 2³¹ − 1 for OpenMM (which reads 0 as "pick one at random")."""
    return int(stream.generate_state(1)[0] % (2**31 - 1)) + 1


def _swap(lower: _Rung, upper: _Rung) -> None:
    """Exchange the configurations of two rungs: positions, and velocities rescaled by
    sqrt(T_new / T_old) so that each keeps the kinetic energy distribution of its rung."""
    a = lower.context.getState(getPositions=True, getVelocities=True)
    b = upper.context.getState(getPositions=True, getVelocities=True)
    ratio = math.sqrt(lower.temperature / upper.temperature)
    lower.context.setPositions(b.getPositions(asNumpy=True))
    lower.context.setVelocities(b.getVelocities(asNumpy=True) * ratio)
    upper.context.setPositions(a.getPositions(asNumpy=True))
    upper.context.setVelocities(a.getVelocities(asNumpy=True) / ratio)


class _Walkers:
    """Which walker is at which rung, and the round trips T_0 -> T_{K-1} -> T_0 per walker."""

    def __init__(self, n_rungs: int) -> None:
        self.at = np.arange(n_rungs)  # at[k]: the walker at rung k
        self.sweeps = 0
        self.round_trips = np.zeros(n_rungs, dtype=np.int64)
        # 0: not yet at T_0; 1: left T_0, heading up; 2: reached the top, heading down.
        self._leg = np.zeros(n_rungs, dtype=np.int64)
        self._leg[0] = 1

    def swap(self, k: int) -> None:
        self.at[[k, k + 1]] = self.at[[k + 1, k]]

    def sweep_done(self) -> None:
        self.sweeps += 1
        bottom, top = self.at[0], self.at[-1]
        if self._leg[bottom] == 2:
            self.round_trips[bottom] += 1
        self._leg[bottom] = 1
        if self._leg[top] == 1:
            self._leg[top] = 2


def _write(system: Any, directory: Path, frames: MDFrames, protocol: MDProtocol,
           seconds: float) -> None:
    import mdtraj

    xyz, times = frames.positions, frames.time_ps
    box = getattr(system, "box", None)  # periodic systems only (module docstring)
    cell = {} if box is None else {
        "unitcell_lengths": np.tile(np.array(box.edges), (len(xyz), 1)),
        "unitcell_angles": np.full((len(xyz), 3), 90.0)}
    trajectory = mdtraj.Trajectory(xyz, system.mdtraj_topology(), time=times, **cell)
    trajectory.save_dcd(str(directory / "frames.dcd"))
    trajectory[0].save_pdb(str(directory / "topology.pdb"))
    exchange = frames.replica_exchange.arrays() if frames.replica_exchange else {}
    np.savez(directory / "frames.npz", potential_kj_per_mol=frames.potential_kj_per_mol,
             time_ps=times, flow_coordinates=system.from_cartesian(xyz), **exchange)
    (directory / "protocol.json").write_text(json.dumps(
        {"protocol": asdict(protocol), "system": system.kind, "parameters": system.parameters(),
         "seconds": seconds}, indent=2, sort_keys=True))


def _load(entry: Path, protocol: MDProtocol, reused: bool) -> MDTrajectory:
    with np.load(entry / "frames.npz") as data:
        arrays = {k: data[k] for k in data.files}
    seconds = json.loads((entry / "protocol.json").read_text()).get("seconds", 0.0)
    return MDTrajectory(arrays["flow_coordinates"], arrays["potential_kj_per_mol"],
                        arrays["time_ps"], protocol, str(entry), float(seconds), reused,
                        ReplicaExchangeStats.from_arrays(arrays))

"""Ice XI in TIP4P-Ew water: the rigid-body flows paper's molecular crystal (docs/architecture.md,
Ice XI and rigid bodies).

Crystal: GenIce2's lattice ``"XI"`` (the antiferroelectric candidate the paper used; ``"11i"``
is the ferroelectric Cmc2₁ structure), 16 molecules per orthorhombic cell, ``rep = (n, n, n)``,
so N = 16 n³ molecules. Water: OpenMM's ``tip4pew.xml``, rigid, PME with Ewald error tolerance
1e-4, cutoff r_c = min(1 nm, shortest box edge / 2 − 1e-5 nm) unless given, Lennard-Jones
switched from 0.9 r_c, long-range dispersion correction, fixed box (NVT).

Flow coordinates (``RigidLayout(N, box, pinned_positions=(0,))``), per sample:
[oxygen positions (N, 3) nm] + [unit quaternions (N, 4)], with the gauge fixed by translating
every configuration so that molecule 0's oxygen is at the origin and wrapping each molecule
*whole* (by its oxygen) into [0, L). Molecule 0's position is pinned: no flow moves it, so no
log-det term counts a direction the data cannot move (docs/architecture.md, Ice XI and rigid
bodies: such phantom directions
bias ΔF by about 1.4 kT). Hydrogens sit at O + R(q) s_H of the TIP4P-Ew template; OpenMM
places the M site (``computeVirtualSites``) and returns its force distributed onto O, H1, H2.

Units: positions nm, energies kJ/mol, k_B in kJ/mol/K. Only free-energy *differences between
temperatures* are meaningful here (the base is the crystal at another temperature); the
constant Jacobian between Cartesian rigid-body volume and (position, Haar) cancels in them
(:mod:`boltzgen.rigid.bodies`), and so does the volume of the translation that the gauge
removes.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, ClassVar

import numpy as np
import torch

from boltzgen._checks import check_float, check_int
from boltzgen.observables import PairHistograms, pair_histograms, pairs_between_molecules
from boltzgen.openmm_bridge import BatchEnergy, LocalOpenMMPotential
from boltzgen.rigid.bodies import WATER_TIP4P_EW, PeriodicBox, RigidLayout, RigidTemplate
from boltzgen.rigid.symmetry import CrystalSymmetry, apply_crystal_symmetry, find_crystal_symmetries
from boltzgen.systems.base import System
from boltzgen.units import KB_KJ_PER_MOL_K

MOLECULES_PER_CELL = 16
LATTICES = ("XI", "11i")
SITES_PER_MOLECULE = 4  # O, H1, H2, M (a virtual site)
WATER_OHH = RigidTemplate("water_ohh", WATER_TIP4P_EW.sites[:3], WATER_TIP4P_EW.site_names[:3])
"""The three real atoms of TIP4P-Ew water (the rigid template the flow coordinates use)."""


def cells_per_edge(molecules: int) -> int:
    """n with 16 n³ = ``molecules``; ValueError naming ``molecules`` otherwise."""
    n = round((molecules / MOLECULES_PER_CELL) ** (1.0 / 3.0))
    if n < 1 or MOLECULES_PER_CELL * n**3 != molecules:
        allowed = ", ".join(str(MOLECULES_PER_CELL * k**3) for k in range(1, 5))
        raise ValueError(f"molecules: {molecules!r} does not tile the ice XI lattice; allowed: "
                         f"16 n³ ({allowed}, ...)")
    return n


@functools.lru_cache(maxsize=8)
def ideal_crystal(lattice: str, n: int) -> tuple[tuple[float, float, float], np.ndarray,
                                                 np.ndarray]:
    """GenIce2 crystal rep (n, n, n): box edges (nm), oxygen positions (N, 3), quaternions (N, 4).

    GenIce writes O, H, H, M with three decimals (Gromacs format); the rigid TIP4P-Ew template
    is fitted to each molecule's O, H, H (Kabsch), so the returned molecules are exactly rigid.
    """
    from genice2.genice import GenIce
    from genice2.plugin import Format, Lattice, Molecule

    # GenIce2 logs deprecation notes of its own internals as warnings; they say nothing about
    # this crystal, so they are muted while it runs.
    loggers = [logging.getLogger(), logging.getLogger("genice_core")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        text = GenIce(Lattice(lattice), reshape=np.diag([n, n, n])).generate_ice(
            Format("gromacs"), water=Molecule("tip4p"))
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    lines = text.splitlines()
    n_atoms = int(lines[1])
    atoms = lines[2 : 2 + n_atoms]
    box = tuple(float(v) for v in lines[2 + n_atoms].split()[:3])
    xyz = np.array([[float(a[20:28]), float(a[28:36]), float(a[36:44])] for a in atoms])
    names = [a[10:15].strip() for a in atoms]
    if names[:4] != ["OW", "HW1", "HW2", "MW"] or n_atoms % 4:
        raise RuntimeError(f"GenIce output has an unexpected layout: {names[:4]}")
    per_molecule = xyz.reshape(-1, 4, 3)[:, :3]
    edges = np.array(box)
    # Molecules may straddle the box edge in GenIce's output: unwrap H by the minimum image.
    per_molecule[:, 1:] -= edges * np.round((per_molecule[:, 1:] - per_molecule[:, :1]) / edges)
    positions, quaternions = WATER_OHH.from_sites(torch.as_tensor(per_molecule))
    return box, positions.numpy(), quaternions.numpy()


class IceXI(LocalOpenMMPotential, System):
    """Ice XI crystal of ``molecules`` rigid TIP4P-Ew waters in its fixed orthorhombic box.

    Args:
        molecules: N = 16 n³ (16, 128, 432, ...).
        lattice: GenIce2 lattice name, ``"XI"`` (default, the paper's) or ``"11i"``.
        cutoff: nonbonded cutoff (nm); default min(1, shortest edge / 2 − 1e-5). PME needs
            r_c < shortest edge / 2.
        ewald_error_tolerance: OpenMM's PME accuracy parameter.
    """

    kind: ClassVar[str] = "ice_xi"
    estimand_note: ClassVar[str] = (
        "ice XI, flow coordinates = oxygen positions (nm; molecule 0 at the origin) and unit "
        "quaternions; only differences between temperatures are defined (Cartesian and "
        "(position, Haar) volumes differ by a constant that cancels)"
    )
    potential_runs_openmm: ClassVar[bool] = True
    boltzmann_constant: float = KB_KJ_PER_MOL_K

    def __init__(self, *, molecules: int = 16, lattice: str = "XI", cutoff: float | None = None,
                 ewald_error_tolerance: float = 1e-4) -> None:
        self.molecules = check_int("molecules", molecules, minimum=1)
        self._cells = cells_per_edge(self.molecules)
        if lattice not in LATTICES:
            raise ValueError(f"lattice: {lattice!r} is not allowed; choose one of "
                             f"{', '.join(LATTICES)}")
        self.lattice = lattice
        self.ewald_error_tolerance = check_float("ewald_error_tolerance", ewald_error_tolerance,
                                                 positive=True)
        box, positions, quaternions = ideal_crystal(lattice, self._cells)
        self.box = PeriodicBox(box)
        largest = min(box) / 2.0 - 1e-5
        if cutoff is None:
            self._cutoff = min(1.0, largest)
        else:
            value = check_float("cutoff", cutoff, positive=True)
            if value > largest:
                raise ValueError(f"cutoff: {value!r} nm is not allowed; this box (shortest edge "
                                 f"{min(box):.5f} nm) holds at most {largest:.5f} nm")
            self._cutoff = value
        self.cutoff = cutoff
        self.dim = 7 * self.molecules
        self._ideal = self.from_cartesian(_sites_of(positions, quaternions)[None])[0]
        self._evaluator: Any = None
        self._platform = "CPU"
        self._lock = threading.Lock()

    # -- geometry ---------------------------------------------------------------------------
    @property
    def cutoff_nm(self) -> float:
        """The cutoff in use (nm)."""
        return self._cutoff

    @property
    def molecule_count(self) -> int:
        return self.molecules

    def layout(self) -> RigidLayout:
        return RigidLayout(self.molecules, self.box, pinned_positions=(0,))

    def ideal_coordinates(self) -> np.ndarray:
        """Flow coordinates (dim,) of the GenIce crystal (molecule 0 at the origin)."""
        return self._ideal.copy()

    def to_cartesian(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Flow coordinates (B, dim) -> O, H1, H2, M positions (B, 4N, 3) nm (differentiable)."""
        x = torch.as_tensor(x)
        positions, quaternions = self.layout().split(x)
        sites = WATER_TIP4P_EW.to_sites(positions, quaternions)  # (B, N, 4, 3)
        return sites.reshape(*sites.shape[:-3], SITES_PER_MOLECULE * self.molecules, 3)

    def from_cartesian(self, xyz: np.ndarray | torch.Tensor) -> np.ndarray:
        """O, H1, H2[, M] positions (B, 3N or 4N, 3) nm -> flow coordinates (B, dim).

        Each molecule is unwrapped around its oxygen (minimum image), fitted by the rigid
        template (exact for rigid input), translated so that molecule 0's oxygen is at the
        origin and wrapped whole into [0, L) by its oxygen.
        """
        xyz = torch.as_tensor(np.asarray(xyz, dtype=np.float64))
        per = 4 if xyz.shape[-2] == 4 * self.molecules else 3
        if xyz.ndim != 3 or xyz.shape[-2] != per * self.molecules:
            raise ValueError(f"xyz: shape {tuple(xyz.shape)} is not allowed; need (B, "
                             f"{3 * self.molecules} or {4 * self.molecules}, 3)")
        atoms = xyz.reshape(xyz.shape[0], self.molecules, per, 3)[:, :, :3]
        edges = self.box.tensor(xyz)
        hydrogens = atoms[:, :, 1:] - edges * torch.round(
            (atoms[:, :, 1:] - atoms[:, :, :1]) / edges)
        atoms = torch.cat([atoms[:, :, :1], hydrogens], dim=2)
        position, quaternion = WATER_OHH.from_sites(atoms)
        # The fitted position is the template origin (the oxygen), not the centroid.
        position = self.box.wrap(position - position[:, :1])
        position[:, 0] = 0.0
        return self.layout().join(position, quaternion).numpy()

    @functools.cached_property
    def crystal_symmetries(self) -> list[CrystalSymmetry]:
        """The space-group operations of the ideal crystal in this box, identity first: 8 for
        N16 (the four rotations of point group 222, each with two translations), 64 for N128
        (eight times as many lattice translations fit in the larger box).
        The match tolerance (0.01 nm) is well above GenIce's three-decimal rounding (the
        largest mismatch found is about 0.002 nm) and far below the O–O distance (0.27 nm)."""
        sites = self.to_cartesian(torch.as_tensor(self._ideal[None])).numpy()
        sites = sites.reshape(self.molecules, SITES_PER_MOLECULE, 3)[:, :3]
        # Water is planar, so a mirror image of a molecule is a rigid motion of it: improper
        # operations are allowed. Hydrogens are identical: H1 and H2 may trade places.
        return find_crystal_symmetries(sites, self.box.edges, ((0, 1, 2), (0, 2, 1)),
                                       tolerance_nm=0.01, allow_improper=True)

    @property
    def symmetry_operation_count(self) -> int:
        return len(self.crystal_symmetries)

    def symmetry_images(self, x: np.ndarray, operations: np.ndarray | None = None) -> np.ndarray:
        """Flow coordinates (B, dim) moved by space-group operations (:mod:`boltzgen.rigid.
        symmetry`), re-pinned at the new molecule 0 and wrapped: row b by ``operations[b]``
        (ints in [0, G)), or without ``operations`` every image, (G B, dim) with image g of
        sample b at row g B + b. Energies are unchanged (up to the PME grid's discretisation,
        which is not translation invariant to round-off)."""
        arr = self._as_samples(x)
        ops = self.crystal_symmetries
        if operations is None:
            chosen = np.repeat(np.arange(len(ops)), len(arr))
            arr = np.tile(arr, (len(ops), 1))
        else:
            chosen = np.asarray(operations)
            if chosen.shape != (len(arr),) or chosen.min(initial=0) < 0 or chosen.max(
                    initial=0) >= len(ops):
                raise ValueError(f"operations: shape {chosen.shape} with values in "
                                 f"[{chosen.min(initial=0)}, {chosen.max(initial=0)}] is not "
                                 f"allowed; need ({len(arr)},) ints in [0, {len(ops)})")
        atoms = self.to_cartesian(torch.as_tensor(arr)).numpy()
        atoms = atoms.reshape(len(arr), self.molecules, SITES_PER_MOLECULE, 3)[:, :, :3]
        for g in np.unique(chosen):
            rows = chosen == g
            atoms[rows] = apply_crystal_symmetry(ops[g], atoms[rows])
        return self.from_cartesian(atoms.reshape(len(arr), 3 * self.molecules, 3))

    # -- energy ---------------------------------------------------------------------------
    def openmm_system(self) -> Any:
        """The OpenMM System (TIP4P-Ew, PME, switching, dispersion correction, rigid water)."""
        import openmm
        from openmm import app, unit

        topology = app.Topology()
        chain = topology.addChain()
        oxygen, hydrogen = app.Element.getBySymbol("O"), app.Element.getBySymbol("H")
        for _ in range(self.molecules):
            residue = topology.addResidue("HOH", chain)
            o = topology.addAtom("O", oxygen, residue)
            h1 = topology.addAtom("H1", hydrogen, residue)
            h2 = topology.addAtom("H2", hydrogen, residue)
            topology.addAtom("M", None, residue)
            topology.addBond(o, h1)
            topology.addBond(o, h2)
        topology.setPeriodicBoxVectors(_box_vectors(self.box.edges) * unit.nanometer)
        forcefield = app.ForceField("tip4pew.xml")
        system = forcefield.createSystem(
            topology, nonbondedMethod=app.PME, nonbondedCutoff=self._cutoff * unit.nanometer,
            rigidWater=True, ewaldErrorTolerance=self.ewald_error_tolerance,
            switchDistance=0.9 * self._cutoff * unit.nanometer,
            useDispersionCorrection=True, removeCMMotion=True)
        for force in system.getForces():
            if isinstance(force, openmm.NonbondedForce):
                if not force.getUseSwitchingFunction():
                    raise RuntimeError("OpenMM ignored switchDistance for the NonbondedForce")
        return system

    def mdtraj_topology(self) -> Any:
        """An mdtraj Topology of the crystal (for trajectories and RDFs)."""
        import mdtraj

        top = mdtraj.Topology()
        chain = top.add_chain()
        for _ in range(self.molecules):
            residue = top.add_residue("HOH", chain)
            o = top.add_atom("O", mdtraj.element.oxygen, residue)
            h1 = top.add_atom("H1", mdtraj.element.hydrogen, residue)
            h2 = top.add_atom("H2", mdtraj.element.hydrogen, residue)
            top.add_atom("M", mdtraj.element.virtual, residue)
            top.add_bond(o, h1)
            top.add_bond(o, h2)
        return top

    def openmm_positions(self, x: np.ndarray) -> np.ndarray:
        """Flow coordinates (B, dim) -> (B, 4N, 3) nm for OpenMM."""
        return self.to_cartesian(torch.as_tensor(np.array(x, dtype=np.float64))).numpy()

    def flow_gradient(self, forces: np.ndarray, x: np.ndarray) -> np.ndarray:
        """∇U in flow coordinates (B, dim) from OpenMM forces (B, 4N, 3) kJ/mol/nm at ``x``.

        OpenMM has already moved the M sites' forces onto O, H1, H2; the chain rule runs through
        x -> sites (the quaternion part is the ambient R⁴ gradient).
        """
        # Also called inside autograd Functions' forward (grad mode off there).
        with torch.enable_grad():
            xt = torch.as_tensor(np.array(x, dtype=np.float64)).requires_grad_(True)
            sites = self.to_cartesian(xt)
            (grad,) = torch.autograd.grad(sites, xt, grad_outputs=-torch.as_tensor(forces))
        return grad.numpy()



    def potential(self, x: torch.Tensor) -> torch.Tensor:
        """U(x) in kJ/mol from OpenMM (in this process, on the platform of
        :meth:`set_openmm_platform`); (..., dim) -> (...).

        Differentiable: the gradient comes from OpenMM's forces through
        :class:`boltzgen.openmm_bridge.BatchEnergy`, then autograd through the sites.
        Non-finite inputs give NaN energies, never finite-looking numbers.
        """
        self._check_coordinates(x)
        flat = x.reshape(-1, self.dim)
        sites = self.to_cartesian(flat)
        energy = BatchEnergy.apply(sites, self._local_evaluator().energies_and_gradients)
        return energy.reshape(x.shape[:-1])

    def observables(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Oxygen displacement from the ideal site (nm) per axis, pooled over molecules."""
        arr = self._as_samples(x)
        layout = self.layout()
        positions, _ = layout.split(torch.as_tensor(np.array(arr)))
        ideal, _ = layout.split(torch.as_tensor(self._ideal))
        edges = self.box.tensor(positions)
        delta = positions - ideal
        delta = (delta - edges * torch.round(delta / edges))[:, 1:].reshape(-1, 3).numpy()
        return {f"oxygen_displacement_{a}_nm": delta[:, i].copy() for i, a in enumerate("xyz")}

    def pair_histograms(self, x: np.ndarray, n_bins: int = 60) -> dict[str, PairHistograms]:
        """Intermolecular O–O and O–H pair-distance histograms of flow coordinates (B, dim),
        per frame: {"O-O": ..., "O-H": ...}, r up to half the shortest box edge (the
        minimum-image limit); weighted g(r) and its error follow from them. See
        :mod:`boltzgen.observables`."""
        xyz = self.openmm_positions(self._as_samples(x))
        topology = self.mdtraj_topology()
        r_max = min(self.box.edges) / 2.0
        return {f"{a}-{b}": pair_histograms(xyz, topology, self.box.edges,
                                            pairs_between_molecules(topology, a, b), r_max,
                                            n_bins)
                for a, b in (("O", "O"), ("O", "H"))}



def _sites_of(positions: np.ndarray, quaternions: np.ndarray) -> np.ndarray:
    sites = WATER_TIP4P_EW.to_sites(torch.as_tensor(positions), torch.as_tensor(quaternions))
    return sites.reshape(-1, 3).numpy()


def _box_vectors(edges: tuple[float, float, float]) -> Any:
    from openmm import Vec3

    a, b, c = edges
    return (Vec3(a, 0, 0), Vec3(0, b, 0), Vec3(0, 0, c))


__all__ = ["IceXI", "cells_per_edge", "ideal_crystal"]

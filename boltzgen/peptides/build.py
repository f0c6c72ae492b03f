"""Build capped single residues (ACE-X-NME) and dipeptides with free termini (X-Y) from a
sequence, without network access.

The start is the alanine dipeptide (ACE-ALA-NME, L-alanine, φ = ψ = 180°) that ships with
openmmtools. Its heavy atoms are renamed and pruned into the requested residues:

- ACE-X-NME: the caps' heavy atoms stay; X keeps the alanine's N, CA, C, O (and CB unless X
  is GLY).
- X-Y: X is the alanine (N, CA, C, O, CB unless GLY); Y is a copy of it moved one residue
  along the chain, by the rigid motion that takes the ACE-ALA peptide unit onto the ALA-NME
  unit. Both residues thus start as complete L backbones: PDBFixer places missing atoms by
  overlaying its templates on the atoms present, and on three atoms (as a cap's CH3, C, O
  would give) that overlay can come out mirrored, a D residue.
- Every proline is turned to φ = −65° about its N-CA bond (the template's 180° leaves no room
  for the ring, and the minimiser then escapes the clash through a cis peptide bond).

Every hydrogen is dropped. PDBFixer then adds the missing heavy atoms (side chains, the
C-terminal OXT of Y) and the hydrogens at pH 7 (charged NH3+ and COO- termini, ASP/GLU
deprotonated, LYS/ARG protonated, HIS as OpenMM's Modeller picks it). The structure is
minimised in the force field on the Reference platform, deterministically, and validated
(bond graph, L residues, trans peptide bonds, finite energy, mdtraj's φ and ψ).

Units: positions nm, energies kJ/mol, temperatures K.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openmm
from openmm import app, unit

from boltzgen.peptides.forcefields import ForceFieldSpec, get_force_field
from boltzgen.peptides.geometry import (
    TRANS_MIN_ABS_OMEGA_DEG,
    dihedrals_deg,
    is_l_amino_acid,
    peptide_bonds_trans,
    rotated_about_axis,
)
from boltzgen.peptides.sequences import (
    AMINO_ACIDS,
    is_capped,
    parse_sequence,
    sequence_label,
)
from boltzgen.peptides.validation import PeptideBuildError, check_bond_graph

TEMPLATE_PATH = ("data", "alanine-dipeptide-gbsa", "alanine-dipeptide.pdb")
"""The alanine-dipeptide structure inside the openmmtools package."""

PH = 7.0
MINIMISER_TOLERANCE_KJ_PER_MOL_NM = 1.0
"""LocalEnergyMinimizer stops when the RMS force is below this, kJ/mol/nm."""
MINIMISER_ROUNDS = 5
"""At most this many minimiser runs, until the energy changes by < 1e-3 kJ/mol."""
PROLINE_PHI_DEG = -65.0
"""φ a proline starts from, degrees (its ring allows about −65° only)."""
SEED = 0
"""Seed of PDBFixer's placement of missing atoms (its integrator) and of the hydrogens' random
starting offsets, for reproducible builds."""

Quadruple = tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class Peptide:
    """A built, minimised and validated peptide.

    Attributes:
        sequence: three-letter codes, e.g. ("ACE", "ALA", "NME") or ("ALA", "TYR").
        force_field: key of FORCE_FIELDS.
        topology: OpenMM Topology (atoms in this order everywhere).
        positions_nm: (n, 3) float64 minimised positions, nm (read-only).
        system: the force field's OpenMM System (physical forces only; pickles).
        minimised_energy_kj_per_mol: potential energy at ``positions_nm``, kJ/mol.
        atom_names, elements: per atom, PDB name and element symbol.
        residue_indices: per atom, its residue's 0-based index.
        residue_names: per residue, its name in the topology (HIS whatever its protonation).
        bonds: (i, j) atom pairs, i < j, sorted.
        phi_atoms, psi_atoms: the molecule's one φ (C, N, CA, C) and one ψ (N, CA, C, N), as
            mdtraj's compute_phi / compute_psi give them: of X for ACE-X-NME; the φ of Y and
            the ψ of X for X-Y.
        chiral_centers: (CA, N, C, CB) of every non-glycine amino acid.
        omega_atoms: (CA, C, N, CA) of every peptide bond; a cap's methyl carbon stands in for
            CA (CH3 of ACE, C of NME).
    """

    sequence: tuple[str, ...]
    force_field: str
    topology: app.Topology
    positions_nm: np.ndarray
    system: openmm.System
    minimised_energy_kj_per_mol: float
    atom_names: tuple[str, ...]
    elements: tuple[str, ...]
    residue_indices: tuple[int, ...]
    residue_names: tuple[str, ...]
    bonds: tuple[tuple[int, int], ...]
    phi_atoms: Quadruple
    psi_atoms: Quadruple
    chiral_centers: tuple[Quadruple, ...]
    omega_atoms: tuple[Quadruple, ...]

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return len(self.atom_names)

    @property
    def label(self) -> str:
        """The sequence as written, e.g. "ACE-ALA-NME"."""
        return sequence_label(self.sequence)

    def mdtraj_topology(self) -> Any:
        """The topology as an ``mdtraj.Topology``."""
        import mdtraj

        return mdtraj.Topology.from_openmm(self.topology)


# ----------------------------------------------------------------------------- structure


def _atom_index(topology: app.Topology) -> dict[tuple[int, str], int]:
    """(residue index, atom name) -> atom index."""
    return {(atom.residue.index, atom.name): atom.index for atom in topology.atoms()}


def template_pdb_path() -> Path:
    """Path of openmmtools' alanine-dipeptide PDB, found without importing openmmtools."""
    spec = importlib.util.find_spec("openmmtools")
    if spec is None or not spec.submodule_search_locations:
        raise PeptideBuildError("template: openmmtools is not installed; the builder starts "
                                "from the alanine dipeptide it ships")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*TEMPLATE_PATH)


def _kept_heavy_atoms(code: str) -> dict[str, str]:
    """{new name: template ALA name} of the template alanine's atoms residue ``code`` keeps."""
    names = ("N", "CA", "C", "O") if code == "GLY" else ("N", "CA", "C", "O", "CB")
    return {name: name for name in names}


def _residue_plan(sequence: tuple[str, ...]) -> list[tuple[str, int, dict[str, str], bool]]:
    """Per residue of the starting structure: (name, template residue index, {new atom name:
    template atom name}, whether the atoms are moved one residue along the chain).

    Template residues: 0 ACE, 1 ALA, 2 NME (whose methyl carbon is "C"). A moved copy of the
    alanine is the residue after it, placed by :func:`_next_residue_transform`.
    """
    if is_capped(sequence):
        return [("ACE", 0, {"CH3": "CH3", "C": "C", "O": "O"}, False),
                (sequence[1], 1, _kept_heavy_atoms(sequence[1]), False),
                ("NME", 2, {"N": "N", "C": "C"}, False)]
    first, second = sequence
    return [(first, 1, _kept_heavy_atoms(first), False),
            (second, 1, _kept_heavy_atoms(second), True)]


def _rigid_fit(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Proper rotation R (3, 3) and shift s (3,) with x R^T + s ≈ target for x in source,
    least squares (Kabsch; the determinant correction excludes a mirror image)."""
    source_center, target_center = source.mean(axis=0), target.mean(axis=0)
    u, _, vt = np.linalg.svd((source - source_center).T @ (target - target_center))
    sign = np.sign(np.linalg.det(vt.T @ u.T))
    rotation = vt.T @ np.diag([1.0, 1.0, sign]) @ u.T
    return rotation, target_center - rotation @ source_center


def _next_residue_transform(index: dict[tuple[int, str], int],
                            positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rigid motion that takes the ACE-ALA peptide unit (CH3, C, O of ACE; N of ALA) onto
    the ALA-NME unit (CA, C, O of ALA; N of NME): applied to the alanine it gives an L residue
    bonded to the alanine's C, with the alanine's own φ and ψ."""
    source = [(0, "CH3"), (0, "C"), (0, "O"), (1, "N")]
    target = [(1, "CA"), (1, "C"), (1, "O"), (2, "N")]
    return _rigid_fit(positions[[index[key] for key in source]],
                      positions[[index[key] for key in target]])


def _with_proline_phi(topology: app.Topology, positions: np.ndarray) -> np.ndarray:
    """Positions with φ of every proline after another residue set to PROLINE_PHI_DEG, by
    turning the residues before it about its N-CA bond (the template's φ = 180° leaves no room
    for the pyrrolidine ring)."""
    index = _atom_index(topology)
    out = positions.copy()
    for residue in topology.residues():
        r = residue.index
        if residue.name != "PRO" or r == 0:
            continue
        phi = (index[(r - 1, "C")], index[(r, "N")], index[(r, "CA")], index[(r, "C")])
        current = dihedrals_deg(out[None], [phi])[0, 0]
        before = [atom.index for atom in topology.atoms() if atom.residue.index < r]
        n, ca = out[phi[1]], out[phi[2]]
        # Looking down N -> CA a right-handed turn by θ lowers the dihedral by θ.
        out[before] = rotated_about_axis(out[before], n, ca - n,
                                         math.radians(current - PROLINE_PHI_DEG))
    return out


def _starting_structure(sequence: tuple[str, ...]) -> tuple[app.Topology, np.ndarray]:
    """Topology and (k, 3) positions (nm) of the template's kept heavy atoms, renamed (and
    moved) into ``sequence``; prolines get φ = PROLINE_PHI_DEG."""
    template = app.PDBFile(str(template_pdb_path()))
    positions = np.asarray(template.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    atoms = list(template.topology.atoms())
    index = _atom_index(template.topology)
    rotation, shift = _next_residue_transform(index, positions)
    topology = app.Topology()
    chain = topology.addChain("A")
    kept: list[np.ndarray] = []
    for number, (name, source, atom_map, moved) in enumerate(_residue_plan(sequence), start=1):
        residue = topology.addResidue(name, chain, id=str(number))
        for new_name, old_name in atom_map.items():
            atom = atoms[index[(source, old_name)]]
            topology.addAtom(new_name, atom.element, residue)
            position = positions[atom.index]
            kept.append(rotation @ position + shift if moved else position)
    return topology, _with_proline_phi(topology, np.array(kept))


def _pdb_text(topology: app.Topology, positions_nm: np.ndarray) -> io.StringIO:
    text = io.StringIO()
    app.PDBFile.writeFile(topology, positions_nm * unit.nanometer, text)
    text.seek(0)
    return text


def _reference_platform() -> openmm.Platform:
    return openmm.Platform.getPlatformByName("Reference")


@contextlib.contextmanager
def _seeded_python_random(seed: int) -> Iterator[None]:
    """Python's global ``random`` seeded for the block and restored after it: OpenMM's
    Modeller.addHydrogens starts new hydrogens from ``random`` offsets, so without a seed the
    minimised structure differs from run to run."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def complete_structure(sequence: tuple[str, ...]) -> tuple[app.Topology, np.ndarray]:
    """Topology and (n, 3) positions (nm) of ``sequence`` (parsed), completed by PDBFixer:
    missing heavy atoms, terminal OXT, hydrogens at pH 7. Not minimised."""
    from pdbfixer import PDBFixer

    fixer = PDBFixer(pdbfile=_pdb_text(*_starting_structure(sequence)),
                     platform=_reference_platform())
    fixer.findMissingResidues()
    fixer.findMissingAtoms()
    fixer.addMissingAtoms(seed=SEED)
    with _seeded_python_random(SEED):
        fixer.addMissingHydrogens(pH=PH)
    positions = np.array(fixer.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    return fixer.topology, positions


def minimise(system: openmm.System, positions_nm: np.ndarray) -> tuple[np.ndarray, float]:
    """Minimised (n, 3) positions (nm) and potential energy (kJ/mol) of ``system``, on the
    Reference platform (deterministic): LocalEnergyMinimizer runs with RMS force tolerance
    MINIMISER_TOLERANCE_KJ_PER_MOL_NM, repeated (at most MINIMISER_ROUNDS) until the energy
    changes by < 1e-3 kJ/mol."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), _reference_platform())
    context.setPositions(positions_nm * unit.nanometer)
    tolerance = MINIMISER_TOLERANCE_KJ_PER_MOL_NM * unit.kilojoule_per_mole / unit.nanometer
    energy = math.inf
    for _ in range(MINIMISER_ROUNDS):
        openmm.LocalEnergyMinimizer.minimize(context, tolerance, 0)
        state = context.getState(getEnergy=True, getPositions=True)
        previous, energy = energy, state.getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole)
        if abs(previous - energy) < 1e-3:
            break
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return np.array(positions, dtype=np.float64), energy


# ----------------------------------------------------------------------------- atom indices


def _amino_acid_residues(topology: app.Topology) -> list[int]:
    return [r.index for r in topology.residues() if r.name in AMINO_ACIDS]


def _chiral_centers(topology: app.Topology) -> tuple[Quadruple, ...]:
    """(CA, N, C, CB) of every amino acid but glycine."""
    index = _atom_index(topology)
    return tuple(tuple(index[(r, name)] for name in ("CA", "N", "C", "CB"))
                 for r in _amino_acid_residues(topology) if (r, "CB") in index)


def _backbone_dihedrals(topology: app.Topology) -> tuple[list[Quadruple], list[Quadruple]]:
    """Every φ (C(i−1), N, CA, C) and ψ (N, CA, C, N(i+1)) of the amino acids, where the
    neighbouring residue (an amino acid or a cap) exists."""
    index = _atom_index(topology)
    phi, psi = [], []
    for r in _amino_acid_residues(topology):
        n, ca, c = index[(r, "N")], index[(r, "CA")], index[(r, "C")]
        if (r - 1, "C") in index:
            phi.append((index[(r - 1, "C")], n, ca, c))
        if (r + 1, "N") in index:
            psi.append((n, ca, c, index[(r + 1, "N")]))
    return phi, psi


def _alpha_carbon(atom: app.topology.Atom, neighbours: dict[int, list[Any]]) -> int:
    """CA of the atom's residue, or a cap's methyl carbon: the one carbon bonded to ``atom``
    in its residue."""
    for other in atom.residue.atoms():
        if other.name == "CA":
            return other.index
    carbons = [o.index for o in neighbours[atom.index]
               if o.residue is atom.residue and o.element.symbol == "C"]
    if len(carbons) != 1:
        raise PeptideBuildError(f"omega: residue {atom.residue.index} ({atom.residue.name}) "
                                f"has no CA and {len(carbons)} carbons bonded to {atom.name}")
    return carbons[0]


def _omega_atoms(topology: app.Topology) -> tuple[Quadruple, ...]:
    """(CA, C, N, CA) of every inter-residue C-N bond, in chain order."""
    neighbours: dict[int, list[Any]] = {atom.index: [] for atom in topology.atoms()}
    links = []
    for a, b in topology.bonds():
        neighbours[a.index].append(b)
        neighbours[b.index].append(a)
        if a.residue is not b.residue:
            links.append((a, b) if a.residue.index < b.residue.index else (b, a))
    return tuple(
        (_alpha_carbon(c, neighbours), c.index, n.index, _alpha_carbon(n, neighbours))
        for c, n in sorted(links, key=lambda pair: pair[0].residue.index)
    )


def _one(kind: str, found: list[Quadruple], sequence: tuple[str, ...]) -> Quadruple:
    if len(found) != 1:
        raise PeptideBuildError(f"{kind}: {sequence_label(sequence)} has {len(found)} "
                                f"{kind} dihedrals; exactly one is required")
    return found[0]


# ----------------------------------------------------------------------------- assembly


def _assemble(sequence: tuple[str, ...], spec: ForceFieldSpec, topology: app.Topology,
              positions_nm: np.ndarray, system: openmm.System, energy: float) -> Peptide:
    atoms = list(topology.atoms())
    phi, psi = _backbone_dihedrals(topology)
    positions_nm.setflags(write=False)
    return Peptide(
        sequence=sequence,
        force_field=spec.name,
        topology=topology,
        positions_nm=positions_nm,
        system=system,
        minimised_energy_kj_per_mol=float(energy),
        atom_names=tuple(atom.name for atom in atoms),
        elements=tuple(atom.element.symbol for atom in atoms),
        residue_indices=tuple(atom.residue.index for atom in atoms),
        residue_names=tuple(residue.name for residue in topology.residues()),
        bonds=tuple(sorted(tuple(sorted((a.index, b.index))) for a, b in topology.bonds())),
        phi_atoms=_one("phi", phi, sequence),
        psi_atoms=_one("psi", psi, sequence),
        chiral_centers=_chiral_centers(topology),
        omega_atoms=_omega_atoms(topology),
    )


def _check_mdtraj_dihedrals(peptide: Peptide) -> None:
    """φ and ψ atoms equal the single φ and ψ that mdtraj finds."""
    import mdtraj

    frame = mdtraj.Trajectory(peptide.positions_nm[None], peptide.mdtraj_topology())
    for kind, compute, ours in (("phi", mdtraj.compute_phi, peptide.phi_atoms),
                                ("psi", mdtraj.compute_psi, peptide.psi_atoms)):
        found = [tuple(int(i) for i in row) for row in compute(frame)[0]]
        if found != [ours]:
            raise PeptideBuildError(f"{kind}: mdtraj finds {found} in {peptide.label}, the "
                                    f"builder {ours}")


def _check_stereo(peptide: Peptide) -> None:
    """Every chiral centre L and every ω trans at the minimised positions."""
    frame = peptide.positions_nm[None]
    where = f"{peptide.label} ({peptide.force_field})"
    for center in peptide.chiral_centers:
        if not is_l_amino_acid(frame, [center])[0]:
            residue = peptide.residue_indices[center[0]]
            raise PeptideBuildError(f"chirality: {where} residue {residue} "
                                    f"({peptide.residue_names[residue]}) is D; every residue "
                                    "must be L")
    for quadruple in peptide.omega_atoms:
        if not peptide_bonds_trans(frame, [quadruple])[0]:
            omega = dihedrals_deg(frame, [quadruple])[0, 0]
            raise PeptideBuildError(f"omega: {where} peptide bond {quadruple[1]}-{quadruple[2]} "
                                    f"has ω = {omega:.1f}°; every one must be trans "
                                    f"(|ω| > {TRANS_MIN_ABS_OMEGA_DEG:g}°)")


def validate_peptide(peptide: Peptide) -> None:
    """PeptideBuildError unless the peptide's bond graph is the force field's, every residue is
    L, every peptide bond trans, the minimised energy finite, and φ/ψ are mdtraj's."""
    check_bond_graph(peptide.topology, peptide.force_field)
    _check_stereo(peptide)
    if not math.isfinite(peptide.minimised_energy_kj_per_mol):
        raise PeptideBuildError(f"energy: {peptide.label} ({peptide.force_field}) minimised to "
                                f"{peptide.minimised_energy_kj_per_mol} kJ/mol; must be finite")
    _check_mdtraj_dihedrals(peptide)


@functools.cache
def _build(sequence: tuple[str, ...], force_field: str) -> Peptide:
    spec = get_force_field(force_field)
    topology, positions = complete_structure(sequence)
    check_bond_graph(topology, spec.name)
    system = spec.create_system(topology)
    minimised, energy = minimise(system, positions)
    peptide = _assemble(sequence, spec, topology, minimised, system, energy)
    validate_peptide(peptide)
    return peptide


@functools.cache
def _topology_only(sequence: tuple[str, ...], force_field: str) -> Peptide:
    spec = get_force_field(force_field)
    topology, positions = complete_structure(sequence)
    return _assemble(sequence, spec, topology, positions.copy(), spec.create_system(topology),
                     math.nan)


def peptide_topology(sequence: str, force_field: str) -> Peptide:
    """The peptide ``sequence`` completed (atoms, bonds, the force field's System, φ/ψ, chiral
    centres) but neither minimised nor checked: ``positions_nm`` is the unminimised start and
    ``minimised_energy_kj_per_mol`` NaN. What a plan needs (the flow's layout) in a fraction
    of a second, so that a build that fails its minimisation or checks fails the job that
    needs the structure (:func:`build_peptide`), not the whole plan. Same atoms and order as
    :func:`build_peptide`'s."""
    codes = parse_sequence(sequence)
    spec = get_force_field(force_field)
    return _topology_only(codes, spec.name)


def build_peptide(sequence: str, force_field: str) -> Peptide:
    """The minimised, validated peptide ``sequence`` ("ACE-X-NME" or "X-Y", see
    parse_sequence) in force field ``force_field`` (a key of FORCE_FIELDS); built once per
    process for each normalised (sequence, force field).

    ValueError naming system.sequence / system.force_field for refused arguments;
    PeptideBuildError if the built molecule fails a check.
    """
    codes = parse_sequence(sequence)
    spec = get_force_field(force_field)
    return _build(codes, spec.name)

"""Peptides from a sequence: capped residues ACE-X-NME and dipeptides X-Y, built from
openmmtools' alanine dipeptide with PDBFixer, minimised and validated."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import pytest
from openmm import app, unit

from boltzgen.peptides import (
    AMINO_ACIDS,
    FORCE_FIELDS,
    PeptideBuildError,
    build_peptide,
    check_bond_graph,
    complete_structure,
    dihedrals_deg,
    is_l_amino_acid,
    minimise,
    parse_sequence,
    peptide_bonds_trans,
    rotated_about_axis,
    signed_volumes,
    template_pdb_path,
    validate_peptide,
)

ROOT = Path(__file__).resolve().parent.parent

# Atoms of each amino acid inside a chain at pH 7 (ASP/GLU -1, LYS/ARG +1, neutral HIS);
# the caps ACE and NME add 6 each; free termini add 2 H (NH3+) and OXT.
RESIDUE_ATOMS = {
    "ALA": 10, "ARG": 24, "ASN": 14, "ASP": 12, "CYS": 11, "GLN": 17, "GLU": 15, "GLY": 7,
    "HIS": 17, "ILE": 19, "LEU": 19, "LYS": 22, "MET": 17, "PHE": 20, "PRO": 14, "SER": 11,
    "THR": 14, "TRP": 24, "TYR": 21, "VAL": 16,
}
FORCES = {
    "amber99sbildn-obc": {"HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce",
                          "NonbondedForce", "GBSAOBCForce"},
    "amber14-obc1": {"HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce",
                     "NonbondedForce", "CustomGBForce"},
}


def _expected_atoms(sequence: tuple[str, ...]) -> int:
    if sequence[0] == "ACE":
        return 12 + RESIDUE_ATOMS[sequence[1]]
    return sum(RESIDUE_ATOMS[code] for code in sequence) + 3


def _nonbonded(system: openmm.System) -> openmm.NonbondedForce:
    (force,) = [f for f in system.getForces() if isinstance(f, openmm.NonbondedForce)]
    return force


def _net_charge(system: openmm.System) -> float:
    force = _nonbonded(system)
    return sum(force.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
               for i in range(force.getNumParticles()))


# ----------------------------------------------------------------------------- builds


def test_alanine_dipeptide_amber99sbildn_obc() -> None:
    peptide = build_peptide("ACE-ALA-NME", "amber99sbildn-obc")
    assert peptide.label == "ACE-ALA-NME" and peptide.n_atoms == 22
    assert Counter(peptide.elements) == {"C": 6, "H": 12, "N": 2, "O": 2}
    assert len(peptide.bonds) == 21
    assert list(peptide.bonds) == sorted(peptide.bonds)
    assert all(i < j for i, j in peptide.bonds)
    assert peptide.residue_names == ("ACE", "ALA", "NME")
    assert peptide.residue_indices == (0,) * 6 + (1,) * 10 + (2,) * 6
    assert peptide.positions_nm.shape == (22, 3) and peptide.positions_nm.dtype == np.float64
    assert not peptide.positions_nm.flags.writeable
    assert len(peptide.chiral_centers) == 1 and len(peptide.omega_atoms) == 2
    frame = peptide.positions_nm[None]
    assert is_l_amino_acid(frame, peptide.chiral_centers).tolist() == [True]
    assert peptide_bonds_trans(frame, peptide.omega_atoms).tolist() == [True]
    energy = peptide.minimised_energy_kj_per_mol
    print(f"ACE-ALA-NME amber99sbildn-obc minimised energy {energy:.2f} kJ/mol")
    assert -200.0 < energy < -50.0


def test_builds_are_cached_per_normalised_arguments() -> None:
    first = build_peptide("ACE-ALA-NME", "amber99sbildn-obc")
    assert build_peptide(" ace-Ala-nme ", "AMBER99SBILDN-OBC") is first


@pytest.mark.parametrize("code", list(AMINO_ACIDS))
def test_every_capped_residue_builds_and_validates(code: str) -> None:
    """ACE-X-NME for all 20 (the build validates: template bond graph, L, trans, finite
    energy, mdtraj's φ/ψ)."""
    peptide = build_peptide(f"ACE-{code}-NME", "amber99sbildn-obc")
    assert peptide.n_atoms == _expected_atoms(peptide.sequence)
    assert len(peptide.chiral_centers) == (0 if code == "GLY" else 1)


@pytest.mark.parametrize("sequence", ["ACE-TRP-NME", "ACE-PRO-NME", "ALA-TYR", "GLY-ALA",
                                      "TYR-PRO", "LYS-ASP"])
def test_amber14_obc1_builds(sequence: str) -> None:
    peptide = build_peptide(sequence, "amber14-obc1")
    codes = parse_sequence(sequence)
    assert peptide.n_atoms == _expected_atoms(codes)
    print(f"{sequence} amber14-obc1: {peptide.n_atoms} atoms, "
          f"{peptide.minimised_energy_kj_per_mol:.2f} kJ/mol")
    frame = peptide.positions_nm[None]
    assert is_l_amino_acid(frame, peptide.chiral_centers).tolist() == [True]
    assert peptide_bonds_trans(frame, peptide.omega_atoms).tolist() == [True]
    assert np.isfinite(peptide.minimised_energy_kj_per_mol)
    assert len(peptide.omega_atoms) == len(codes) - 1


def test_dipeptide_has_charged_free_termini() -> None:
    peptide = build_peptide("ALA-TYR", "amber14-obc1")
    names = {(r, n) for r, n in zip(peptide.residue_indices, peptide.atom_names, strict=True)}
    assert {(0, "H"), (0, "H2"), (0, "H3"), (1, "OXT")} <= names
    assert abs(_net_charge(peptide.system)) < 1e-6
    charged = build_peptide("LYS-ASP", "amber14-obc1")
    assert abs(_net_charge(charged.system)) < 1e-6  # +1 +1 -1 -1


@pytest.mark.parametrize("name", list(FORCE_FIELDS))
def test_force_field_systems(name: str) -> None:
    """Only the physical forces (no CMMotionRemover), no constraints, the papers' cutoffs, and
    no reaction field on top of GB."""
    spec = FORCE_FIELDS[name]
    peptide = build_peptide("ACE-ALA-NME", name)
    system = peptide.system
    assert {type(f).__name__ for f in system.getForces()} == FORCES[name]
    assert system.getNumConstraints() == 0
    nonbonded = _nonbonded(system)
    expected = getattr(openmm.NonbondedForce, spec.nonbonded_method)
    assert nonbonded.getNonbondedMethod() == expected
    if spec.cutoff_nm is not None:
        assert nonbonded.getCutoffDistance().value_in_unit(unit.nanometer) == spec.cutoff_nm
        assert nonbonded.getReactionFieldDielectric() == 1.0
    assert spec.temperature_k == {"amber99sbildn-obc": 300.0, "amber14-obc1": 310.0}[name]
    assert pickle.loads(pickle.dumps(peptide)).n_atoms == peptide.n_atoms


def test_build_is_deterministic() -> None:
    spec = FORCE_FIELDS["amber99sbildn-obc"]
    runs = []
    for _ in range(2):
        topology, positions = complete_structure(("ACE", "ALA", "NME"))
        runs.append(minimise(spec.create_system(topology), positions))
    assert np.array_equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


@pytest.mark.parametrize("sequence, force_field", [("ACE-ALA-NME", "amber99sbildn-obc"),
                                                   ("ALA-TYR", "amber14-obc1"),
                                                   ("TYR-PRO", "amber14-obc1")])
def test_phi_psi_are_mdtrajs(sequence: str, force_field: str) -> None:
    peptide = build_peptide(sequence, force_field)
    traj = mdtraj.Trajectory(peptide.positions_nm[None], peptide.mdtraj_topology())
    (phi_atoms, phi), (psi_atoms, psi) = mdtraj.compute_phi(traj), mdtraj.compute_psi(traj)
    assert phi_atoms.tolist() == [list(peptide.phi_atoms)]
    assert psi_atoms.tolist() == [list(peptide.psi_atoms)]
    ours = dihedrals_deg(traj.xyz.astype(np.float64), [peptide.phi_atoms, peptide.psi_atoms])
    np.testing.assert_allclose(ours[0], np.degrees([phi[0, 0], psi[0, 0]]), atol=1e-2)


# ----------------------------------------------------------------------------- geometry


def test_template_alanine_is_l_and_its_mirror_is_d() -> None:
    """The sign convention: openmmtools' alanine dipeptide is L-alanine."""
    pdb = app.PDBFile(str(template_pdb_path()))
    xyz = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    index = {(a.residue.index, a.name): a.index for a in pdb.topology.atoms()}
    center = [[index[(1, name)] for name in ("CA", "N", "C", "CB")]]
    mirrored = xyz * np.array([-1.0, 1.0, 1.0])
    assert signed_volumes(xyz[None], center)[0, 0] > 0
    assert is_l_amino_acid(np.stack([xyz, mirrored]), center).tolist() == [True, False]


def test_mirror_images_are_detected_as_d() -> None:
    peptide = build_peptide("ALA-TYR", "amber14-obc1")
    xyz = peptide.positions_nm
    frames = np.stack([xyz, xyz * np.array([-1.0, 1.0, 1.0]), xyz * -1.0])
    assert is_l_amino_acid(frames, peptide.chiral_centers).tolist() == [True, False, False]
    assert is_l_amino_acid(frames[:, :3], ()).tolist() == [True] * 3  # no centre: glycine
    nan = xyz.copy()
    nan[0] = np.nan
    assert is_l_amino_acid(nan[None], peptide.chiral_centers).tolist() == [False]


def _turned_about_peptide_bond(xyz: np.ndarray, omega: tuple[int, ...], after: list[int],
                               angle_deg: float) -> np.ndarray:
    out = xyz.copy()
    c, n = xyz[omega[1]], xyz[omega[2]]
    out[after] = rotated_about_axis(xyz[after], c, n - c, np.radians(angle_deg))
    return out


def test_cis_peptide_bond_is_detected() -> None:
    peptide = build_peptide("ACE-ALA-NME", "amber99sbildn-obc")
    xyz, omega = peptide.positions_nm, peptide.omega_atoms[1]
    after = [i for i, r in enumerate(peptide.residue_indices) if r == 2]
    start = dihedrals_deg(xyz[None], [omega])[0, 0]
    frames = np.stack([_turned_about_peptide_bond(xyz, omega, after, angle)
                       for angle in (0.0, 180.0, 20.0, 40.0)])
    omegas = dihedrals_deg(frames, [omega])[:, 0]
    # Turning the last atom of a dihedral about its middle bond by +θ adds θ.
    expected = (start + np.array([0.0, 180.0, 20.0, 40.0]) + 180.0) % 360.0 - 180.0
    np.testing.assert_allclose(omegas, expected, atol=1e-6)
    trans = peptide_bonds_trans(frames, peptide.omega_atoms)
    assert trans.tolist() == [True, False, abs(expected[2]) > 150.0, abs(expected[3]) > 150.0]


def test_validation_refuses_d_cis_and_non_finite_energy() -> None:
    peptide = build_peptide("ACE-ALA-NME", "amber99sbildn-obc")
    validate_peptide(peptide)
    mirrored = dataclasses.replace(peptide, positions_nm=peptide.positions_nm * -1.0)
    with pytest.raises(PeptideBuildError, match=r"^chirality: ACE-ALA-NME "
                                                r"\(amber99sbildn-obc\) residue 1 \(ALA\) is D"):
        validate_peptide(mirrored)
    omega = peptide.omega_atoms[1]
    after = [i for i, r in enumerate(peptide.residue_indices) if r == 2]
    cis = _turned_about_peptide_bond(peptide.positions_nm, omega, after, 180.0)
    with pytest.raises(PeptideBuildError, match=rf"^omega: .* peptide bond {omega[1]}-{omega[2]} "
                                                r"has ω = -?\d"):
        validate_peptide(dataclasses.replace(peptide, positions_nm=cis))
    with pytest.raises(PeptideBuildError, match=r"^energy: .* nan kJ/mol; must be finite$"):
        validate_peptide(dataclasses.replace(peptide, minimised_energy_kj_per_mol=float("nan")))


def test_dihedrals_match_mdtraj_on_random_frames() -> None:
    rng = np.random.default_rng(3)
    xyz = rng.normal(size=(5, 6, 3))
    quads = [(0, 1, 2, 3), (2, 3, 4, 5), (5, 1, 0, 4)]
    topology = mdtraj.Topology()
    residue = topology.add_residue("UNK", topology.add_chain())
    for i in range(6):
        topology.add_atom(f"C{i}", mdtraj.element.carbon, residue)
    traj = mdtraj.Trajectory(xyz.astype(np.float32), topology)
    reference = np.degrees(mdtraj.compute_dihedrals(traj, np.array(quads), periodic=False))
    ours = dihedrals_deg(traj.xyz.astype(np.float64), quads)
    np.testing.assert_allclose(ours, reference, atol=1e-2)  # mdtraj computes in float32


def test_geometry_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"^xyz: shape \(4, 3\) is not allowed; need"):
        is_l_amino_acid(np.zeros((4, 3)), [(0, 1, 2, 3)])
    with pytest.raises(ValueError, match=r"^chiral_centers: .* is not allowed; need atom"):
        is_l_amino_acid(np.zeros((1, 4, 3)), [(0, 1, 2, 4)])


# ----------------------------------------------------------------------------- bond graph


def _copy(peptide_topology: app.Topology, positions_nm: np.ndarray) -> app.Modeller:
    """A Modeller on a deep copy (Modeller keeps the Topology it is given; builds are cached)."""
    return app.Modeller(copy.deepcopy(peptide_topology), positions_nm * unit.nanometer)


def test_removed_bond_fails_the_bond_graph_check() -> None:
    peptide = build_peptide("ACE-ALA-NME", "amber99sbildn-obc")
    check_bond_graph(peptide.topology, peptide.force_field)
    broken = _copy(peptide.topology, peptide.positions_nm)
    ca_cb = next(b for b in broken.topology.bonds() if {b[0].name, b[1].name} == {"CA", "CB"})
    broken.delete([ca_cb])
    with pytest.raises(PeptideBuildError, match=r"^bond graph: No template found"):
        check_bond_graph(broken.topology, peptide.force_field)


def test_renamed_atom_fails_the_bond_graph_check() -> None:
    """The force field matches templates by graph, not names: the name check catches it."""
    peptide = build_peptide("ALA-TYR", "amber14-obc1")
    renamed = _copy(peptide.topology, peptide.positions_nm)
    atom = next(a for a in renamed.topology.atoms() if a.name == "CB" and a.residue.index == 0)
    atom.name = "CX"
    with pytest.raises(PeptideBuildError, match=r"^bond graph: residue 0 \(ALA\) vs template "
                                                r"NALA: atoms differ by \['CB', 'CX'\]$"):
        check_bond_graph(renamed.topology, peptide.force_field)


def test_extra_inter_residue_bond_fails_the_bond_graph_check() -> None:
    peptide = build_peptide("ACE-ALA-NME", "amber99sbildn-obc")
    extra = _copy(peptide.topology, peptide.positions_nm)
    atoms = {(a.residue.index, a.name): a for a in extra.topology.atoms()}
    extra.topology.addBond(atoms[(0, "CH3")], atoms[(2, "C")])
    with pytest.raises(PeptideBuildError, match=r"^bond graph: "):
        check_bond_graph(extra.topology, peptide.force_field)


# ----------------------------------------------------------------------------- refusals


def test_parse_sequence_normalises() -> None:
    assert parse_sequence("ace-ala-nme") == ("ACE", "ALA", "NME")
    assert parse_sequence(" Gly-Ala ") == ("GLY", "ALA")
    assert len(AMINO_ACIDS) == 20 and AMINO_ACIDS["TRP"] == "W"


SUPPORTED = ("the builder supports ACE-X-NME (a capped single residue) and X-Y (a dipeptide "
             "with free termini)")


@pytest.mark.parametrize("text, allowed", [
    ("ACE-XYZ-NME", "unknown residue code 'XYZ'; the residues are ALA, ARG, ASN"),
    ("ALA--TYR", "unknown residue code ''"),
    ("ALA-ALA-ALA", SUPPORTED),
    ("ACE-ALA-ALA-NME", SUPPORTED),
    ("NME-ALA-ACE", SUPPORTED),
    ("ACE-ALA", SUPPORTED),
    ("ALA-NME", SUPPORTED),
    ("ALA", SUPPORTED),
    ("", SUPPORTED),
    ("   ", SUPPORTED),
])
def test_bad_sequences_are_refused(text: str, allowed: str) -> None:
    with pytest.raises(ValueError) as error:
        build_peptide(text, "amber99sbildn-obc")
    message = str(error.value)
    assert message.startswith(f"system.sequence: {text!r} is not allowed; {allowed}")
    assert "\n" not in message


def test_unknown_residue_message_lists_the_twenty() -> None:
    with pytest.raises(ValueError) as error:
        parse_sequence("ACE-XYZ-NME")
    assert all(code in str(error.value) for code in AMINO_ACIDS)


def test_bad_force_field_is_refused() -> None:
    with pytest.raises(ValueError) as error:
        build_peptide("ACE-ALA-NME", "charmm36")
    assert str(error.value) == ("system.force_field: 'charmm36' is not allowed; choose one of "
                                "amber99sbildn-obc, amber14-obc1")


def test_peptides_module_imports_no_torch() -> None:
    code = "import sys, boltzgen.peptides; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True)
    assert out.stdout.split() == ["False"], out.stderr[-2000:]

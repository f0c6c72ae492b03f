"""Peptides built from a sequence: capped single residues ACE-X-NME and dipeptides X-Y with free
termini, in the force fields of the Boltzmann-generator literature (see ``forcefields``).

Imports no torch. Units: nm, kJ/mol, K.
"""

from boltzgen.peptides.build import (
    Peptide,
    build_peptide,
    complete_structure,
    minimise,
    peptide_topology,
    template_pdb_path,
    validate_peptide,
)
from boltzgen.peptides.forcefields import FORCE_FIELDS, ForceFieldSpec, get_force_field
from boltzgen.peptides.geometry import (
    TRANS_MIN_ABS_OMEGA_DEG,
    dihedrals_deg,
    is_l_amino_acid,
    peptide_bonds_trans,
    rotated_about_axis,
    signed_volumes,
)
from boltzgen.peptides.sequences import AMINO_ACIDS, parse_sequence
from boltzgen.peptides.validation import PeptideBuildError, check_bond_graph

__all__ = [
    "AMINO_ACIDS",
    "FORCE_FIELDS",
    "TRANS_MIN_ABS_OMEGA_DEG",
    "ForceFieldSpec",
    "Peptide",
    "PeptideBuildError",
    "build_peptide",
    "peptide_topology",
    "check_bond_graph",
    "complete_structure",
    "dihedrals_deg",
    "get_force_field",
    "is_l_amino_acid",
    "minimise",
    "parse_sequence",
    "peptide_bonds_trans",
    "rotated_about_axis",
    "signed_volumes",
    "template_pdb_path",
    "validate_peptide",
]

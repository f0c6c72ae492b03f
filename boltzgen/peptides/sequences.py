"""Peptide sequences the builder accepts: a capped single residue ACE-X-NME or a dipeptide X-Y
with free (charged) termini, X and Y among the 20 standard amino acids.

Sequences are written as dash-separated three-letter codes, case-insensitive ("ace-ala-nme",
"ALA-TYR"); :func:`parse_sequence` returns them upper-case as a tuple.
"""

from __future__ import annotations

AMINO_ACIDS: dict[str, str] = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C",
    "GLN": "Q", "GLU": "E", "GLY": "G", "HIS": "H", "ILE": "I",
    "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F", "PRO": "P",
    "SER": "S", "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V",
}
"""The 20 standard amino acids, three-letter code -> one-letter code."""

N_CAP = "ACE"
"""Acetyl cap, the first residue of a capped sequence."""
C_CAP = "NME"
"""N-methylamide cap, the last residue of a capped sequence."""

SUPPORTED_FORMS = ("the builder supports ACE-X-NME (a capped single residue) and X-Y "
                   "(a dipeptide with free termini), X and Y among the 20 standard amino acids")


def _refuse(text: object, allowed: str) -> ValueError:
    return ValueError(f"system.sequence: {text!r} is not allowed; {allowed}")


def is_capped(sequence: tuple[str, ...]) -> bool:
    """True for ACE-X-NME with X a standard amino acid."""
    return (len(sequence) == 3 and sequence[0] == N_CAP and sequence[2] == C_CAP
            and sequence[1] in AMINO_ACIDS)


def is_dipeptide(sequence: tuple[str, ...]) -> bool:
    """True for X-Y with X and Y standard amino acids (free, charged termini)."""
    return len(sequence) == 2 and all(code in AMINO_ACIDS for code in sequence)


def parse_sequence(text: str) -> tuple[str, ...]:
    """Three-letter codes of ``text`` ("ACE-ALA-NME", "ala-tyr"), upper-case.

    ValueError naming ``system.sequence`` for an empty or non-string value, a code that is
    neither one of the 20 amino acids nor a cap, and any form other than ACE-X-NME or X-Y
    (longer sequences, caps in the wrong place, a lone residue).
    """
    if not isinstance(text, str) or not text.strip():
        raise _refuse(text, SUPPORTED_FORMS)
    codes = tuple(code.strip().upper() for code in text.strip().split("-"))
    unknown = [code for code in codes if code not in AMINO_ACIDS and code not in (N_CAP, C_CAP)]
    if unknown:
        raise _refuse(text, f"unknown residue code {unknown[0]!r}; the residues are "
                            f"{', '.join(AMINO_ACIDS)} and the caps {N_CAP} (first), "
                            f"{C_CAP} (last)")
    if not (is_capped(codes) or is_dipeptide(codes)):
        raise _refuse(text, SUPPORTED_FORMS)
    return codes


def sequence_label(sequence: tuple[str, ...]) -> str:
    """"ACE-ALA-NME" for ("ACE", "ALA", "NME")."""
    return "-".join(sequence)

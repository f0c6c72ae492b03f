"""Checks that a built peptide is the molecule the force field describes.

:func:`check_bond_graph` compares, residue by residue, the bonds of a Topology with the residue
template the force field assigns to it, atom by atom by name, and requires the residues to be
linked by peptide bonds C(i)-N(i+1) only. Template atom names are Amber's (HH31, CH3 of NME,
H1 of an N-terminus); the Topology's are PDB names. Both are read through OpenMM's own table
of PDB name aliases (pdbNames.xml, the table its PDB reader applies), so the comparison is by
the name OpenMM's reader would give each template atom.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import Path

from openmm import app

from boltzgen.peptides.forcefields import get_force_field

NamePair = frozenset[str]


class PeptideBuildError(RuntimeError):
    """A built peptide failed a check; the message says which and why, in one line."""


@functools.cache
def _alias_tables() -> dict[str, dict[str, str]]:
    """Residue name -> {alias or name: PDB name} from OpenMM's pdbNames.xml."""
    root = ElementTree.parse(Path(app.__file__).parent / "data" / "pdbNames.xml").getroot()
    tables: dict[str, dict[str, str]] = {}
    for residue in root.findall("Residue"):
        table = tables.setdefault(residue.attrib["name"], {})
        for atom in residue.findall("Atom"):
            table.update({alias: atom.attrib["name"] for alias in atom.attrib.values()})
    return tables


def _pdb_names(residue_name: str) -> dict[str, str]:
    """Alias -> PDB name in a protein residue: the generic protein aliases, overridden by the
    residue's own (as OpenMM's PDB reader applies them)."""
    tables = _alias_tables()
    return tables.get("Protein", {}) | tables.get(residue_name, {})


def _topology_bonds(topology: app.Topology) -> tuple[dict[int, set[NamePair]],
                                                     dict[int, set[str]],
                                                     set[tuple[int, int]]]:
    """Per residue index: its internal bonds as name pairs and its atoms bonded to another
    residue; and every inter-residue bond as (atom index, atom index), lower residue first."""
    internal: dict[int, set[NamePair]] = defaultdict(set)
    external: dict[int, set[str]] = defaultdict(set)
    links: set[tuple[int, int]] = set()
    for a, b in topology.bonds():
        if a.residue.index == b.residue.index:
            internal[a.residue.index].add(frozenset((a.name, b.name)))
            continue
        external[a.residue.index].add(a.name)
        external[b.residue.index].add(b.name)
        first, second = sorted((a, b), key=lambda atom: atom.residue.index)
        links.add((first.index, second.index))
    return internal, external, links


def _check_residue(residue: app.topology.Residue, template: object, bonds: set[NamePair],
                   external: set[str]) -> None:
    """The residue's atoms, internal bonds and externally bonded atoms equal the template's."""
    aliases = _pdb_names(residue.name)
    names = [aliases.get(atom.name, atom.name) for atom in template.atoms]
    where = f"residue {residue.index} ({residue.name}) vs template {template.name}"
    atoms = {atom.name for atom in residue.atoms()}
    if atoms != set(names):
        differ = sorted(atoms ^ set(names))
        raise PeptideBuildError(f"bond graph: {where}: atoms differ by {differ}")
    expected = {frozenset((names[i], names[j])) for i, j in template.bonds}
    if bonds != expected:
        differ = sorted("-".join(sorted(pair)) for pair in bonds ^ expected)
        raise PeptideBuildError(f"bond graph: {where}: bonds differ by {differ}")
    linked = {names[i] for i, atom in enumerate(template.atoms) if atom.externalBonds}
    if external != linked:
        raise PeptideBuildError(f"bond graph: {where}: atoms bonded to other residues are "
                                f"{sorted(external)}, the template's {sorted(linked)}")


def _peptide_links(topology: app.Topology) -> set[tuple[int, int]]:
    """(C of residue i, N of residue i + 1) atom indices for consecutive residues."""
    residues = list(topology.residues())
    index = {(atom.residue.index, atom.name): atom.index for atom in topology.atoms()}
    return {(index.get((r.index, "C"), -1), index.get((r.index + 1, "N"), -1))
            for r in residues[:-1]}


def check_bond_graph(topology: app.Topology, force_field: str) -> None:
    """PeptideBuildError unless every residue's bonds equal those of the template that the
    force field ``force_field`` (a key of FORCE_FIELDS) assigns to it, and residues are linked
    by the peptide bonds C(i)-N(i+1) and nothing else."""
    forcefield = get_force_field(force_field).forcefield()
    try:
        templates = forcefield.getMatchingTemplates(topology)
    except ValueError as error:
        first_line = str(error).strip().splitlines()[0]
        raise PeptideBuildError(f"bond graph: {first_line}") from error
    internal, external, links = _topology_bonds(topology)
    for residue, template in zip(topology.residues(), templates, strict=True):
        _check_residue(residue, template, internal[residue.index], external[residue.index])
    expected = _peptide_links(topology)
    if links != expected:
        raise PeptideBuildError(f"bond graph: inter-residue bonds {sorted(links)} are not the "
                                f"peptide bonds C(i)-N(i+1) {sorted(expected)}")

"""Bad input: one line on stderr naming field, value and what is allowed; exit 2; nothing started.

Most cases run the CLI in-process (fast); one runs the installed console script in a subprocess
to prove that the user sees exactly one line and no traceback.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from campaign.cli import app
from tests.conftest import TINY_SPEC, write_spec

runner = CliRunner()


def _with(path: str, value: object, base: dict | None = None) -> dict:
    data = copy.deepcopy(TINY_SPEC if base is None else base)
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return data


ICE = {
    "name": "ice", "system": {"kind": "ice_xi"}, "temperature": 100.0,
    "base": {"kind": "thermodynamic", "temperature": 250.0},
    "reference": {"sampler": "md", "ladder_size": 3},
    "flow": {"kind": "rigid_body", "n_blocks": 1, "channels": 8, "heads": 2},
    "energy": {"backend": "openmm"},
}

PEPTIDE = {
    "name": "peptides", "system": {"kind": "peptide", "sequence": "ACE-ALA-NME"},
    "temperature": 300.0, "reference": {"sampler": "md", "md": {"production_ps": 2.0}},
    "flow": {"kind": "internal_coordinates", "n_layers": 1, "hidden": 8},
    "energy": {"backend": "openmm"},
}


PARTICLES = {
    "name": "particles", "system": {"kind": "lj", "n_particles": 13}, "temperature": 1.0,
    "reference": {"n_chains": 8, "n_steps": 20, "burn_in": 5},
    "flow": {"kind": "egnn_cnf", "hidden": 8, "n_layers": 2},
    "training": {"objective": "flow_matching", "coupling": "equivariant_ot", "steps": 2},
}


def _particles(**changes: object) -> dict:
    data = PARTICLES
    for key, value in changes.items():
        data = _with(key.replace("__", "."), value, data)
    return data


def _peptide(**changes: object) -> dict:
    data = PEPTIDE
    for key, value in changes.items():
        data = _with(key.replace("__", "."), value, data)
    return data


BAD_SPECS = {
    # case: (spec mapping, words the message must contain)
    "unknown top-level key": ({**TINY_SPEC, "tempratur": 1.0}, ["tempratur", "unknown key"]),
    "unknown nested key": (_with("training.stepz", 3), ["training.stepz", "unknown key"]),
    "unknown system kind": (_with("system", {"kind": "argon"}), ["system.kind", "argon",
                                                                  "double_well"]),
    "unknown system parameter": (_with("system", {"kind": "double_well", "depth": 3}),
                                 ["system", "depth"]),
    "zero temperature": (_with("temperature", 0), ["temperature", "0", "> 0"]),
    "negative temperature": (_with("temperature", -1.5), ["temperature", "-1.5", "> 0"]),
    "string temperature": (_with("temperature", "warm"), ["temperature", "warm"]),
    "nan temperature": (_with("temperature", float("nan")), ["temperature", "nan"]),
    "negative grid temperature": (_with("grid", {"temperature": [1.0, -2.0]}),
                                  ["grid.temperature", "-2.0", "> 0"]),
    "empty grid axis": (_with("grid", {"temperature": []}), ["grid.temperature", "at least one"]),
    "unknown grid axis": (_with("grid", {"pressure": [1, 2]}), ["grid.pressure"]),
    "negative steps": (_with("training.steps", -5), ["training.steps", "-5"]),
    "fractional batch": (_with("training.batch_size", 2.5), ["training.batch_size", "2.5"]),
    "zero samples": (_with("sampling.n_samples", 0), ["sampling.n_samples", "0"]),
    "bad name": (_with("name", "my campaign!"), ["name", "my campaign!", "letter"]),
    "missing system": ({k: v for k, v in TINY_SPEC.items() if k != "system"},
                       ["system", "required"]),
    "openmm backend without an OpenMM form": (
        _with("system", {"kind": "dw4"}) | {"base": {"kind": "thermodynamic", "temperature": 2.0},
                                            "energy": {"backend": "openmm"}},
        ["energy.backend", "openmm", "dw4"]),
    "unknown openmm platform": (_with("energy", {"backend": "openmm", "platform": "Metal"}),
                                ["energy.platform", "Metal"]),
    "both the reference role and its old name": (
        _with("resources.mcmc", {"count": 2, "cpus": 0.25}),
        ["resources.mcmc", "'count': 2", "old name of resources.reference", "keep only"]),
    "too many cpus": (_with("resources.trainer", {"count": 1, "cpus": 4096}),
                      ["resources.trainer.cpus", "4096"]),
    "too many gpus": (_with("resources.trainer", {"count": 1, "cpus": 1, "gpus": 64}),
                      ["resources.trainer.gpus", "64"]),
    "actors together exceed the machine": (_with("resources.trainer", {"count": 4096, "cpus": 1}),
                                           ["resources", "CPUs in all", "add up to at most"]),
    "rigid flow on a Euclidean system": (_with("flow", {"kind": "rigid_body"}),
                                         ["flow.kind", "rigid_body", "needs a rigid-body"]),
    "ice size that does not tile the lattice": (
        {**ICE, "system": {"kind": "ice_xi", "molecules": 20}},
        ["system.molecules", "20", "16 n³"]),
    "ice cutoff the box cannot hold": (
        {**ICE, "system": {"kind": "ice_xi", "cutoff": 0.5}},
        ["system.cutoff", "0.5", "at most 0.36678"]),
    "ice target temperature equal to the base": (
        {**ICE, "temperature": 250.0}, ["base.temperature", "250.0", "equals the target"]),
    "md shorter than one frame": (
        {**ICE, "reference": {"sampler": "md", "md": {"production_ps": 0.1,
                                                       "frame_interval_ps": 0.5}}},
        ["reference.md.production_ps", "0.1", "one frame interval"]),
    "md ladder with one rung": (
        {**ICE, "reference": {"sampler": "md", "ladder_size": 1}},
        ["reference.ladder_size", "1", ">= 2"]),
    "held-out blocks that leave no held-out block": (
        {**ICE, "reference": {"sampler": "md", "holdout_fraction": 0.1, "holdout_blocks": 5}},
        ["reference.holdout_blocks", "5", "no held-out block"]),
    "held-out blocks without md": (
        {**ICE, "base": {"kind": "uniform"}, "reference": {"sampler": "exact",
                                                          "holdout_blocks": 4},
         "system": {"kind": "tetrahedron_field"}, "energy": {"backend": "torch"},
         "flow": {"kind": "rigid_body", "n_blocks": 1}},
        ["reference.holdout_blocks", "4", "sampler 'exact'"]),
    "symmetry augmentation of a system without known symmetries": (
        {**ICE, "base": {"kind": "uniform"}, "reference": {"sampler": "exact"},
         "system": {"kind": "tetrahedron_field"}, "energy": {"backend": "torch"},
         "flow": {"kind": "rigid_body", "n_blocks": 1},
         "training": {"symmetry_augmentation": True}},
        ["training.symmetry_augmentation", "True", "no known symmetry operations"]),
    "thermal scaling without a thermodynamic base": (
        {**ICE, "base": {"kind": "uniform"}, "reference": {"sampler": "exact"},
         "system": {"kind": "tetrahedron_field"}, "energy": {"backend": "torch"},
         "flow": {"kind": "rigid_body", "n_blocks": 1, "thermal_scaling": True}},
        ["flow.thermal_scaling", "True", "thermodynamic"]),
    "warm start for a maximum-likelihood job": (
        {**ICE, "training": {"objective": "maximum_likelihood", "warm_start_steps": 10}},
        ["training.warm_start_steps", "10", "reverse_kl"]),
    # Top-level settings that the grid replaces in every job are checked all the same.
    "top-level system kind that every grid block replaces": (
        _with("system", {"kind": "argon"}) | {"grid": [{"system": {"kind": "double_well"}},
                                                      {"system": {"kind": "dw4"}}]},
        ["system.kind", "argon", "double_well"]),
    "top-level system parameter that a grid axis replaces": (
        _with("system", {"kind": "double_well", "a": -1.0}) | {"grid": {"system.a": [0.5, 1]}},
        ["system.a", "-1.0", "> 0"]),
    "top-level flow kind that a grid axis replaces": (
        _with("flow", {"kind": "glow", "n_layers": 4, "hidden": 32})
        | {"grid": {"flow.kind": ["spline_coupling", "affine_coupling"]}},
        ["flow.kind", "glow", "spline_coupling"]),
    "top-level flow parameter of a flow the grid replaces": (
        _with("flow", {"kind": "spline_coupling", "n_layers": 0, "hidden": 32})
        | {"grid": {"flow": [{"kind": "affine_coupling"}]}},
        ["flow.n_layers", "0", ">= 1"]),
    "top-level base that every grid block replaces": (
        _with("base", {"kind": "uniform"}) | {"grid": {"base": [{"kind": "normal"}]}},
        ["base.kind", "uniform", "Euclidean"]),
    "zero max_jobs": (_with("max_jobs", 0), ["max_jobs", "0"]),
    "fractional max_jobs": (_with("max_jobs", 2.5), ["max_jobs", "2.5"]),
    "grid beyond max_jobs": (_with("max_jobs", 5) | {"grid": {"temperature": [1.0, 2.0, 3.0],
                                                               "training.steps": [10, 20]}},
                             ["grid", "6 jobs", "max_jobs = 5"]),
    "unknown residue": (_peptide(system__sequence="ACE-XYZ-NME"),
                        ["system.sequence", "XYZ", "ALA"]),
    "sequence too long": (_peptide(system__sequence="ALA-ALA-ALA"),
                          ["system.sequence", "ALA-ALA-ALA", "ACE-X-NME"]),
    "unknown force field": (_peptide(system__force_field="charmm36"),
                            ["system.force_field", "charmm36", "amber99sbildn-obc"]),
    "peptide at zero kelvin": (_peptide(temperature=0.0), ["temperature", "0", "> 0"]),
    "replica ladder not starting at the target": (
        _peptide(reference__md__replica_temperatures=[310.0, 350.0]),
        ["reference.md.replica_temperatures", "310", "target"]),
    "peptide MD shorter than one frame": (
        _peptide(reference__md__production_ps=0.1, reference__md__frame_interval_ps=0.5),
        ["reference.md.production_ps", "0.1", "one frame interval"]),
    "unknown LJ convention": (_particles(system__convention="half_pairs"),
                              ["system.convention", "half_pairs", "ordered_pairs",
                               "unordered_pairs"]),
    "one LJ particle": (_particles(system__n_particles=1),
                        ["system.n_particles", "1", "at least 2"]),
    "LJ at zero temperature": (_particles(temperature=0.0), ["temperature", "0", "> 0"]),
    "negative LJ temperature": (_particles(temperature=-1.0), ["temperature", "-1", "> 0"]),
    "solver tolerance zero": (_particles(flow__atol=0.0), ["flow.atol", "0.0", "> 0"]),
    "negative relative tolerance": (_particles(flow__rtol=-0.001),
                                    ["flow.rtol", "-0.001", "> 0"]),
    "hutchinson for reported likelihoods": (
        _particles(flow__divergence="hutchinson"),
        ["flow.divergence", "hutchinson", "exact divergence"]),
    "EGNN on ice": (_with("flow", {"kind": "egnn_cnf"}, ICE),
                    ["flow.kind", "egnn_cnf", "particles", "rigid_body"]),
    "EGNN on a plain vector": (_with("flow", {"kind": "egnn_cnf"}),
                               ["flow.kind", "egnn_cnf", "R^2", "mlp_cnf"]),
    "flow matching without a continuous flow": (
        _particles(flow={"kind": "affine_coupling"}),
        ["training.objective", "flow_matching", "affine_coupling", "egnn_cnf"]),
    "equivariant OT on a vector": (
        _with("flow", {"kind": "mlp_cnf"}) | {"training": {
            "objective": "flow_matching", "coupling": "equivariant_ot"}},
        ["training.coupling", "equivariant_ot", "particles"]),
    "md on a system without a structure": (
        _with("reference", {"sampler": "md"}) | {"base": {"kind": "thermodynamic",
                                                          "temperature": 2.0}},
        ["reference.sampler", "md", "double_well"]),
}

BAD_FILES = {
    "not yaml": ("name: [unclosed\n  - :", ["spec", "valid YAML"]),
    "not a mapping": ("- 1\n- 2\n", ["spec", "list", "mapping"]),
    "empty file": ("", ["spec", "empty"]),
    "object tag": ("name: !!python/object/apply:os.system ['touch pwned']\n",
                   ["spec", "tag"]),
}


def _assert_refused(result, words: list[str], workdir: Path) -> None:
    import ray

    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in result.output
    assert not ray.is_initialized()
    assert not (workdir / "mlflow.db").exists()
    assert not (workdir / "pwned").exists()


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_refused_by_launch(case: str, workdir: Path) -> None:
    data, words = BAD_SPECS[case]
    path = write_spec(workdir, data)
    result = runner.invoke(app, ["launch", str(path)])
    _assert_refused(result, words, workdir)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_refused(case: str, workdir: Path) -> None:
    text, words = BAD_FILES[case]
    path = workdir / "spec.yaml"
    path.write_text(text)
    for command in ("validate", "launch"):
        _assert_refused(runner.invoke(app, [command, str(path)]), words, workdir)


def test_missing_file_is_refused(workdir: Path) -> None:
    _assert_refused(runner.invoke(app, ["launch", "nope.yaml"]), ["nope.yaml"], workdir)


def test_console_script_prints_one_line(workdir: Path) -> None:
    path = write_spec(workdir, _with("temperature", -1))
    exe = Path(sys.executable).with_name("campaign")
    proc = subprocess.run([str(exe), "launch", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: temperature: -1 is not allowed; must be a finite")
    assert not (workdir / "mlflow.db").exists()


def test_valid_spec_validates(workdir: Path) -> None:
    path = write_spec(workdir, _with("grid", {"temperature": [1.0, 2.0]}))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "2 jobs" in result.stdout


def test_old_name_of_the_reference_role_is_read_as_reference(workdir: Path) -> None:
    """Specs written before the rename give ``resources.mcmc``: the same plan as
    ``resources.reference`` (same resources, same job ids)."""
    from campaign.plan import make_plan
    from campaign.spec import parse_spec

    old = copy.deepcopy(TINY_SPEC)
    old["resources"] = {("mcmc" if role == "reference" else role): value
                        for role, value in old["resources"].items()}
    old["resources"]["mcmc"] = {"count": 1, "cpus": 0.3}
    new = copy.deepcopy(TINY_SPEC)
    new["resources"]["reference"] = {"count": 1, "cpus": 0.3}
    old_plan, new_plan = make_plan(parse_spec(old)), make_plan(parse_spec(new))
    assert old_plan.resources == new_plan.resources
    assert old_plan.resources["reference"]["cpus"] == 0.3 and "mcmc" not in old_plan.resources
    assert [j.job_id for j in old_plan.jobs] == [j.job_id for j in new_plan.jobs]
    result = runner.invoke(app, ["validate", str(write_spec(workdir, old))])
    assert result.exit_code == 0, result.output

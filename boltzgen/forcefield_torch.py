"""An OpenMM force field re-implemented in PyTorch: batched, differentiable, float64.

For data-free training a molecule's energy is evaluated for every model sample of every step;
OpenMM computes one configuration per call, so a batch of 256 alanine-dipeptide conformations
costs 256 calls (about 40 ms on one CPU core), more than the flow itself. The same terms in
PyTorch take the whole batch at once, and ∇U comes from autograd.

:class:`TorchForceField` reads the parameters of an ``openmm.System`` (nothing else: the force
field, its 1-4 scaling and its GB radii are whatever the System holds) and supports the forces a
peptide in implicit solvent without cutoff has (anything else is refused by name):

- ``HarmonicBondForce``: ½ k (r − r0)²;
- ``HarmonicAngleForce``: ½ k (θ − θ0)²;
- ``PeriodicTorsionForce``: k (1 + cos(n φ − φ0)) (φ the IUPAC dihedral);
- ``NonbondedForce`` with ``NoCutoff``: Coulomb k_e q_i q_j / r and Lennard-Jones
  4 ε_ij ((σ_ij/r)^12 − (σ_ij/r)^6) (Lorentz-Berthelot: σ_ij = (σ_i + σ_j)/2,
  ε_ij = sqrt(ε_i ε_j)) over every pair that is not an exception; each exception (1-2, 1-3:
  zero; 1-4: the scaled charge product and LJ parameters) with its own parameters;
- ``GBSAOBCForce`` (Onufriev, Bashford & Case, Proteins 55 (2004) 383, model II: α = 1,
  β = 0.8, γ = 4.85; dielectric offset 0.009 nm): for every atom i the offset radius
  ρ̃_i = ρ_i − 0.009 and, over every other atom j with scaled radius s_j = S_j ρ̃_j and
  distance r, the integral

      I_i = ½ ρ̃_i Σ_j [1/L − 1/U + ¼ r (1/U² − 1/L²) + ln(L/U)/(2r) + s_j² (1/L² − 1/U²)/(4r)
                        + (2 (1/ρ̃_i − 1/L) where ρ̃_i < s_j − r)]   (zero where ρ̃_i >= r + s_j),

  L = max(ρ̃_i, |r − s_j|), U = r + s_j; Born radii B_i = 1/(1/ρ̃_i − tanh(αΨ − βΨ² + γΨ³)/ρ_i)
  with Ψ = I_i; energy −½ k_e (1/ε_in − 1/ε_out) Σ_i Σ_j q_i q_j / f_ij (all ordered pairs and
  i = j), f_ij = sqrt(r² + B_i B_j exp(−r²/(4 B_i B_j))); plus the nonpolar ACE term
  Σ_i 4π γ_SA (ρ_i + 0.14 nm)² (ρ_i / B_i)^6 with γ_SA the force's surface-area energy
  (kJ/mol/nm²).

k_e = 138.93545764438198 kJ mol⁻¹ nm e⁻² (OpenMM's ONE_4PI_EPS0, CODATA 2018). Checked against
OpenMM's Reference platform (double precision) force by force, energies and forces to 1e-6
relative (tests/test_forcefield_torch.py; measured: 4e-15).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["SUPPORTED_FORCES", "TorchForceField"]

ONE_4PI_EPS0 = 138.93545764438198  # kJ mol^-1 nm e^-2, as OpenMM (CODATA 2018)
GB_OFFSET_NM = 0.009  # the dielectric offset of OpenMM's GBSAOBCForce
OBC_ALPHA, OBC_BETA, OBC_GAMMA = 1.0, 0.8, 4.85  # OBC model II
SA_PROBE_NM = 0.14  # the solvent probe radius of the ACE surface term
SUPPORTED_FORCES = ("HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce",
                    "NonbondedForce", "GBSAOBCForce", "CMMotionRemover")


def _value(quantity: Any) -> float:
    """A number in OpenMM's default units (nm, kJ/mol, rad, e) from a Quantity or a float."""
    return float(quantity._value if hasattr(quantity, "_value") else quantity)


def _tensor(values: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=dtype)


class TorchForceField(torch.nn.Module):
    """U(x) in kJ/mol of an ``openmm.System`` (module docstring) for positions x (..., n, 3) nm.

    Raises ValueError naming the first force it does not support, or a NonbondedForce /
    GBSAOBCForce with a cutoff (periodic systems need Ewald sums, which this does not do).
    """

    def __init__(self, system: Any) -> None:
        super().__init__()
        import openmm

        self.n_atoms = system.getNumParticles()
        self.terms: list[str] = []
        for force in system.getForces():
            name = type(force).__name__
            if name not in SUPPORTED_FORCES:
                raise ValueError(f"system: force {name} is not supported by the PyTorch force "
                                 f"field; supported: {', '.join(SUPPORTED_FORCES)}")
            if isinstance(force, openmm.HarmonicBondForce):
                self._bonds(force)
            elif isinstance(force, openmm.HarmonicAngleForce):
                self._angles(force)
            elif isinstance(force, openmm.PeriodicTorsionForce):
                self._torsions(force)
            elif isinstance(force, openmm.NonbondedForce):
                if force.getNonbondedMethod() != openmm.NonbondedForce.NoCutoff:
                    raise ValueError("system: a NonbondedForce with a cutoff is not supported "
                                     "by the PyTorch force field; it needs NoCutoff")
                self._nonbonded(force)
            elif isinstance(force, openmm.GBSAOBCForce):
                if force.getNonbondedMethod() != openmm.GBSAOBCForce.NoCutoff:
                    raise ValueError("system: a GBSAOBCForce with a cutoff is not supported by "
                                     "the PyTorch force field; it needs NoCutoff")
                self._gbsa(force)

    # -- parameters -------------------------------------------------------------------------
    def _terms(self, term: str, rows: list[Any], n_atoms: int, names: tuple[str, ...]) -> None:
        """Buffers ``<term>_atoms`` (rows, n_atoms) and ``<term>_<name>`` (rows,) from OpenMM's
        per-term parameter lists (atom indices first, then the values in ``names``' order)."""
        self.register_buffer(f"{term}_atoms", _tensor([r[:n_atoms] for r in rows], torch.long)
                             .reshape(-1, n_atoms))
        for offset, name in enumerate(names):
            self.register_buffer(f"{term}_{name}",
                                 _tensor([_value(r[n_atoms + offset]) for r in rows]))
        self.terms.append(f"{term}s")

    def _bonds(self, force: Any) -> None:
        self._terms("bond", [force.getBondParameters(b) for b in range(force.getNumBonds())],
                    2, ("r0", "k"))

    def _angles(self, force: Any) -> None:
        self._terms("angle", [force.getAngleParameters(a) for a in range(force.getNumAngles())],
                    3, ("theta0", "k"))

    def _torsions(self, force: Any) -> None:
        self._terms("torsion", [force.getTorsionParameters(t)
                                for t in range(force.getNumTorsions())], 4, ("n", "phase", "k"))

    def _nonbonded(self, force: Any) -> None:
        n = self.n_atoms
        params = [force.getParticleParameters(i) for i in range(n)]
        charge = np.array([_value(p[0]) for p in params])
        sigma = np.array([_value(p[1]) for p in params])
        epsilon = np.array([_value(p[2]) for p in params])
        excepted = np.zeros((n, n), dtype=bool)
        exceptions = []
        for e in range(force.getNumExceptions()):
            i, j, q, s, eps = force.getExceptionParameters(e)
            excepted[i, j] = excepted[j, i] = True
            if _value(q) != 0.0 or _value(eps) != 0.0:  # 1-2 and 1-3 pairs: no interaction
                exceptions.append((i, j, _value(q), _value(s), _value(eps)))
        i, j = np.triu_indices(n, 1)
        keep = ~excepted[i, j]
        i, j = i[keep], j[keep]
        pairs = np.stack([i, j], 1)
        exc = np.array(exceptions, dtype=np.float64).reshape(-1, 5)
        # Ordinary pairs and exceptions in one list: charge product, σ, ε per pair.
        all_pairs = np.concatenate([pairs, exc[:, :2].astype(np.int64)])
        self.register_buffer("pair_atoms", _tensor(all_pairs, torch.long).reshape(-1, 2))
        self.register_buffer("pair_qq", _tensor(np.concatenate([charge[i] * charge[j],
                                                                exc[:, 2]])))
        self.register_buffer("pair_sigma", _tensor(np.concatenate([0.5 * (sigma[i] + sigma[j]),
                                                                   exc[:, 3]])))
        self.register_buffer("pair_epsilon", _tensor(np.concatenate(
            [np.sqrt(epsilon[i] * epsilon[j]), exc[:, 4]])))
        self.terms.append("nonbonded")

    def _gbsa(self, force: Any) -> None:
        n = self.n_atoms
        params = [force.getParticleParameters(i) for i in range(n)]
        self.register_buffer("gb_charge", _tensor([_value(p[0]) for p in params]))
        radius = np.array([_value(p[1]) for p in params])
        offset_radius = radius - GB_OFFSET_NM
        self.register_buffer("gb_radius", _tensor(radius))
        self.register_buffer("gb_offset_radius", _tensor(offset_radius))
        self.register_buffer("gb_scaled_radius", _tensor(
            np.array([_value(p[2]) for p in params]) * offset_radius))
        self.gb_prefactor = -0.5 * ONE_4PI_EPS0 * (1.0 / force.getSoluteDielectric()
                                                   - 1.0 / force.getSolventDielectric())
        self.gb_surface = 4.0 * math.pi * _value(force.getSurfaceAreaEnergy())
        self.terms.append("gbsa")

    # -- energy ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """U (...,) kJ/mol of positions x (..., n, 3) nm; differentiable."""
        if x.shape[-2:] != (self.n_atoms, 3):
            raise ValueError(f"x: shape {tuple(x.shape)} is not allowed; need (..., "
                             f"{self.n_atoms}, 3)")
        energy = x.new_zeros(x.shape[:-2])
        for term in self.terms:
            energy = energy + getattr(self, f"_{term}_energy")(x)
        return energy

    def _bonds_energy(self, x: torch.Tensor) -> torch.Tensor:
        i, j = self.bond_atoms.T
        r = torch.linalg.vector_norm(x[..., j, :] - x[..., i, :], dim=-1)
        return (0.5 * self.bond_k * (r - self.bond_r0) ** 2).sum(-1)

    def _angles_energy(self, x: torch.Tensor) -> torch.Tensor:
        from boltzgen.internal_coordinates import bond_angle

        i, j, k = self.angle_atoms.T
        theta = bond_angle(x[..., i, :], x[..., j, :], x[..., k, :])
        return (0.5 * self.angle_k * (theta - self.angle_theta0) ** 2).sum(-1)

    def _torsions_energy(self, x: torch.Tensor) -> torch.Tensor:
        from boltzgen.internal_coordinates import dihedral

        i, j, k, m = self.torsion_atoms.T
        phi = dihedral(x[..., i, :], x[..., j, :], x[..., k, :], x[..., m, :])
        return (self.torsion_k * (1.0 + torch.cos(self.torsion_n * phi - self.torsion_phase))
                ).sum(-1)

    def _nonbonded_energy(self, x: torch.Tensor) -> torch.Tensor:
        i, j = self.pair_atoms.T
        r = torch.linalg.vector_norm(x[..., j, :] - x[..., i, :], dim=-1)
        six = (self.pair_sigma / r) ** 6
        return (ONE_4PI_EPS0 * self.pair_qq / r
                + 4.0 * self.pair_epsilon * (six * six - six)).sum(-1)

    def _gbsa_energy(self, x: torch.Tensor) -> torch.Tensor:
        n = self.n_atoms
        diff = x[..., :, None, :] - x[..., None, :, :]  # (..., n, n, 3): x_i − x_j
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        # |x_i − x_j| with the diagonal set to 1 (its terms are masked): no 0 under a root
        r = torch.sqrt(torch.where(eye, 1.0, (diff**2).sum(-1)))
        rho = self.gb_offset_radius[:, None]  # ρ̃_i along rows
        s = self.gb_scaled_radius[None, :]  # s_j along columns
        upper = r + s
        lower = torch.maximum(rho.expand_as(r), (r - s).abs())
        inv_l, inv_u = 1.0 / lower, 1.0 / upper
        term = (inv_l - inv_u + 0.25 * r * (inv_u**2 - inv_l**2)
                + 0.5 * torch.log(lower / upper) / r
                + 0.25 * s**2 * (inv_l**2 - inv_u**2) / r)
        term = term + torch.where(rho < s - r, 2.0 * (1.0 / rho - inv_l), 0.0)
        term = torch.where(~eye & (rho < upper), term, 0.0)
        psi = 0.5 * self.gb_offset_radius * term.sum(-1)
        tanh = torch.tanh(OBC_ALPHA * psi - OBC_BETA * psi**2 + OBC_GAMMA * psi**3)
        born = 1.0 / (1.0 / self.gb_offset_radius - tanh / self.gb_radius)
        bb = born[..., :, None] * born[..., None, :]
        r2 = torch.where(eye, 0.0, r**2)
        f = torch.sqrt(r2 + bb * torch.exp(-r2 / (4.0 * bb)))
        qq = self.gb_charge[:, None] * self.gb_charge[None, :]
        polar = self.gb_prefactor * (qq / f).sum((-1, -2))
        nonpolar = (self.gb_surface * (self.gb_radius + SA_PROBE_NM) ** 2
                    * (self.gb_radius / born) ** 6).sum(-1)
        return polar + nonpolar

"""Base class of the molecular / toy systems.

A system defines a potential energy U(x) on its flow coordinates x in R^dim. Its Boltzmann
density at temperature T is p_T(x) = exp(-u_T(x)) / Z(T) with the reduced energy
u_T(x) = U(x) / (k_B T) and the configurational partition function

    Z(T) = ∫ exp(-U(x) / (k_B T)) dx      (over the flow coordinates, measure ``estimand_note``),

and the reduced (dimensionless) free energy f(T) = -ln Z(T), in units of kT (docs/architecture.md,
Conventions).

Constructor convention: a concrete system's ``__init__`` takes only keyword parameters with
defaults (its physical parameters), validates them and stores each under the same attribute
name, so that :func:`boltzgen.systems.make_system` can build it from a config mapping.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from boltzgen._checks import check_float
from boltzgen.layouts import Layout, VectorLayout
from boltzgen.rigid.bodies import RigidLayout


class System(ABC):
    """A potential energy on ``dim`` flow coordinates.

    Subclasses set ``kind`` (registry name), ``estimand_note`` (one sentence: coordinates and
    measure in which Z is defined), ``dim`` and ``boltzmann_constant`` (energy units per
    temperature unit; 1.0 for toy systems in reduced units, where temperature means kT), and
    implement :meth:`potential`. Forces, where needed, follow by autograd.
    """

    kind: ClassVar[str]
    estimand_note: ClassVar[str]
    # True where :meth:`potential` runs OpenMM in the calling process (ice): the roles that
    # call it then run OpenMM on the job's energy.platform (campaign.plan.openmm_roles).
    potential_runs_openmm: ClassVar[bool] = False
    dim: int
    boltzmann_constant: float = 1.0

    @classmethod
    def parameter_names(cls) -> list[str]:
        """Names of the keyword parameters of ``__init__`` (the physical parameters)."""
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]

    def parameters(self) -> dict[str, float]:
        """The physical parameters of this instance, ``{name: value}``."""
        return {name: getattr(self, name) for name in self.parameter_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.parameters().items())
        return f"{type(self).__name__}({args})"

    def _check_coordinates(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor of shape (..., {self.dim}), got {type(x)}")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x: shape {tuple(x.shape)} is not allowed; {self.kind} needs (..., {self.dim})"
            )

    @abstractmethod
    def potential(self, x: torch.Tensor) -> torch.Tensor:
        """Potential energy U(x) in energy units; shape (..., dim) -> (...); differentiable."""

    def reduced_energy(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """Reduced energy u_T(x) = U(x) / (k_B T), dimensionless; shape (..., dim) -> (...)."""
        t = check_float("temperature", temperature, positive=True)
        return self.potential(x) / (self.boltzmann_constant * t)

    def set_openmm_platform(self, platform: str) -> None:
        """The OpenMM platform (the job's ``energy.platform``) on which :meth:`potential` runs,
        for systems whose potential is OpenMM (``potential_runs_openmm``); others ignore it."""
        # A torch potential runs on its tensors' device: there is no platform to choose.
        return

    def openmm_system(self) -> Any:
        """This system as an ``openmm.System``, for the OpenMM energy backend.

        Systems that support it also define ``openmm_positions(x)`` (flow coordinates -> (B, n, 3)
        nm) and ``flow_gradient(forces, x)`` (OpenMM forces at x -> ∇U in flow coordinates).
        """
        raise NotImplementedError(f"system '{self.kind}' has no OpenMM form")

    @classmethod
    def supports_openmm(cls) -> bool:
        return cls.openmm_system is not System.openmm_system

    def ideal_coordinates(self) -> np.ndarray:
        """A starting structure in flow coordinates (dim,), for MD (e.g. the ideal crystal)."""
        raise NotImplementedError(f"system '{self.kind}' has no starting structure")

    @classmethod
    def supports_ideal_coordinates(cls) -> bool:
        return cls.ideal_coordinates is not System.ideal_coordinates

    @classmethod
    def supports_md(cls) -> bool:
        """MD needs the OpenMM form and a starting structure."""
        return cls.supports_openmm() and cls.supports_ideal_coordinates()

    def pair_histograms(self, x: np.ndarray, n_bins: int = 60) -> dict[str, Any]:
        """Pair-distance histograms of molecular samples by element pair (radial distribution
        functions), for the structural comparison of a job's report."""
        raise NotImplementedError(f"system '{self.kind}' has no pair structure")

    @classmethod
    def supports_pair_histograms(cls) -> bool:
        return cls.pair_histograms is not System.pair_histograms

    def exact_free_energy(self, temperature: float) -> float | None:
        """Exact f(T) = -ln Z(T) in kT (Z as in the module docstring), or None if unknown."""
        check_float("temperature", temperature, positive=True)
        return None

    @property
    def molecule_count(self) -> int | None:
        """Molecules of a molecular system (per-molecule free energies divide by it), else None."""
        return None

    def layout(self) -> Layout:
        """The geometry of the flow coordinates (:mod:`boltzgen.layouts`), which picks the flows
        that suit this system; default: a plain vector in R^dim. ``layout().dim == dim``."""
        return VectorLayout(self.dim)

    def rigid_layout(self) -> RigidLayout | None:
        """The :class:`boltzgen.rigid.bodies.RigidLayout` of a rigid-body system, else None.

        Rigid-body systems have flow coordinates on a manifold (torus × S³ per body); their base
        is the uniform distribution (:class:`boltzgen.priors.UniformRigidPrior`).
        """
        layout = self.layout()
        return layout if isinstance(layout, RigidLayout) else None

    @property
    def symmetry_operation_count(self) -> int:
        """G, the number of operations :meth:`symmetry_images` knows (the identity included)."""
        return 1

    def symmetry_images(self, x: np.ndarray, operations: np.ndarray | None = None) -> np.ndarray:
        """Samples (B, dim) moved by the system's G symmetry operations that keep it in its own
        basin (a crystal's space group; operation 0 is the identity): with ``operations``
        (B,) ints in [0, G), row b moved by operation ``operations[b]``; without, every image,
        (G B, dim) with image g of sample b at row g B + b. Default: none known, G = 1."""
        arr = self._as_samples(x)
        if operations is not None and np.any(np.asarray(operations) != 0):
            raise ValueError("operations: only 0 (the identity) is allowed; system "
                             f"'{self.kind}' has no known symmetry operations")
        return arr

    @classmethod
    def supports_symmetry_images(cls) -> bool:
        return cls.symmetry_images is not System.symmetry_images

    def exact_samples(self, n: int, temperature: float, seed: int) -> tuple[np.ndarray, int]:
        """``n`` independent samples of p_T and the number of proposals used, where available."""
        raise NotImplementedError(f"system '{self.kind}' cannot draw exact samples")

    @classmethod
    def supports_exact_sampling(cls) -> bool:
        return cls.exact_samples is not System.exact_samples

    def exact_mode_probabilities(self, temperature: float) -> np.ndarray | None:
        """Exact probability of each mode (cells of :meth:`mode_index`) at T, or None."""
        return None

    def mode_index(self, x: np.ndarray) -> np.ndarray | None:
        """The mode (an int) each sample (N, dim) belongs to, or None for systems without modes."""
        return None

    # How many modes :meth:`mode_index` tells apart, for a system without exact mode weights
    # (whose modes are counted in a reference's samples instead); 0: none.
    mode_count: ClassVar[int] = 0

    # Name of the coordinate whose sign defines two metastable states (metrics
    # ``delta_f_<label>``), for systems with :meth:`metastable_coordinate`.
    metastable_label: ClassVar[str] = ""

    def metastable_coordinate(self, x: np.ndarray) -> np.ndarray:
        """The coordinate (N,) whose sign splits samples (N, dim) into two metastable states,
        state 0 where it is < 0 and state 1 where it is > 0 (a peptide's φ); the free energy
        between them, ΔF = F(1) − F(0) = −ln(P(1) / P(0)) in kT, is estimated from the
        reference and from the reweighted flow."""
        raise NotImplementedError(f"system '{self.kind}' defines no metastable states")

    @classmethod
    def supports_metastable_states(cls) -> bool:
        return cls.metastable_coordinate is not System.metastable_coordinate

    def valid_samples(self, x: np.ndarray) -> np.ndarray:
        """True (N,) for samples (N, dim) of the target's own region of configuration space
        (default: all); an invalid sample (a D amino acid of an L peptide) gets weight zero in
        every estimate and is counted (``valid_fraction``)."""
        return np.ones(len(self._as_samples(x)), dtype=bool)

    @classmethod
    def checks_validity(cls) -> bool:
        return cls.valid_samples is not System.valid_samples

    def backbone_dihedrals(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(φ, ψ) in radians (N,) each of samples (N, dim), for Ramachandran plots."""
        raise NotImplementedError(f"system '{self.kind}' has no backbone")

    @classmethod
    def supports_backbone_dihedrals(cls) -> bool:
        return cls.backbone_dihedrals is not System.backbone_dihedrals

    def observables(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """1-D arrays for marginal histograms; default: each coordinate, ``{"x1": ..., ...}``.

        ``x`` has shape (N, dim). Arrays may differ in length from N (they feed histograms).
        """
        arr = self._as_samples(x)
        return {f"x{i + 1}": arr[:, i].copy() for i in range(self.dim)}

    def _as_samples(self, x: np.ndarray) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(
                f"x: shape {arr.shape} is not allowed; {self.kind} observables need (N, {self.dim})"
            )
        return arr

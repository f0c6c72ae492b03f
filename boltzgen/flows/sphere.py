"""Flip-equivariant bijections of S³ (unit quaternions), with log|det J| on the sphere.

Rigid-body flows (Köhler, Invernizzi, de Haan, Noé, ICML 2023; docs/architecture.md, Ice XI and
rigid bodies) keep the density
on SO(3) proper by making every map of S³ odd, f(−q) = −f(q): then a flip-symmetric density
stays flip-symmetric. Both maps here are *projective*: y = G(p) / |G(p)| with G odd and
positively homogeneous, so they act on directions.

Log-det convention: log|det J| is taken on the sphere, i.e. of the 3 × 3 Jacobian between the
orthonormal tangent bases E_p and E_y of :func:`boltzgen.rigid.quaternions.tangent_basis`:

    J_tan = E_yᵀ (dG/dp) E_p / |G(p)|,

because the radial part of dG/dp is removed by the normalisation and E_yᵀ G = 0. For a linear
G(p) = A p this gives the closed form log|det A| − 4 log|A p| (the "angular central" change of
variables, d = 4).

**Symmetrized (double) Möbius.** With the sphere Möbius map M(p, q) = (1 − |q|²)/|p − q|² ·
(p − q) − q, |q| < 1, the symmetrized map normalize(M(p, q) + M(p, −q)) works out to the
projective *linear* map of

    A(q) = (1 + |q|²) I − 2 q qᵀ,

(in the plane of p and q with z = e^{iθ}: M(z, r) + M(z, −r) = 2z(1 − r²)/(1 − r²z²), whose
direction is that of (1 − r²) cos θ q̂ + (1 + r²) sin θ u). Hence, with ρ = |q|²,

    log|det J| = ln[(1 − ρ)(1 + ρ)³ / ((1 + ρ)² − 4 (q·p)²)²],

the closed form for d = 4, and the inverse is again closed-form: A(q)⁻¹ ∝
(1 − ρ) I + 2 q qᵀ. Along a fixed unit axis a, A = (1 + ρ) I − 2ρ a aᵀ, and the inverse of the
map with ρ is the map with −ρ; :func:`double_mobius_axial` takes a *signed* ρ ∈ (−1, 1)
(ρ > 0: the symmetrized Möbius with q = √ρ a, pushing mass away from ±a; ρ < 0: its inverse,
pulling mass towards ±a). An axial map changes only the angle θ between p and ±a and keeps
the direction u of p's component orthogonal to a, which its conditioner may therefore see.

**Projective convex gradient.** y = ∇ψ(p) / |∇ψ(p)| with ψ even, strictly convex and
2-homogeneous, here

    ψ(x) = ½|x|² + γ · ½ (Σ_k α_k (w_k·x)^{2m})^{1/m},    γ, α_k > 0, m >= 2,

(a squared weighted ℓ_{2m} norm of W x plus a quadratic; both terms are convex, even and
2-homogeneous). For a 2-homogeneous strictly convex ψ the map is the Gauss map of the level set
{ψ = 1} composed with the radial projection of S³ onto it, hence a diffeomorphism of S³, and
it is odd because ∇ψ is. Where one term k dominates, a whole region of directions is sent close
to ±w_k: the map creates modes. Its inverse solves ∇ψ(x) = y (the unique minimiser of the
strictly convex ψ(x) − y·x) by damped Newton steps to |∇ψ(x) − y| <= ``INVERSE_TOLERANCE``
and returns x / |x|; gradients with respect to the parameters flow through one final Newton
step (implicit differentiation).
"""

from __future__ import annotations

import math

import torch

from boltzgen.rigid.quaternions import tangent_basis

__all__ = [
    "INVERSE_TOLERANCE",
    "axial_circle_mixture",
    "axial_mixture",
    "convex_gradient",
    "convex_gradient_inverse",
    "double_mobius",
    "double_mobius_axial",
]

INVERSE_TOLERANCE = 1e-12
"""Residual |∇ψ(x) − y| at which the convex-gradient inverse stops (float64)."""
MAX_NEWTON_STEPS = 100


def _normalize(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v / norm, norm[..., 0]


def double_mobius(p: torch.Tensor, q: torch.Tensor, inverse: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetrized Möbius map of p ∈ S³ with parameter q (|q| < 1), or its inverse.

    Shapes: p (..., 4), q broadcastable to p. Returns (y, log|det J|) with log-det (...).
    ValueError if some |q| >= 1 (the map degenerates on the unit sphere).
    """
    rho = (q * q).sum(-1)
    _check_inside("q", rho.detach().sqrt(), "Möbius parameter |q|")
    qp = (q * p).sum(-1)
    if inverse:  # A⁻¹ ∝ (1 − ρ) I + 2 q qᵀ
        image = (1.0 - rho)[..., None] * p + 2.0 * qp[..., None] * q
        log_det_a = torch.log1p(rho) + 3.0 * torch.log1p(-rho)
    else:
        image = (1.0 + rho)[..., None] * p - 2.0 * qp[..., None] * q
        log_det_a = torch.log1p(-rho) + 3.0 * torch.log1p(rho)
    y, norm = _normalize(image)
    return y, log_det_a - 4.0 * torch.log(norm)


def double_mobius_axial(p: torch.Tensor, axis: torch.Tensor, rho: torch.Tensor,
                        inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial symmetrized Möbius map with signed strength ρ ∈ (−1, 1) along the unit ``axis``.

    A = (1 + ρ) I − 2ρ a aᵀ; the inverse is the same map with −ρ. Shapes: p (..., 4), axis (4,)
    or broadcastable, rho (...). Returns (y, log|det J|). ValueError if some |ρ| >= 1.
    """
    _check_inside("rho", rho.detach().abs(), "signed strength |rho|")
    rho = -rho if inverse else rho
    c = (p * axis).sum(-1)
    image = (1.0 + rho)[..., None] * p - 2.0 * (rho * c)[..., None] * axis
    y, norm = _normalize(image)
    return y, torch.log1p(-rho) + 3.0 * torch.log1p(rho) - 4.0 * torch.log(norm)


def _check_inside(name: str, magnitude: torch.Tensor, what: str) -> None:
    """ValueError naming ``name`` unless every magnitude is finite and < 1."""
    if magnitude.numel() == 0:
        return
    worst = magnitude.max()
    if not bool(torch.isfinite(magnitude).all()) or float(worst) >= 1.0:
        raise ValueError(f"{name}: a {what} of {float(worst):.6g} is not allowed; it must be "
                         "finite and strictly inside the unit ball (< 1)")


def _psi_terms(x: torch.Tensor, weights: torch.Tensor, alphas: torch.Tensor, m: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z = W x (..., K), S = Σ α z^{2m} (...), g = Σ α z^{2m-1} w (..., 4)."""
    z = (weights * x[..., None, :]).sum(-1)
    s = (alphas * z ** (2 * m)).sum(-1)
    g = ((alphas * z ** (2 * m - 1))[..., None] * weights).sum(-2)
    return z, s, g


def _psi_gradient(x: torch.Tensor, gamma: torch.Tensor, weights: torch.Tensor,
                  alphas: torch.Tensor, m: int) -> torch.Tensor:
    """∇ψ(x) = x + γ S^{1/m − 1} g."""
    _, s, g = _psi_terms(x, weights, alphas, m)
    return x + (gamma * s ** (1.0 / m - 1.0))[..., None] * g


def _psi_hessian(x: torch.Tensor, gamma: torch.Tensor, weights: torch.Tensor,
                 alphas: torch.Tensor, m: int) -> torch.Tensor:
    """∇²ψ(x) = I + γ S^{1/m − 1} [(2m − 1) Wᵀ diag(α z^{2m−2}) W − 2(m − 1) g gᵀ / S]."""
    z, s, g = _psi_terms(x, weights, alphas, m)
    curvature = ((alphas * z ** (2 * m - 2))[..., None, None]
                 * weights[..., :, None] * weights[..., None, :]).sum(-3)
    inner = (2 * m - 1) * curvature - 2.0 * (m - 1) * g[..., :, None] * g[..., None, :] / s[
        ..., None, None]
    eye = torch.eye(4, dtype=x.dtype, device=x.device)
    return eye + (gamma * s ** (1.0 / m - 1.0))[..., None, None] * inner


def convex_gradient(p: torch.Tensor, gamma: torch.Tensor, weights: torch.Tensor,
                    alphas: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y = ∇ψ(p)/|∇ψ(p)| and log|det J| on S³ (module docstring).

    Shapes: p (..., 4); gamma (...) or scalar; weights (..., K, 4); alphas (..., K); m an int >= 2.
    """
    grad = _psi_gradient(p, gamma, weights, alphas, m)
    y, norm = _normalize(grad)
    hessian = _psi_hessian(p, gamma, weights, alphas, m)
    projected = tangent_basis(y).transpose(-1, -2) @ hessian @ tangent_basis(p)
    return y, torch.linalg.slogdet(projected)[1] - 3.0 * torch.log(norm)


def convex_gradient_inverse(y: torch.Tensor, gamma: torch.Tensor, weights: torch.Tensor,
                            alphas: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p with convex_gradient(p) = y, and log|det dp/dy| = −log|det J(p)|.

    Damped Newton on the strictly convex ψ(x) − y·x from x = y, without autograd, until
    |∇ψ(x) − y| <= INVERSE_TOLERANCE for every sample (RuntimeError naming the residual if not
    within MAX_NEWTON_STEPS); then one Newton step with autograd on, whose derivative with
    respect to the parameters is the implicit-function derivative.
    """
    with torch.no_grad():
        x = y.clone()
        args = (gamma.detach(), weights.detach(), alphas.detach(), m)
        for _ in range(MAX_NEWTON_STEPS):
            residual = _psi_gradient(x, *args) - y
            worst = torch.linalg.vector_norm(residual, dim=-1)
            if x.numel() == 0 or float(worst.max()) <= INVERSE_TOLERANCE:
                break
            step = torch.linalg.solve(_psi_hessian(x, *args), residual[..., None])[..., 0]
            # Backtracking on the objective ψ(x) − y·x, ψ = ½ x·∇ψ(x) (Euler, 2-homogeneous).
            objective = 0.5 * (x * _psi_gradient(x, *args)).sum(-1) - (y * x).sum(-1)
            scale = torch.ones_like(worst)
            for _ in range(30):
                trial = x - scale[..., None] * step
                trial_objective = 0.5 * (trial * _psi_gradient(trial, *args)).sum(-1) - (
                    y * trial).sum(-1)
                bad = trial_objective > objective + 1e-14 * objective.abs()
                if not bool(bad.any()):
                    break
                scale = torch.where(bad, 0.5 * scale, scale)
            x = x - scale[..., None] * step
        else:
            raise RuntimeError(
                f"convex_gradient_inverse: Newton did not reach residual {INVERSE_TOLERANCE:g} in "
                f"{MAX_NEWTON_STEPS} steps (worst {float(worst.max()):.3g})"
            )
    residual = _psi_gradient(x, gamma, weights, alphas, m) - y
    x = x - torch.linalg.solve(_psi_hessian(x, gamma, weights, alphas, m).detach(),
                               residual[..., None])[..., 0]
    p = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    _, logdet = convex_gradient(p, gamma, weights, alphas, m)
    return p, -logdet


def axial_mixture(p: torch.Tensor, axis: torch.Tensor, log_scales: torch.Tensor,
                  weights: torch.Tensor, inverse: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Convex combination of axial double-Möbius angle maps (Rezende et al. 2020's mixture).

    Write p = ±cos θ a + sin θ u with θ ∈ [0, π/2] the angle to the nearer of ±a. One axial
    double Möbius with strength λ = e^t maps θ to atan2(λ sin θ, cos θ) (tan θ' = λ tan θ; this
    is :func:`double_mobius_axial` with ρ = tanh(t/2)). The mixture

        θ' = H(θ) = Σ_k w_k atan2(λ_k sin θ, cos θ),   w_k >= 0, Σ w_k = 1,

    is increasing and fixes 0 and π/2, so it keeps u, the hemisphere and the flip symmetry;
    K = 1 is exactly the double Möbius map. On S³ (one direction along θ, two along u):

        log|det J| = log H'(θ) + 2 log(sin θ' / sin θ),
        H'(θ) = Σ_k w_k λ_k / (cos²θ + λ_k² sin²θ).

    Inverse: closed form for K = 1, else a safeguarded Newton / bisection solve on θ ∈ [0, π/2]
    (:func:`_monotone_root`) to machine precision and one
    Newton step with autograd on (implicit-function gradients). Shapes: p (..., 4), axis (4,),
    log_scales and weights (..., K) (weights already normalized).
    """
    lam = torch.exp(log_scales)

    def h(t: torch.Tensor) -> torch.Tensor:
        return (weights * torch.atan2(lam * torch.sin(t)[..., None], torch.cos(t)[..., None])
                ).sum(-1)

    def h_prime(t: torch.Tensor) -> torch.Tensor:
        cos2, sin2 = (torch.cos(t) ** 2)[..., None], (torch.sin(t) ** 2)[..., None]
        return (weights * lam / (cos2 + lam**2 * sin2)).sum(-1)

    def bracket(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Component k alone inverts to θ_k = atan2(sin θ' / λ_k, cos θ'); the mixture's root
        # lies between the smallest and the largest θ_k (each term is increasing).
        singles = torch.atan2(torch.sin(target)[..., None] / lam.detach(),
                              torch.cos(target)[..., None])
        return singles.min(-1).values, singles.max(-1).values

    def closed_inverse(target: torch.Tensor) -> torch.Tensor:
        return torch.atan2(torch.sin(target) / lam[..., 0], torch.cos(target))

    return _axial_angle_map(p, axis, h, h_prime, bracket, inverse,
                            closed_inverse if log_scales.shape[-1] == 1 else None)


def _axial_angle_map(p: torch.Tensor, axis: torch.Tensor, h, h_prime, bracket, inverse: bool,
                     closed_inverse=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply an increasing angle map θ' = h(θ) of [0, π/2] (fixing 0 and π/2) to
    p = side · cos θ · a + sin θ · u, keeping u and the side; returns (y, log|det J|) on S³,
    log h'(θ) + 2 log(sin θ' / sin θ).

    Inverse: ``closed_inverse(θ')`` if given, else :func:`_monotone_root` in the bracket
    ``bracket(θ')`` (evaluated without gradients) and one Newton step with autograd on
    (implicit-function gradients).
    """
    c = (p * axis).sum(-1)
    perp = p - c[..., None] * axis
    s = torch.linalg.vector_norm(perp, dim=-1)
    u = perp / s.clamp_min(1e-300)[..., None]
    side = torch.where(c < 0, -torch.ones_like(c), torch.ones_like(c))
    theta = torch.atan2(s, c.abs())
    if not inverse:
        theta_out = h(theta)
        log_det = torch.log(h_prime(theta)) + 2.0 * _log_sin_ratio(theta_out, theta, h_prime)
    else:
        if closed_inverse is not None:
            theta_in = closed_inverse(theta)
        else:
            with torch.no_grad():
                target = theta.detach()
                lower, upper = bracket(target)
                root = _monotone_root(h, h_prime, target, lower, upper)
            theta_in = root - (h(root) - theta) / h_prime(root).detach()
        theta_out = theta_in
        log_det = -(torch.log(h_prime(theta_in)) + 2.0 * _log_sin_ratio(theta, theta_in, h_prime))
    y = (side * torch.cos(theta_out))[..., None] * axis + torch.sin(theta_out)[..., None] * u
    return y, log_det


def _half_phase(cos_b: torch.Tensor, sin_b: torch.Tensor, re: torch.Tensor, im: torch.Tensor
                ) -> torch.Tensor:
    """φ_w(β) = arg(1 − w e^{−iβ}) ∈ (−π/2, π/2) for w = re + i·im, from cos β and sin β
    (continuous: the real part 1 − re cos β − im sin β is > 0 for |w| < 1)."""
    return torch.atan2(re * sin_b - im * cos_b, 1.0 - re * cos_b - im * sin_b)


def _lift_derivative(cos_b: torch.Tensor, sin_b: torch.Tensor, re: torch.Tensor,
                     im: torch.Tensor) -> torch.Tensor:
    """dh_w/dβ = (1 − |w|²) / |e^{iβ} − w|²."""
    norm2 = re * re + im * im
    return (1.0 - norm2) / (1.0 - 2.0 * (re * cos_b + im * sin_b) + norm2)


def axial_circle_mixture(p: torch.Tensor, axis: torch.Tensor, centres: torch.Tensor,
                         weights: torch.Tensor, inverse: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial map whose angle map is a mixture of circle Möbius maps with complex centres.

    As in :func:`axial_mixture`, p = ±cos θ a + sin θ u and only θ ∈ [0, π/2] changes. On the
    doubled angle β = 2θ the axial double Möbius map is the circle Möbius map
    M_w(z) = (z − w)/(1 − w̄ z) with a *real* centre w (tan θ' = λ tan θ, λ = (1 + w)/(1 − w)),
    which can move mass only towards the poles ±a or the equator. Here w is complex
    (Rezende et al. 2020's circle Möbius mixtures), so a component can put a mode at any
    angle to a. With h_w the increasing lift of M_w fixing β = 0, each component is
    symmetrized under β -> 2π − β (conjugation),

        g_w(β) = ½ [h_w(β) + 2π − h_w(2π − β)],    G = Σ_k w_k g_{w_k},   θ' = G(2θ)/2,

    so that G fixes 0 and π (the poles and the equator, hence u, the side and the flip
    symmetry). For real w, g_w = h_w is exactly the axial double Möbius map. g is even in
    Im w, so a centre must not start on the real axis (its gradient would vanish there).
    Log-det on S³: log G'(2θ) + 2 log(sin θ' / sin θ), with g_w' = ½[h_w'(β) + h_w'(2π − β)]
    and h_w'(β) = (1 − |w|²)/|e^{iβ} − w|².

    Inverse: each h_w has a closed-form inverse, so each g_w⁻¹(β') lies between h_w⁻¹(β') and
    2π − h_w⁻¹(2π − β'), and the mixture's root between the smallest and largest of these over
    k; :func:`_monotone_root` then solves to machine precision, and one Newton step with
    autograd on gives the implicit-function gradients. Shapes: p (..., 4), axis (4,), centres
    complex (..., K) with |w| < 1, weights (..., K) (normalized).
    """
    re, im = centres.real, centres.imag
    phase_at_zero = torch.atan2(-im, 1.0 - re)  # φ_w(0)

    # Real arithmetic throughout (complex tensors are several times slower here). With
    # h_w(β) = β + 2 [φ_w(β) − φ_w(0)] and cos, sin even and odd under β -> 2π − β:
    # g_w(β) = β + φ_w(β) − φ_w(2π − β).
    def h(t: torch.Tensor) -> torch.Tensor:
        b = 2.0 * t[..., None]
        cos_b, sin_b = torch.cos(b), torch.sin(b)
        g = b + _half_phase(cos_b, sin_b, re, im) - _half_phase(cos_b, -sin_b, re, im)
        return 0.5 * (weights * g).sum(-1)

    def h_prime(t: torch.Tensor) -> torch.Tensor:
        b = 2.0 * t[..., None]
        cos_b, sin_b = torch.cos(b), torch.sin(b)
        return (weights * 0.5 * (_lift_derivative(cos_b, sin_b, re, im)
                                 + _lift_derivative(cos_b, -sin_b, re, im))).sum(-1)

    def lift_inverse(target: torch.Tensor) -> torch.Tensor:
        # M_w⁻¹ = M_{−w}: h_w⁻¹(β') = β' + c + 2 φ_{−w}(β' + c) with c = 2 φ_w(0).
        shifted = target + 2.0 * phase_at_zero.detach()
        return shifted + 2.0 * _half_phase(torch.cos(shifted), torch.sin(shifted),
                                           -re.detach(), -im.detach())

    def bracket(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        doubled = 2.0 * target[..., None]
        ends = torch.cat([lift_inverse(doubled),
                          2.0 * math.pi - lift_inverse(2.0 * math.pi - doubled)], dim=-1)
        lower = (0.5 * ends.min(-1).values).clamp(0.0, 0.5 * math.pi)
        upper = (0.5 * ends.max(-1).values).clamp(0.0, 0.5 * math.pi)
        return torch.minimum(lower, upper), torch.maximum(lower, upper)

    return _axial_angle_map(p, axis, h, h_prime, bracket, inverse)


def _monotone_root(h, h_prime, target: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
                   ) -> torch.Tensor:
    """Solve h(t) = target for an increasing h, given a bracket h(lower) <= target <= h(upper):
    Newton steps safeguarded by bisection of the shrinking bracket, until |h(t) − target| <=
    1e-14 or the bracket is a few ulps wide (where h is steep, t is then known to float64
    resolution although h(t) is not) everywhere; at most 100 iterations (bisection alone needs
    about 55)."""
    lo, hi = lower.clone(), upper.clone()
    t = 0.5 * (lo + hi)
    for _ in range(100):
        residual = h(t) - target
        # converged samples stay where they are
        active = (residual.abs() > 1e-14) & (hi - lo > 4e-16 * t.abs().clamp_min(1.0))
        if not bool(active.any()):
            break
        above = residual > 0
        hi = torch.where(above, t, hi)
        lo = torch.where(above, lo, t)
        newton = t - residual / h_prime(t)
        inside = (newton > lo) & (newton < hi)
        t = torch.where(active, torch.where(inside, newton, 0.5 * (lo + hi)), t)
    return t


def _log_sin_ratio(theta_out: torch.Tensor, theta_in: torch.Tensor, h_prime) -> torch.Tensor:
    """log(sin θ_out / sin θ_in), with its limit log H'(0) at the poles (θ_in -> 0)."""
    tiny = theta_in < 1e-12
    safe_in = torch.where(tiny, torch.ones_like(theta_in), theta_in)
    safe_out = torch.where(tiny, torch.ones_like(theta_out), theta_out)
    ratio = torch.log(torch.sin(safe_out)) - torch.log(torch.sin(safe_in))
    return torch.where(tiny, torch.log(h_prime(torch.zeros_like(theta_in))), ratio)

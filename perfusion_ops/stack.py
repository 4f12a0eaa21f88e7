"""The e-independent half of Perfusion's gated rank-1 edit, for J concepts at once.

Notation (paper, Sec. 4 and App. B): ``e`` is a text encoding (what the host feeds ``to_k``/``to_v``),
``i_j`` the target input of concept j, ``q_j = C⁻¹ i_j`` its key in the C⁻¹ metric, ``β_j``/``τ_j`` its gate.
Everything here works on row vectors: ``e`` has shape ``(..., D)``, ``I`` and ``Q`` are ``(J, D)``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def similarity(e: Tensor, inputs: Tensor, keys: Tensor) -> Tensor:
    """Normalised metric similarity ``s_j(e) = (e·q_j) / (i_j·q_j)`` (Eq. 2–3), shape ``(..., J)``.

    ``s_j(i_j) = 1``; it is the linear gate of ROME's closed form (Eq. 1, App. A)."""
    energy = (inputs * keys).sum(-1)
    return (e @ keys.T) / energy


def gate(s: Tensor, beta: Tensor, tau: Tensor) -> Tensor:
    """Sigmoid gate ``g = σ((s − β) / τ)`` of Eq. 3, per concept (``beta``/``tau`` broadcast over J)."""
    return torch.sigmoid((s - beta) / tau)


def first_opening(gates: Tensor, window: int) -> Tensor:
    """Each concept's gate kept where it first opens: ``g'_t = g_t · Π_{u<t} (1 − g_u²)`` along the token axis of
    ``gates`` ``(..., T, J)``, restarting every ``window`` tokens (a text encoder's window: 77 for CLIP; the last
    window may be shorter).

    Why: a causal text encoder (CLIP) writes a trigger into every token after it, so Eq. 3's gate on the encoding
    alone also opens on the words after the trigger — on a second concept's trigger too (measured in the tiny world:
    s up to 1.09 after the trigger). No token before a trigger can carry it, so the first token that opens the gate
    is the trigger itself, and every open gate shuts the later ones: by 1 − g², a fifth left after a gate of 0.9,
    geometrically less after each further open one. Squared, so that the sigmoid's tail does not add up over a long
    prompt: ordinary tokens open Eq. 3's gate by σ(−β/τ) (0.009 at β 0.7, τ 0.15; 0.07 at β 0.4), 10⁻⁴ to 0.005
    squared. One trigger per concept and window is assumed."""
    t = gates.shape[-2]
    g = torch.nn.functional.pad(gates, (0, 0, 0, -t % window)).unflatten(-2, (-1, window))
    shut = torch.cumprod(1 - g.square(), -2)
    before = torch.cat([torch.ones_like(shut[..., :1, :]), shut[..., :-1, :]], -2)
    return (g * before).flatten(-3, -2)[..., :t, :]


class ConceptStack:
    """``I``, ``Q``, ``β``, ``τ`` of J concepts and the factor of their coupling matrix, computed once.

    The metric-orthogonal remainder of Eq. 10 is ``e⊥ = e − Iᵀ c`` with ``c`` chosen so that every
    ``q_j·e⊥ = 0``: ``c = M⁻¹ Q e`` with ``M = Q Iᵀ`` (``M_ab = q_a·i_b``; the Gram matrix ``G = I C⁻¹ Iᵀ``
    when all concepts share one C). In row form ``e⊥ = e − (e Qᵀ) R`` with ``R = M⁻ᵀ I``, so a call costs two
    thin matmuls. Solving with ``M`` itself (not a symmetrised G) keeps ``e⊥`` exactly orthogonal to every
    ``q_j`` even for concepts whose C estimates differ slightly. For J = 1, ``R = i / (i·q)``: Eq. 3's ``e⊥``.
    ``gated=False`` replaces the sigmoid by the linear ``s`` (Eq. 2, ROME's closed form).

    ``strength`` (J,) scales each concept's whole term: the edit is ``h = W e + Σ_j s_j Δ_j`` with
    ``Δ_j = g_j o_j − c_j W r_j`` (``c = e Qᵀ``, ``r_j`` the rows of R), i.e. ``e⊥ = e − (c ⊙ s) R`` and gates
    ``s_j g_j``. s = 1 (the default) is the paper's edit, s = 0 leaves the host projection bit for bit.

    ``windows`` (J,): 0 for Eq. 3's gate on every token, or a causal text encoder's window length for the gate kept
    where it first opens in each window (:func:`first_opening`); the concepts that have one share it. The remainder
    ``e⊥`` is the same either way.

    ``joint_gates``: each gate reads ``c_j``, the coordinate of ``e`` along ``i_j`` in the basis of all J target
    inputs — the very coefficients the remainder removes, ``c = M⁻¹ Q e`` (row form ``c = (e Qᵀ) M⁻ᵀ``) — instead of
    Eq. 4's ``s_j``. ``c_j(i_k) = δ_jk`` however correlated two concepts' inputs are, so a trigger opens no other
    concept's gate, and with the linear gate the edit maps every ``i_j`` to ``o_j`` exactly (the rank-J closed
    form), which Eq. 4 does only for metric-orthogonal inputs. For one concept, or orthogonal ones, ``c = s``.
    """

    def __init__(self, inputs: Tensor, keys: Tensor, beta, tau, gated: bool = True, strength=None, windows=None,
                 joint_gates: bool = False):
        inputs, keys = inputs.detach().float(), keys.detach().float()
        if inputs.ndim != 2 or inputs.shape != keys.shape:
            raise ValueError(f"target inputs {tuple(inputs.shape)} and keys {tuple(keys.shape)} must both be (J, D)")
        beta = torch.as_tensor(beta, dtype=torch.float32).reshape(-1).expand(inputs.shape[0]).clone()
        tau = torch.as_tensor(tau, dtype=torch.float32).reshape(-1).expand(inputs.shape[0]).clone()
        strengths = None if strength is None else torch.as_tensor(strength, dtype=torch.float32).reshape(-1)
        if strengths is not None and (strengths.shape[0] != inputs.shape[0] or bool(torch.all(strengths == 1))):
            if strengths.shape[0] != inputs.shape[0]:
                raise ValueError(f"need one strength per concept ({inputs.shape[0]}), got {strengths.shape[0]}")
            strengths = None  # all 1: the plain edit, without the extra products
        if not bool(torch.all(tau > 0)):
            raise ValueError(f"gate temperature τ must be > 0, got {tau.tolist()}")
        windows = [0] * inputs.shape[0] if windows is None else [int(w) for w in windows]
        if len(windows) != inputs.shape[0] or min(windows) < 0 or len(set(windows) - {0}) > 1:
            raise ValueError(f"need one gate window per concept, 0 or one shared length, got {windows}")
        self.window = max(windows)
        if self.window and not gated:
            raise ValueError("first-opening gates need the sigmoid gate")
        self.opening = None if min(windows) else torch.tensor(windows) > 0  # the concepts with one, if not all
        coupling = keys.double() @ inputs.double().T  # M_ab = q_a·i_b, J×J
        try:
            basis = torch.linalg.solve(coupling.T, inputs.double())
        except RuntimeError as err:  # singular M: two concepts with the same target input
            raise ValueError("concepts have linearly dependent target inputs; combine distinct concepts") from err
        self.inputs, self.keys, self.beta, self.tau, self.gated = inputs, keys, beta, tau, gated
        self.strengths = strengths
        self.energy = torch.diagonal(coupling).float()  # ||i_j||²_{C⁻¹}
        self.basis = basis.float()  # R = M⁻ᵀ I
        self.dual = torch.linalg.inv(coupling).T.float() if joint_gates else None  # M⁻ᵀ: e·q_j → c_j
        self._device_copies: dict[torch.device, tuple[Tensor, ...]] = {}

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def tensors_on(self, device: torch.device) -> tuple[Tensor, ...]:
        """``(Q, energy, β, τ, R, strengths or None, M⁻ᵀ or None)`` on ``device``; copied once per device (hosts
        move models)."""
        if device not in self._device_copies:
            tensors = (self.keys, self.energy, self.beta, self.tau, self.basis, self.strengths, self.dual)
            self._device_copies[device] = tuple(None if t is None else t.to(device) for t in tensors)
        return self._device_copies[device]

    def split(self, e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(e⊥, g, w)`` in float32 for any ``(..., D)``: the remainder of Eq. 10, the gates of Eq. 3 (or joint), the
        weights of the target outputs, ``w_j = s_j g_j`` (the gates themselves at strength 1)."""
        keys, energy, beta, tau, basis, strengths, dual = self.tensors_on(e.device)
        e = e.float()
        projections = e @ keys.T  # e·q_j
        s = projections / energy if dual is None else projections @ dual
        gates = gate(s, beta, tau) if self.gated else s
        if self.window:
            opened = first_opening(gates, self.window)
            gates = opened if self.opening is None else torch.where(self.opening.to(e.device), opened, gates)
        if strengths is not None:
            return e - (projections * strengths) @ basis, gates, gates * strengths
        return e - projections @ basis, gates, gates

    def remainder(self, e: Tensor) -> Tensor:
        """``e⊥`` of Eq. 10: ``e`` less its component in span{i_j}, orthogonal to every i_j in the C⁻¹ metric."""
        return self.split(e)[0]

"""The joint edit as PyTorch hook pairs on every edited ``attn2.to_k`` / ``attn2.to_v`` (the A1111 route).

Nothing is swapped or patched: each projection module keeps its class, its ``forward`` and its weights (the
webui loads checkpoints with ``strict=False``, so a replaced module would silently miss its weights), and
the edit lives only in two hooks per module, removed by :meth:`HookedEdit.remove`:

- the forward **pre**-hook turns the context ``e`` (B, T, D) into the core's rows ``[e⊥; e_sup]``
  (:meth:`SharedContext.prepare`, computed once per context for all 32 projections);
- the module then runs *as the host installed it* on those rows: ``torch.nn.Linear.forward`` as the
  webui's built-in Lora extension patched it (its functional path adds the LoRA delta there, its default
  path merges the LoRA into the weight first), low-VRAM casts, whatever — so ``W e⊥`` includes all of it;
- the forward hook hands that output to the core's :class:`EditedProjection`, which adds the gated target
  outputs and returns ``W e⊥ + Σ_j g_j o_j`` in the context's shape (Eq. 4). Key-locked rows take
  ``o_K = W_K e_sup`` from the same host call.

The module is called once per projection, as without the edit; only ``J`` rows are added to its input.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from perfusion_ops.edit import JointEdit

KeyResolver = Callable[[Tensor], Tensor]  # K context from the real context (global key lock), same shape


class _Projection:
    """The hook pair of one module (one layer, one path)."""

    def __init__(self, edit: JointEdit, layer: str, kv: str, width: int, key_context: KeyResolver | None):
        self.width, self.key_context = width, key_context
        self._output: Tensor | None = None
        self.projection = edit.projection(layer, kv, self._host_output)
        self.shared = edit.shared
        self._pending: dict[int, tuple[Tensor, Tensor]] = {}  # id(rows) -> (rows, context)
        self.calls = 0

    def _host_output(self, rows: Tensor) -> Tensor:
        return self._output

    def pre(self, module: nn.Module, args: tuple):
        if not args or not isinstance(args[0], Tensor) or args[0].shape[-1] != self.width or args[0].ndim < 2:
            return None  # not a text context: leave the call alone
        context = args[0]
        if self.key_context is not None:
            context = self.key_context(context)
        rows = self.shared.prepare(context).rows
        if len(self._pending) > 8:  # calls that raised between the hooks never reached post()
            self._pending.clear()
        self._pending[id(rows)] = (rows, context)
        return (rows, *args[1:])

    def post(self, module: nn.Module, args: tuple, output: Tensor):
        entry = self._pending.pop(id(args[0]), None) if args else None
        if entry is None or entry[0] is not args[0]:
            return None  # the pre-hook let this call through
        self._output = output
        try:
            self.calls += 1
            return self.projection(entry[1])
        finally:
            self._output = None


class HookedEdit:
    """A :class:`JointEdit` hooked into the ``to_k``/``to_v`` of every layer it edits under ``root``.

    ``root`` is the diffusion model (``sd_model.model.diffusion_model`` in the webui): layer names are its
    module paths (``input_blocks.1.1.transformer_blocks.0.attn2``). ``key_context`` (global key lock) maps a
    K context to the one K should see; V always sees the real context. Use as a context manager or call
    :meth:`remove`; removing twice is harmless.
    """

    def __init__(self, root: nn.Module, edit: JointEdit, key_context: KeyResolver | None = None):
        self.edit = edit
        self.handles: list = []
        self.projections: dict[tuple[str, str], _Projection] = {}
        if not edit.active:  # every concept at strength 0: the modules stay exactly as the host has them
            return
        attentions = {layer: root.get_submodule(layer) for layer in edit.layers}  # KeyError-free: fail first
        try:
            for layer, attention in attentions.items():
                for path in "kv":
                    module = getattr(attention, f"to_{path}")
                    hooks = _Projection(edit, layer, path, module.in_features,
                                        key_context if path == "k" else None)
                    self.handles.append(module.register_forward_pre_hook(hooks.pre))
                    self.handles.append(_register_first(module, hooks.post))
                    self.projections[(layer, path)] = hooks
        except BaseException:
            self.remove()
            raise

    @property
    def calls(self) -> int:
        """How many cross-attention layer calls the edit has changed since it was installed (V calls)."""
        return sum(p.calls for (_, path), p in self.projections.items() if path == "v")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> "HookedEdit":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _register_first(module: nn.Module, hook):
    """A forward hook that runs before any other forward hook of ``module`` (others see the edited output)."""
    try:
        return module.register_forward_hook(hook, prepend=True)
    except TypeError:  # torch < 2.0 has no prepend
        return module.register_forward_hook(hook)


def hooked_modules(root: nn.Module) -> list[str]:
    """Names of the ``to_k``/``to_v`` modules under ``root`` that carry a Perfusion hook (for checks)."""
    names = []
    for name, module in root.named_modules():
        hooks = list(module._forward_pre_hooks.values()) + list(module._forward_hooks.values())
        if any(isinstance(getattr(h, "__self__", None), _Projection) for h in hooks):
            names.append(name)
    return names

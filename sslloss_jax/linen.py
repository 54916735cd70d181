"""Flax Linen wrappers of the sslloss_jax losses: one ``nn.Module`` per public loss.

Same names, hyperparameters and call convention as :mod:`sslloss_jax.nnx`, generated from
the same table (``sslloss_jax/_wrappers.py``):

- Fields: the pure function's hyperparameters (names and defaults), the state's sizes
  (``output_dim``, ``dim``, ``memory_bank_size=(size, dim)``, ...), ``update=True``,
  ``state=None`` (a whole initial state instead of sizes), ``state_dtype=float32`` and
  ``rng_stream="loss"``.
- ``loss = module.apply(variables, *arrays, update=None, key=None, **overrides,
  mutable=["loss_state"], rngs=...)``: any hyperparameter may be overridden per call.
- State: the pure function's ``NamedTuple`` is the variable ``"state"`` of the
  ``"loss_state"`` collection. As ``flax.linen.BatchNorm``, ``init`` builds it without
  updating it (and without collectives: ``axis_name`` is ignored while initializing), and
  ``apply(..., mutable=["loss_state"])`` updates it; pass ``update=False`` to evaluate
  without ``mutable``. The memory bank's random initial contents use the ``"params"`` rng.
- Randomness: losses that take a PRNG key draw one per call with
  ``self.make_rng(rng_stream)`` (the ``"loss"`` rng of ``apply``, falling back to
  ``"params"``); ``key=`` overrides.

``LOSS_CLASSES`` maps each pure function name to its class.
"""

from __future__ import annotations

import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sslloss_jax import _wrappers as W

__all__ = ["LOSS_CLASSES", "COLLECTION"]

#: The variable collection of every loss state.
COLLECTION = "loss_state"


def _fields(wi: W.WrapperInfo) -> list[tuple[str, Any]]:
    """``(name, default)`` of the dataclass fields, required ones first."""
    # sizes are required unless a whole state= is given (checked when building the state)
    fields = list(wi.hypers.items()) + [
        (k, None if v is inspect.Parameter.empty else v) for k, v in wi.sizes.items()]
    if wi.stateful:
        if "update" not in wi.hypers:
            fields.append(("update", True))
        fields += [("state", None), ("state_dtype", jnp.float32)]
    if wi.key_param:
        fields.append(("rng_stream", "loss"))
    req = [f for f in fields if f[1] is inspect.Parameter.empty]
    return req + [f for f in fields if f[1] is not inspect.Parameter.empty]


def _make_class(wi: W.WrapperInfo) -> type[nn.Module]:
    call_sig = W.call_signature(wi)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arrays, update, key, overrides = W.bind_call(wi, args, kwargs)
        hyper = {k: getattr(self, k) for k in wi.hypers}
        hyper.update(overrides)
        initializing = self.is_initializing()
        if initializing and "axis_name" in hyper:
            hyper["axis_name"] = None  # as BatchNorm: no collectives while initializing
        if wi.key_param and key is None and (self.has_rng(self.rng_stream)
                                             or self.has_rng("params")):
            key = self.make_rng(self.rng_stream)
        if not wi.stateful:
            return W.call_pure(wi, hyper, arrays, None, key, True)[0]

        def init() -> Any:
            if self.state is not None:
                return self.state
            assert wi.state_kind is not None
            sizes = {k: getattr(self, k) for k in W.STATE_KINDS[wi.state_kind].sizes}
            rng = self.make_rng("params") if wi.needs_init_key else None
            return W.init_state(wi, sizes, rng, self.state_dtype)

        var = self.variable(COLLECTION, "state", init)
        update = (self.update if update is None else update) and not initializing
        out, new_state = W.call_pure(wi, hyper, arrays, var.value, key, bool(update))
        if update:
            var.value = jax.lax.stop_gradient(new_state)
        return out

    __call__.__signature__ = call_sig.replace(  # type: ignore[attr-defined]
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
                    *call_sig.parameters.values()])
    __call__.__doc__ = f"``{wi.class_name}{call_sig}``: the loss (see the class docstring)."
    __call__.__qualname__ = f"{wi.class_name}.__call__"
    __call__.__module__ = __name__
    fields = _fields(wi)
    ns: dict[str, Any] = {
        "__annotations__": {k: "Any" for k, _ in fields},
        "__call__": nn.compact(__call__), "__doc__": wi.docstring("linen"),
        "__module__": __name__, "__qualname__": wi.class_name,
        "pure_function": staticmethod(wi.fn),
    }
    ns.update({k: v for k, v in fields if v is not inspect.Parameter.empty})
    return type(wi.class_name, (nn.Module,), ns)


#: pure function name -> Linen class.
LOSS_CLASSES: dict[str, type[Any]] = {}  # nn.Module subclasses
for _wi in W.infos():
    LOSS_CLASSES[_wi.fn_name] = globals()[_wi.class_name] = _make_class(_wi)
    __all__.append(_wi.class_name)
del _wi


def __getattr__(name: str) -> Any:  # for type checkers: the classes are generated
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

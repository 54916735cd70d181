"""Flax NNX wrappers of the sslloss_jax losses: one ``nnx.Module`` per public loss.

The modules are thin: each call reads the hyperparameters (attributes) and the state
(an ``nnx.BatchStat`` variable), calls the pure function and writes the new state back.
They are generated from the table in ``sslloss_jax/_wrappers.py`` (one line per loss) by
:func:`_make_class`, which reads the pure function's signature.

Conventions (every class):

- ``Loss(**hyperparameters, [sizes], update=True, state=None, state_dtype=float32,
  rngs=None, rng_stream="loss")``: keyword-only; hyperparameters have the pure function's
  names and defaults and become attributes.
- ``loss = module(*arrays, update=None, key=None, **overrides)``: the positional arrays of
  the pure function (its state and key parameters removed); any hyperparameter may be
  overridden per call, e.g. a traced ``teacher_temp=`` schedule (no retrace).
- State: ``module.loss_state`` is a :class:`LossState` (an ``nnx.BatchStat``) holding the
  pure function's ``NamedTuple``, built in ``__init__`` from the constructor's sizes
  (``output_dim``, ``dim``, ``memory_bank_size=(size, dim)`` + ``rngs``, ...) or given whole
  with ``state=``. A call stores the new state unless ``update=False`` (attribute or call
  keyword); ``model.eval(update=False)`` / ``model.train(update=True)`` switch every loss
  of a model at once.
- Randomness: losses that take a PRNG key draw one per call from ``rngs[rng_stream]``
  (the ``"loss"`` stream, or ``rngs``' default stream if it has none); ``key=`` overrides.

``LOSS_CLASSES`` maps each pure function name to its class. This module imports flax;
``import sslloss_jax`` does not.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sslloss_jax import _wrappers as W

__all__ = ["LossState", "LOSS_CLASSES"]


class LossState(nnx.BatchStat):
    """The state ``NamedTuple`` of a loss (memory bank, DINO center, TiCo covariance, ...).

    An ``nnx.BatchStat``: not a parameter (``nnx.value_and_grad`` does not differentiate
    it), filtered with ``nnx.BatchStat`` or ``LossState``. Read it with
    ``module.loss_state.get_value()``.
    """


def _ctor_signature(wi: W.WrapperInfo) -> inspect.Signature:
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(k, kw, default=v) for k, v in wi.hypers.items()]
    # sizes are required unless a whole state= is given (checked when building the state)
    params += [inspect.Parameter(k, kw, default=None if v is inspect.Parameter.empty else v)
               for k, v in wi.sizes.items()]
    if wi.stateful:
        if "update" not in wi.hypers:
            params.append(inspect.Parameter("update", kw, default=True))
        params += [inspect.Parameter("state", kw, default=None),
                   inspect.Parameter("state_dtype", kw, default=jnp.float32)]
    if wi.key_param or wi.needs_init_key:
        params.append(inspect.Parameter("rngs", kw, default=None))
    if wi.key_param:
        params.append(inspect.Parameter("rng_stream", kw, default="loss"))
    return inspect.Signature(params)


def _make_class(wi: W.WrapperInfo) -> type[nnx.Module]:
    ctor_sig = _ctor_signature(wi)
    call_sig = W.call_signature(wi)

    def __init__(self, **kwargs: Any) -> None:
        try:
            bound = ctor_sig.bind(**kwargs)
        except TypeError as e:
            raise TypeError(f"{wi.class_name}: {e}") from None
        bound.apply_defaults()
        a = bound.arguments
        for k in (*wi.hypers, *wi.sizes):
            setattr(self, k, a[k])
        if wi.stateful:
            self.update = a["update"]
            state = a["state"]
            if state is None:
                rngs = a.get("rngs")
                key = rngs.params() if (wi.needs_init_key and rngs is not None) else None
                state = W.init_state(wi, {k: a[k] for k in W.STATE_KINDS[
                    wi.state_kind].sizes}, key, a["state_dtype"])  # type: ignore[index]
            self.loss_state = LossState(state)
        if wi.key_param:
            self.rngs = a["rngs"]
            self.rng_stream = a["rng_stream"]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arrays, update, key, overrides = W.bind_call(wi, args, kwargs)
        hyper = {k: getattr(self, k) for k in wi.hypers}
        hyper.update(overrides)
        if wi.key_param and key is None and self.rngs is not None:
            key = getattr(self.rngs, self.rng_stream)()
        if not wi.stateful:
            return W.call_pure(wi, hyper, arrays, None, key, True)[0]
        update = self.update if update is None else update
        out, new_state = W.call_pure(wi, hyper, arrays, self.loss_state.get_value(), key,
                                     update)
        if update:
            self.loss_state.set_value(jax.lax.stop_gradient(new_state))
        return out

    __init__.__signature__ = ctor_sig.replace(  # type: ignore[attr-defined]
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
                    *ctor_sig.parameters.values()])
    __call__.__signature__ = call_sig.replace(  # type: ignore[attr-defined]
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
                    *call_sig.parameters.values()])
    __call__.__doc__ = (f"``{wi.class_name}{call_sig}``: the loss"
                        + (" (the new state is stored unless ``update=False``)."
                           if wi.stateful and not wi.returns_state_only else "."
                           if not wi.stateful else
                           "; returns the state before the update."))
    for f in (__init__, __call__):
        f.__qualname__ = f"{wi.class_name}.{f.__name__}"
        f.__module__ = __name__
    cls = type(wi.class_name, (nnx.Module,), {
        "__init__": __init__, "__call__": __call__, "__doc__": wi.docstring("nnx"),
        "__module__": __name__, "__qualname__": wi.class_name,
        "pure_function": staticmethod(wi.fn), "__signature__": ctor_sig,
    })
    return cls


#: pure function name -> NNX class.
LOSS_CLASSES: dict[str, type[Any]] = {}  # nnx.Module subclasses
for _wi in W.infos():
    LOSS_CLASSES[_wi.fn_name] = globals()[_wi.class_name] = _make_class(_wi)
    __all__.append(_wi.class_name)
del _wi


def __getattr__(name: str) -> Any:  # for type checkers: the classes are generated
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

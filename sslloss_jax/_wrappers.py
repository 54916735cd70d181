"""The declarative table behind the Flax wrappers (``sslloss_jax.nnx``, ``sslloss_jax.linen``).

This module does not import flax. It reads the signature of each pure function and
describes what a wrapper needs: the positional arrays of the call, the state parameter
(found from its annotation, e.g. ``state: DINOState``), the PRNG-key parameter
(``key: jax.Array | None``) and the keyword-only hyperparameters with their defaults.
``nnx.py`` and ``linen.py`` turn each :class:`WrapperInfo` into a class with a small factory.

Adding a wrapper for a new loss is one line in :data:`WRAPPERS`; a loss with a new kind of
state also needs one line in :data:`STATE_KINDS`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

import sslloss_jax as S

__all__ = ["StateKind", "WrapperInfo", "STATE_KINDS", "WRAPPERS", "info", "call_pure"]


@dataclasses.dataclass(frozen=True)
class StateKind:
    """How a wrapper builds a state ``NamedTuple`` from its constructor's sizes.

    Attributes:
      init: ``init(key, dtype, **sizes) -> state``; ``key`` is ``None`` unless ``needs_key``.
      sizes: constructor keywords (with their defaults, ``inspect.Parameter.empty`` for a
        required one) that ``init`` reads. A size that is also a hyperparameter of the loss
        (W-MSE's ``embedding_dim``) is that hyperparameter.
      needs_key: whether building the state draws a PRNG key (the memory bank's random
        initial contents).
    """

    init: Callable[..., Any]
    sizes: Mapping[str, Any]
    needs_key: bool = False


_REQ = inspect.Parameter.empty

#: State type name (as written in the pure function's annotation) -> how to build it.
STATE_KINDS: dict[str, StateKind] = {
    "MemoryBankState": StateKind(
        lambda key, dtype, memory_bank_size: S.init_memory_bank(
            key, memory_bank_size[0], memory_bank_size[1], dtype),
        {"memory_bank_size": _REQ}, needs_key=True),
    "DINOState": StateKind(lambda key, dtype, output_dim: S.init_dino_state(output_dim, dtype),
                           {"output_dim": _REQ}),
    "IBOTState": StateKind(lambda key, dtype, output_dim: S.init_ibot_state(output_dim, dtype),
                           {"output_dim": _REQ}),
    "TiCoState": StateKind(lambda key, dtype, dim: S.init_tico_state(dim, dtype), {"dim": _REQ}),
    "WMSEState": StateKind(
        lambda key, dtype, embedding_dim: S.init_wmse_state(embedding_dim, dtype),
        {"embedding_dim": 128}),
    "SwaVQueueState": StateKind(
        lambda key, dtype, n_crops, size, dim: S.init_swav_queue(n_crops, size, dim, dtype),
        {"n_crops": _REQ, "size": _REQ, "dim": _REQ}),
}

#: ``(pure function name, class name)``: one line per wrapped public function. Class names
#: are lightly's where lightly has the loss. Functions that return a state only (a queue
#: update) become modules that return the state *before* the update and store the new one.
WRAPPERS: tuple[tuple[str, str], ...] = (
    ("ntxent_loss", "NTXentLoss"),
    ("ntxent_memory_bank_loss", "NTXentMemoryBankLoss"),
    ("dcl_loss", "DCLLoss"),
    ("dclw_loss", "DCLWLoss"),
    ("negative_cosine_similarity", "NegativeCosineSimilarity"),
    ("sym_negative_cosine_similarity_loss", "SymNegCosineSimilarityLoss"),
    ("hypersphere_loss", "HypersphereLoss"),
    ("alignment_loss", "AlignmentLoss"),
    ("uniformity_loss", "UniformityLoss"),
    ("barlow_twins_loss", "BarlowTwinsLoss"),
    ("vicreg_loss", "VICRegLoss"),
    ("dino_loss", "DINOLoss"),
    ("tico_loss", "TiCoLoss"),
    ("koleo_loss", "KoLeoLoss"),
    ("swav_loss", "SwaVLoss"),
    ("swav_queue_update", "SwaVQueue"),
    ("memory_bank_enqueue", "MemoryBank"),
    ("msn_loss", "MSNLoss"),
    ("pmsn_loss", "PMSNLoss"),
    ("pmsn_custom_loss", "PMSNCustomLoss"),
    ("co2_regularizer", "CO2Regularizer"),
    ("co2_memory_bank_regularizer", "CO2MemoryBankRegularizer"),
    ("ibot_patch_loss", "IBOTPatchLoss"),
    ("ibot_plus_plus_patch_loss", "IBOTPlusPlusPatchLoss"),
    ("capi_loss", "CAPILoss"),
    ("wmse_loss", "WMSELoss"),
    ("supcon_loss", "SupConLoss"),
    ("mocov3_loss", "MoCoV3Loss"),
    ("clip_loss", "CLIPLoss"),
    ("siglip_loss", "SigLIPLoss"),
    ("vicregl_loss", "VICRegLLoss"),
    ("detcon_b_loss", "DetConBLoss"),
    ("detcon_s_loss", "DetConSLoss"),
    ("directclr_loss", "DirectCLRLoss"),
    ("directclr_memory_bank_loss", "DirectCLRMemoryBankLoss"),
    ("macl_loss", "MACLLoss"),
    ("mmcr_loss", "MMCRLoss"),
    ("frossl_loss", "FroSSLLoss"),
    ("emp_ssl_loss", "EMPSSLLoss"),
    ("sigreg", "SIGReg"),
    ("lejepa_loss", "LeJEPALoss"),
    ("lewm_loss", "LeWMLoss"),
    ("visreg_loss", "VISRegLoss"),
    ("patch_kernel_alignment_loss", "PatchKernelAlignmentLoss"),
    ("dse_regularizer", "DSERegularizer"),
    ("fovi_simclr_loss", "FoviSimCLRLoss"),
    ("infonce_loss", "InfoNCELoss"),
    ("y_aware_infonce_loss", "YAwareInfoNCELoss"),
    ("byol_regression_loss", "BYOLRegressionLoss"),
    ("simsiam_loss", "SimSiamLoss"),
    ("idmm_loss", "IDMMLoss"),
    ("nnclr_loss", "NNCLRLoss"),
    ("ressl_loss", "ReSSLLoss"),
    ("vibcreg_loss", "VIbCRegLoss"),
)

#: Names a wrapper adds to the pure function's: they must not be hyperparameters.
RESERVED = frozenset({"rngs", "state", "state_dtype", "rng_stream", "loss_state", "name",
                      "parent"})


@dataclasses.dataclass(frozen=True)
class WrapperInfo:
    """What the signature of one pure function says about its wrapper.

    Attributes:
      fn_name: the public function (``sslloss_jax.<fn_name>``).
      class_name: the wrapper class name.
      fn: the function object, bound when the table is read (a wrapper never looks the
        function up again, so a test can replace ``sslloss_jax.<fn_name>`` by a shim).
      arrays: the positional parameters of the call (state and key removed), in order.
      state_param: the state parameter's name, or ``None``.
      state_kind: the state type name (a key of :data:`STATE_KINDS`), or ``None``.
      key_param: the PRNG-key parameter's name, or ``None``.
      hypers: keyword-only hyperparameters -> default (``inspect.Parameter.empty`` if
        required).
      returns_state_only: the function returns the new state (a queue update), no loss.
    """

    fn_name: str
    class_name: str
    fn: Callable[..., Any]
    arrays: tuple[inspect.Parameter, ...]
    state_param: str | None
    state_kind: str | None
    key_param: str | None
    hypers: Mapping[str, Any]
    returns_state_only: bool

    @property
    def stateful(self) -> bool:
        return self.state_param is not None

    @property
    def needs_init_key(self) -> bool:
        """Whether building the initial state draws a PRNG key."""
        return self.state_kind is not None and STATE_KINDS[self.state_kind].needs_key

    @property
    def sizes(self) -> dict[str, Any]:
        """Constructor keywords that size the state (not hyperparameters)."""
        if self.state_kind is None:
            return {}
        kind = STATE_KINDS[self.state_kind]
        return {k: v for k, v in kind.sizes.items() if k not in self.hypers}

    def summary(self) -> str:
        """The first paragraph of the pure function's docstring."""
        doc = inspect.getdoc(self.fn) or ""
        return doc.split("\n\n")[0].replace("\n", " ").strip()

    def docstring(self, flavour: str) -> str:
        """A docstring for the ``flavour`` (``"nnx"`` or ``"linen"``) wrapper class."""
        arrays = ", ".join(p.name for p in self.arrays)
        lines = [
            f"Flax {'NNX' if flavour == 'nnx' else 'Linen'} wrapper of "
            f":func:`sslloss_jax.{self.fn_name}`: {self.summary()}",
            "",
            "The math is the pure function's; see its docstring for the arguments, shapes "
            "and the distributed semantics.",
            "",
            f"Call: ``loss = module({arrays}, **overrides)``. Every hyperparameter below is "
            "an attribute (a constructor keyword with the pure function's name and default) "
            "and may be overridden per call (a traced value never retraces).",
            "",
            "Hyperparameters:",
        ]
        for k, v in self.hypers.items():
            lines.append(f"  {k}: " + ("required" if v is _REQ else f"default ``{v!r}``"))
        if self.stateful:
            assert self.state_kind is not None
            sizes = ", ".join(f"``{k}``" for k in STATE_KINDS[self.state_kind].sizes) or "-"
            where = ("an ``nnx.BatchStat`` variable ``loss_state``" if flavour == "nnx" else
                     "the ``'loss_state'`` collection, variable ``'state'``")
            lines += [
                "",
                f"State: a :class:`sslloss_jax.{self.state_kind}` held in {where}, built "
                f"from the constructor's {sizes}"
                + (" and a PRNG key (``rngs``)" if STATE_KINDS[self.state_kind].needs_key
                   and flavour == "nnx" else
                   " and the ``'params'`` rng" if STATE_KINDS[self.state_kind].needs_key else "")
                + " (or given whole as ``state=``). "
                + ("The call returns the state *before* the update and stores the new one. "
                   if self.returns_state_only else
                   "The call returns the loss and stores the new state. ")
                + "``update=False`` (attribute or call keyword) leaves the state unchanged "
                "(evaluation)"
                + (" and is passed to the pure function's ``update``."
                   if "update" in self.hypers else "."),
            ]
        if self.key_param:
            lines += [
                "",
                "Randomness: each call draws a key from the ``rng_stream`` (default "
                + ("``'loss'``) stream of the module's ``rngs``" if flavour == "nnx" else
                   "``'loss'``, falling back to ``'params'``) rng of ``apply``")
                + "; a ``key=`` call keyword overrides it.",
            ]
        return "\n".join(lines)


def _annotation(p: inspect.Parameter) -> str:
    a = p.annotation
    return a if isinstance(a, str) else getattr(a, "__name__", str(a))


def info(fn_name: str, class_name: str) -> WrapperInfo:
    """Read the signature of ``sslloss_jax.<fn_name>``."""
    fn = getattr(S, fn_name)
    arrays: list[inspect.Parameter] = []
    state_param = state_kind = key_param = None
    hypers: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        ann = _annotation(p).split("|")[0].strip()
        if p.kind is p.KEYWORD_ONLY:
            if p.name in RESERVED:
                raise TypeError(f"{fn_name}: hyperparameter {p.name!r} is reserved by the "
                                "Flax wrappers")
            hypers[p.name] = p.default
        elif p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{fn_name}: *args / **kwargs cannot be wrapped")
        elif ann in STATE_KINDS:
            state_param, state_kind = p.name, ann
        elif p.name == "key" and ann == "jax.Array":
            key_param = p.name
        else:
            arrays.append(p)
    ret = inspect.signature(fn).return_annotation
    returns_state_only = state_param is not None and (ret if isinstance(ret, str) else
                                                      getattr(ret, "__name__", "")) in STATE_KINDS
    return WrapperInfo(fn_name, class_name, fn, tuple(arrays), state_param, state_kind,
                       key_param, hypers, returns_state_only)


def call_signature(wi: WrapperInfo) -> inspect.Signature:
    """``(*arrays, update=None[, key=None], **overrides)`` of a wrapper's ``__call__``."""
    params = [p.replace(annotation=inspect.Parameter.empty,
                        kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in wi.arrays]
    kw = inspect.Parameter.KEYWORD_ONLY
    if wi.stateful:
        params.append(inspect.Parameter("update", kw, default=None))
    if wi.key_param:
        params.append(inspect.Parameter("key", kw, default=None))
    params.append(inspect.Parameter("overrides", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params)


def bind_call(wi: WrapperInfo, args: tuple, kwargs: dict) -> tuple[dict, bool | None, Any,
                                                                    dict]:
    """``(arrays by name, update, key, overrides)`` of a wrapper call; unknown overrides
    raise ``TypeError``."""
    bound = call_signature(wi).bind(*args, **kwargs)
    arrays = {p.name: bound.arguments[p.name] for p in wi.arrays if p.name in bound.arguments}
    overrides = dict(bound.arguments.get("overrides", {}))
    unknown = set(overrides) - set(wi.hypers)
    if unknown:
        raise TypeError(f"{wi.class_name}: unknown hyperparameter(s) {sorted(unknown)}; "
                        f"known: {sorted(wi.hypers)}")
    return arrays, bound.arguments.get("update"), bound.arguments.get("key"), overrides


def call_pure(wi: WrapperInfo, hypers: Mapping[str, Any], arrays: Mapping[str, Any],
              state: Any, key: Any, update: bool) -> tuple[Any, Any]:
    """Call the pure function: ``(output, new_state)`` (``new_state`` is ``None`` for a
    stateless loss; for a queue update, ``output`` is the state before it)."""
    kwargs = dict(arrays)
    hyper = dict(hypers)
    if "update" in hyper:
        hyper["update"] = update
    missing = [k for k, v in hyper.items() if v is _REQ]
    if missing:
        raise TypeError(f"{wi.class_name}: missing required hyperparameter(s) {missing}")
    if wi.state_param is not None:
        kwargs[wi.state_param] = state
    if wi.key_param is not None:
        kwargs[wi.key_param] = key
    out = wi.fn(**kwargs, **hyper)
    if wi.returns_state_only:
        return state, out
    if wi.stateful:
        return out
    return out, None


def init_state(wi: WrapperInfo, sizes: Mapping[str, Any], key: jax.Array | None,
               dtype: Any = jnp.float32) -> Any:
    """The initial state of a stateful wrapper from its constructor's sizes."""
    assert wi.state_kind is not None
    kind = STATE_KINDS[wi.state_kind]
    missing = [k for k, v in sizes.items() if v is _REQ or v is None]
    if missing:
        raise TypeError(f"{wi.class_name}: the state needs the constructor keyword(s) "
                        f"{missing} (or a whole initial state=)")
    if kind.needs_key and key is None:
        raise TypeError(f"{wi.class_name}: building the state needs a PRNG key (rngs)")
    return kind.init(key if kind.needs_key else None, dtype, **sizes)


def infos() -> tuple[WrapperInfo, ...]:
    """Every row of :data:`WRAPPERS` whose function exists in this ``sslloss_jax``."""
    return tuple(info(f, c) for f, c in WRAPPERS if hasattr(S, f))

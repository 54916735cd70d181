"""sslloss_jax: self-supervised-learning losses as pure, distributed-exact JAX functions.

Every loss is a plain function: arrays positional, hyperparameters keyword-only, state
(if any) an explicit ``NamedTuple`` passed in and returned, and ``axis_name`` to run it on
a sharded batch with the value and gradients of the global batch. See the README and
``docs/ARCHITECTURE.md`` for the contract.
"""

from sslloss_jax._clustering import SwaVQueueState as SwaVQueueState
from sslloss_jax._clustering import capi_loss as capi_loss
from sslloss_jax._clustering import init_swav_queue as init_swav_queue
from sslloss_jax._clustering import msn_loss as msn_loss
from sslloss_jax._clustering import pmsn_custom_loss as pmsn_custom_loss
from sslloss_jax._clustering import pmsn_loss as pmsn_loss
from sslloss_jax._clustering import power_law_distribution as power_law_distribution
from sslloss_jax._clustering import sinkhorn as sinkhorn
from sslloss_jax._clustering import swav_loss as swav_loss
from sslloss_jax._clustering import swav_queue_update as swav_queue_update
from sslloss_jax._contrastive import co2_memory_bank_regularizer as co2_memory_bank_regularizer
from sslloss_jax._contrastive import co2_regularizer as co2_regularizer
from sslloss_jax._contrastive import dcl_loss as dcl_loss
from sslloss_jax._contrastive import dclw_loss as dclw_loss
from sslloss_jax._contrastive import negative_mises_fisher_weights as negative_mises_fisher_weights
from sslloss_jax._contrastive import ntxent_loss as ntxent_loss
from sslloss_jax._contrastive import ntxent_memory_bank_loss as ntxent_memory_bank_loss
from sslloss_jax._covariance import TiCoState as TiCoState
from sslloss_jax._covariance import init_tico_state as init_tico_state
from sslloss_jax._covariance import tico_loss as tico_loss
from sslloss_jax._distillation import DINOState as DINOState
from sslloss_jax._distillation import IBOTState as IBOTState
from sslloss_jax._distillation import dino_loss as dino_loss
from sslloss_jax._distillation import dino_teacher_temperature as dino_teacher_temperature
from sslloss_jax._distillation import ibot_patch_loss as ibot_patch_loss
from sslloss_jax._distillation import ibot_plus_plus_patch_loss as ibot_plus_plus_patch_loss
from sslloss_jax._distillation import init_dino_state as init_dino_state
from sslloss_jax._distillation import init_ibot_state as init_ibot_state
from sslloss_jax._memory_bank import MemoryBankState as MemoryBankState
from sslloss_jax._memory_bank import init_memory_bank as init_memory_bank
from sslloss_jax._memory_bank import memory_bank_enqueue as memory_bank_enqueue
from sslloss_jax._redundancy import BarlowTwinsTerms as BarlowTwinsTerms
from sslloss_jax._redundancy import VICRegTerms as VICRegTerms
from sslloss_jax._redundancy import barlow_twins_loss as barlow_twins_loss
from sslloss_jax._redundancy import barlow_twins_terms as barlow_twins_terms
from sslloss_jax._redundancy import vicreg_loss as vicreg_loss
from sslloss_jax._redundancy import vicreg_terms as vicreg_terms
from sslloss_jax._similarity import alignment_loss as alignment_loss
from sslloss_jax._similarity import hypersphere_loss as hypersphere_loss
from sslloss_jax._similarity import koleo_loss as koleo_loss
from sslloss_jax._similarity import negative_cosine_similarity as negative_cosine_similarity
from sslloss_jax._similarity import (
    sym_negative_cosine_similarity_loss as sym_negative_cosine_similarity_loss,
)
from sslloss_jax._similarity import uniformity_loss as uniformity_loss
from sslloss_jax._whitening import WMSEState as WMSEState
from sslloss_jax._whitening import init_wmse_state as init_wmse_state
from sslloss_jax._whitening import whiten as whiten
from sslloss_jax._whitening import wmse_loss as wmse_loss

__version__ = "0.1.0"

__all__ = [
    "BarlowTwinsTerms",
    "DINOState",
    "IBOTState",
    "MemoryBankState",
    "SwaVQueueState",
    "TiCoState",
    "VICRegTerms",
    "WMSEState",
    "alignment_loss",
    "barlow_twins_loss",
    "barlow_twins_terms",
    "capi_loss",
    "co2_memory_bank_regularizer",
    "co2_regularizer",
    "dcl_loss",
    "dclw_loss",
    "dino_loss",
    "dino_teacher_temperature",
    "hypersphere_loss",
    "ibot_patch_loss",
    "ibot_plus_plus_patch_loss",
    "init_ibot_state",
    "init_dino_state",
    "init_memory_bank",
    "init_swav_queue",
    "init_tico_state",
    "init_wmse_state",
    "koleo_loss",
    "memory_bank_enqueue",
    "msn_loss",
    "negative_cosine_similarity",
    "negative_mises_fisher_weights",
    "ntxent_loss",
    "ntxent_memory_bank_loss",
    "pmsn_custom_loss",
    "pmsn_loss",
    "power_law_distribution",
    "sinkhorn",
    "swav_loss",
    "swav_queue_update",
    "sym_negative_cosine_similarity_loss",
    "tico_loss",
    "uniformity_loss",
    "vicreg_loss",
    "vicreg_terms",
    "whiten",
    "wmse_loss",
]

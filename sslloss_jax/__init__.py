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
from sslloss_jax._contrastive import FoviSimCLRTerms as FoviSimCLRTerms
from sslloss_jax._contrastive import co2_memory_bank_regularizer as co2_memory_bank_regularizer
from sslloss_jax._contrastive import co2_regularizer as co2_regularizer
from sslloss_jax._contrastive import dcl_loss as dcl_loss
from sslloss_jax._contrastive import dclw_loss as dclw_loss
from sslloss_jax._contrastive import directclr_loss as directclr_loss
from sslloss_jax._contrastive import directclr_memory_bank_loss as directclr_memory_bank_loss
from sslloss_jax._contrastive import fovi_simclr_loss as fovi_simclr_loss
from sslloss_jax._contrastive import fovi_simclr_terms as fovi_simclr_terms
from sslloss_jax._contrastive import macl_loss as macl_loss
from sslloss_jax._contrastive import mocov3_loss as mocov3_loss
from sslloss_jax._contrastive import negative_mises_fisher_weights as negative_mises_fisher_weights
from sslloss_jax._contrastive import nnclr_loss as nnclr_loss
from sslloss_jax._contrastive import ntxent_loss as ntxent_loss
from sslloss_jax._contrastive import ntxent_memory_bank_loss as ntxent_memory_bank_loss
from sslloss_jax._contrastive import ressl_loss as ressl_loss
from sslloss_jax._contrastive import supcon_loss as supcon_loss
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
from sslloss_jax._patch import dse_regularizer as dse_regularizer
from sslloss_jax._patch import patch_kernel_alignment_loss as patch_kernel_alignment_loss
from sslloss_jax._patch import roi_resample_to_grid as roi_resample_to_grid
from sslloss_jax._redundancy import BarlowTwinsTerms as BarlowTwinsTerms
from sslloss_jax._redundancy import VIbCRegTerms as VIbCRegTerms
from sslloss_jax._redundancy import VICRegTerms as VICRegTerms
from sslloss_jax._redundancy import barlow_twins_loss as barlow_twins_loss
from sslloss_jax._redundancy import barlow_twins_terms as barlow_twins_terms
from sslloss_jax._redundancy import vibcreg_loss as vibcreg_loss
from sslloss_jax._redundancy import vibcreg_terms as vibcreg_terms
from sslloss_jax._redundancy import vicreg_loss as vicreg_loss
from sslloss_jax._redundancy import vicreg_terms as vicreg_terms
from sslloss_jax._region import detcon_b_loss as detcon_b_loss
from sslloss_jax._region import detcon_s_loss as detcon_s_loss
from sslloss_jax._seeds import idmm_loss as idmm_loss
from sslloss_jax._seeds import infonce_loss as infonce_loss
from sslloss_jax._seeds import y_aware_infonce_loss as y_aware_infonce_loss
from sslloss_jax._similarity import alignment_loss as alignment_loss
from sslloss_jax._similarity import byol_regression_loss as byol_regression_loss
from sslloss_jax._similarity import hypersphere_loss as hypersphere_loss
from sslloss_jax._similarity import koleo_loss as koleo_loss
from sslloss_jax._similarity import negative_cosine_similarity as negative_cosine_similarity
from sslloss_jax._similarity import simsiam_loss as simsiam_loss
from sslloss_jax._similarity import (
    sym_negative_cosine_similarity_loss as sym_negative_cosine_similarity_loss,
)
from sslloss_jax._similarity import uniformity_loss as uniformity_loss
from sslloss_jax._slicing import VISRegTerms as VISRegTerms
from sslloss_jax._slicing import lejepa_loss as lejepa_loss
from sslloss_jax._slicing import lewm_loss as lewm_loss
from sslloss_jax._slicing import sigreg as sigreg
from sslloss_jax._slicing import visreg_loss as visreg_loss
from sslloss_jax._slicing import visreg_terms as visreg_terms
from sslloss_jax._spectral import EMPSSLTerms as EMPSSLTerms
from sslloss_jax._spectral import emp_ssl_loss as emp_ssl_loss
from sslloss_jax._spectral import emp_ssl_terms as emp_ssl_terms
from sslloss_jax._spectral import frossl_loss as frossl_loss
from sslloss_jax._spectral import mmcr_loss as mmcr_loss
from sslloss_jax._two_tower import clip_loss as clip_loss
from sslloss_jax._two_tower import siglip_loss as siglip_loss
from sslloss_jax._vicregl import VICRegLTerms as VICRegLTerms
from sslloss_jax._vicregl import vicregl_loss as vicregl_loss
from sslloss_jax._vicregl import vicregl_terms as vicregl_terms
from sslloss_jax._whitening import WMSEState as WMSEState
from sslloss_jax._whitening import init_wmse_state as init_wmse_state
from sslloss_jax._whitening import whiten as whiten
from sslloss_jax._whitening import wmse_loss as wmse_loss

__version__ = "0.1.0"

__all__ = [
    "BarlowTwinsTerms",
    "DINOState",
    "EMPSSLTerms",
    "FoviSimCLRTerms",
    "IBOTState",
    "MemoryBankState",
    "SwaVQueueState",
    "TiCoState",
    "VICRegLTerms",
    "VICRegTerms",
    "VISRegTerms",
    "VIbCRegTerms",
    "WMSEState",
    "alignment_loss",
    "barlow_twins_loss",
    "barlow_twins_terms",
    "byol_regression_loss",
    "capi_loss",
    "clip_loss",
    "co2_memory_bank_regularizer",
    "co2_regularizer",
    "dcl_loss",
    "dclw_loss",
    "detcon_b_loss",
    "detcon_s_loss",
    "dino_loss",
    "dino_teacher_temperature",
    "directclr_loss",
    "directclr_memory_bank_loss",
    "dse_regularizer",
    "emp_ssl_loss",
    "emp_ssl_terms",
    "fovi_simclr_loss",
    "fovi_simclr_terms",
    "frossl_loss",
    "hypersphere_loss",
    "ibot_patch_loss",
    "ibot_plus_plus_patch_loss",
    "idmm_loss",
    "infonce_loss",
    "init_dino_state",
    "init_ibot_state",
    "init_memory_bank",
    "init_swav_queue",
    "init_tico_state",
    "init_wmse_state",
    "koleo_loss",
    "lejepa_loss",
    "lewm_loss",
    "macl_loss",
    "memory_bank_enqueue",
    "mmcr_loss",
    "mocov3_loss",
    "msn_loss",
    "negative_cosine_similarity",
    "negative_mises_fisher_weights",
    "nnclr_loss",
    "ntxent_loss",
    "ntxent_memory_bank_loss",
    "patch_kernel_alignment_loss",
    "pmsn_custom_loss",
    "pmsn_loss",
    "power_law_distribution",
    "ressl_loss",
    "roi_resample_to_grid",
    "siglip_loss",
    "sigreg",
    "simsiam_loss",
    "sinkhorn",
    "supcon_loss",
    "swav_loss",
    "swav_queue_update",
    "sym_negative_cosine_similarity_loss",
    "tico_loss",
    "uniformity_loss",
    "vibcreg_loss",
    "vibcreg_terms",
    "vicreg_loss",
    "vicreg_terms",
    "vicregl_loss",
    "vicregl_terms",
    "visreg_loss",
    "visreg_terms",
    "whiten",
    "wmse_loss",
    "y_aware_infonce_loss",
]

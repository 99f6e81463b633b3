"""The thin core: preprocessing + the class-conditional Gaussian prior + interchangeable backbones, the model, objectives.

Backbone families: the i-ResNet (iresnet/: residual blocks, spectral normalisation, log-det
estimators) and coupling flows (coupling.py). The shared modules (layers, preprocess, priors,
objectives) import neither family. Imports nothing from the other layers of mixflow_core
(data, eval, training, study, cli).
"""

from .config import IRESNET_FIELDS, MLP, Conv, CouplingConv, CouplingMLP, ModelConfig, PriorConfig, from_dict, to_dict
from .coupling import AffineCoupling, FactorOut, InvertibleLinear, build_coupling
from .iresnet import (
    Exact, FixedPointInfo, LipSwish, PowerSeries, ResidualBlock, RussianRoulette, SpectralConv2d, SpectralLinear,
    build_conv_iresnet, build_iresnet, build_mlp_iresnet, fixed_point_inverse, operator_norm, spectral_layers,
)
from .layers import PRECISIONS, ActNorm, Flow, FlowSequence, Squeeze, training_precision
from .model import MixtureFlow, build_model
from .objectives import Hybrid, Likelihood, PushAway, hybrid, likelihood, push_away
from .preprocess import IdentityPreprocess, LogitPreprocess
from .priors import ClassConditionalGaussian, ClassMoments, class_moments, init_means

__all__ = [
    "IRESNET_FIELDS", "MLP", "Conv", "CouplingMLP", "CouplingConv", "ModelConfig", "PriorConfig", "from_dict", "to_dict",
    "AffineCoupling", "FactorOut", "InvertibleLinear", "build_coupling",
    "FixedPointInfo", "ResidualBlock", "build_conv_iresnet", "build_iresnet", "build_mlp_iresnet",
    "fixed_point_inverse",
    "PRECISIONS", "ActNorm", "Flow", "FlowSequence", "Squeeze", "training_precision",
    "LipSwish", "SpectralConv2d", "SpectralLinear", "operator_norm", "spectral_layers",
    "Exact", "PowerSeries", "RussianRoulette",
    "IdentityPreprocess", "LogitPreprocess", "MixtureFlow", "build_model",
    "Hybrid", "Likelihood", "PushAway", "hybrid", "likelihood", "push_away",
    "ClassConditionalGaussian", "ClassMoments", "class_moments", "init_means",
]

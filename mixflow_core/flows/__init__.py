"""The thin core: i-ResNet layers, log-det estimators, the class-conditional Gaussian prior, the model, objectives.

Imports nothing from the other layers of mixflow_core (data, eval, training, study, cli).
"""

from .config import MLP, Conv, ModelConfig, PriorConfig, from_dict, to_dict
from .iresnet import FixedPointInfo, ResidualBlock, build_conv_iresnet, build_iresnet, build_mlp_iresnet, fixed_point_inverse
from .layers import ActNorm, Flow, FlowSequence, Squeeze
from .lipschitz import LipSwish, SpectralConv2d, SpectralLinear, operator_norm, spectral_layers
from .logdet import Exact, PowerSeries, RussianRoulette
from .model import MixtureFlow, build_model
from .objectives import Hybrid, Likelihood, PushAway, hybrid, likelihood, push_away
from .preprocess import IdentityPreprocess, LogitPreprocess
from .priors import ClassConditionalGaussian, ClassMoments, class_moments, init_means

__all__ = [
    "MLP", "Conv", "ModelConfig", "PriorConfig", "from_dict", "to_dict",
    "FixedPointInfo", "ResidualBlock", "build_conv_iresnet", "build_iresnet", "build_mlp_iresnet",
    "fixed_point_inverse",
    "ActNorm", "Flow", "FlowSequence", "Squeeze",
    "LipSwish", "SpectralConv2d", "SpectralLinear", "operator_norm", "spectral_layers",
    "Exact", "PowerSeries", "RussianRoulette",
    "IdentityPreprocess", "LogitPreprocess", "MixtureFlow", "build_model",
    "Hybrid", "Likelihood", "PushAway", "hybrid", "likelihood", "push_away",
    "ClassConditionalGaussian", "ClassMoments", "class_moments", "init_means",
]

"""mixflow: normalizing flows (invertible residual networks) with a class-conditional Gaussian mixture prior."""

from .config import ModelConfig, PriorConfig, from_dict, to_dict
from .iresnet import FixedPointInfo, ResidualBlock, build_conv_iresnet, build_iresnet, build_mlp_iresnet, fixed_point_inverse, make_logdet
from .layers import ActNorm, Flow, FlowSequence, Squeeze
from .lipschitz import LipSwish, SpectralConv2d, SpectralLinear, operator_norm, spectral_layers
from .logdet import Exact, PowerSeries, RussianRoulette
from .model import IdentityPreprocess, LogitPreprocess, MixtureFlow, build_model
from .objectives import hybrid, likelihood, make_objective, push_away
from .priors import ClassConditionalGaussian, init_means

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "PriorConfig", "from_dict", "to_dict",
    "FixedPointInfo", "ResidualBlock", "build_conv_iresnet", "build_iresnet", "build_mlp_iresnet",
    "fixed_point_inverse", "make_logdet",
    "ActNorm", "Flow", "FlowSequence", "Squeeze",
    "LipSwish", "SpectralConv2d", "SpectralLinear", "operator_norm", "spectral_layers",
    "Exact", "PowerSeries", "RussianRoulette",
    "IdentityPreprocess", "LogitPreprocess", "MixtureFlow", "build_model",
    "hybrid", "likelihood", "make_objective", "push_away",
    "ClassConditionalGaussian", "init_means",
]

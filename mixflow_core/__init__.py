"""mixflow: normalizing flows (invertible residual networks) with a class-conditional Gaussian mixture prior."""

from .flows import (
    MLP, ActNorm, ClassConditionalGaussian, Conv, Exact, FixedPointInfo, Flow, FlowSequence, Hybrid, IdentityPreprocess,
    Likelihood, LipSwish, LogitPreprocess, MixtureFlow, ModelConfig, PowerSeries, PriorConfig, PushAway, ResidualBlock,
    RussianRoulette, SpectralConv2d, SpectralLinear, Squeeze, build_conv_iresnet, build_iresnet, build_mlp_iresnet,
    build_model, fixed_point_inverse, from_dict, hybrid, init_means, likelihood, operator_norm, push_away, spectral_layers,
    to_dict,
)

from .version import __version__  # noqa: F401

__all__ = [
    "MLP", "Conv", "ModelConfig", "PriorConfig", "from_dict", "to_dict",
    "FixedPointInfo", "ResidualBlock", "build_conv_iresnet", "build_iresnet", "build_mlp_iresnet",
    "fixed_point_inverse",
    "ActNorm", "Flow", "FlowSequence", "Squeeze",
    "LipSwish", "SpectralConv2d", "SpectralLinear", "operator_norm", "spectral_layers",
    "Exact", "PowerSeries", "RussianRoulette",
    "IdentityPreprocess", "LogitPreprocess", "MixtureFlow", "build_model",
    "Hybrid", "Likelihood", "PushAway", "hybrid", "likelihood", "push_away",
    "ClassConditionalGaussian", "init_means",
]

"""The i-ResNet family (Behrmann et al. 2019; Chen et al. 2019), the original study's backbone, and its machinery.

- arch: the architecture values `MLP` (vectors) and `Conv` (images);
- network: residual blocks x + g(x), the fixed-point inverse, the builders;
- lipschitz: spectrally normalised layers (Lip(g) <= coeff < 1), the batched Krylov refresh;
- logdet: estimators of log|det(I + J_g)| (power series, Russian roulette, exact).

Nothing outside this package needs these names except the configuration (flows/config.py) and
the model builder (flows/model.py); training and evaluation reach the family through the
backbone hooks of layers.Flow.
"""

from .arch import MLP, Conv
from .lipschitz import LipSwish, SpectralConv2d, SpectralLinear, operator_norm, spectral_layers
from .logdet import Estimator, Exact, LogDetEstimator, PowerSeries, RussianRoulette
from .network import (
    FixedPointInfo, IResNet, ResidualBlock, build_conv_iresnet, build_iresnet, build_mlp_iresnet, fixed_point_inverse,
)

__all__ = [
    "MLP", "Conv",
    "LipSwish", "SpectralConv2d", "SpectralLinear", "operator_norm", "spectral_layers",
    "Estimator", "Exact", "LogDetEstimator", "PowerSeries", "RussianRoulette",
    "FixedPointInfo", "IResNet", "ResidualBlock", "build_conv_iresnet", "build_iresnet", "build_mlp_iresnet",
    "fixed_point_inverse",
]

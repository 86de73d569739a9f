"""Neural-network pieces shared by every model family."""

from ode_lm.nn.block import MLP, Attention, Block, BlockGates, DropoutMasks
from ode_lm.nn.cache import KVCache
from ode_lm.nn.hypernetwork import HyperNetwork
from ode_lm.nn.layers import LayerNorm, Linear
from ode_lm.nn.modulation import Modulation
from ode_lm.nn.ssm import SelectiveSSM
from ode_lm.nn.time_embedding import sinusoidal

__all__ = ["MLP", "Attention", "Block", "BlockGates", "DropoutMasks", "HyperNetwork", "KVCache", "LayerNorm",
           "Linear", "Modulation", "SelectiveSSM", "sinusoidal"]
